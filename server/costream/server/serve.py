"""Running the server: uvicorn, its listening socket, graceful shutdown, worker processes.

``costream serve`` ends here. One process runs :func:`app.create_app` under a uvicorn
server that closes viewers with 1001 before anything else on SIGTERM; ``--workers N``
runs N such processes on one socket (they share nothing but Redis). Log records are
scrubbed of the settings' secrets before any handler sees them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
from typing import Any

from starlette.applications import Starlette

from costream.config import Settings
from costream.server.app import create_app
from costream.server.deps import Services

_SETTINGS_ENV = "COSTREAM_SETTINGS_JSON"


def app_from_env() -> Starlette:
    """Factory for ``--workers``: each worker process reads the parent's settings."""
    raw = os.environ.get(_SETTINGS_ENV)
    if raw is None:
        return create_app(Settings.from_env())
    values = json.loads(raw)
    values["allowed_origins"] = tuple(values["allowed_origins"])
    return create_app(Settings(**values))


def serve(settings: Settings, workers: int = 1) -> None:
    """Run the server (blocking). ``workers > 1`` needs Redis: processes share nothing else."""
    import uvicorn

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    redact_secrets_in_logs(settings.secrets())
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "ws_max_size": settings.max_frame_bytes,
        "ws_ping_interval": 20.0,
        # A viewer far behind answers pings only after its backlog: its lateness is the
        # slow-viewer policy's business (fed from the log; 4008 after send_timeout_s), not
        # a dead connection's (1011).
        "ws_ping_timeout": 60.0,
        # Compression would run once per viewer on the same bytes (a fan-out encodes once)
        # and keep a deflate context of tens of kilobytes per connection.
        "ws_per_message_deflate": False,
        "timeout_graceful_shutdown": int(settings.shutdown_grace_s) + 5,
        "log_level": "info",
    }
    if workers > 1:
        if not settings.redis_url:
            raise SystemExit("--workers needs Redis (--redis-url): processes share nothing else")
        from uvicorn.supervisors import Multiprocess

        # The settings reach the worker processes through their environment, secrets too:
        # the same trust boundary as the LLM_API_KEY variable they came from.
        os.environ[_SETTINGS_ENV] = json.dumps(dataclasses.asdict(settings))
        config = uvicorn.Config(
            "costream.server.serve:app_from_env", factory=True, workers=workers, **options
        )
        Multiprocess(config, sockets=[_listen(config, settings)]).run()
    else:
        config = uvicorn.Config(create_app(settings), **options)
        _graceful_server(config).run(sockets=[_listen(config, settings)])


def redact_secrets_in_logs(secrets: list[str]) -> None:
    """A last line of defence: a log record that would print a secret prints ``***``.

    Code never logs secrets on purpose; this catches a library that echoes one (an
    upstream error body that repeats the API key, a URL with its password). It wraps the
    record factory, so it covers every logger and handler of the process, uvicorn's too.
    """
    if not secrets:
        return
    make_record = logging.getLogRecordFactory()

    def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        message = record.getMessage()
        if any(secret in message for secret in secrets):
            for secret in secrets:
                message = message.replace(secret, "***")
            record.msg, record.args = message, None
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and any(secret in str(error) for secret in secrets):
            record.exc_info = None  # the traceback would repeat it
            record.msg = (
                f"{record.msg} ({type(error).__name__}: details withheld, they held a secret)"
            )
        return record

    logging.setLogRecordFactory(redacting_factory)


def _listen(config: Any, settings: Settings) -> socket.socket:
    """The listening socket, with a bounded send buffer that accepted sockets inherit.

    The kernel would otherwise grow a stalled viewer's send buffer to megabytes (4 MiB
    on Linux): memory per viewer that no queue of ours accounts for, and frames the
    slow-viewer policy never sees backing up. Bounded, a stalled viewer's writer blocks
    soon, its queue overflows, and it is fed from the log when it reads again.
    """
    sock: socket.socket = config.bind_socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.send_buffer_bytes)
    return sock


def _graceful_server(config: Any) -> Any:
    import uvicorn

    services: Services = config.app.state.services

    class GracefulServer(uvicorn.Server):
        """Closes viewers with 1001 (go elsewhere) before uvicorn closes the rest with 1012."""

        async def shutdown(self, sockets: list[Any] | None = None) -> None:
            for server in self.servers:
                server.close()  # stop accepting first, so clients reconnect elsewhere
            await asyncio.gather(
                *(session.close_going_away() for session in services.sessions.all())
            )
            await super().shutdown(sockets)

    return GracefulServer(config)
