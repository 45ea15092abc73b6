"""How a run begins and ends, over the Broker interface: the one place that does it.

Every run, built-in (``agent.runner``), published over HTTP (``server.ingest``) or straight
into Redis (the publisher's Redis transport), and every run the reaper ends, goes through
these functions:

- :func:`open_run` takes the run lease and appends ``RUN_STARTED`` in one step, and records
  the user's message; a run whose lease expired is reaped first.
- :class:`OpenSegments` follows a run's events in log order and knows what they left open
  (reasoning and text messages, tool calls, the step) and the events that close it. The
  reaper feeds it a dead run's log (:func:`closing_events`); the publisher's thread feeds
  it what it publishes.
- :func:`ending_event` builds the run's last event: ``RUN_FINISHED`` with its outcome,
  usage and cost, or ``RUN_ERROR`` with a code and a message safe to show.
- :func:`end_run` records the run's history, usage and cost, then appends the closing
  events, the ending and a ``MESSAGES_SNAPSHOT`` and releases the lease, in one atomic
  step, so a viewer never sees a half-closed run. The runner passes its own retrying
  storage calls in, so its exactly-once appends keep working through a Redis restart.
- :func:`reap` ends a run whose producer died (its process stopped, or gave up on
  storage) once its lease expired: it takes the lease over with a new fence, so the dead
  producer can append nothing more, closes what the log shows open and ends the run with
  ``RUN_ERROR`` ``producer_lost``.

Nothing here counts metrics: :func:`end_run` and :func:`reap` return what they appended
(:class:`Ended`), and their callers count it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol, TypeVar

from costream import protocol
from costream.broker import Broker, RunLease
from costream.config import Settings
from costream.errors import ExternallyProduced, LeaseLost, NotFound, RunActive
from costream.protocol import (
    ErrorCode,
    Event,
    MessagesSnapshot,
    ReasoningEnd,
    ReasoningMessageEnd,
    ReasoningMessageStart,
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
    TextMessageStart,
    TokenUsage,
    ToolCallEnd,
    ToolCallStart,
    Usage,
    UserMessage,
)
from costream.segments import new_id
from costream.sizes import latest_messages
from costream.store import Store

Outcome = Literal["success", "cancelled", "error"]

T = TypeVar("T")

log = logging.getLogger(__name__)

_REAP_PAGE: Final = 1000


# ---- opening ---------------------------------------------------------------------------


async def open_run(
    broker: Broker,
    store: Store,
    conversation_id: str,
    content: str,
    ttl_ms: int,
    reap: Callable[[str], Awaitable[None]],
    *,
    run_id: str | None = None,
    message_id: str | None = None,
    external: bool = False,
    sender: str | None = None,
) -> RunLease:
    """Take the run lease and append RUN_STARTED in one step, and record the user message:
    how every run starts, built-in or published (``external``). A run whose lease expired
    is reaped (``reap``) first. ``NotFound``; ``RunActive`` while a live run holds the
    lease; ``ExternallyProduced`` for a built-in run of a conversation an external
    producer owns. ``sender``: the sending session's display name, already cleaned
    (``names.clean_name``); RUN_STARTED's user message and the history carry it."""
    conversation = await store.get(conversation_id)
    if conversation is None:
        raise NotFound(conversation_id)
    if conversation.external and not external:
        raise ExternallyProduced(conversation_id)
    run_id = run_id or new_id()
    user = UserMessage(id=message_id or new_id(), content=content)
    if sender is not None:
        user.name = sender
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
        conversation_id, [SnapshotMessage(id=user.id, role="user", content=content, name=sender)]
    )
    return lease


# ---- what a run left open --------------------------------------------------------------


class OpenSegments:
    """The segments and the step a run's events opened and did not close, and the events
    that close them. Fed the run's events in log order; not thread-safe."""

    def __init__(self) -> None:
        self._segments: dict[tuple[str, str], None] = {}  # started and not ended, in order
        self._step: str | None = None

    def clear(self) -> None:
        """Forget everything: a new run starts with nothing open."""
        self._segments.clear()
        self._step = None

    def track(self, event: Event) -> None:
        """Note an event that opens or closes a segment or the step; others change nothing."""
        match event:
            case ReasoningMessageStart(message_id=i):
                self._segments["reasoning", i] = None
            case ReasoningEnd(message_id=i):
                self._segments.pop(("reasoning", i), None)
            case TextMessageStart(message_id=i):
                self._segments["text", i] = None
            case TextMessageEnd(message_id=i):
                self._segments.pop(("text", i), None)
            case ToolCallStart(tool_call_id=i):
                self._segments["tool", i] = None
            case ToolCallEnd(tool_call_id=i):
                self._segments.pop(("tool", i), None)
            case StepStarted(step_name=name):
                self._step = name
            case StepFinished():
                self._step = None

    def closing_events(self) -> list[Event]:
        """The events that close what is open: reasoning and text in the order they
        started, then tool calls, then the step (``finishReason`` ``error``)."""
        events: list[Event] = []
        for kind, i in self._segments:
            if kind == "reasoning":
                events += [ReasoningMessageEnd(message_id=i), ReasoningEnd(message_id=i)]
            elif kind == "text":
                events.append(TextMessageEnd(message_id=i))
        events += [ToolCallEnd(tool_call_id=i) for kind, i in self._segments if kind == "tool"]
        if self._step is not None:
            meta = StepFinishedMeta(finish_reason="error")
            events.append(StepFinished(step_name=self._step, metadata=meta))
        return events


async def closing_events(broker: Broker, conversation_id: str, start_seq: int) -> list[Event]:
    """The events that close what a run left open, read from its log from ``start_seq``
    (its RUN_STARTED) on."""
    open_segments = OpenSegments()
    after = start_seq - 1
    while True:
        frames = await broker.read_log(conversation_id, after, _REAP_PAGE)
        for frame in frames:
            open_segments.track(protocol.event_decoder.decode(frame))
        if len(frames) < _REAP_PAGE:
            return open_segments.closing_events()
        after = protocol.seq_of(frames[-1])


# ---- ending ------------------------------------------------------------------------------


@dataclass
class RunEnd:
    """How a run ends, as its producer tells it."""

    outcome: Outcome
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    model: str = ""
    error_code: ErrorCode = "internal"
    error_message: str = "the run failed"
    messages: list[SnapshotMessage] = field(default_factory=list)  # history not yet recorded


@dataclass(frozen=True)
class Ended:
    """What :func:`end_run` appended."""

    head: int  # seq of the ending event
    events: int  # events appended: the closing ones and the ending
    ending: RunFinished | RunError


class Durable(Protocol):
    """Awaits ``make()``, a storage call, retrying it as the caller sees fit."""

    def __call__(self, make: Callable[[], Awaitable[T]], /) -> Awaitable[T]: ...


FinishWrite = Callable[[list[bytes], bytes], Awaitable[int]]
"""Appends a run's last bodies with the snapshot and releases its lease; the last seq."""


async def _once(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


def ending_event(
    conversation_id: str, run_id: str, end: RunEnd, total_cost_usd: float
) -> RunFinished | RunError:
    """The run's last event: RUN_ERROR for an ``error`` outcome, else RUN_FINISHED with
    the outcome, the run's usage and cost, and the conversation's ``total_cost_usd``."""
    if end.outcome == "error":
        return RunError(message=end.error_message, code=end.error_code)
    usage = end.usage
    return RunFinished(
        thread_id=conversation_id,
        run_id=run_id,
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
        metadata=RunFinishedMeta(cost_usd=end.cost_usd, total_cost_usd=total_cost_usd),
    )


async def end_run(
    broker: Broker,
    store: Store,
    lease: RunLease,
    end: RunEnd,
    closing: Sequence[Event] = (),
    *,
    durably: Durable = _once,
    write: FinishWrite | None = None,
    max_snapshot_bytes: int = Settings.max_event_bytes,
) -> Ended:
    """End a run: record ``end.messages``, its usage and cost; then, in one atomic step,
    append ``closing`` and the ending event, store a MESSAGES_SNAPSHOT of the history and
    release the lease. How every run ends.

    ``durably`` wraps each storage call and ``write`` makes the last append (default:
    ``broker.finish_run`` under ``lease``): the runner passes its retrying ones. Raises
    ``LeaseLost`` (nothing was appended: whoever holds the lease ends the run) and what
    the storage calls raise."""
    conversation_id = lease.conversation_id
    messages, usage, cost = end.messages, end.usage, end.cost_usd
    if messages:
        await durably(lambda: store.append_messages(conversation_id, messages))
    # Kept under the run's id: a write retried after its answer was lost counts once.
    run_id = lease.run_id
    total = await durably(lambda: store.record_run(conversation_id, run_id, usage, cost))
    ending = ending_event(conversation_id, lease.run_id, end, total)
    history = await durably(lambda: store.messages(conversation_id))
    # Within one event's cap, as every logged frame: the newest messages that fit.
    latest = latest_messages(history, max_snapshot_bytes)
    snapshot = protocol.encode(MessagesSnapshot(messages=latest))
    bodies = [protocol.encode(event) for event in (*closing, ending)]
    if write is None:
        head = await broker.finish_run(lease, bodies, snapshot)
    else:
        head = await write(bodies, snapshot)
    return Ended(head, len(bodies), ending)


async def reap(broker: Broker, store: Store, conversation_id: str, ttl_ms: int) -> Ended | None:
    """End a run whose lease expired: take the lease over, close what its log shows open
    and append RUN_ERROR ``producer_lost``. None when there was nothing to reap (no run,
    a live lease, or another process reaped it first)."""
    active = await broker.active_run(conversation_id)
    if active is None or active.lease_alive:
        return None
    lease = await broker.take_over_run(conversation_id, ttl_ms)
    if lease is None:
        return None
    closing = await closing_events(broker, conversation_id, active.start_seq)
    end = RunEnd(
        "error",
        error_code="producer_lost",
        error_message="the run's server process stopped responding",
    )
    try:
        ended = await end_run(broker, store, lease, end, closing)
    except LeaseLost:
        return None  # another process reaped it first
    log.info("run %s of %s ended: producer_lost", lease.run_id, conversation_id)
    return ended
