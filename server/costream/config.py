"""Settings from flags and the environment. Secrets are kept out of ``repr``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

DEMO_MODEL = "costream/demo"
DEFAULT_DATA_DIR = ".costream"  # of the working directory: where `costream serve` keeps data


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def _env_list(name: str) -> tuple[str, ...]:
    """A comma-separated list (spaces around items dropped)."""
    return tuple(item.strip() for item in os.environ.get(name, "").split(",") if item.strip())


@dataclass(frozen=True)
class Settings:
    """Everything a server process is configured with."""

    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str | None = field(default=None, repr=False)  # may carry a password
    # Without Redis: the SQLite data directory, or None for the memory broker (nothing is
    # kept). ``from_env`` (so ``costream serve``) defaults to DEFAULT_DATA_DIR.
    data_dir: str | None = None
    flush_ms: int = 30  # delta merging window; 0 turns merging off

    # The LLM (the OpenHands SDK examples' variable names).
    model: str = DEMO_MODEL
    api_key: str | None = field(default=None, repr=False)
    base_url: str | None = None
    demo_delay_ms: float = 25.0  # the demo model's pace per token; 0 in tests

    # Access.
    create_key: str | None = field(default=None, repr=False)  # COSTREAM_CREATE_KEY
    # Empty: the server's own origin only, and loopback origins when it listens on loopback.
    allowed_origins: tuple[str, ...] = ()
    # Host header values accepted when not listening on loopback (empty: any); a name
    # outside the list is refused 421, which stops DNS rebinding.
    allowed_hosts: tuple[str, ...] = ()
    # The models a creator may name (COSTREAM_ALLOWED_MODELS); empty: the server's own.
    allowed_models: tuple[str, ...] = ()

    # Limits.
    max_message_chars: int = 100_000
    max_frame_bytes: int = 1024 * 1024
    max_body_bytes: int = 1024 * 1024
    max_viewers_per_conversation: int = 1000  # WebSockets and SSE streams
    max_runs: int = 20  # runs at once on one process
    create_rate: float = 60.0  # conversations per minute per client over HTTP; 0: no limit
    message_rate: float = 120.0  # messages per minute per client over HTTP; 0: no limit
    viewer_queue_frames: int = 1024
    # Replies (pong, accepted, error) waiting for one client that does not read: past
    # either bound the session is closed 4008.
    max_replies: int = 64
    max_reply_bytes: int = 64 * 1024
    send_buffer_bytes: int = 128 * 1024  # kernel send buffer per socket (SO_SNDBUF)
    log_retain: int = 10_000  # events of finished runs kept per conversation...
    log_retain_bytes: int = 8 * 1024 * 1024  # ...and at most these bytes of them
    # One run's logged events: past this the run is ended (runner) or refused 413 (ingest).
    max_run_bytes: int = 32 * 1024 * 1024
    # One logged event, encoded; below every client's frame limit (1 MiB). Longer deltas
    # are split into several events; any other event this large is refused.
    max_event_bytes: int = 256 * 1024
    recent_frames_bytes: int = 4 * 1024 * 1024  # the hub's per-conversation frame cache
    max_history_bytes: int = 1024 * 1024  # the conversation history sent to the LLM
    # A conversation nobody wrote to or watched for this long is deleted; 0: never.
    conversation_ttl_s: float = 7 * 24 * 3600.0
    max_steps: int = 10
    max_tool_calls_per_step: int = 16
    max_file_bytes: int = 256 * 1024
    max_files: int = 100

    # Timing.
    hello_timeout_s: float = 10.0
    heartbeat_s: float = 15.0
    send_timeout_s: float = 30.0  # a socket that takes no data this long is closed 4008
    lease_ttl_ms: int = 10_000
    presence_ttl_ms: int = 15_000
    llm_timeout_s: float = 60.0  # no chunk for this long: the call timed out
    llm_retries: int = 2
    retry_backoff_s: float = 0.5
    shutdown_grace_s: float = 10.0
    header_timeout_s: float = 10.0  # a request's headers must arrive within this
    body_timeout_s: float = 30.0  # and its body within this

    # /metrics on its own listener ("host:port"); None: on the main port.
    metrics_listen: str | None = None

    @property
    def is_demo(self) -> bool:
        return self.model == DEMO_MODEL

    @property
    def models(self) -> tuple[str, ...]:
        """The models a conversation may use: ``allowed_models``, else the server's own."""
        return self.allowed_models or (self.model,)

    def secrets(self) -> list[str]:
        """The values that must never reach a log line: API key, create key, Redis password."""
        values = [self.api_key, self.create_key]
        if self.redis_url:
            values.append(urlsplit(self.redis_url).password)
        return [value for value in values if value and len(value) >= 4]

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Read ``REDIS_URL``, ``LLM_MODEL``, ``LLM_API_KEY``, ``LLM_BASE_URL``,
        ``COSTREAM_*``; keyword arguments (from flags) win. With no API key and no model
        the demo model is used; with no ``COSTREAM_DATA_DIR``, data lives in
        ``./.costream/``."""
        api_key = os.environ.get("LLM_API_KEY") or None
        model = os.environ.get("LLM_MODEL") or (None if api_key else DEMO_MODEL)
        origins = os.environ.get("COSTREAM_ALLOWED_ORIGINS", "")
        settings = cls(
            host=os.environ.get("COSTREAM_HOST", cls.host),
            port=_env_int("COSTREAM_PORT", cls.port),
            redis_url=os.environ.get("REDIS_URL") or None,
            data_dir=os.environ.get("COSTREAM_DATA_DIR") or DEFAULT_DATA_DIR,
            flush_ms=_env_int("COSTREAM_FLUSH_MS", cls.flush_ms),
            model=model or DEMO_MODEL,
            api_key=api_key,
            base_url=os.environ.get("LLM_BASE_URL") or None,
            demo_delay_ms=_env_float("COSTREAM_DEMO_DELAY_MS", cls.demo_delay_ms),
            create_key=os.environ.get("COSTREAM_CREATE_KEY") or None,
            allowed_origins=tuple(o.strip() for o in origins.split(",") if o.strip()),
            lease_ttl_ms=_env_int("COSTREAM_LEASE_TTL_MS", cls.lease_ttl_ms),
            presence_ttl_ms=_env_int("COSTREAM_PRESENCE_TTL_MS", cls.presence_ttl_ms),
            hello_timeout_s=_env_float("COSTREAM_HELLO_TIMEOUT_S", cls.hello_timeout_s),
            send_timeout_s=_env_float("COSTREAM_SEND_TIMEOUT_S", cls.send_timeout_s),
            max_message_chars=_env_int("COSTREAM_MAX_MESSAGE_CHARS", cls.max_message_chars),
            max_viewers_per_conversation=_env_int(
                "COSTREAM_MAX_VIEWERS", cls.max_viewers_per_conversation
            ),
            heartbeat_s=_env_float("COSTREAM_HEARTBEAT_S", cls.heartbeat_s),
            llm_timeout_s=_env_float("COSTREAM_LLM_TIMEOUT_S", cls.llm_timeout_s),
            retry_backoff_s=_env_float("COSTREAM_RETRY_BACKOFF_S", cls.retry_backoff_s),
            viewer_queue_frames=_env_int("COSTREAM_VIEWER_QUEUE", cls.viewer_queue_frames),
            max_replies=_env_int("COSTREAM_MAX_REPLIES", cls.max_replies),
            max_reply_bytes=_env_int("COSTREAM_MAX_REPLY_BYTES", cls.max_reply_bytes),
            allowed_hosts=_env_list("COSTREAM_ALLOWED_HOSTS"),
            allowed_models=_env_list("COSTREAM_ALLOWED_MODELS"),
            max_runs=_env_int("COSTREAM_MAX_RUNS", cls.max_runs),
            create_rate=_env_float("COSTREAM_CREATE_RATE", cls.create_rate),
            message_rate=_env_float("COSTREAM_MESSAGE_RATE", cls.message_rate),
            send_buffer_bytes=_env_int("COSTREAM_SEND_BUFFER_BYTES", cls.send_buffer_bytes),
            log_retain=_env_int("COSTREAM_LOG_RETAIN", cls.log_retain),
            log_retain_bytes=_env_int("COSTREAM_LOG_RETAIN_BYTES", cls.log_retain_bytes),
            max_run_bytes=_env_int("COSTREAM_MAX_RUN_BYTES", cls.max_run_bytes),
            max_event_bytes=_env_int("COSTREAM_MAX_EVENT_BYTES", cls.max_event_bytes),
            recent_frames_bytes=_env_int("COSTREAM_RECENT_FRAMES_BYTES", cls.recent_frames_bytes),
            max_history_bytes=_env_int("COSTREAM_MAX_HISTORY_BYTES", cls.max_history_bytes),
            conversation_ttl_s=_env_float("COSTREAM_CONVERSATION_TTL_S", cls.conversation_ttl_s),
            header_timeout_s=_env_float("COSTREAM_HEADER_TIMEOUT_S", cls.header_timeout_s),
            body_timeout_s=_env_float("COSTREAM_BODY_TIMEOUT_S", cls.body_timeout_s),
            metrics_listen=os.environ.get("COSTREAM_METRICS_LISTEN") or None,
            llm_retries=_env_int("COSTREAM_LLM_RETRIES", cls.llm_retries),
            max_steps=_env_int("COSTREAM_MAX_STEPS", cls.max_steps),
            max_tool_calls_per_step=_env_int(
                "COSTREAM_MAX_TOOL_CALLS", cls.max_tool_calls_per_step
            ),
            shutdown_grace_s=_env_float("COSTREAM_SHUTDOWN_GRACE_S", cls.shutdown_grace_s),
        )
        known = {f.name for f in fields(cls)}
        return replace(
            settings, **{k: v for k, v in overrides.items() if k in known and v is not None}
        )
