"""A token callback that publishes another program's LLM stream to a costream conversation.

:class:`TokenPublisher` takes LiteLLM ``ModelResponseStream`` chunks (or plain ``str``)
from any thread, in an OpenHands ``Conversation(token_callbacks=[..., publisher])`` or a
plain LiteLLM streaming loop, and turns them into the events a built-in run appends, with
the same :class:`~costream.segments.StepSegments`: ``RUN_STARTED``, per step
``STEP_STARTED``, the segments, ``STEP_FINISHED`` with usage and cost, and
``RUN_FINISHED`` or ``RUN_ERROR`` with the history snapshot.

- Two transports: straight into the servers' Redis (``redis_url`` + ``conversation_id``),
  or through a server's HTTP API with the conversation's write token (``url`` + ``token``,
  the ingest endpoints of ``ingest.py``).
- Calls never block and never raise: a call turns its chunk into events under a lock
  (microseconds) and queues them; one background thread publishes. A failed publish is
  logged (never with the token) and counted in ``errors``; the agent goes on.
- Bounded: consecutive deltas of one segment merge in the queue (merging never changes
  the concatenated text), so a slow transport costs no more events. Past
  ``max_pending_events`` or ``max_pending_chars`` the run is abandoned: its queued events
  are dropped (counted in ``dropped``) and it ends in ``RUN_ERROR`` with its segments closed.
- Steps: a chunk with output after a ``finish_reason``, a new response id, or
  :meth:`TokenPublisher.step` starts the next step. ``STEP_FINISHED`` waits for the
  stream's usage chunk (``stream_options={"include_usage": True}``) for at most a second
  after the finish reason.

Here: the publisher, its runs, its lock and its thread. ``publisher_steps.py`` turns a
run's chunks into events and knows what closes a run cut short, ``publisher_queue.py``
holds the bounded queue between callers and the thread, ``publisher_transports.py`` the
two transports and the runs in storage they share with ``ingest.py``. Neither Starlette nor LiteLLM is imported
by any of them; chunks are read by attribute like ``segments`` does, and the Redis broker
is imported only by the Redis transport.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Final, Literal, TypeVar
from urllib.parse import parse_qs, urlsplit

from costream import protocol
from costream.client.publisher.queue import Abandon, Barrier, Close, EventQueue, Finish, Item, Start
from costream.client.publisher.steps import OpenSegments, StepReader
from costream.client.publisher.transports import (
    DEFAULT_LEASE_TTL_MS,
    REDIS_SCHEMES,
    HTTPTransport,
    PublishError,
    RedisTransport,
    Transport,
)
from costream.lifecycle import Outcome, RunEnd
from costream.protocol import (
    Event,
    LoggedEvent,
)
from costream.segments import as_usage as as_usage  # public: usage in the form RUN_FINISHED takes
from costream.store import CONVERSATION_ID

log = logging.getLogger(__name__)

T = TypeVar("T")

_RETRY_S: Final = (0.1, 0.3, 1.0)  # transient failures, as the runner retries appends


# ---- the publisher ---------------------------------------------------------------------


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


class TokenPublisher:
    """Publishes an LLM stream's chunks to a costream conversation; a token callback.

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
        lease_ttl_ms: int = DEFAULT_LEASE_TTL_MS,
        timeout_s: float = 10.0,
        max_pending_events: int = 10_000,
        max_pending_chars: int = 4_000_000,
    ) -> None:
        make: Callable[[], Transport]
        if url is not None and redis_url is None:
            token = token or parse_qs(urlsplit(url).fragment).get("t", [""])[0]
            if not token:
                raise ValueError("pass token=<the conversation's write token>")
            transport = HTTPTransport(url, token, timeout_s)
            self.where = transport.where

            def make() -> Transport:
                return transport
        elif redis_url is not None and url is None:
            if not conversation_id or not CONVERSATION_ID.match(conversation_id):
                raise ValueError("pass conversation_id=<the conversation's id>")
            parts = urlsplit(redis_url)
            if parts.scheme not in REDIS_SCHEMES:
                raise ValueError("redis_url must be a URL the servers' --redis-url takes")
            self.where = f"redis at {parts.netloc.rpartition('@')[2] or 'localhost'}"

            def make() -> Transport:
                # Made in the publisher's thread: its event loop lives there.
                return RedisTransport(redis_url, conversation_id, lease_ttl_ms)
        else:
            raise ValueError("pass url= and token=, or redis_url= and conversation_id=")
        self.errors = 0  # publishes that failed (each logged)
        self.dropped = 0  # events or chunks not published
        self.run_id: str | None = None  # the latest run started in the conversation
        self.cancel_requested = False  # someone asked the conversation's run to stop
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # ---- the caller's side, under the lock
        self._queue = EventQueue(max_pending_events, max_pending_chars)
        self._closed = False
        self._in_run = False
        self._warned_outside = False
        self._steps = StepReader(model or "")
        # ---- the publisher thread's side
        self._transport: Transport | None = None
        self._state: Literal["idle", "live", "broken"] = "idle"
        self._next_renew = 0.0
        self._open = OpenSegments()  # what the log holds open, closed if the run is cut short
        self._thread = threading.Thread(
            target=self._work, args=(make,), name="costream-publisher", daemon=True
        )
        self._thread.start()

    # ---- the callback ------------------------------------------------------------------
    def __call__(self, chunk: object) -> None:
        """Take one stream chunk (or a piece of text); returns at once, never raises."""
        try:
            with self._lock:
                if self._closed or not self._in_run:
                    self._chunk_outside_run()
                    return
                if isinstance(chunk, str):
                    events = self._steps.text(chunk)
                else:
                    events = self._steps.chunk(chunk)
                self._enqueue(events)
        except Exception:
            self._failed("turning a chunk into events")

    # ---- runs and steps ------------------------------------------------------------------
    def run(self, content: str) -> _RunScope:
        """``with publisher.run(message):`` RUN_STARTED ... RUN_FINISHED (RUN_ERROR when
        it raises; the exception goes on)."""
        return _RunScope(self, content)

    def start_run(self, content: str) -> None:
        """Start a run for the user's message ``content`` (RUN_STARTED)."""
        try:
            with self._lock:
                if self._closed:
                    log.warning("costream publisher: start_run after close is ignored")
                    return
                if self._in_run:
                    log.warning("costream publisher: start_run ends the run still open first")
                    self._finish("success", None, None, None)
                self._in_run, self._queue.overflowed = True, False
                self._steps.start_run()
                self._queue.append(Start(content))
                self._cond.notify()
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
            with self._lock:
                if not self._in_run:
                    return
                self._finish("error" if error is not None else outcome, usage, cost_usd, error)
        except Exception:
            self._failed("ending a run")

    def step(self) -> None:
        """End the current step; the next chunk starts a new one."""
        try:
            with self._lock:
                if self._in_run:
                    self._enqueue(self._steps.end_step())
        except Exception:
            self._failed("ending a step")

    def tool_result(self, tool_call_id: str, content: str, *, is_error: bool = False) -> None:
        """A tool call's result (TOOL_CALL_RESULT), after its step."""
        try:
            with self._lock:
                if not self._in_run:
                    return
                self._enqueue(self._steps.tool_result(tool_call_id, content, is_error=is_error))
        except Exception:
            self._failed("publishing a tool result")

    # ---- flushing and closing ------------------------------------------------------------
    def _barrier(self) -> concurrent.futures.Future[None]:
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            if self._closed or not self._thread.is_alive():
                done.set_result(None)
            else:
                self._queue.append(Barrier(done))
                self._cond.notify()
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

    def close(self, timeout: float = 10.0) -> None:
        """End an open run (success), publish what is queued, stop the thread."""
        with self._lock:
            if not self._closed:
                if self._in_run:
                    self._finish("success", None, None, None)
                self._closed = True
                self._queue.append(Close())
                self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("costream publisher: not flushed within %.1f s; giving up", timeout)

    async def aclose(self, timeout: float = 10.0) -> None:
        """:meth:`close` for async code."""
        await asyncio.to_thread(self.close, timeout)

    def __enter__(self) -> TokenPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- the caller's side (under the lock) ------------------------------------------------
    def _chunk_outside_run(self) -> None:
        self.dropped += 1
        if not self._warned_outside:
            self._warned_outside = True
            log.warning(
                "costream publisher: a chunk came outside a run and is not published; "
                "wrap the agent's work in `with publisher.run(message):`"
            )

    def _finish(
        self,
        outcome: Outcome,
        usage: object,
        cost_usd: float | None,
        error: BaseException | str | None,
    ) -> None:
        self._enqueue(self._steps.end_step(None if outcome == "success" else outcome))
        end = self._steps.run_end(outcome, usage, cost_usd, error)
        self._in_run = False
        self._queue.append(Finish(end))
        self._cond.notify()

    def _settle_step_if_due(self) -> None:
        """Send STEP_FINISHED without usage once the usage chunk is overdue."""
        if self._steps.usage_overdue():
            self._enqueue(self._steps.end_step())

    # ---- the bounded queue (under the lock) ------------------------------------------------
    def _enqueue(self, events: list[Event]) -> None:
        self.dropped += self._queue.put(events)
        if self._queue.over_bounds():
            self._abandon()
        if events:
            self._cond.notify()

    def _abandon(self) -> None:
        """Drop the run's queued events and end it with RUN_ERROR: the transport is too slow."""
        self.dropped += self._queue.abandon()
        log.warning(
            "costream publisher: %s fell too far behind; this run's remaining output is "
            "dropped and it ends in RUN_ERROR",
            self.where,
        )

    def _failed(self, what: str) -> None:
        with self._lock:
            self.errors += 1
        log.exception("costream publisher: %s failed", what)

    # ---- the publisher's thread ------------------------------------------------------------
    def _work(self, make: Callable[[], Transport]) -> None:
        try:
            self._transport = make()
        except Exception as error:
            log.error("costream publisher: cannot reach %s (%s)", self.where, type(error).__name__)
        try:
            while True:
                if self._process(self._take()):
                    return
        finally:
            if self._transport is not None:
                try:
                    self._transport.close()
                except Exception:
                    log.debug("closing the transport failed", exc_info=True)

    def _take(self) -> list[Item]:
        """Wait for queued items (or a lease renewal that is due); take them all."""
        with self._cond:
            while True:
                self._settle_step_if_due()
                if self._queue:
                    break
                waits = []
                if self._state == "live":
                    waits.append(self._next_renew - time.monotonic())
                usage_due = self._steps.usage_due_at()
                if usage_due is not None:
                    waits.append(usage_due - time.monotonic())
                timeout = min(waits) if waits else None
                if timeout is not None and timeout <= 0:
                    break
                self._cond.wait(timeout)
            return self._queue.take_all()

    def _process(self, batch: list[Item]) -> bool:
        """Publish a batch in order; whether it held the close."""
        events: list[Event] = []
        closing = False
        for item in batch:
            if isinstance(item, LoggedEvent):
                events.append(item)  # type: ignore[arg-type]  # every LoggedEvent is an Event
                continue
            self._send(events)
            events = []
            if isinstance(item, Start):
                self._start(item.content)
            elif isinstance(item, Finish):
                self._end(item.end)
            elif isinstance(item, Abandon):
                message = "the publisher fell behind the stream and dropped part of it"
                self._end(RunEnd("error", error_code="internal", error_message=message))
            elif isinstance(item, Barrier):
                item.done.set_result(None)
            else:
                closing = True
        self._send(events)
        if self._state == "live" and time.monotonic() >= self._next_renew:
            ok, _ = self._attempt("renewing the run's lease", self._renew)
            if not ok:
                self._state = "broken"
        return closing

    def _renew(self, transport: Transport) -> bool:
        cancel = transport.renew()
        self._next_renew = time.monotonic() + transport.lease_ttl_ms / 4000
        if cancel:
            self.cancel_requested = True
        return cancel

    def _start(self, content: str) -> None:
        self._open.clear()
        self.cancel_requested = False
        ok, run_id = self._attempt("starting a run", lambda t: t.start_run(content))
        if ok and run_id is not None and self._transport is not None:
            self._state = "live"
            self.run_id = run_id
            self._next_renew = time.monotonic() + self._transport.lease_ttl_ms / 4000
        else:
            self._state = "broken"

    def _send(self, events: list[Event]) -> None:
        if not events:
            return
        if self._state != "live":
            with self._lock:
                self.dropped += len(events)
            return
        bodies = [protocol.encode(event) for event in events]
        ok, cancel = self._attempt("publishing events", lambda t: t.append(bodies))
        if not ok:
            self._state = "broken"
            with self._lock:
                self.dropped += len(events)
            return
        if cancel:
            self.cancel_requested = True
        for event in events:
            self._open.track(event)

    def _end(self, end: RunEnd) -> None:
        if self._state != "live":
            self._state = "idle"  # the run never started, or broke: its lease expires
            return
        closing = self._open.closing_events()
        self._attempt("ending the run", lambda t: t.finish(end, closing))
        self._state = "idle"

    def _attempt(self, what: str, action: Callable[[Transport], T]) -> tuple[bool, T | None]:
        """Run a transport call, retrying transient failures; (succeeded, its result)."""
        transport = self._transport
        if transport is None:
            with self._lock:
                self.errors += 1
            return False, None
        for delay in (*_RETRY_S, None):
            try:
                return True, action(transport)
            except PublishError as error:
                if error.transient and delay is not None:
                    time.sleep(delay)
                    continue
                message = error.message
            except Exception as error:
                # The type only: an exception's text may quote a request, and its token.
                message = f"unexpected {type(error).__name__}"
                log.debug("costream publisher: %s failed", what, exc_info=True)
            with self._lock:
                self.errors += 1
            log.error("costream publisher: %s failed: %s", what, message)
            return False, None
        raise AssertionError("unreachable")
