"""A published run kept well formed when some of its events are lost.

An outage can cost a :class:`~costream.publisher.TokenPublisher` events: its bounded
buffer sheds them, or the server reaped the run while its answer was lost. What is sent
after such a gap must still obey the segment grammar (:mod:`costream.grammar`), which
ingest enforces with 400: a delta whose segment's start was lost, an end for a segment
that is not open, a result for a tool call of an interrupted run. :class:`Continuity`
checks each event with the grammar before it is sent and drops (and counts) what no
longer fits, ends a step whose ``STEP_FINISHED`` was lost before the next one starts,
and, for a run that continues an interrupted one, opens again the step and segments
that were open when it was cut (:meth:`Continuity.reopen`).

Without a gap every event fits: nothing is dropped and nothing is added.
"""

from __future__ import annotations

from costream.grammar import GrammarError, RunGrammar
from costream.lifecycle import OpenSegments
from costream.protocol import (
    Event,
    ReasoningEnd,
    ReasoningMessageEnd,
    ReasoningMessageStart,
    ReasoningStart,
    StepFinished,
    StepFinishedMeta,
    StepStarted,
    TextMessageEnd,
    TextMessageStart,
    ToolCallEnd,
    ToolCallStart,
)


def _opens(event: Event) -> str | None:
    """The grammar key of the segment ``event`` starts, if it starts one."""
    match event:
        case TextMessageStart(message_id=i):
            return f"text:{i}"
        case ReasoningStart(message_id=i):
            return f"reasoning:{i}"
        case ReasoningMessageStart(message_id=i):
            return f"reasoning_message:{i}"
        case ToolCallStart(tool_call_id=i):
            return f"tool:{i}"
    return None


def _closes(event: Event) -> str | None:
    """The grammar key of the segment ``event`` ends, if it ends one."""
    match event:
        case TextMessageEnd(message_id=i):
            return f"text:{i}"
        case ReasoningEnd(message_id=i):
            return f"reasoning:{i}"
        case ReasoningMessageEnd(message_id=i):
            return f"reasoning_message:{i}"
        case ToolCallEnd(tool_call_id=i):
            return f"tool:{i}"
    return None


class Continuity:
    """One published run's events as sent: what they opened, checked with the grammar.
    Not thread-safe (the publishing thread's own)."""

    def __init__(self) -> None:
        self.dropped = 0  # events that no longer fitted, since the caller last looked
        self._reset()

    def _reset(self) -> None:
        self._grammar = RunGrammar()
        self._starts: dict[str, Event] = {}  # open segments' first events, oldest first
        self._step: StepStarted | None = None
        self._open = OpenSegments()

    def admit(self, events: list[Event]) -> list[Event]:
        """The events to send for ``events``: those that fit the run so far, after a
        ``STEP_FINISHED`` (``error``) for a step whose own end was lost."""
        admitted: list[Event] = []
        for event in events:
            if isinstance(event, StepStarted) and self._step is not None:
                meta = StepFinishedMeta(finish_reason="error")
                ending = StepFinished(step_name=self._step.step_name, metadata=meta)
                if self._take(ending):
                    admitted.append(ending)
            if self._take(event):
                admitted.append(event)
            else:
                self.dropped += 1
        return admitted

    def _take(self, event: Event) -> bool:
        try:
            self._grammar.check([event])
        except GrammarError:
            return False
        self._open.track(event)
        if (key := _opens(event)) is not None:
            self._starts[key] = event
        elif (key := _closes(event)) is not None:
            self._starts.pop(key, None)
        elif isinstance(event, StepStarted):
            self._step = event
        elif isinstance(event, StepFinished):
            self._step = None
        return True

    def closing_events(self) -> list[Event]:
        """The events that close what is open, as the server's reaper would close it."""
        return self._open.closing_events()

    def reopen(self) -> list[Event]:
        """Forget the run and start a new one with what was open: its step and its
        segments, started again under the same ids (their earlier deltas stay in the
        interrupted run)."""
        opening: list[Event] = [self._step] if self._step is not None else []
        opening += self._starts.values()
        self._reset()
        return self.admit(opening)
