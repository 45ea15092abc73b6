"""The publishing thread of a :class:`~costream.publisher.TokenPublisher`.

One daemon thread per publisher takes what its :class:`~.queue.Outbox` holds ready and
publishes it in order through a :class:`~.transports.Transport`: starts the run, appends
its events in batches, renews the run's lease (a quarter of its time-to-live), and ends
the run, closing what the log still holds open when the run was cut short.

- A transient failure (:class:`~.transports.PublishError` ``transient``) is tried again
  after 0.1, 0.3 and 0.9 s; then, or on any other failure, the run is broken: its later
  events are counted as dropped and its lease expires (the servers end it
  ``producer_lost``). Failures are logged with a message safe to show, never the token.
- A step whose finish reason came is settled without usage once the usage chunk is
  overdue (:meth:`~.steps.StepReader.usage_overdue`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal, TypeVar

from costream import protocol
from costream.backoff import Backoff
from costream.client.publisher.queue import Abandon, Barrier, Finish, Item, Outbox, Start
from costream.client.publisher.transports import PublishError, Transport
from costream.lifecycle import OpenSegments, RunEnd
from costream.protocol import Event, LoggedEvent

log = logging.getLogger("costream.client.publisher")

T = TypeVar("T")


def _retry_backoff() -> Backoff:
    """Transient failures are tried again after 0.1, 0.3 and 0.9 s, then given up."""
    return Backoff(first_s=0.1, cap_s=1.0, factor=3.0, attempts=3)


class Sender:
    """The publisher's thread: publishes what the outbox holds, in order."""

    def __init__(self, outbox: Outbox, make: Callable[[], Transport]) -> None:
        self._outbox = outbox
        self._transport: Transport | None = None
        self._state: Literal["idle", "live", "broken"] = "idle"
        self._next_renew = 0.0
        self._open = OpenSegments()  # what the log holds open, closed if the run is cut short
        self.thread = threading.Thread(
            target=self._work, args=(make,), name="costream-publisher", daemon=True
        )
        self.thread.start()

    def _work(self, make: Callable[[], Transport]) -> None:
        try:
            self._transport = make()
        except Exception as error:
            log.error(
                "costream publisher: cannot reach %s (%s)", self._outbox.where, type(error).__name__
            )
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
        """Wait until something is ready (or a lease renewal is due); take it."""
        outbox = self._outbox
        with outbox.cond:
            while True:
                if outbox.steps.usage_overdue():
                    outbox.enqueue(outbox.steps.end_step())
                now = time.monotonic()
                if outbox.queue.ready(now):
                    break
                dues = [outbox.queue.ready_at(), outbox.steps.usage_due_at()]
                if self._state == "live":
                    dues.append(self._next_renew)
                due = min((d for d in dues if d is not None), default=None)
                if due is not None and due <= now:
                    break
                outbox.cond.wait(None if due is None else due - now)
            return outbox.queue.take_ready(time.monotonic())

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
                self._start(item)
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
            self._outbox.cancel_requested = True
        return cancel

    def _start(self, start: Start) -> None:
        self._open.clear()
        self._outbox.cancel_requested = False
        ok, run_id = self._attempt(
            "starting a run", lambda t: t.start_run(start.content, start.model, start.exclusive)
        )
        if ok and run_id is not None and self._transport is not None:
            self._state = "live"
            self._outbox.run_id = run_id
            self._next_renew = time.monotonic() + self._transport.lease_ttl_ms / 4000
        else:
            self._state = "broken"

    def _send(self, events: list[Event]) -> None:
        if not events:
            return
        if self._state != "live":
            self._outbox.count(dropped=len(events))
            return
        bodies = [protocol.encode(event) for event in events]
        ok, cancel = self._attempt("publishing events", lambda t: t.append(bodies))
        if not ok:
            self._state = "broken"
            self._outbox.count(dropped=len(events))
            return
        if cancel:
            self._outbox.cancel_requested = True
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
            self._outbox.count(errors=1)
            return False, None
        backoff = _retry_backoff()
        while True:
            try:
                return True, action(transport)
            except PublishError as error:
                delay = backoff.next_delay() if error.transient else None
                if delay is not None:
                    time.sleep(delay)
                    continue
                message = error.message
            except Exception as error:
                # The type only: an exception's text may quote a request, and its token.
                message = f"unexpected {type(error).__name__}"
                log.debug("costream publisher: %s failed", what, exc_info=True)
            self._outbox.count(errors=1)
            log.error("costream publisher: %s failed: %s", what, message)
            return False, None
