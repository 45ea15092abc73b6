"""What a :class:`~costream.publisher.TokenPublisher`'s callers and its thread share.

Callers put a run's events and control items (:class:`Start`, :class:`Finish`,
:class:`Abandon`, :class:`Barrier`, :class:`Close`) into an :class:`EventQueue` under the
:class:`Outbox`'s lock; the publishing thread takes what is ready and publishes it in order.

- The flush window (``flush_ms``, the built-in runner's ``COSTREAM_FLUSH_MS``, 30 ms by
  default): a segment's first delta is ready at once (time to first token); its later
  deltas wait at most ``flush_ms`` in the queue, merging, as the runner's
  :class:`~costream.segments.DeltaMerger` does, so both transports make about as many
  events as a built-in run of the same stream. Any other event makes everything before
  it ready. ``flush_ms=0`` merges only while the thread is busy.
- Merging never changes the concatenated text and never cuts a delta: a merged delta
  stops growing past ``_MERGE_UP_TO_CHARS`` and the next delta starts a new event, so a
  frame stays far below the 1 MiB limit while each delta the LLM sent stays whole.
- Past ``max_events`` queued events or ``max_chars`` queued delta characters the run is
  abandoned: its queued events are dropped and :class:`Abandon` is queued, and the run's
  later events are dropped until the next run starts. During an outage (the thread cannot
  reach the server and is trying again) the queue is the publisher's buffer: past its
  bounds the queued events are shed into a :class:`Gap` that counts them, and the run's
  later events are queued as before, to be published once the server is back.

Not thread-safe by itself: the :class:`Outbox`'s lock guards every call.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import msgspec

from costream.client.publisher.steps import StepReader
from costream.lifecycle import RunEnd
from costream.protocol import Event, LoggedEvent
from costream.segments import DELTA_TYPES, Delta, merge_key

log = logging.getLogger("costream.client.publisher")

_MERGE_UP_TO_CHARS: Final = 64 * 1024  # a merged delta takes no more deltas past this


@dataclass
class Start:
    """Start a run for the user's message ``content``."""

    content: str
    model: str = ""  # shown to viewers from the start, when known
    exclusive: bool = False  # mark the conversation as owned by this producer


@dataclass
class Finish:
    """End the run as ``end`` tells."""

    end: RunEnd


@dataclass
class Abandon:
    """The run fell too far behind: end it with RUN_ERROR."""


@dataclass
class Gap:
    """``lost`` events of the run were shed here (the buffer was full during an outage)."""

    lost: int


@dataclass
class Barrier:
    """Everything queued before it was published (or failed): set ``done``."""

    done: concurrent.futures.Future[None]


@dataclass
class Close:
    """Stop the publisher's thread."""


Item = LoggedEvent | Start | Finish | Abandon | Gap | Barrier | Close


class EventQueue:
    """Events and control items in order, a segment's later deltas held up to the flush
    window and merged; bounded."""

    def __init__(self, max_events: int, max_chars: int, flush_ms: int = 0) -> None:
        self._max_events, self._max_chars = max_events, max_chars
        self._window = max(0, flush_ms) / 1000
        self._items: collections.deque[Item] = collections.deque()
        self._pending_events = 0
        self._pending_chars = 0
        self._last_key: tuple[type, str] | None = None  # the segment of the last delta put
        self._held_until: float | None = None  # the last item waits until then
        self.overflowed = False  # the run was abandoned: its later events are dropped

    def __bool__(self) -> bool:
        return bool(self._items)

    def append(self, item: Start | Finish | Barrier | Close) -> None:
        """Queue a control item; everything before it is ready."""
        self._items.append(item)
        self._last_key = self._held_until = None

    def put(self, events: Sequence[Event]) -> int:
        """Queue a run's events, deltas merged; how many were dropped (the run is abandoned)."""
        dropped = 0
        for event in events:
            if self.overflowed:
                dropped += 1
            elif isinstance(event, DELTA_TYPES):
                self._put_delta(event)
            else:
                self._items.append(event)
                self._pending_events += 1
                self._last_key = self._held_until = None
        return dropped

    def over_bounds(self) -> bool:
        """Whether more events or delta characters are queued than the bounds allow."""
        return self._pending_events > self._max_events or self._pending_chars > self._max_chars

    def _put_delta(self, event: Delta) -> None:
        """Merge a delta into the queued delta of its segment when that one is last, else
        queue it: at once when it opens its segment, held for the window when it goes on."""
        self._pending_chars += len(event.delta)
        key = merge_key(event)
        last = self._items[-1] if self._items else None
        if (
            isinstance(last, DELTA_TYPES)
            and merge_key(last) == key
            and len(last.delta) < _MERGE_UP_TO_CHARS
        ):
            last.delta += event.delta
            return
        # A copy: the caller's event is never changed by later merges.
        self._items.append(msgspec.structs.replace(event))
        self._pending_events += 1
        going_on = key == self._last_key
        self._last_key = key
        self._held_until = time.monotonic() + self._window if going_on and self._window else None

    def ready(self, now: float) -> bool:
        """Whether anything may be taken now."""
        if not self._items:
            return False
        return self._held_until is None or now >= self._held_until or len(self._items) > 1

    def ready_at(self) -> float | None:
        """When the held delta is due (None: nothing held)."""
        return self._held_until if self._items else None

    def take_ready(self, now: float) -> list[Item]:
        """What may go now, in order: everything but a delta still inside its window."""
        held = None
        if self._held_until is not None and now < self._held_until:
            held = self._items.pop()
        else:
            self._held_until = None
        batch = list(self._items)
        self._items.clear()
        self._pending_events = self._pending_chars = 0
        if isinstance(held, DELTA_TYPES):
            self._items.append(held)
            self._pending_events, self._pending_chars = 1, len(held.delta)
        return batch

    def shed(self) -> int:
        """Drop the run's queued events into a :class:`Gap` (merged with one just before
        them); how many were dropped. The run's later events are queued as before."""
        dropped = 0
        while self._items and isinstance(self._items[-1], LoggedEvent):
            self._items.pop()
            dropped += 1
        last = self._items[-1] if self._items else None
        if isinstance(last, Gap):
            last.lost += dropped
        else:
            self._items.append(Gap(dropped))
        self._pending_events = sum(isinstance(i, LoggedEvent) for i in self._items)
        self._pending_chars = 0
        self._last_key = self._held_until = None
        return dropped

    def clear(self) -> int:
        """Empty the queue (the publisher gave up): how many events it held; waiting
        barriers are released."""
        events = 0
        for item in self._items:
            if isinstance(item, LoggedEvent):
                events += 1
            elif isinstance(item, Barrier) and not item.done.done():
                item.done.set_result(None)
        self._items.clear()
        self._pending_events = self._pending_chars = 0
        self._last_key = self._held_until = None
        return events

    def abandon(self) -> int:
        """Drop the run's queued events and queue :class:`Abandon`; how many were dropped."""
        dropped = 0
        while self._items and isinstance(self._items[-1], LoggedEvent):
            self._items.pop()
            dropped += 1
        self._pending_events = sum(isinstance(i, LoggedEvent) for i in self._items)
        self._pending_chars = 0
        self._items.append(Abandon())
        self._last_key = self._held_until = None
        self.overflowed = True
        return dropped


class Outbox:
    """The queue, the step reader and the counters, under one lock; callers put, the
    publishing thread takes.

    Counters: ``delivered`` events the server stored (answered), ``dropped`` events (or
    chunks) given up on, never stored, ``unconfirmed`` events sent whose answer never
    came before the publisher gave up on them (all of such a batch is stored, or none),
    ``retried`` calls tried again after a failure, ``errors`` failures given up on. Every
    event queued ends up delivered, dropped or unconfirmed; ``held`` counts those the
    thread has taken and not yet settled, ``in_flight`` those of the call under way."""

    def __init__(self, queue: EventQueue, steps: StepReader, where: str) -> None:
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.queue, self.steps, self.where = queue, steps, where
        self.errors = 0
        self.dropped = 0
        self.delivered = 0
        self.unconfirmed = 0
        self.retried = 0
        self.held = 0
        self.in_flight = 0
        self.outage = False  # the thread cannot reach the server and is trying again
        self.deadline: float | None = None  # close(): give up what is not sent by then
        self.stopped = False  # close() gave up: the counters are final, nothing more is sent
        self.run_id: str | None = None  # the latest run started in the conversation
        self.cancel_requested = False  # someone asked the conversation's run to stop

    def enqueue(self, events: list[Event]) -> None:
        """Queue a run's events (under the lock); wake the thread when some are ready or
        a delta starts waiting (the thread then sleeps until it is due)."""
        held_until = self.queue.ready_at()
        self.dropped += self.queue.put(events)
        if self.queue.over_bounds() and self.outage:
            self.dropped += self.queue.shed()
        elif self.queue.over_bounds():
            self.dropped += self.queue.abandon()
            log.warning(
                "costream publisher: %s fell too far behind; this run's remaining output "
                "is dropped and it ends in RUN_ERROR",
                self.where,
            )
        if events and (self.queue.ready(time.monotonic()) or self.queue.ready_at() != held_until):
            self.cond.notify()

    def settle(
        self, *, delivered: int = 0, dropped: int = 0, unconfirmed: int = 0, held: int | None = None
    ) -> None:
        """Count events as delivered, dropped or unconfirmed, ``held`` of them (all by
        default) taken from the queue (takes the lock); nothing once close() gave up (it
        counted them)."""
        with self.lock:
            if self.stopped:
                return
            self.delivered += delivered
            self.dropped += dropped
            self.unconfirmed += unconfirmed
            self.held -= delivered + dropped + unconfirmed if held is None else held

    def give_up(self, *, failed: bool = True) -> None:
        """Stop publishing (under the lock): what is queued or held is dropped, the call
        under way unconfirmed, one error counted (unless ``failed`` is False: the caller
        counted it); the counters are final."""
        if self.stopped:
            return
        self.stopped = True
        left = self.held + self.queue.clear()
        self.errors += 1 if left and failed else 0
        self.unconfirmed += self.in_flight
        self.dropped += left - self.in_flight
        self.held = self.in_flight = 0
        self.cond.notify_all()

    def control(self, item: Start | Finish | Barrier | Close) -> None:
        """Queue a control item (under the lock) and wake the thread."""
        self.queue.append(item)
        self.cond.notify()

    def count(self, *, errors: int = 0, dropped: int = 0) -> None:
        """Count failed publishes or unpublished events (takes the lock)."""
        with self.lock:
            self.errors += errors
            self.dropped += dropped
