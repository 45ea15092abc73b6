"""Ending the runs of dead producers, from what their log shows.

A run whose producer died (its process stopped, or gave up on storage) keeps its lease
until the lease expires. Then a server that watches the conversation, or whoever starts
the next run there (``runner.open_run``), reaps it: takes the lease over with a new fence,
so the dead producer can append nothing more, reads the run's log to close what it left
open (reasoning, text messages, tool calls, the step), and ends it with ``RUN_ERROR``
``producer_lost`` and a ``MESSAGES_SNAPSHOT`` in one atomic step. :func:`closing_events`
also closes what a published run left open when its producer finishes it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from costream import protocol
from costream.broker import Broker, RunLease
from costream.errors import LeaseLost, NotFound, RunActive
from costream.metrics import Metrics
from costream.protocol import (
    ErrorCode,
    Event,
    MessagesSnapshot,
    ReasoningEnd,
    ReasoningMessageEnd,
    RunAgentInput,
    RunError,
    RunFinished,
    RunFinishedMeta,
    RunOutcome,
    RunStarted,
    SnapshotMessage,
    StepFinished,
    StepFinishedMeta,
    StepStarted,
    TextMessageEnd,
    TokenUsage,
    ToolCallEnd,
    Usage,
    UserMessage,
)
from costream.segments import new_id
from costream.store import Store

Outcome = Literal["success", "cancelled", "error"]

log = logging.getLogger(__name__)

_REAP_PAGE: Final = 1000


async def reap(
    broker: Broker, store: Store, metrics: Metrics, conversation_id: str, ttl_ms: int
) -> None:
    """End a run whose lease expired: close its open segments, append producer_lost."""
    active = await broker.active_run(conversation_id)
    if active is None or active.lease_alive:
        return
    lease = await broker.take_over_run(conversation_id, ttl_ms)
    if lease is None:
        return
    closing = await closing_events(broker, conversation_id, active.start_seq)
    closing.append(
        RunError(message="the run's server process stopped responding", code="producer_lost")
    )
    history = await store.messages(conversation_id)
    snapshot = protocol.encode(MessagesSnapshot(messages=history))
    try:
        await broker.finish_run(lease, [protocol.encode(event) for event in closing], snapshot)
    except LeaseLost:
        return  # another process reaped it first
    metrics.events_appended.inc(len(closing))
    metrics.run_errors.inc()
    log.info("run %s of %s ended: producer_lost", lease.run_id, conversation_id)


async def closing_events(broker: Broker, conversation_id: str, start_seq: int) -> list[Event]:
    """The events that end what a dead run left open, read from its log."""
    reasoning: dict[str, None] = {}
    texts: dict[str, None] = {}
    tools: dict[str, None] = {}
    step: str | None = None
    after = start_seq - 1
    while True:
        frames = await broker.read_log(conversation_id, after, _REAP_PAGE)
        for frame in frames:
            event = protocol.event_decoder.decode(frame)
            match event:
                case protocol.ReasoningMessageStart(message_id=i):
                    reasoning[i] = None
                case protocol.ReasoningEnd(message_id=i):
                    reasoning.pop(i, None)
                case protocol.TextMessageStart(message_id=i):
                    texts[i] = None
                case protocol.TextMessageEnd(message_id=i):
                    texts.pop(i, None)
                case protocol.ToolCallStart(tool_call_id=i):
                    tools[i] = None
                case protocol.ToolCallEnd(tool_call_id=i):
                    tools.pop(i, None)
                case StepStarted(step_name=name):
                    step = name
                case StepFinished():
                    step = None
        if len(frames) < _REAP_PAGE:
            break
        after = protocol.seq_of(frames[-1])
    events: list[Event] = []
    for message_id in reasoning:
        events += [
            ReasoningMessageEnd(message_id=message_id),
            ReasoningEnd(message_id=message_id),
        ]
    events += [TextMessageEnd(message_id=message_id) for message_id in texts]
    events += [ToolCallEnd(tool_call_id=tool_call_id) for tool_call_id in tools]
    if step is not None:
        events.append(
            StepFinished(step_name=step, metadata=StepFinishedMeta(finish_reason="error"))
        )
    return events


async def open_run(
    broker: Broker,
    store: Store,
    conversation_id: str,
    content: str,
    ttl_ms: int,
    reap: Callable[[str], Awaitable[None]],
) -> RunLease:
    """Take the run lease and append RUN_STARTED in one step, and record the user message:
    how every run starts, built-in or published. A run whose lease expired is reaped
    (``reap``) first. ``NotFound``; ``RunActive`` while a live run holds the lease."""
    if await store.get(conversation_id) is None:
        raise NotFound(conversation_id)
    run_id = new_id()
    user = UserMessage(id=new_id(), content=content)
    body = protocol.encode(
        RunStarted(
            thread_id=conversation_id,
            run_id=run_id,
            input=RunAgentInput(thread_id=conversation_id, run_id=run_id, messages=[user]),
        )
    )
    try:
        lease = await broker.start_run(conversation_id, run_id, body, ttl_ms)
    except RunActive:
        active = await broker.active_run(conversation_id)
        if active is None or active.lease_alive:
            raise
        await reap(conversation_id)
        lease = await broker.start_run(conversation_id, run_id, body, ttl_ms)
    await store.append_messages(
        conversation_id, [SnapshotMessage(id=user.id, role="user", content=content)]
    )
    return lease


@dataclass
class RunEnd:
    """How a run ends, as its producer tells it."""

    outcome: Outcome
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    model: str = ""
    error_code: ErrorCode = "internal"
    error_message: str = "the run failed"
    messages: list[SnapshotMessage] = field(default_factory=list)  # the run's history


async def finish_external_run(
    broker: Broker, store: Store, lease: RunLease, end: RunEnd, closing: Sequence[Event]
) -> int:
    """Record history, usage and cost, then append ``closing`` and the last event with
    the snapshot and release the lease, as the runner's ``_end`` does; the last seq."""
    conversation_id = lease.conversation_id
    await store.append_messages(conversation_id, end.messages)
    await store.add_usage(conversation_id, end.usage)
    total = await store.add_cost(conversation_id, end.cost_usd)
    ending: Event
    if end.outcome == "error":
        ending = RunError(message=end.error_message, code=end.error_code)
    else:
        usage = end.usage
        ending = RunFinished(
            thread_id=conversation_id,
            run_id=lease.run_id,
            outcome=RunOutcome(type=end.outcome),
            usage=[
                TokenUsage(
                    model=end.model or None,
                    input_tokens=usage.input_tokens,
                    output_tokens=usage.output_tokens,
                    reasoning_tokens=usage.reasoning_tokens,
                    total_tokens=usage.input_tokens + usage.output_tokens,
                )
            ],
            metadata=RunFinishedMeta(cost_usd=end.cost_usd, total_cost_usd=total),
        )
    history = await store.messages(conversation_id)
    snapshot = protocol.encode(MessagesSnapshot(messages=history))
    bodies = [protocol.encode(event) for event in (*closing, ending)]
    return await broker.finish_run(lease, bodies, snapshot)
