"""The segment grammar of a run's events (PROTOCOL.md, "Logged events"), checked event by
event with no I/O: ingest refuses what breaks it, and the tests check logs with it.

Within one run:

- ``TEXT_MESSAGE_START``, ``REASONING_START``, ``REASONING_MESSAGE_START`` and
  ``TOOL_CALL_START`` open a segment under an id not used before by that kind;
- a segment's deltas (``*_CONTENT``, ``TOOL_CALL_ARGS``) and its ``*_END`` need it open,
  and the end closes it; ``REASONING_END`` needs its reasoning message ended first;
- ``TOOL_CALL_RESULT`` answers a tool call that started and ended, once;
- ``STEP_STARTED`` needs no step open; ``STEP_FINISHED`` ends the step of that name;
- the run's boundaries (``RUN_STARTED``, ``RUN_FINISHED``, ``RUN_ERROR``) are the
  caller's to place: :class:`RunGrammar` sees what lies between them.

Token counts and costs are range-checked by the protocol's decoder (``protocol.Usage``).
The state is bounded: ids are at most :data:`MAX_ID_CHARS` long, at most
:data:`MAX_OPEN` segments are open at once, and only the latest :data:`MAX_REMEMBERED`
closed ids are remembered for the duplicate check.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import msgspec

from costream.protocol import (
    Event,
    ReasoningEnd,
    ReasoningMessageContent,
    ReasoningMessageEnd,
    ReasoningMessageStart,
    ReasoningStart,
    StepFinished,
    StepStarted,
    TextMessageContent,
    TextMessageEnd,
    TextMessageStart,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallResult,
    ToolCallStart,
)

MAX_ID_CHARS: Final = 200
MAX_OPEN: Final = 256
MAX_REMEMBERED: Final = 1024


class GrammarError(ValueError):
    """An event that breaks the grammar: ``index`` is its position in what was checked."""

    def __init__(self, index: int, problem: str) -> None:
        super().__init__(f"event {index}: {problem}")
        self.index = index
        self.problem = problem


class RunGrammar(msgspec.Struct, kw_only=True):
    """What one run's events opened and closed so far; :meth:`check` moves it on.

    Keys are ``kind:id`` (``text``, ``reasoning``, ``reasoning_message``, ``tool``). The
    struct encodes to JSON, so a caller may keep it between requests (ingest keeps it in
    the broker, beside the run)."""

    # Dicts used as ordered sets (O(1) membership, oldest first, JSON objects on the wire).
    open: dict[str, None] = msgspec.field(default_factory=dict)
    closed: dict[str, None] = msgspec.field(default_factory=dict)  # bounded
    answered: dict[str, None] = msgspec.field(default_factory=dict)  # tool calls with a result
    step: str | None = None

    def check(self, events: Iterable[Event], first_index: int = 0) -> None:
        """Check ``events`` in order and take them in; GrammarError at the first that
        breaks the grammar (the state then holds the events before it)."""
        for index, event in enumerate(events, first_index):
            problem = self._take(event)
            if problem is not None:
                raise GrammarError(index, problem)

    def _take(self, event: Event) -> str | None:
        match event:
            case TextMessageStart(message_id=i):
                return self._start("text", i)
            case TextMessageContent(message_id=i):
                return self._within("text", i, "TEXT_MESSAGE_CONTENT")
            case TextMessageEnd(message_id=i):
                return self._end("text", i, "TEXT_MESSAGE_END")
            case ReasoningStart(message_id=i):
                return self._start("reasoning", i)
            case ReasoningMessageStart(message_id=i):
                return self._start("reasoning_message", i)
            case ReasoningMessageContent(message_id=i):
                return self._within("reasoning_message", i, "REASONING_MESSAGE_CONTENT")
            case ReasoningMessageEnd(message_id=i):
                return self._end("reasoning_message", i, "REASONING_MESSAGE_END")
            case ReasoningEnd(message_id=i):
                if f"reasoning_message:{i}" in self.open:
                    return f"REASONING_END for {i!r} before its REASONING_MESSAGE_END"
                return self._end("reasoning", i, "REASONING_END")
            case ToolCallStart(tool_call_id=i):
                return self._start("tool", i)
            case ToolCallArgs(tool_call_id=i):
                return self._within("tool", i, "TOOL_CALL_ARGS")
            case ToolCallEnd(tool_call_id=i):
                return self._end("tool", i, "TOOL_CALL_END")
            case ToolCallResult(tool_call_id=i):
                return self._result(i)
            case StepStarted(step_name=name):
                if self.step is not None:
                    return f"STEP_STARTED {name!r} while step {self.step!r} is open"
                self.step = name
            case StepFinished(step_name=name):
                if self.step != name:
                    return f"STEP_FINISHED {name!r} for no open step of that name"
                self.step = None
        return None

    def _start(self, kind: str, segment_id: str) -> str | None:
        if len(segment_id) > MAX_ID_CHARS:
            return f"an id has at most {MAX_ID_CHARS} characters"
        key = f"{kind}:{segment_id}"
        if key in self.open or key in self.closed:
            return f"{_START[kind]} for {segment_id!r}, which already started"
        if len(self.open) >= MAX_OPEN:
            return f"more than {MAX_OPEN} segments open at once"
        self.open[key] = None
        return None

    def _within(self, kind: str, segment_id: str, name: str) -> str | None:
        if f"{kind}:{segment_id}" not in self.open:
            return f"{name} for {segment_id!r}, which is not open (no {_START[kind]})"
        return None

    def _end(self, kind: str, segment_id: str, name: str) -> str | None:
        key = f"{kind}:{segment_id}"
        if key not in self.open:
            return f"{name} for {segment_id!r}, which is not open (no {_START[kind]})"
        del self.open[key]
        _remember(self.closed, key)
        return None

    def _result(self, call_id: str) -> str | None:
        key = f"tool:{call_id}"
        if key in self.open:
            return f"TOOL_CALL_RESULT for {call_id!r} before its TOOL_CALL_END"
        if key not in self.closed:
            return f"TOOL_CALL_RESULT for {call_id!r}, a tool call that never started"
        if call_id in self.answered:
            return f"a second TOOL_CALL_RESULT for {call_id!r}"
        _remember(self.answered, call_id)
        return None


def _remember(keys: dict[str, None], key: str) -> None:
    keys[key] = None
    if len(keys) > MAX_REMEMBERED:
        del keys[next(iter(keys))]


_START: Final = {
    "text": "TEXT_MESSAGE_START",
    "reasoning": "REASONING_START",
    "reasoning_message": "REASONING_MESSAGE_START",
    "tool": "TOOL_CALL_START",
}

grammar_encoder: Final = msgspec.json.Encoder()
grammar_decoder: Final = msgspec.json.Decoder(RunGrammar)
