"""LiteLLM stream chunks to protocol events: segment boundaries, ids, tool-call fragments.

:class:`StepSegments` is the token callback of the OpenHands example made exact: it
detects where a reasoning, text or tool-call segment starts and ends, gives each its id,
and never emits an event for an empty delta. It reads chunks through :mod:`costream.chunks`
(by attribute or by key) and never imports LiteLLM.
:class:`DeltaMerger` merges consecutive deltas of one segment (:func:`merge_key`) within a
flush window, and splits any delta whose frame would pass ``max_event_bytes``
(:func:`costream.sizes.split_deltas`): merged or not, no delta frame is larger.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Literal

import msgspec

from costream.chunks import chunk_field, chunk_text
from costream.config import Settings
from costream.protocol import (
    Event,
    FunctionCall,
    ReasoningEnd,
    ReasoningMessageContent,
    ReasoningMessageEnd,
    ReasoningMessageStart,
    ReasoningStart,
    SnapshotMessage,
    TextMessageContent,
    TextMessageEnd,
    TextMessageStart,
    ToolCall,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
)
from costream.sizes import DELTA_TYPES as DELTA_TYPES
from costream.sizes import Delta as Delta
from costream.sizes import split_deltas

DEFAULT_MAX_EVENT_BYTES: Final = Settings.max_event_bytes  # the setting's default


def new_id() -> str:
    """A fresh segment or message id (22 URL-safe characters)."""
    return secrets.token_urlsafe(16)


@dataclass
class _ToolCall:
    id: str
    index: int | None
    name: str = ""
    arguments: str = ""
    started: bool = False  # TOOL_CALL_START is out (it needs the name)
    ended: bool = False  # TOOL_CALL_END is out, or the call was dropped unnamed
    pending_args: str = ""  # arguments that came before the name


@dataclass
class StepOutput:
    """What one step said, for the conversation's history."""

    message_id: str
    reasoning: list[tuple[str, str]] = field(default_factory=list)  # (message id, text)
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


class StepSegments:
    """Segments of one LLM step (one streamed call)."""

    def __init__(self, new_id: Callable[[], str] = new_id) -> None:
        self._new_id = new_id
        self.parent_message_id = new_id()
        self._open: Literal["reasoning", "text"] | None = None
        self._open_id = ""
        self._text_used_parent_id = False
        self._tools: list[_ToolCall] = []
        self._seen_reasoning_content = False
        self._reasoning: list[tuple[str, str]] = []
        self._content: list[str] = []

    # ---- input -------------------------------------------------------------------
    def feed(self, chunk: object) -> list[Event]:
        """Events for one chunk, in order; [] for empty and usage-only chunks."""
        events: list[Event] = []
        choices = chunk_field(chunk, "choices")
        if not isinstance(choices, list):
            return events
        for choice in choices:
            delta = chunk_field(choice, "delta")
            if delta is None:
                continue
            # Some providers (OpenRouter, vLLM) name the field ``reasoning``.
            reasoning = chunk_text(delta, "reasoning_content") or chunk_text(delta, "reasoning")
            reasoning = self._without_signed_repeat(
                reasoning, chunk_field(delta, "thinking_blocks")
            )
            if reasoning:
                self._seen_reasoning_content = True
            else:
                # Anthropic through LiteLLM: thinking_blocks carry the same text as
                # reasoning_content. Use them only while no reasoning_content was seen in
                # this step, so the text goes out once.
                reasoning = self._thinking_without_reasoning_content(delta)
            if reasoning:
                events += self._reasoning_delta(reasoning)
            content = chunk_text(delta, "content")
            if content:
                events += self._text_delta(content)
            tool_calls = chunk_field(delta, "tool_calls")
            if isinstance(tool_calls, list):
                for fragment in tool_calls:
                    events += self._tool_fragment(fragment)
        return events

    def feed_text(self, text: str) -> list[Event]:
        """A plain string as content (some agents hand text, not chunks)."""
        return self._text_delta(text) if text else []

    def close(self) -> list[Event]:
        """End whatever is open (tool calls in start order). Idempotent."""
        events = self._end_open()
        events += self._end_tools()
        return events

    def output(self) -> StepOutput:
        """The step's reasoning, content and named tool calls, for the history."""
        tool_calls = [
            ToolCall(id=t.id, function=FunctionCall(name=t.name, arguments=t.arguments or "{}"))
            for t in self._tools
            if t.name
        ]
        return StepOutput(
            self.parent_message_id, list(self._reasoning), "".join(self._content), tool_calls
        )

    # ---- segments --------------------------------------------------------------------
    def _reasoning_so_far(self) -> str:
        return "".join(text for _, text in self._reasoning)

    def _repeats_streamed_thinking(self, block: object) -> bool:
        """A signature block whose text repeats thinking this step already streamed.

        Anthropic's closing ``signature`` chunk, in some LiteLLM versions and through
        some gateways, repeats the whole thinking block's text beside the signature.
        """
        text = chunk_text(block, "thinking")
        return (
            bool(chunk_field(block, "signature"))
            and bool(text)
            and (self._reasoning_so_far().endswith(text))
        )

    def _without_signed_repeat(self, reasoning: str, blocks: object) -> str:
        if reasoning and isinstance(blocks, list):
            if any(self._repeats_streamed_thinking(b) for b in blocks):
                if self._reasoning_so_far().endswith(reasoning):
                    return ""
        return reasoning

    def _thinking_without_reasoning_content(self, delta: object) -> str:
        blocks = chunk_field(delta, "thinking_blocks")
        if self._seen_reasoning_content or not isinstance(blocks, list):
            return ""
        return "".join(
            chunk_text(block, "thinking")
            for block in blocks
            if not self._repeats_streamed_thinking(block)
        )

    def _reasoning_delta(self, text: str) -> list[Event]:
        events: list[Event] = []
        if self._open != "reasoning":
            events += self._end_open()
            events += self._end_tools()
            self._open, self._open_id = "reasoning", self._new_id()
            self._reasoning.append((self._open_id, ""))
            events += [
                ReasoningStart(message_id=self._open_id),
                ReasoningMessageStart(message_id=self._open_id),
            ]
        message_id, so_far = self._reasoning[-1]
        self._reasoning[-1] = (message_id, so_far + text)
        events.append(ReasoningMessageContent(message_id=self._open_id, delta=text))
        return events

    def _text_delta(self, text: str) -> list[Event]:
        events: list[Event] = []
        if self._open != "text":
            events += self._end_open()
            events += self._end_tools()
            # The step's first text segment is the step's assistant message; a later one
            # (after a tool call or reasoning) is a message of its own.
            if self._text_used_parent_id:
                self._open_id = self._new_id()
            else:
                self._open_id, self._text_used_parent_id = self.parent_message_id, True
            self._open = "text"
            events.append(TextMessageStart(message_id=self._open_id))
        self._content.append(text)
        events.append(TextMessageContent(message_id=self._open_id, delta=text))
        return events

    def _end_open(self) -> list[Event]:
        open_kind, message_id = self._open, self._open_id
        self._open = None
        if open_kind == "reasoning":
            return [ReasoningMessageEnd(message_id=message_id), ReasoningEnd(message_id=message_id)]
        if open_kind == "text":
            return [TextMessageEnd(message_id=message_id)]
        return []

    # ---- tool calls ------------------------------------------------------------------
    def _tool_fragment(self, fragment: object) -> list[Event]:
        index = chunk_field(fragment, "index")
        index = index if isinstance(index, int) else None
        call_id = chunk_text(fragment, "id")
        function = chunk_field(fragment, "function")
        name = chunk_text(function, "name") if function is not None else ""
        arguments = chunk_text(function, "arguments") if function is not None else ""
        if not (call_id or name or arguments):
            return []
        events: list[Event] = []
        call = self._find_call(index, call_id)
        if call is not None and call.ended:
            # Text or reasoning came after this call, which ended it; a provider's late
            # fragment for it cannot reopen it (its arguments would follow its END).
            return []
        if call is None:
            events += self._end_open()
            call = _ToolCall(id=call_id or self._new_id(), index=index)
            self._tools.append(call)
        if name and not call.started:
            call.name += name
        if arguments:
            if call.started:
                call.arguments += arguments
                events.append(ToolCallArgs(tool_call_id=call.id, delta=arguments))
            else:
                call.pending_args += arguments
        if not call.started and call.name:
            events += self._end_open()
            call.started = True
            events.append(
                ToolCallStart(
                    tool_call_id=call.id,
                    tool_call_name=call.name,
                    parent_message_id=self.parent_message_id,
                )
            )
            if call.pending_args:
                call.arguments, call.pending_args = call.pending_args, ""
                events.append(ToolCallArgs(tool_call_id=call.id, delta=call.arguments))
        return events

    def _find_call(self, index: int | None, call_id: str) -> _ToolCall | None:
        if not self._tools:
            return None
        if call_id:
            # A new id is a new call, even on an index already used.
            return next((t for t in self._tools if t.id == call_id), None)
        if index is not None:
            for call in reversed(self._tools):
                if call.index == index:
                    return call
            return None
        return self._tools[-1]  # no id, no index: continues the latest call

    def _end_tools(self) -> list[Event]:
        events: list[Event] = []
        for call in self._tools:
            if call.ended:
                continue
            call.ended = True
            if not call.started:
                continue  # never named: nothing was announced, nothing to end
            if not call.arguments:
                call.arguments = "{}"
                events.append(ToolCallArgs(tool_call_id=call.id, delta="{}"))
            events.append(ToolCallEnd(tool_call_id=call.id))
        return events


Sink = Callable[[list[Event]], Awaitable[None]]


def merge_key(delta: Delta) -> tuple[type, str]:
    """The segment a delta belongs to: consecutive deltas with one key may merge into one
    (their texts concatenated), here and in the publisher's queue."""
    if isinstance(delta, ToolCallArgs):
        return ToolCallArgs, delta.tool_call_id
    return type(delta), delta.message_id


class DeltaMerger:
    """Merges consecutive deltas of one segment within ``flush_ms`` before the sink.

    A segment's first delta goes out at once (time to first token); later ones wait at
    most ``flush_ms``; anything pending is flushed before any other event. Order and the
    concatenated text never change. ``flush_ms=0`` passes every event straight through.
    The events pushed are never modified: a merged delta is a new event. A delta whose
    frame would pass ``max_event_bytes`` goes out as several consecutive deltas, and a
    merged one is sent once it reaches that size, so what waits stays bounded.
    """

    def __init__(
        self, sink: Sink, flush_ms: int, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    ) -> None:
        self._sink = sink
        self._window = flush_ms / 1000
        self._max_bytes = max_event_bytes
        self._pending: Delta | None = None
        self._last_key: tuple[type, str] | None = None
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._timed_flushes: set[asyncio.Task[None]] = set()  # only those still running
        self._timed_failure: BaseException | None = None  # raised by ``aclose``

    async def push(self, events: list[Event]) -> None:
        """Hand events on in order, holding back a segment's later deltas for merging."""
        if not events:
            return
        async with self._lock:
            out: list[Event] = []
            for event in events:
                if self._window <= 0 or not isinstance(event, DELTA_TYPES):
                    out += self._take_pending()
                    self._last_key = None
                    out.append(event)
                    continue
                key = merge_key(event)
                if key != self._last_key:
                    out += self._take_pending()
                    self._last_key = key
                    out.append(event)  # first delta of a segment: at once
                elif self._pending is None:
                    self._pending = msgspec.structs.replace(event)
                else:
                    self._pending.delta += event.delta
                if self._pending is not None and len(self._pending.delta) >= self._max_bytes:
                    out += self._take_pending()  # as large as one event may be: send it
            if out:
                await self._sink(split_deltas(out, self._max_bytes))
            self._arm_timer()

    def _take_pending(self) -> list[Event]:
        pending, self._pending = self._pending, None
        return [] if pending is None else [pending]

    def _arm_timer(self) -> None:
        if self._pending is not None and self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._window, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        task = asyncio.ensure_future(self.flush())
        self._timed_flushes.add(task)
        task.add_done_callback(self._on_timed_flush_done)

    def _on_timed_flush_done(self, task: asyncio.Task[None]) -> None:
        # A finished flush is forgotten at once (a long run makes thousands); a failure is
        # kept for ``aclose`` to raise.
        self._timed_flushes.discard(task)
        if not task.cancelled() and self._timed_failure is None:
            self._timed_failure = task.exception()

    async def flush(self) -> None:
        """Send the pending merged delta, if any, now."""
        async with self._lock:
            pending = self._take_pending()
            if pending:
                await self._sink(split_deltas(pending, self._max_bytes))

    async def aclose(self) -> None:
        """Stop the timer and flush; a failed timed flush raises here."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await asyncio.gather(*self._timed_flushes)
        if self._timed_failure is not None:
            raise self._timed_failure
        await self.flush()


def step_messages(output: StepOutput, with_tool_calls: bool = True) -> list[SnapshotMessage]:
    """A step's output as history messages: its reasoning, then the assistant message."""
    messages = [
        SnapshotMessage(id=message_id, role="reasoning", content=text)
        for message_id, text in output.reasoning
        if text
    ]
    tool_calls = output.tool_calls if with_tool_calls else []
    if output.content or tool_calls:
        messages.append(
            SnapshotMessage(
                id=output.message_id,
                role="assistant",
                content=output.content or None,
                tool_calls=list(tool_calls) or None,
            )
        )
    return messages
