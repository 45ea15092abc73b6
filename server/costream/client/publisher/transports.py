"""Where a :class:`~costream.publisher.TokenPublisher`'s runs go: the two transports.

- :class:`RedisTransport`: straight into the servers' Redis, with the broker and store the
  servers use (``redis_url`` + ``conversation_id``).
- :class:`HTTPTransport`: through a server's ingest endpoints (``ingest.py``) with the
  conversation's write token (``url`` + ``token``).

Both send every batch with the head they expect before it (the start's, then each
append's answer), so a batch tried again after a lost answer is stored once (the broker's
``expected_head``); when the log's head is neither (409 ``head_mismatch``, the broker's
``AppendConflict``) they read the head again and send the batch there, once. Both are
blocking and called from the publisher's thread only. A failed call raises
:class:`PublishError`, whose message is safe to log (no token, no password) and which
says whether trying again may help (``transient``: the server or Redis is away, or
another run still holds the lease) or the run is over (``over``: it ended, or was reaped
while the publisher could not reach it). The Redis transport starts, ends and reaps runs
with :mod:`costream.lifecycle`, as the runner and ``ingest.py`` do.

Neither Starlette nor LiteLLM is imported here, and the Redis broker only by the Redis
transport, when it is made.
"""

from __future__ import annotations

import abc
import asyncio
import http.client
import json
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import msgspec

from costream import lifecycle, protocol
from costream.broker import AppendConflict, RunLease
from costream.errors import LeaseLost, NotFound, RunActive, RunTooLarge, StorageUnavailable
from costream.lifecycle import RunEnd, open_run
from costream.protocol import Event
from costream.sizes import frame_size, split_deltas
from costream.store import CONVERSATION_ID, Store

T = TypeVar("T")


def _same_events(stored: list[Event], bodies: list[bytes]) -> bool:
    """Whether the log's ``stored`` events are ``bodies`` (seq and timestamp aside)."""
    if len(stored) != len(bodies):
        return False
    for event, body in zip(stored, bodies, strict=True):
        sent = protocol.event_decoder.decode(body)
        unset: dict[str, Any] = {"seq": msgspec.UNSET, "timestamp": 0}
        if msgspec.structs.replace(event, **unset) != msgspec.structs.replace(sent, **unset):
            return False
    return True


DEFAULT_LEASE_TTL_MS: Final = 10_000  # Settings.lease_ttl_ms
MAX_EVENT_BYTES: Final = 256 * 1024  # Settings.max_event_bytes: one logged event at most
REDIS_SCHEMES: Final = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
_MAX_REQUEST_BYTES: Final = 512 * 1024  # one HTTP request; the server takes up to 1 MiB


# ---- the transports (called from the publisher's thread only) -------------------------


class PublishError(Exception):
    """A transport call failed; ``message`` is safe to log (no token, no password).
    ``transient``: the same call may succeed later; ``over``: the run it was for has
    ended (or was reaped), so nothing more can go into it."""

    def __init__(self, message: str, transient: bool, *, over: bool = False) -> None:
        super().__init__(message)
        self.message, self.transient, self.over = message, transient, over


class _Conflict(PublishError):
    """The log's head is neither the one the batch expected nor the one after it."""

    def __init__(self, message: str, head: int | None = None) -> None:
        super().__init__(message, transient=False)
        self.head = head


class Transport(abc.ABC):
    """Where a publisher's runs go. Blocking; one thread calls it."""

    lease_ttl_ms: int = DEFAULT_LEASE_TTL_MS

    @abc.abstractmethod
    def start_run(self, content: str, model: str, exclusive: bool) -> str:
        """Start a run (RUN_STARTED is in the log); its run id. ``model`` (when not
        empty) becomes the model shown to viewers; ``exclusive`` marks the conversation
        as owned by an external producer (no runs start on the servers)."""

    @abc.abstractmethod
    def append(self, bodies: list[bytes]) -> bool:
        """Append events of the run; whether a cancel was requested (when known). Called
        again with the same ``bodies`` after a failure, it stores each event once."""

    @abc.abstractmethod
    def stored(self, bodies: list[bytes]) -> int | None:
        """After :meth:`append` of ``bodies`` found the run over: how many of them the
        log holds (0 or all; None when that cannot be told)."""

    @abc.abstractmethod
    def renew(self) -> bool:
        """Keep the lease alive; whether a cancel was requested."""

    @abc.abstractmethod
    def finish(self, end: RunEnd, closing: list[Event]) -> None:
        """Close what is open and end the run."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the transport's connections."""


class RedisTransport(Transport):
    """Straight into the servers' Redis, with the broker and store the servers use."""

    def __init__(self, redis_url: str, conversation_id: str, lease_ttl_ms: int) -> None:
        from costream.broker.redis.broker import RedisBroker  # only this transport needs redis

        self.lease_ttl_ms = lease_ttl_ms
        self._conversation_id = conversation_id
        self._loop = asyncio.new_event_loop()  # this thread's own: the broker's calls run here
        self._broker = RedisBroker(redis_url)
        self._store = Store(self._broker)
        self._lease: RunLease | None = None
        self._head = 0  # the log's head after our last stored batch

    def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        async def call() -> T:
            return await make()

        try:
            return self._loop.run_until_complete(call())
        except StorageUnavailable as error:  # its message is scrubbed of the password
            raise PublishError(str(error), transient=True) from None
        except AppendConflict as conflict:  # a LeaseLost: caught first
            raise _Conflict("the log's head is not the expected one", conflict.head) from None
        except LeaseLost:
            message = "the run is over (its lease expired or was taken over)"
            raise PublishError(message, False, over=True) from None
        except RunTooLarge:
            raise PublishError("the run passed the servers' max_run_bytes", False) from None
        except NotFound:
            raise PublishError("no such conversation in this Redis", False) from None
        except RunActive:  # maybe an interrupted run of ours, until it is reaped
            raise PublishError("the conversation already has an active run", True) from None

    async def _reap(self, conversation_id: str) -> None:
        await lifecycle.reap(self._broker, self._store, conversation_id, self.lease_ttl_ms)

    async def _open(self, content: str, model: str, exclusive: bool) -> RunLease:
        conversation_id, store = self._conversation_id, self._store
        if exclusive:
            await store.mark_external(conversation_id)
        lease = await open_run(
            self._broker,
            store,
            conversation_id,
            content,
            self.lease_ttl_ms,
            self._reap,
            external=True,
        )
        if model:
            await store.set_model(conversation_id, model)
        active = await self._broker.active_run(conversation_id)
        if active is None or active.fence != lease.fence:
            raise LeaseLost(conversation_id)
        self._head = active.start_seq  # nobody else appends while we hold the lease
        return lease

    def start_run(self, content: str, model: str, exclusive: bool) -> str:
        self._lease = self._call(lambda: self._open(content, model, exclusive))
        return self._lease.run_id

    def _current(self) -> RunLease:
        if self._lease is None:
            raise PublishError("no run", transient=False)
        return self._lease

    def append(self, bodies: list[bytes]) -> bool:
        # As the server's ingest does: a delta too long for one event is several.
        if any(frame_size(body) > MAX_EVENT_BYTES for body in bodies):
            events = [protocol.event_decoder.decode(body) for body in bodies]
            bodies = [protocol.encode(e) for e in split_deltas(events, MAX_EVENT_BYTES)]
        lease, expected = self._current(), self._head
        # A retry after a lost answer sends the same expected head: stored once.
        try:
            self._head = self._call(lambda: self._broker.append(lease, bodies, expected))
        except _Conflict as conflict:  # the head moved under us: read it, send there once
            if conflict.head is None:
                raise
            head = conflict.head
            self._head = self._call(lambda: self._broker.append(lease, bodies, head))
        return False

    def stored(self, bodies: list[bytes]) -> int | None:
        conversation_id, head = self._conversation_id, self._head
        frames = self._call(lambda: self._broker.read_log(conversation_id, head, len(bodies)))
        events = [protocol.event_decoder.decode(frame) for frame in frames]
        return len(bodies) if _same_events(events, bodies) else 0

    def renew(self) -> bool:
        lease = self._current()
        return self._call(lambda: self._broker.renew_lease(lease, self.lease_ttl_ms))

    async def _finish(self, lease: RunLease, end: RunEnd, closing: list[Event]) -> None:
        if end.model:  # before viewers see the end
            await self._store.set_model(self._conversation_id, end.model)
        await lifecycle.end_run(self._broker, self._store, lease, end, closing)

    def finish(self, end: RunEnd, closing: list[Event]) -> None:
        lease = self._current()
        try:
            self._call(lambda: self._finish(lease, end, closing))
        except PublishError as error:
            if not error.transient:  # over, or refused: this lease is done with
                self._lease = None
            raise
        self._lease = None

    def close(self) -> None:
        try:
            self._loop.run_until_complete(self._broker.close())
        finally:
            self._loop.close()


def _request_batches(bodies: list[bytes]) -> list[list[bytes]]:
    """Encoded events in groups of at most ``_MAX_REQUEST_BYTES``; ``[[]]`` for none."""
    batches: list[list[bytes]] = [[]]
    size = 2
    for body in bodies:
        if batches[-1] and size + len(body) + 1 > _MAX_REQUEST_BYTES:
            batches.append([])
            size = 2
        batches[-1].append(body)
        size += len(body) + 1
    return batches


class HTTPTransport(Transport):
    """Through a server's ingest endpoints with the conversation's write token."""

    def __init__(self, url: str, token: str, timeout_s: float) -> None:
        parts = urlsplit(url)
        prefix, _, conversation_id = parts.path.rstrip("/").rpartition("/")
        for known in ("/c", "/api/conversations"):
            if prefix.endswith(known):
                prefix = prefix[: -len(known)]
                break
        else:
            raise ValueError("url must look like http://host:port/c/<conversation id>")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be an http:// or https:// URL")
        if not CONVERSATION_ID.match(conversation_id):
            raise ValueError("url does not end in a conversation id")
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._base = f"{prefix}/api/conversations/{conversation_id}"
        self.where = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{self._base}"
        self._token = token
        self._timeout_s = timeout_s
        self._connection: http.client.HTTPConnection | None = None
        self._run_path = ""
        self._head: int | None = None  # the log's head after our last stored batch
        # The request batches of the last append() call and how many were stored, so a
        # retry of the same events resends only the rest, each with its expected head.
        self._batches: list[list[bytes]] = []
        self._stored = 0

    def _request(self, path: str, body: bytes | None) -> Any:
        """POST ``body`` (GET for None); the answer's JSON. Errors name the status, never
        the token."""
        if self._connection is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._connection = kind(self._host, self._port, timeout=self._timeout_s)
        headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {self._token}",
        }
        try:
            method = "GET" if body is None else "POST"
            self._connection.request(method, self._base + path, body, headers)
            answer = self._connection.getresponse()
            status, payload = answer.status, answer.read()
        except (OSError, http.client.HTTPException) as error:
            self._connection.close()
            self._connection = None
            raise PublishError(
                f"{self.where} did not answer ({type(error).__name__})", transient=True
            ) from None
        try:
            parsed = json.loads(payload) if payload else {}
        except ValueError:
            parsed = {}
        if status < 300:
            return parsed
        detail = parsed.get("error", {}) if isinstance(parsed, dict) else {}
        code = detail.get("code", "") if isinstance(detail, dict) else ""
        message = detail.get("message", "") if isinstance(detail, dict) else ""
        hint = " (is the token the conversation's write token?)" if status in (401, 403) else ""
        said = (
            f"{self.where}{path.partition('?')[0]} answered HTTP {status} {code}: {message}{hint}"
        )
        if status == 409 and code == "head_mismatch":
            raise _Conflict(said)
        if status == 409 and code != "run_active" and path.startswith("/runs/"):
            raise PublishError(said, transient=False, over=True)  # no_run: ended or reaped
        # run_active: maybe an interrupted run of ours, until the server reaps it
        raise PublishError(said, transient=status >= 500 or status in (409, 429))

    def _read_head(self) -> int | None:
        """The log's head as the server has it now (an empty append answers it; an older
        server's conversation does)."""
        head = self._request(f"{self._run_path}/events", b"[]").get("head")
        if not isinstance(head, int):
            head = self._request("", None).get("head")
        return head if isinstance(head, int) else None

    def start_run(self, content: str, model: str, exclusive: bool) -> str:
        body: dict[str, Any] = {"input": content, "exclusive": exclusive}
        if model:
            body["model"] = model
        answer = self._request("/runs", json.dumps(body).encode())
        run_id = str(answer["runId"])
        self.lease_ttl_ms = int(answer.get("leaseTtlMs", DEFAULT_LEASE_TTL_MS))
        head = answer.get("head")
        self._head = head if isinstance(head, int) else None  # None: an older server
        self._run_path = f"/runs/{run_id}"
        self._batches, self._stored = [], 0
        return run_id

    def append(self, bodies: list[bytes]) -> bool:
        batches = _request_batches(bodies)
        if batches != self._batches:  # new events, not a retry
            self._batches, self._stored = batches, 0
        cancel = False
        while self._stored < len(batches):
            batch = batches[self._stored]
            body = b"[" + b",".join(batch) + b"]"
            try:
                answer = self._request(self._events_path(batch), body)
            except _Conflict:  # the head moved under us: read it, send the batch there once
                self._head = self._read_head()
                answer = self._request(self._events_path(batch), body)
            head = answer.get("head")
            if isinstance(head, int):
                self._head = head
            self._stored += 1
            cancel = cancel or bool(answer.get("cancelRequested"))
        self._batches, self._stored = [], 0
        return cancel

    def stored(self, bodies: list[bytes]) -> int | None:
        if self._head is None or _request_batches(bodies) != self._batches:
            return None
        current = self._batches[self._stored]
        answer = self._request(f"/events?after={self._head}&limit={len(current)}", None)
        try:
            events = msgspec.convert(answer, list[Event])
        except msgspec.ValidationError:
            return None
        if _same_events(events, current):
            return len(bodies) if self._stored == len(self._batches) - 1 else None
        return 0 if self._stored == 0 else None

    def _events_path(self, batch: list[bytes]) -> str:
        path = f"{self._run_path}/events"
        if batch and self._head is not None:
            path += f"?expectedHead={self._head}"
        return path

    def renew(self) -> bool:
        return self.append([])

    def finish(self, end: RunEnd, closing: list[Event]) -> None:
        if closing:
            self.append([protocol.encode(event) for event in closing])
        body: dict[str, Any] = {
            "outcome": end.outcome,
            "usage": msgspec.to_builtins(end.usage),
            "costUsd": end.cost_usd,
            "messages": msgspec.to_builtins(end.messages),
        }
        if end.model:
            body["model"] = end.model
        if end.outcome == "error":
            body["error"] = {"code": end.error_code, "message": end.error_message}
        self._request(f"{self._run_path}/finish", json.dumps(body).encode())

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
