"""The publishing thread of a :class:`~costream.publisher.TokenPublisher`.

One daemon thread per publisher takes what its :class:`~.queue.Outbox` holds ready and
publishes it in order through a :class:`~.transports.Transport`: starts the run, appends
its events in batches, renews the run's lease (a quarter of its time-to-live), and ends
the run, closing what the log still holds open when the run was cut short.

Outages (nothing lost, nothing doubled):

- A call that fails because the server (or Redis) is away, hangs past the transport's
  timeout, or answers 5xx, 429 or 409 ``run_active`` is tried again in the background,
  with capped, jittered exponential backoff, for as long as the publisher is open.
  Meanwhile the thread takes nothing: the outbox's bounded queue is the buffer (shed into
  a :class:`~.queue.Gap` past its bounds). A batch sent again carries the head it
  expected, so it is stored once.
- A run whose start failed starts late, once the server answers. A run that is over
  when the server answers again (409 ``no_run`` or a lost lease: it was reaped as
  ``producer_lost``, or its process restarted) goes on in a new run for the same message:
  the batch that was under way is looked for in the log (sent again only when it is not
  there), and the new run starts with CUSTOM ``stream_gap`` and opens again the step and
  segments that were open (:class:`~.continuity.Continuity`).
- Events that are lost (shed, or no longer fitting the segment grammar after a gap) are
  announced in the run: the next batch it gets starts with CUSTOM ``stream_gap``
  ``{"lost", "unconfirmed", "resumes"}``.
- A failure that trying again cannot mend (401, 403, 404, a refused batch) is logged
  (never with the token) and counted in ``errors``: a run that cannot start is dropped;
  after a refused batch the publisher ends the run itself (RUN_ERROR, freeing the lease
  at once) and drops the rest of it.
- ``close()`` sets a deadline (:attr:`~.queue.Outbox.deadline`): a call still failing
  then is given up, and what is left is counted (:meth:`~.queue.Outbox.give_up`).
- A step whose finish reason came is settled without usage once the usage chunk is
  overdue (:meth:`~.steps.StepReader.usage_overdue`).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from costream import protocol
from costream.backoff import Backoff
from costream.client.publisher.continuity import Continuity
from costream.client.publisher.queue import Abandon, Barrier, Finish, Gap, Item, Outbox, Start
from costream.client.publisher.transports import PublishError, Transport
from costream.lifecycle import RunEnd
from costream.protocol import Custom, Event, LoggedEvent

log = logging.getLogger("costream.client.publisher")

T = TypeVar("T")
Outcome = Literal["ok", "over", "failed"]

STREAM_GAP = "stream_gap"  # CUSTOM event: what a run is missing, and the run it resumes


@dataclass
class _Run:
    """One run of the publisher, over as many server runs as outages made it take."""

    start: Start
    run_id: str | None = None  # the server's run, while it lives
    resumes: str | None = None  # the interrupted server run that the next one goes on from
    reopen: bool = False  # the next server run opens again what was open
    lost: int = 0  # events lost since the last stream_gap
    unconfirmed: int = 0  # events of an interrupted run that may or may not be in its log
    broken: bool = False  # it cannot be published (its start was refused)
    continuity: Continuity = field(default_factory=Continuity)

    def interrupted(self) -> None:
        """The server run is over: what follows goes to a new one."""
        self.resumes, self.run_id, self.reopen = self.run_id, None, True


class Sender:
    """The publisher's thread: publishes what the outbox holds, in order."""

    def __init__(self, outbox: Outbox, make: Callable[[], Transport], retry_cap_s: float) -> None:
        self._outbox = outbox
        self._transport: Transport | None = None
        self._retry_cap_s = retry_cap_s
        self._run: _Run | None = None
        self._next_renew = 0.0
        self._outage_since: float | None = None
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
            while not self._outbox.stopped:
                if self._process(self._take()):
                    return
        finally:
            if self._transport is not None:
                try:
                    self._transport.close()
                except Exception:
                    log.debug("closing the transport failed", exc_info=True)

    def _live(self) -> bool:
        return self._run is not None and self._run.run_id is not None

    def _take(self) -> list[Item]:
        """Wait until something is ready (or a lease renewal is due); take it."""
        outbox = self._outbox
        with outbox.cond:
            while not outbox.stopped:
                if outbox.steps.usage_overdue():
                    outbox.enqueue(outbox.steps.end_step())
                now = time.monotonic()
                if outbox.queue.ready(now):
                    break
                dues = [outbox.queue.ready_at(), outbox.steps.usage_due_at()]
                if self._live():
                    dues.append(self._next_renew)
                due = min((d for d in dues if d is not None), default=None)
                if due is not None and due <= now:
                    break
                outbox.cond.wait(None if due is None else due - now)
            if outbox.stopped:
                return []
            items = outbox.queue.take_ready(time.monotonic())
            outbox.held += sum(isinstance(item, LoggedEvent) for item in items)
            return items

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
                self._run = _Run(item)
                self._outbox.cancel_requested = False
                self._open(self._run)
            elif isinstance(item, Finish):
                self._end(item.end)
            elif isinstance(item, Abandon):
                message = "the publisher fell behind the stream and dropped part of it"
                self._end(RunEnd("error", error_code="internal", error_message=message))
            elif isinstance(item, Gap):
                if self._run is not None:
                    self._run.lost += item.lost  # counted as dropped when shed
            elif isinstance(item, Barrier):
                item.done.set_result(None)
            else:
                closing = True
        self._send(events)
        if self._live() and time.monotonic() >= self._next_renew:
            self._renew()
        return closing

    # ---- runs ------------------------------------------------------------------------------
    def _open(self, run: _Run) -> bool:
        """Start ``run`` on the server (late, when it was away); False when it cannot."""
        start = run.start
        outcome, run_id = self._attempt(
            "starting a run", lambda t: t.start_run(start.content, start.model, start.exclusive)
        )
        if outcome != "ok" or run_id is None or self._transport is None:
            run.broken = True
            return False
        run.run_id = self._outbox.run_id = run_id
        self._next_renew = time.monotonic() + self._transport.lease_ttl_ms / 4000
        return True

    def _renew(self) -> None:
        def renew(transport: Transport) -> bool:
            return transport.renew()

        outcome, cancel = self._attempt("renewing the run's lease", renew)
        if self._transport is not None:
            self._next_renew = time.monotonic() + self._transport.lease_ttl_ms / 4000
        if outcome == "over" and self._run is not None:
            self._run.interrupted()
        elif cancel:
            self._outbox.cancel_requested = True

    def _send(self, events: list[Event]) -> None:
        if events:
            self._deliver(events)

    def _announcement(self, run: _Run) -> list[Event]:
        """CUSTOM stream_gap when something is missing or the run resumes another, then
        what the interrupted run had open."""
        events: list[Event] = []
        if run.lost or run.unconfirmed or run.resumes is not None:
            gap = {"lost": run.lost, "unconfirmed": run.unconfirmed, "resumes": run.resumes}
            events.append(Custom(name=STREAM_GAP, value=gap))
            run.lost = run.unconfirmed = 0
            run.resumes = None
        if run.reopen:
            run.reopen = False
            events += run.continuity.reopen()
        return events

    def _deliver(self, events: list[Event]) -> None:
        """Append ``events`` (taken from the queue) to the run, after its announcement if
        any, in a new server run if the last one is over."""
        outbox, run, taken = self._outbox, self._run, len(events)
        while True:
            if run is None or run.broken or (run.run_id is None and not self._open(run)):
                outbox.settle(dropped=taken)
                if run is not None:
                    run.lost += taken
                return
            saved = copy.deepcopy(run)
            batch = self._announcement(run)
            batch += run.continuity.admit(events)
            misfits, run.continuity.dropped = run.continuity.dropped, 0
            if not batch:
                outbox.settle(dropped=misfits)
                run.lost += misfits
                return
            outcome, stored = self._append(batch, taken - misfits)
            if outcome == "failed" or (outcome == "over" and stored == 0):
                self._restore(run, saved)
                if outcome == "over":  # not in the log: all of it goes to a new run
                    run.interrupted()
                    continue
                if not outbox.stopped:  # refused (not given up at close)
                    outbox.settle(dropped=taken)
                    run.lost += taken
                    self._break(run)
                return
            sent = taken - misfits
            if stored is None:  # sent, and the run ended before its answer could be read
                outbox.settle(unconfirmed=sent, dropped=misfits)
                run.unconfirmed += sent
            else:  # the batch's announcement and added step ends were not queued: not held
                outbox.settle(delivered=len(batch), dropped=misfits, held=taken)
            run.lost += misfits
            if outcome == "over":
                run.interrupted()
            return

    @staticmethod
    def _restore(run: _Run, saved: _Run) -> None:
        """Put back what preparing a batch changed (it was not stored)."""
        run.continuity, run.lost, run.unconfirmed = saved.continuity, saved.lost, saved.unconfirmed
        run.resumes, run.reopen = saved.resumes, saved.reopen

    def _append(self, batch: list[Event], taken: int) -> tuple[Outcome, int | None]:
        """Append ``batch`` (``taken`` of its events from the queue); (how it went, how
        many of the batch the log holds: all when ok, 0 or all when over, None when not
        known)."""
        bodies = [protocol.encode(event) for event in batch]
        with self._outbox.lock:
            self._outbox.in_flight = taken
        outcome, cancel = self._attempt("publishing events", lambda t: t.append(bodies))
        stored: int | None = len(batch) if outcome == "ok" else None
        if outcome == "over" and self._transport is not None:
            try:
                stored = self._transport.stored(bodies)
            except PublishError:
                stored = None
        with self._outbox.lock:
            self._outbox.in_flight = 0
        if cancel:
            self._outbox.cancel_requested = True
        return outcome, stored

    def _break(self, run: _Run) -> None:
        """A batch was refused: end the server run now (RUN_ERROR, freeing its lease);
        the rest of the run is dropped."""
        end = RunEnd(
            "error", error_code="internal", error_message="the server refused part of the run"
        )
        closing = run.continuity.closing_events()
        outcome, _ = self._attempt("ending a broken run", lambda t: t.finish(end, closing))
        if outcome == "ok":
            self._outbox.settle(delivered=len(closing), held=0)
        run.broken = True

    def _end(self, end: RunEnd) -> None:
        """End the run; one the server ended meanwhile (reaped) is ended in a new run, so
        that its end, usage, cost and history are recorded."""
        run = self._run
        for _ in range(3):
            if run is None or run.broken:
                break
            if run.run_id is None or run.lost or run.unconfirmed or run.reopen:
                self._deliver([])  # published late, resumed, or a gap to announce first
                if run.broken or run.run_id is None:
                    break
            if self._finish(run, end) != "over":
                break
            run.interrupted()
        self._run = None

    def _finish(self, run: _Run, end: RunEnd) -> Outcome:
        closing = run.continuity.closing_events()
        outcome, _ = self._attempt("ending the run", lambda t: t.finish(end, closing))
        if outcome == "ok":
            self._outbox.settle(delivered=len(closing), held=0)
        return outcome

    # ---- calls -------------------------------------------------------------------------------
    def _attempt(self, what: str, action: Callable[[Transport], T]) -> tuple[Outcome, T | None]:
        """Run a transport call, trying transient failures again until close's deadline;
        (how it went, its result)."""
        transport, outbox = self._transport, self._outbox
        if transport is None:
            outbox.count(errors=1)
            return "failed", None
        backoff = Backoff(first_s=0.1, cap_s=self._retry_cap_s, jitter=True)
        while not outbox.stopped:
            try:
                result = action(transport)
            except PublishError as error:
                if error.over:
                    self._reached()
                    return "over", None
                if error.transient and self._wait_to_retry(what, error.message, backoff):
                    continue
                message = error.message
            except Exception as error:
                # The type only: an exception's text may quote a request, and its token.
                message = f"unexpected {type(error).__name__}"
                log.debug("costream publisher: %s failed", what, exc_info=True)
            else:
                self._reached()
                return "ok", result
            if outbox.stopped:
                break
            outbox.count(errors=1)
            log.error("costream publisher: %s failed: %s", what, message)
            if outbox.deadline is not None and time.monotonic() >= outbox.deadline:
                with outbox.lock:
                    outbox.give_up(failed=False)
            return "failed", None
        return "failed", None

    def _wait_to_retry(self, what: str, message: str, backoff: Backoff) -> bool:
        """Wait before trying again (False: close's deadline passed, give up)."""
        outbox = self._outbox
        delay = backoff.next_delay() or self._retry_cap_s
        with outbox.cond:
            now = time.monotonic()
            if outbox.deadline is not None and now >= outbox.deadline:
                return False
            if not outbox.outage:
                outbox.outage = True
                self._outage_since = now
                log.warning(
                    "costream publisher: %s failed: %s; trying again in the background",
                    what,
                    message,
                )
            retry_at = now + delay
            while not outbox.stopped:
                until = min(retry_at, outbox.deadline or retry_at)
                now = time.monotonic()
                if now >= until:
                    break
                outbox.cond.wait(until - now)
            if outbox.stopped:
                return False
            outbox.retried += 1
            return True

    def _reached(self) -> None:
        """The server answered: the outage, if any, is over."""
        outbox = self._outbox
        if not outbox.outage:
            return
        with outbox.lock:
            outbox.outage = False
        since = self._outage_since or time.monotonic()
        log.warning(
            "costream publisher: %s answers again after %.1f s",
            outbox.where,
            time.monotonic() - since,
        )
