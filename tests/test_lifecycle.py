"""The run lifecycle over a broker: what a run left open, how every run ends, reaping."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import pytest
from msgspec.structs import replace

from costream import lifecycle, protocol
from costream.broker import RunLease
from costream.broker.memory import MemoryBroker
from costream.errors import LeaseLost
from costream.lifecycle import OpenSegments, RunEnd
from costream.protocol import (
    Event,
    ReasoningEnd,
    ReasoningMessageContent,
    ReasoningMessageEnd,
    ReasoningMessageStart,
    ReasoningStart,
    SnapshotMessage,
    StepFinished,
    StepFinishedMeta,
    StepStarted,
    StepStartedMeta,
    TextMessageContent,
    TextMessageEnd,
    TextMessageStart,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from costream.store import Store

T = TypeVar("T")

_LONG_TTL_MS = 60_000


def _step_started(name: str = "llm-1") -> StepStarted:
    return StepStarted(step_name=name, metadata=StepStartedMeta(model="m", attempt=1))


def _tool_start(tool_call_id: str) -> ToolCallStart:
    return ToolCallStart(
        tool_call_id=tool_call_id, tool_call_name="list_files", parent_message_id="a1"
    )


async def _no_reap(conversation_id: str) -> None:
    raise AssertionError(f"nothing to reap in {conversation_id}")


class _Conversation:
    """A conversation on a memory broker, with a run opened in it."""

    def __init__(self) -> None:
        self.broker = MemoryBroker()
        self.store = Store(self.broker)
        self.id = ""

    async def open(self, ttl_ms: int = _LONG_TTL_MS) -> RunLease:
        if not self.id:
            created = await self.store.create(title="t", model="m", system="")
            self.id = created.conversation.id
        return await lifecycle.open_run(self.broker, self.store, self.id, "hello", ttl_ms, _no_reap)

    async def append(self, lease: RunLease, *events: Event) -> None:
        await self.broker.append(lease, [protocol.encode(event) for event in events])

    async def log(self) -> list[dict[str, Any]]:
        frames = await self.broker.read_log(self.id, 0, 1000)
        return [msgspec.json.decode(frame) for frame in frames]


def _types(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events]


# ---- what a run left open --------------------------------------------------------------


def test_open_segments_close_what_is_still_open_then_the_step() -> None:
    """Closed segments are forgotten; what is open closes in start order, tool calls
    after text, and the step last with finishReason error."""
    open_segments = OpenSegments()
    for event in (
        _step_started(),
        ReasoningStart(message_id="r1"),
        ReasoningMessageStart(message_id="r1"),
        ReasoningMessageContent(message_id="r1", delta="hm"),
        ReasoningMessageEnd(message_id="r1"),
        ReasoningEnd(message_id="r1"),
        _tool_start("c1"),
        _tool_start("c2"),
        ToolCallEnd(tool_call_id="c2"),
        ReasoningMessageStart(message_id="r2"),
        TextMessageStart(message_id="t1"),
        TextMessageContent(message_id="t1", delta="hi"),
    ):
        open_segments.track(event)

    expected = [
        ReasoningMessageEnd(message_id="r2"),
        ReasoningEnd(message_id="r2"),
        TextMessageEnd(message_id="t1"),
        ToolCallEnd(tool_call_id="c1"),
        StepFinished(step_name="llm-1", metadata=StepFinishedMeta(finish_reason="error")),
    ]
    # Compared without their timestamps: the clock may tick between the two lists.
    closing = open_segments.closing_events()
    assert [replace(e, timestamp=0) for e in closing] == [replace(e, timestamp=0) for e in expected]
    open_segments.clear()
    assert open_segments.closing_events() == []


def test_open_segments_leave_nothing_to_close_after_a_finished_step() -> None:
    """A step whose segments and STEP_FINISHED are out needs no closing event."""
    open_segments = OpenSegments()
    for event in (
        _step_started(),
        TextMessageStart(message_id="t1"),
        TextMessageEnd(message_id="t1"),
        StepFinished(step_name="llm-1", metadata=StepFinishedMeta(finish_reason="stop")),
    ):
        open_segments.track(event)
    assert open_segments.closing_events() == []


async def test_closing_events_read_from_the_log_close_what_the_run_left_open() -> None:
    """The log of a run cut mid tool call gives the events that close it."""
    conversation = _Conversation()
    lease = await conversation.open()
    await conversation.append(lease, _step_started(), _tool_start("c1"))

    start_seq = (await conversation.log())[0]["seq"]
    closing = await lifecycle.closing_events(conversation.broker, conversation.id, start_seq)

    assert closing == [
        ToolCallEnd(tool_call_id="c1"),
        StepFinished(step_name="llm-1", metadata=StepFinishedMeta(finish_reason="error")),
    ]


# ---- ending --------------------------------------------------------------------------------


async def test_end_run_records_the_run_then_appends_its_end_and_releases_the_lease() -> None:
    """History, usage and cost are recorded; the closing events, RUN_FINISHED with the
    run's and the conversation's cost, and the snapshot go out in one step."""
    conversation = _Conversation()
    for cost in (0.25, 0.5):
        lease = await conversation.open()
        answer = SnapshotMessage(id=f"a{cost}", role="assistant", content="hi")
        end = RunEnd(
            "success",
            usage=Usage(input_tokens=3, output_tokens=2),
            cost_usd=cost,
            model="m",
            messages=[answer],
        )
        ended = await lifecycle.end_run(
            conversation.broker,
            conversation.store,
            lease,
            end,
            [TextMessageEnd(message_id="t1")],
        )

    events = await conversation.log()
    assert _types(events)[-2:] == ["TEXT_MESSAGE_END", "RUN_FINISHED"]
    finished = events[-1]
    assert ended.head == finished["seq"] and ended.events == 2
    assert finished["outcome"] == {"type": "success"}
    assert finished["usage"][0]["totalTokens"] == 5 and finished["usage"][0]["model"] == "m"
    assert finished["metadata"] == {"costUsd": 0.5, "totalCostUsd": 0.75}
    assert await conversation.broker.active_run(conversation.id) is None
    snapshot = await conversation.broker.read_snapshot(conversation.id)
    assert snapshot is not None and protocol.seq_of(snapshot) == finished["seq"]
    history = [m.content for m in await conversation.store.messages(conversation.id)]
    assert history == ["hello", "hi", "hello", "hi"]
    usage, total = await conversation.store.totals(conversation.id)
    assert usage == Usage(input_tokens=6, output_tokens=4) and total == 0.75


async def test_the_snapshot_of_a_long_history_holds_its_newest_messages_within_the_cap() -> None:
    """A history longer than one event may be (a late joiner's client reads frames of 1
    MiB at most): the snapshot keeps the newest messages that fit, the store keeps all."""
    conversation = _Conversation()
    cap = 16 * 1024
    for turn in range(8):
        lease = await conversation.open()
        answer = SnapshotMessage(id=f"a{turn}", role="assistant", content=f"{turn}" * 3000)
        end = RunEnd("success", messages=[answer])
        await lifecycle.end_run(
            conversation.broker, conversation.store, lease, end, max_snapshot_bytes=cap
        )

    snapshot = await conversation.broker.read_snapshot(conversation.id)
    assert snapshot is not None and len(snapshot) <= cap
    kept = [m["id"] for m in msgspec.json.decode(snapshot)["messages"] if m["role"] != "user"]
    assert kept[-1] == "a7" and "a0" not in kept and len(kept) >= 4
    assert len(await conversation.store.messages(conversation.id)) == 16


async def test_a_single_message_longer_than_the_cap_is_cut_in_the_snapshot() -> None:
    conversation = _Conversation()
    lease = await conversation.open()
    answer = SnapshotMessage(id="big", role="assistant", content="x" * 100_000)
    end = RunEnd("success", messages=[answer])
    await lifecycle.end_run(
        conversation.broker, conversation.store, lease, end, max_snapshot_bytes=8192
    )

    snapshot = await conversation.broker.read_snapshot(conversation.id)
    assert snapshot is not None and len(snapshot) <= 8192
    (message,) = msgspec.json.decode(snapshot)["messages"]
    assert message["id"] == "big" and message["content"].endswith("characters kept]")


async def test_end_run_with_an_error_outcome_appends_run_error_with_its_code() -> None:
    """An error outcome ends the run with RUN_ERROR, its code and its message."""
    conversation = _Conversation()
    lease = await conversation.open()
    end = RunEnd("error", error_code="rate_limited", error_message="slow down")
    ended = await lifecycle.end_run(conversation.broker, conversation.store, lease, end)

    events = await conversation.log()
    assert events[-1]["type"] == "RUN_ERROR"
    assert (events[-1]["code"], events[-1]["message"]) == ("rate_limited", "slow down")
    assert ended.events == 1 and isinstance(ended.ending, protocol.RunError)


async def test_end_run_goes_through_the_callers_storage_wrapper_and_writer() -> None:
    """The runner's retrying storage calls and exactly-once writer do every storage call
    and the last append, so its retries cover the whole ending."""
    conversation = _Conversation()
    lease = await conversation.open()
    wrapped: list[str] = []
    written: list[int] = []

    async def durably(make: Callable[[], Awaitable[T]]) -> T:
        wrapped.append("call")
        return await make()

    async def write(bodies: list[bytes], snapshot: bytes) -> int:
        head = await conversation.broker.finish_run(lease, bodies, snapshot)
        written.append(len(bodies))
        return head

    end = RunEnd("cancelled", messages=[SnapshotMessage(id="a", role="assistant", content="x")])
    await lifecycle.end_run(
        conversation.broker,
        conversation.store,
        lease,
        end,
        [TextMessageEnd(message_id="t1")],
        durably=durably,
        write=write,
    )

    assert len(wrapped) == 3  # history, the run's totals, the snapshot's history
    assert written == [2]
    assert (await conversation.log())[-1]["outcome"] == {"type": "cancelled"}


async def test_end_run_under_a_lost_lease_appends_nothing() -> None:
    """A run whose lease was taken over cannot end itself: LeaseLost, the log unchanged."""
    conversation = _Conversation()
    lease = await conversation.open(ttl_ms=20)
    await asyncio.sleep(0.05)
    assert await conversation.broker.take_over_run(conversation.id, _LONG_TTL_MS) is not None
    before = await conversation.log()

    with pytest.raises(LeaseLost):
        await lifecycle.end_run(conversation.broker, conversation.store, lease, RunEnd("success"))
    assert await conversation.log() == before


# ---- reaping -------------------------------------------------------------------------------


async def test_reap_ends_a_run_whose_lease_expired_once() -> None:
    """A dead run's open segments close and RUN_ERROR producer_lost ends it; a live run
    and an already reaped one are left alone."""
    conversation = _Conversation()
    lease = await conversation.open(ttl_ms=100)
    await conversation.append(
        lease,
        _step_started(),
        TextMessageStart(message_id="t1"),
        TextMessageContent(message_id="t1", delta="Par"),
    )
    broker, store = conversation.broker, conversation.store
    assert await lifecycle.reap(broker, store, conversation.id, _LONG_TTL_MS) is None  # alive
    await asyncio.sleep(0.15)

    ended = await lifecycle.reap(broker, store, conversation.id, _LONG_TTL_MS)

    events = await conversation.log()
    assert _types(events)[-4:] == [
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END",
        "STEP_FINISHED",
        "RUN_ERROR",
    ]
    assert events[-1]["code"] == "producer_lost"
    assert ended is not None and ended.events == 3 and ended.head == events[-1]["seq"]
    assert await broker.active_run(conversation.id) is None
    assert await lifecycle.reap(broker, store, conversation.id, _LONG_TTL_MS) is None
    assert len(await conversation.log()) == len(events)
