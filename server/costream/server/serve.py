"""Running the server: uvicorn, its listening socket, graceful shutdown, worker processes.

``costream serve`` ends here. One process runs :func:`app.create_app` under a uvicorn
server that closes viewers with 1001 before anything else on SIGTERM; ``--workers N``
runs N such processes on one socket, and each worker is the same server: its logging
configured, its log records scrubbed of the settings' secrets before any handler sees
them, its viewers closed with 1001 on SIGTERM, and its ``/metrics`` answering for all the
workers (added up through a directory the parent makes, see ``metrics.SharedMetrics``).
They share nothing else but Redis. Every connection's request headers and body must
arrive in time (``timeouts.TimedH11Protocol``); with ``--metrics-listen``, ``/metrics``
has a listener of its own (``metrics_listener``): in the single process's loop, or in
the parent of the workers, adding up what they write.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette

from costream.config import Settings
from costream.metrics import SharedMetrics, written_total
from costream.server import metrics_listener
from costream.server.app import create_app
from costream.server.deps import Services
from costream.server.metrics_listener import MetricsListener, serve_in_thread
from costream.server.timeouts import TimedH11Protocol

if TYPE_CHECKING:
    import uvicorn

_SETTINGS_ENV = "COSTREAM_SETTINGS_JSON"
_METRICS_DIR_ENV = "COSTREAM_WORKER_METRICS_DIR"


def app_from_env() -> Starlette:
    """Factory for ``--workers``: each worker process reads the parent's settings and
    becomes the same server as a single process (logging, redaction, 1001 on SIGTERM),
    with ``/metrics`` for all the workers."""
    raw = os.environ.get(_SETTINGS_ENV)
    if raw is None:
        settings = Settings.from_env()
    else:
        values = json.loads(raw)
        values["allowed_origins"] = tuple(values["allowed_origins"])
        settings = Settings(**values)
    # A worker is a fresh interpreter (uvicorn spawns it): the parent's logging set-up
    # and record factory are not inherited.
    configure_logging(settings)
    TimedH11Protocol.configure(settings.header_timeout_s, settings.body_timeout_s)
    app = create_app(settings)
    services: Services = app.state.services
    services.on_started.append(lambda: _close_viewers_first_on_signals(None, services))
    shared_dir = os.environ.get(_METRICS_DIR_ENV)
    if shared_dir:
        shared = services.metrics.shared = SharedMetrics(services.metrics, Path(shared_dir))
        services.on_started.append(lambda: _keep_writing(shared))
    return app


def configure_logging(settings: Settings) -> None:
    """costream's INFO lines on stderr, scrubbed of the settings' secrets."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    redact_secrets_in_logs(settings.secrets())


def _keep_writing(shared: SharedMetrics) -> None:
    # Started from the app's start-up, in the server's loop; cancelled (and so written
    # one last time) when that loop ends.
    _background.add(asyncio.get_running_loop().create_task(shared.run()))


_background: set[asyncio.Task[Any]] = set()  # tasks referenced until the process ends


def serve(settings: Settings, workers: int = 1) -> None:
    """Run the server (blocking). ``workers > 1`` needs Redis: processes share nothing else."""
    import uvicorn

    configure_logging(settings)
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
        # The loop asyncio.run makes (the single process runs uvicorn.Server.serve in it).
        "loop": "asyncio",
        # uvicorn's h11 protocol with header and body read timeouts (timeouts.py).
        "http": TimedH11Protocol,
    }
    TimedH11Protocol.configure(settings.header_timeout_s, settings.body_timeout_s)
    metrics_socket = _bind_metrics(settings)
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
        with tempfile.TemporaryDirectory(prefix="costream-metrics-") as metrics_dir:
            os.environ[_METRICS_DIR_ENV] = metrics_dir
            stop_metrics = None
            if metrics_socket is not None:
                # The parent answers for all the workers, from what they write.
                listener = MetricsListener(
                    lambda: written_total(Path(metrics_dir)), settings.header_timeout_s
                )
                stop_metrics = serve_in_thread(listener, metrics_socket)
            try:
                Multiprocess(config, sockets=[_listen(config, settings)]).run()
            finally:
                if stop_metrics is not None:
                    stop_metrics()
    else:
        app = create_app(settings)
        config = uvicorn.Config(app, **options)
        server = uvicorn.Server(config)
        services: Services = app.state.services
        if metrics_socket is not None:
            listener = MetricsListener(services.metrics.render, settings.header_timeout_s)
            services.on_started.append(lambda: _keep_serving(listener, metrics_socket))
        asyncio.run(_serve_gracefully(server, [_listen(config, settings)], services))


def _bind_metrics(settings: Settings) -> socket.socket | None:
    """The ``--metrics-listen`` socket, bound before anything starts (a wrong address
    stops the start with a clear message); None without the option."""
    if settings.metrics_listen is None:
        return None
    try:
        return metrics_listener.bind(settings.metrics_listen)
    except ValueError as error:
        raise SystemExit(f"costream serve: {error}") from None
    except OSError as error:
        raise SystemExit(
            f"costream serve: cannot listen on {settings.metrics_listen} for /metrics: {error}"
        ) from None


def _keep_serving(listener: MetricsListener, sock: socket.socket) -> None:
    # In the server's loop, from the app's start-up; cancelled when that loop ends.
    _background.add(asyncio.get_running_loop().create_task(listener.serve(sock)))


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


async def _serve_gracefully(
    server: uvicorn.Server, sockets: list[socket.socket], services: Services
) -> None:
    """``server.serve``, where SIGTERM and SIGINT first close viewers with 1001 (go
    elsewhere), then reach uvicorn, which closes the remaining connections with 1012.

    uvicorn installs its signal handlers as ``serve`` begins and puts the previous ones
    back (and re-raises the signal) as it ends. Ours go on top of its handlers from the
    app's start-up (which uvicorn runs after installing its own, and before it answers
    any request), and hand each signal on to the handler they replaced.
    """
    services.on_started.append(lambda: _close_viewers_first_on_signals(server, services))
    await server.serve(sockets)


def _close_viewers_first_on_signals(server: uvicorn.Server | None, services: Services) -> None:
    """On SIGTERM or SIGINT: stop accepting (``server``; a worker, which has no hold of its
    uvicorn server, shares the listening socket with the others), close every viewer with
    1001, then hand the signal on to uvicorn."""
    loop = asyncio.get_running_loop()
    leaving: set[asyncio.Task[None]] = set()

    async def leave(number: int, pass_on: Callable[[int, FrameType | None], Any]) -> None:
        try:
            for listener in server.servers if server is not None else ():
                listener.close()  # stop accepting first, so clients reconnect elsewhere
            sessions = services.sessions.all()
            await asyncio.gather(*(session.close_going_away() for session in sessions))
        finally:
            pass_on(number, None)

    def on_signal(number: int, pass_on: Callable[[int, FrameType | None], Any]) -> None:
        if leaving:  # a second signal: uvicorn's call (a second Ctrl+C forces the exit)
            pass_on(number, None)
            return
        task = loop.create_task(leave(number, pass_on))
        leaving.add(task)

    for number in (signal.SIGTERM, signal.SIGINT):
        uvicorn_handler = signal.getsignal(number)
        if callable(uvicorn_handler):
            loop.add_signal_handler(number, on_signal, number, uvicorn_handler)
