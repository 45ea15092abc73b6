"""A token and event callback that publishes another program's LLM stream to a costream conversation.

:class:`TokenPublisher` takes LiteLLM ``ModelResponseStream`` chunks (or plain ``str``)
from any thread, in an OpenHands ``Conversation(token_callbacks=[..., publisher])`` or a
plain LiteLLM streaming loop, and turns them into the events a built-in run appends, with
the same :class:`~costream.segments.StepSegments`: ``RUN_STARTED``, per step
``STEP_STARTED``, the segments, ``STEP_FINISHED`` with usage and cost, and
``RUN_FINISHED`` or ``RUN_ERROR`` with the history snapshot.

- In OpenHands' ``callbacks=[publisher]`` too, it reads the conversation's events
  (:mod:`.openhands`): the user's message starts a run, observations become tool
  results, the agent's finish or error ends the run. Elsewhere ``with publisher.run(message):``
  marks a run.
- Two transports: straight into the servers' Redis (``redis_url`` + ``conversation_id``),
  or through a server's HTTP API with the conversation's write token (``url`` + ``token``,
  the ingest endpoints).
- Calls never block and never raise: a call turns its chunk into events under a lock
  (microseconds) and queues them; one background thread publishes (:mod:`.sender`). A
  failed publish is logged (never with the token) and counted in ``errors``; the agent
  goes on.
- Outages: while the server (or Redis) is away the thread tries again in the background
  (backoff capped at ``retry_cap_s``) and the queue buffers the stream (bounded; past its
  bounds events are shed and counted). When the server answers again the run goes on, or
  starts late, or, if the server ended it meanwhile, goes on in a new run for the same
  message; a run missing events starts its next batch with CUSTOM ``stream_gap``.
- Counters: ``delivered`` (stored), ``dropped`` (given up, never stored), ``unconfirmed``
  (sent, answer never came; stored all or nothing), ``retried``, ``errors``.
- ``close()`` waits at most ``close_timeout_s`` (5 s); the publisher is a context
  manager whose exit ends an open run with RUN_ERROR when an exception leaves it; at the
  interpreter's exit an open publisher is closed the same way (RUN_ERROR when the program
  dies of an exception).
- A flush window (``flush_ms``, 30 ms as the built-in runner's) merges a segment's
  deltas, so a run makes about as many events as a built-in one (:mod:`.queue`). Past
  ``max_pending_events`` or ``max_pending_chars`` the run is abandoned: its queued events
  are dropped (counted in ``dropped``) and it ends in ``RUN_ERROR`` with its segments closed.
- Steps: a chunk with output after a ``finish_reason``, a new response id, or
  :meth:`TokenPublisher.step` starts the next step (:mod:`.steps`). ``STEP_FINISHED``
  waits for the stream's usage chunk for at most a second after the finish reason.
- The published runs' model is shown to viewers; with ``exclusive=True`` (the default)
  the conversation is marked as owned by this kind of producer, so a writer's message
  starts no run on the servers.

Neither Starlette, LiteLLM nor OpenHands is imported here; chunks and OpenHands' events
are read by attribute, and the Redis broker is imported only by the Redis transport.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from costream.chunks import as_usage as as_usage  # public: usage in the form RUN_FINISHED takes
from costream.client.publisher.openhands import OpenHandsEvents, is_openhands_event
from costream.client.publisher.queue import Barrier, Close, EventQueue, Finish, Outbox, Start
from costream.client.publisher.sender import Sender
from costream.client.publisher.steps import StepReader
from costream.client.publisher.transports import (
    DEFAULT_LEASE_TTL_MS,
    REDIS_SCHEMES,
    HTTPTransport,
    RedisTransport,
    Transport,
)
from costream.lifecycle import Outcome
from costream.store import CONVERSATION_ID

log = logging.getLogger("costream.client.publisher")

DEFAULT_FLUSH_MS = 30  # the built-in runner's COSTREAM_FLUSH_MS
DEFAULT_CLOSE_TIMEOUT_S = 5.0
DEFAULT_RETRY_CAP_S = 2.0


class _RunScope:
    """``with publisher.run(...)`` and ``async with publisher.run(...)``."""

    def __init__(self, publisher: TokenPublisher, content: str) -> None:
        self._publisher, self._content = publisher, content

    def __enter__(self) -> TokenPublisher:
        self._publisher.start_run(self._content)
        return self._publisher

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None:
            self._publisher.finish_run()
        elif isinstance(error, Exception):
            self._publisher.finish_run(error=error)
        else:  # KeyboardInterrupt, CancelledError: the user stopped it
            self._publisher.finish_run(outcome="cancelled")

    async def __aenter__(self) -> TokenPublisher:
        return self.__enter__()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.__exit__(kind, error, traceback)


def _transport_maker(
    url: str | None,
    token: str | None,
    redis_url: str | None,
    conversation_id: str | None,
    lease_ttl_ms: int,
    timeout_s: float,
) -> tuple[Callable[[], Transport], str]:
    """How the publisher's thread makes its transport, and where it publishes (safe to log)."""
    if url is not None and redis_url is None:
        token = token or parse_qs(urlsplit(url).fragment).get("t", [""])[0]
        if not token:
            raise ValueError("pass token=<the conversation's write token>, or the write link")
        transport = HTTPTransport(url, token, timeout_s)
        return (lambda: transport), transport.where
    if redis_url is not None and url is None:
        if not conversation_id or not CONVERSATION_ID.match(conversation_id):
            raise ValueError("pass conversation_id=<the conversation's id>")
        parts = urlsplit(redis_url)
        if parts.scheme not in REDIS_SCHEMES:
            raise ValueError("redis_url must be a URL the servers' --redis-url takes")
        where = f"redis at {parts.netloc.rpartition('@')[2] or 'localhost'}"
        # Made in the publisher's thread: its event loop lives there.
        return (lambda: RedisTransport(redis_url, conversation_id, lease_ttl_ms)), where
    raise ValueError(
        "pass url= (the write link, or with token=), or redis_url= and conversation_id="
    )


class TokenPublisher:
    """Publishes an LLM stream's chunks to a costream conversation; a token callback and,
    for OpenHands, an event callback.

    Thread-safe; every method but :meth:`flush` and :meth:`close` returns at once, and
    none raises once constructed. ``errors`` counts failed publishes, ``dropped`` the
    events (or chunks) that were not published.
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        token: str | None = None,
        redis_url: str | None = None,
        conversation_id: str | None = None,
        model: str | None = None,
        exclusive: bool = True,
        flush_ms: int = DEFAULT_FLUSH_MS,
        lease_ttl_ms: int = DEFAULT_LEASE_TTL_MS,
        timeout_s: float = 10.0,
        max_pending_events: int = 10_000,
        max_pending_chars: int = 4_000_000,
        close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
        retry_cap_s: float = DEFAULT_RETRY_CAP_S,
    ) -> None:
        make, self.where = _transport_maker(
            url, token, redis_url, conversation_id, lease_ttl_ms, timeout_s
        )
        self._close_timeout_s = close_timeout_s
        self._model, self._exclusive = model or "", exclusive
        queue = EventQueue(max_pending_events, max_pending_chars, flush_ms)
        self._outbox = Outbox(queue, StepReader(model or ""), self.where)
        self._closed = False
        self._in_run = False
        self._warned_outside = False
        self._openhands = OpenHandsEvents(self)
        self._sender = Sender(self._outbox, make, retry_cap_s)
        # A program that ends without close() (the OpenHands example) still gets its
        # last run ended and published: atexit runs before daemon threads stop.
        atexit.register(self._at_exit)

    @property
    def errors(self) -> int:
        """Failures given up on (each logged)."""
        return self._outbox.errors

    @property
    def dropped(self) -> int:
        """Events (or chunks outside a run) given up on: never stored."""
        return self._outbox.dropped

    @property
    def delivered(self) -> int:
        """Events the server stored, ``stream_gap`` and the events the publisher adds
        (closing what a cut-short run left open) included; not ``RUN_STARTED`` nor the
        run's end, which the server makes."""
        return self._outbox.delivered

    @property
    def unconfirmed(self) -> int:
        """Events sent whose answer never came before the publisher gave up on them
        (closed, or their run ended meanwhile): each such batch is stored whole or not."""
        return self._outbox.unconfirmed

    @property
    def retried(self) -> int:
        """Calls tried again after the server (or Redis) failed to answer."""
        return self._outbox.retried

    @property
    def run_id(self) -> str | None:
        """The latest run started in the conversation."""
        return self._outbox.run_id

    @property
    def cancel_requested(self) -> bool:
        """Someone asked the conversation's run to stop (seen at the last publish)."""
        return self._outbox.cancel_requested

    # ---- the callbacks -------------------------------------------------------------------
    def __call__(self, chunk: object) -> None:
        """Take one stream chunk (or a piece of text, or an OpenHands event); returns at
        once, never raises."""
        if is_openhands_event(chunk):
            self._openhands.on_event(chunk)
            return
        outbox = self._outbox
        try:
            with outbox.lock:
                if self._closed or not self._in_run:
                    self._chunk_outside_run()
                    return
                if isinstance(chunk, str):
                    events = outbox.steps.text(chunk)
                else:
                    events = outbox.steps.chunk(chunk)
                outbox.enqueue(events)
        except Exception:
            self._failed("turning a chunk into events")

    # ---- runs and steps ------------------------------------------------------------------
    def run(self, content: str) -> _RunScope:
        """``with publisher.run(message):`` RUN_STARTED ... RUN_FINISHED (RUN_ERROR when
        it raises; the exception goes on)."""
        return _RunScope(self, content)

    def start_run(self, content: str) -> None:
        """Start a run for the user's message ``content`` (RUN_STARTED)."""
        outbox = self._outbox
        try:
            with outbox.lock:
                if self._closed:
                    log.warning("costream publisher: start_run after close is ignored")
                    return
                if self._in_run:
                    log.warning("costream publisher: start_run ends the run still open first")
                    self._finish("success", None, None, None)
                self._in_run, outbox.queue.overflowed = True, False
                outbox.steps.start_run()
                outbox.control(Start(content, self._model, self._exclusive))
        except Exception:
            self._failed("starting a run")

    def finish_run(
        self,
        usage: object = None,
        cost_usd: float | None = None,
        *,
        outcome: Literal["success", "cancelled"] = "success",
        error: BaseException | str | None = None,
    ) -> None:
        """End the run: RUN_FINISHED with ``usage`` and ``cost_usd`` when given (else the
        steps' sums), or RUN_ERROR when ``error`` is given."""
        try:
            with self._outbox.lock:
                if not self._in_run:
                    return
                self._finish("error" if error is not None else outcome, usage, cost_usd, error)
        except Exception:
            self._failed("ending a run")

    def step(self) -> None:
        """End the current step; the next chunk starts a new one."""
        outbox = self._outbox
        try:
            with outbox.lock:
                if self._in_run:
                    outbox.enqueue(outbox.steps.end_step())
        except Exception:
            self._failed("ending a step")

    def tool_result(self, tool_call_id: str, content: str, *, is_error: bool = False) -> None:
        """A tool call's result (TOOL_CALL_RESULT), after its step."""
        outbox = self._outbox
        try:
            with outbox.lock:
                if not self._in_run:
                    return
                outbox.enqueue(outbox.steps.tool_result(tool_call_id, content, is_error=is_error))
        except Exception:
            self._failed("publishing a tool result")

    # ---- flushing and closing ------------------------------------------------------------
    def _barrier(self) -> concurrent.futures.Future[None]:
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._outbox.lock:
            if self._closed or not self._sender.thread.is_alive():
                done.set_result(None)
            else:
                self._outbox.control(Barrier(done))
        return done

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far was published (or failed); False on timeout."""
        try:
            self._barrier().result(timeout)
            return True
        except concurrent.futures.TimeoutError:
            return False

    async def aflush(self, timeout: float = 10.0) -> bool:
        """:meth:`flush` for async code."""
        try:
            await asyncio.wait_for(asyncio.wrap_future(self._barrier()), timeout)
            return True
        except TimeoutError:
            return False

    def close(self, timeout: float | None = None, *, error: BaseException | None = None) -> None:
        """End an open run (success; RUN_ERROR with ``error``), publish what is queued
        within ``timeout`` seconds (``close_timeout_s`` by default), stop the thread;
        what is not published by then is counted in ``dropped`` or ``unconfirmed``.
        Called at the interpreter's exit when not before."""
        atexit.unregister(self._at_exit)
        timeout = self._close_timeout_s if timeout is None else timeout
        outbox = self._outbox
        with outbox.lock:
            if not self._closed:
                if self._in_run:
                    outcome: Outcome = "success" if error is None else "error"
                    self._finish(outcome, None, None, error)
                self._closed = True
                outbox.deadline = time.monotonic() + timeout
                outbox.control(Close())
        self._sender.thread.join(timeout + 0.05)
        if self._sender.thread.is_alive():
            log.error("costream publisher: %s did not answer within %.1f s", self.where, timeout)
            with outbox.lock:
                outbox.give_up()
        if outbox.dropped or outbox.unconfirmed:
            log.warning(
                "costream publisher: closed; %d events delivered, %d dropped, %d unconfirmed",
                outbox.delivered,
                outbox.dropped,
                outbox.unconfirmed,
            )

    async def aclose(self, timeout: float | None = None) -> None:
        """:meth:`close` for async code."""
        await asyncio.to_thread(self.close, timeout)

    def _at_exit(self) -> None:
        # A program that died of an exception ends its open run with RUN_ERROR.
        self.close(error=getattr(sys, "last_value", None))

    def __enter__(self) -> TokenPublisher:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is not None and not isinstance(error, Exception):
            with self._outbox.lock:  # KeyboardInterrupt: the user stopped it
                if self._in_run:
                    self._finish("cancelled", None, None, None)
        self.close(error=error)

    # ---- the caller's side (under the lock) ------------------------------------------------
    def _chunk_outside_run(self) -> None:
        self._outbox.dropped += 1
        if not self._warned_outside:
            self._warned_outside = True
            log.warning(
                "costream publisher: a chunk came outside a run and is not published; "
                "pass the publisher in OpenHands' callbacks too, or wrap the agent's work "
                "in `with publisher.run(message):`"
            )

    def _finish(
        self,
        outcome: Outcome,
        usage: object,
        cost_usd: float | None,
        error: BaseException | str | None,
    ) -> None:
        steps = self._outbox.steps
        self._outbox.enqueue(steps.end_step(None if outcome == "success" else outcome))
        end = steps.run_end(outcome, usage, cost_usd, error)
        self._in_run = False
        self._outbox.control(Finish(end))

    def _failed(self, what: str) -> None:
        self._outbox.count(errors=1)
        log.exception("costream publisher: %s failed", what)
