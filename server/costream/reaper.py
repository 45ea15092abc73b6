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
from typing import Final

from . import protocol
from .broker import Broker
from .errors import LeaseLost
from .metrics import Metrics
from .protocol import (
    Event,
    MessagesSnapshot,
    ReasoningEnd,
    ReasoningMessageEnd,
    RunError,
    StepFinished,
    StepFinishedMeta,
    StepStarted,
    TextMessageEnd,
    ToolCallEnd,
)
from .store import Store

# The run's log lines keep the runner's logger name, as before this module was split off.
log = logging.getLogger("costream.runner")

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
