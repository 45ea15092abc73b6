"""The bounded queue between a :class:`~costream.publisher.TokenPublisher`'s callers and its thread.

Callers put a run's events and control items (:class:`Start`, :class:`Finish`,
:class:`Abandon`, :class:`Barrier`, :class:`Close`) under the publisher's lock; its thread
takes them all at once and publishes them in order.

- Consecutive deltas of one segment merge (up to ``_MAX_DELTA_CHARS`` each); merging never
  changes the concatenated text, so a slow transport costs no more events.
- Past ``max_events`` queued events or ``max_chars`` queued delta characters the run is
  abandoned: its queued events are dropped and :class:`Abandon` is queued, and the run's
  later events are dropped until the next run starts.

Not thread-safe by itself: the publisher's lock guards every call.
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import msgspec

from costream.lifecycle import RunEnd
from costream.protocol import (
    Event,
    LoggedEvent,
    ReasoningMessageContent,
    TextMessageContent,
    ToolCallArgs,
)

_MAX_DELTA_CHARS: Final = 16_384  # one (merged) delta: frames stay far below 1 MiB
_MERGEABLE: Final = (ReasoningMessageContent, TextMessageContent, ToolCallArgs)
_Delta = ReasoningMessageContent | TextMessageContent | ToolCallArgs


@dataclass
class Start:
    """Start a run for the user's message ``content``."""

    content: str


@dataclass
class Finish:
    """End the run as ``end`` tells."""

    end: RunEnd


@dataclass
class Abandon:
    """The run fell too far behind: end it with RUN_ERROR."""


@dataclass
class Barrier:
    """Everything queued before it was published (or failed): set ``done``."""

    done: concurrent.futures.Future[None]


@dataclass
class Close:
    """Stop the publisher's thread."""


Item = LoggedEvent | Start | Finish | Abandon | Barrier | Close


def _delta_key(event: _Delta) -> tuple[type, str]:
    if isinstance(event, ToolCallArgs):
        return ToolCallArgs, event.tool_call_id
    return type(event), event.message_id


class EventQueue:
    """Events and control items in order, consecutive deltas of one segment merged; bounded."""

    def __init__(self, max_events: int, max_chars: int) -> None:
        self._max_events, self._max_chars = max_events, max_chars
        self._items: collections.deque[Item] = collections.deque()
        self._pending_events = 0
        self._pending_chars = 0
        self.overflowed = False  # the run was abandoned: its later events are dropped

    def __bool__(self) -> bool:
        return bool(self._items)

    def append(self, item: Start | Finish | Barrier | Close) -> None:
        """Queue a control item."""
        self._items.append(item)

    def put(self, events: Sequence[Event]) -> int:
        """Queue a run's events, deltas merged; how many were dropped (the run is abandoned)."""
        dropped = 0
        for event in events:
            if self.overflowed:
                dropped += 1
            elif isinstance(event, _MERGEABLE):
                self._put_delta(event)
            else:
                self._items.append(event)
                self._pending_events += 1
        return dropped

    def over_bounds(self) -> bool:
        """Whether more events or delta characters are queued than the bounds allow."""
        return self._pending_events > self._max_events or self._pending_chars > self._max_chars

    def _put_delta(self, event: _Delta) -> None:
        """Queue a delta, merged into the queued delta of its segment when one is last."""
        text = event.delta
        self._pending_chars += len(text)
        last = self._items[-1] if self._items else None
        if isinstance(last, _MERGEABLE) and _delta_key(last) == _delta_key(event):
            room = max(0, _MAX_DELTA_CHARS - len(last.delta))
            last.delta += text[:room]
            text = text[room:]
        while text:
            self._items.append(msgspec.structs.replace(event, delta=text[:_MAX_DELTA_CHARS]))
            self._pending_events += 1
            text = text[_MAX_DELTA_CHARS:]

    def abandon(self) -> int:
        """Drop the run's queued events and queue :class:`Abandon`; how many were dropped."""
        dropped = 0
        while self._items and isinstance(self._items[-1], LoggedEvent):
            self._items.pop()
            dropped += 1
        self._pending_events = sum(isinstance(i, LoggedEvent) for i in self._items)
        self._pending_chars = 0
        self._items.append(Abandon())
        self.overflowed = True
        return dropped

    def take_all(self) -> list[Item]:
        """Everything queued, in order; the queue is left empty."""
        batch = list(self._items)
        self._items.clear()
        self._pending_events = self._pending_chars = 0
        return batch
