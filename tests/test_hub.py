"""The hub's handoff from log to live, overflow and hole filling, over the real memory broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest

from costream import protocol
from costream.broker import RunLease
from costream.broker.memory import MemoryBroker
from costream.config import Settings
from costream.metrics import Metrics
from costream.server.hub import FellBehind, Follower, Hub
from costream.server.viewer_queue import ViewerQueue
from costream.store import mint_id


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    broker = MemoryBroker(log_retain=50)
    hub = Hub(broker, Metrics())
    await broker.start(hub.on_frame, hub.on_resync)
    yield hub
    await broker.close()


async def _run(hub: Hub) -> tuple[str, RunLease]:
    conversation_id = mint_id()
    await hub.broker.create_conversation(conversation_id, {"title": b"t"})
    started = protocol.RunStarted(
        thread_id=conversation_id,
        run_id="r",
        input=protocol.RunAgentInput(thread_id=conversation_id, run_id="r", messages=[]),
    )
    lease = await hub.broker.start_run(conversation_id, "r", protocol.encode(started), 10_000)
    return conversation_id, lease


def _delta(n: int) -> bytes:
    return protocol.encode(protocol.TextMessageContent(message_id="m", delta=f"d{n} "))


async def _drain(follower: Follower, until_seq: int) -> list[int]:
    seqs: list[int] = []
    while not seqs or seqs[-1] < until_seq:
        batch = await follower.next_batch(timeout=1)
        assert batch, f"stalled after {seqs[-1:]}"
        seqs += [json.loads(f)["seq"] for f in batch if f.startswith('{"seq":')]
    return seqs


async def test_follower_replays_log_then_follows_live_without_duplicates(hub: Hub) -> None:
    """Events appended before and after attaching arrive once each, in order."""
    conversation_id, lease = await _run(hub)
    await hub.broker.append(lease, [_delta(i) for i in range(5)])
    async with Follower(hub, conversation_id, 0, queue_size=100) as follower:
        await hub.broker.append(lease, [_delta(i) for i in range(5, 10)])
        assert await _drain(follower, 11) == list(range(1, 12))


async def test_overflowing_viewer_catches_up_from_the_log(hub: Hub) -> None:
    """A follower whose queue overflows gets every event from the log, in order, once."""
    conversation_id, lease = await _run(hub)
    async with Follower(hub, conversation_id, 0, queue_size=4) as follower:
        for i in range(40):
            await hub.broker.append(lease, [_delta(i)])
        assert follower.queue.lagging
        assert hub.metrics.catch_ups.value >= 1
        assert await _drain(follower, 41) == list(range(1, 42))
        # Back on the live tail afterwards.
        await hub.broker.append(lease, [_delta(99)])
        assert await _drain(follower, 42) == [42]
        assert not follower.queue.lagging


async def test_follower_fills_a_hole_from_the_log(hub: Hub) -> None:
    """A live frame lost on the way (a hole) is read from the log before the next one."""
    conversation_id, lease = await _run(hub)
    async with Follower(hub, conversation_id, 0, queue_size=100) as follower:
        assert await _drain(follower, 1) == [1]
        await hub.broker.append(lease, [_delta(1)])
        follower.queue.frames.clear()  # seq 2 lost between the broker and this process
        await hub.broker.append(lease, [_delta(2)])
        assert await _drain(follower, 3) == [2, 3]


async def test_idle_follower_notices_a_lost_last_frame(hub: Hub) -> None:
    """When the last frame of a burst is lost, the idle check finds it in the log."""
    conversation_id, lease = await _run(hub)
    async with Follower(hub, conversation_id, 0, queue_size=100) as follower:
        assert await _drain(follower, 1) == [1]
        await hub.broker.append(lease, [_delta(1)])
        follower.queue.frames.clear()
        assert await follower.next_batch(timeout=0.05) == []
        assert await follower.check_head() == 2
        assert await _drain(follower, 2) == [2]


async def test_follower_that_needs_trimmed_events_fails_fell_behind(hub: Hub) -> None:
    """If the events after lastSeq were trimmed away, the follower raises FellBehind (4008)."""
    conversation_id, lease = await _run(hub)
    await hub.broker.append(lease, [_delta(i) for i in range(200)])
    finished = protocol.RunError(message="m", code="internal")
    snapshot = protocol.MessagesSnapshot(messages=[])
    await hub.broker.finish_run(lease, [protocol.encode(finished)], protocol.encode(snapshot))
    state = await hub.broker.log_state(conversation_id)
    assert state is not None and state.first_seq > 2
    async with Follower(hub, conversation_id, 1, queue_size=10) as follower:
        with pytest.raises(FellBehind):
            await follower.next_batch(timeout=1)


async def test_last_follower_leaving_unsubscribes(hub: Hub) -> None:
    """The process keeps one subscription per conversation, only while it has followers."""
    conversation_id, _ = await _run(hub)
    async with Follower(hub, conversation_id, 0, queue_size=10):
        async with Follower(hub, conversation_id, 0, queue_size=10):
            assert hub.conversations() == [conversation_id]
        assert hub.conversations() == [conversation_id]
    assert hub.conversations() == []


async def test_burst_of_joins_reaches_a_viewer_as_one_latest_count(hub: Hub) -> None:
    """Presence is throttled and coalesced: 100 joins arrive as one frame with the final count."""
    conversation_id, _ = await _run(hub)
    async with Follower(hub, conversation_id, 0, queue_size=10) as follower:
        assert await _drain(follower, 1) == [1]
        for n in range(100):
            await hub.broker.presence_join(conversation_id, f"viewer-{n}", 10_000)
        batch = await follower.next_batch(timeout=5)
        assert [json.loads(frame) for frame in batch] == [{"type": "presence", "viewers": 100}]


async def test_catch_up_after_overflow_is_served_from_memory(hub: Hub) -> None:
    """A lagging follower whose missed frames are recent reads them without the broker."""
    conversation_id, lease = await _run(hub)
    async with Follower(hub, conversation_id, 0, queue_size=4) as follower:
        assert await _drain(follower, 1) == [1]
        for i in range(40):
            await hub.broker.append(lease, [_delta(i)])
        assert follower.queue.lagging
        assert hub.recent_after(conversation_id, 1, 1000) is not None

        async def unavailable(*args: object) -> list[bytes]:
            raise AssertionError("the broker's log was read")

        hub.broker.read_log = unavailable  # type: ignore[method-assign]
        assert await _drain(follower, 41) == list(range(2, 42))


class _NetworkLikeBroker(MemoryBroker):
    """The memory broker, with an unsubscribe that completes only when the test lets it,
    as a network broker's does (its reply is awaited): what opens the window in the hub."""

    def __init__(self) -> None:
        super().__init__()
        self.unsubscribing = asyncio.Event()
        self.let_unsubscribe = asyncio.Event()

    async def unsubscribe(self, conversation_id: str) -> None:
        self.unsubscribing.set()
        await self.let_unsubscribe.wait()
        await super().unsubscribe(conversation_id)


async def test_viewer_arriving_while_the_last_one_leaves_stays_subscribed() -> None:
    """A follower attaching while the last follower's unsubscribe is under way gets live frames."""
    broker = _NetworkLikeBroker()
    hub = Hub(broker, Metrics())
    await broker.start(hub.on_frame, hub.on_resync)
    conversation_id, lease = await _run(hub)
    leaving, arriving = ViewerQueue(10, hub.metrics), ViewerQueue(10, hub.metrics)
    await hub.attach(conversation_id, leaving)
    detach = asyncio.create_task(hub.detach(conversation_id, leaving))
    await broker.unsubscribing.wait()
    attach = asyncio.create_task(hub.attach(conversation_id, arriving))
    await asyncio.sleep(0)  # let the arrival reach the hub while the unsubscribe is pending
    broker.let_unsubscribe.set()
    await asyncio.gather(detach, attach)
    assert hub.conversations() == [conversation_id]
    await broker.append(lease, [_delta(1)])
    assert [json.loads(frame)["seq"] for frame in arriving.frames] == [2]
    await broker.close()


async def test_recent_frames_of_a_conversation_stay_within_their_byte_bound() -> None:
    """Large frames: the hub's cache of recent frames keeps at most recent_frames_bytes,
    the newest ones, and still serves a catch-up from them."""
    broker = MemoryBroker(log_retain=50)
    limit = Settings().recent_frames_bytes
    hub = Hub(broker, Metrics())  # its default bound is the setting's
    await broker.start(hub.on_frame, hub.on_resync)
    conversation_id, lease = await _run(hub)
    big = "x" * (128 * 1024)
    frames = [protocol.encode(protocol.TextMessageContent(message_id="m", delta=big))] * 80
    async with Follower(hub, conversation_id, 0, queue_size=1000):
        for frame in frames:
            await broker.append(lease, [frame])
        cached = next(
            texts
            for after in range(1, 82)
            if (texts := hub.recent_after(conversation_id, after, 1000)) is not None
        )
        assert 0 < sum(len(text.encode()) for text in cached) <= limit
        assert json.loads(cached[-1])["seq"] == 81  # the newest are kept
        assert hub.recent_bytes(conversation_id) <= limit
    await broker.close()


async def test_a_burst_of_small_frames_stays_in_memory_for_catch_ups() -> None:
    """15 000 small frames (a producer at full speed for most of a second): a follower that
    fell behind at the start of the burst catches up from the hub's memory, not the broker."""
    broker = MemoryBroker(log_retain=100_000)
    hub = Hub(broker, Metrics())
    await broker.start(hub.on_frame, hub.on_resync)
    conversation_id, lease = await _run(hub)
    async with Follower(hub, conversation_id, 0, queue_size=1000):
        for i in range(15_000):
            await broker.append(lease, [_delta(i)])
        texts = hub.recent_after(conversation_id, 2, 1000)
        assert texts is not None
        assert [json.loads(text)["seq"] for text in texts] == list(range(3, 1003))
        assert hub.recent_bytes(conversation_id) <= Settings().recent_frames_bytes
    await broker.close()


async def test_waiting_follower_takes_live_frames_at_once_in_order(hub: Hub) -> None:
    """A caught-up follower with a sender gets live frames through it, in order and once
    each, without its writer waking; a frame after a hole goes through the log instead."""
    conversation_id, lease = await _run(hub)
    sent: list[int] = []
    async with Follower(hub, conversation_id, 0, queue_size=100) as follower:
        assert await _drain(follower, 1) == [1]

        class Sender:
            def write(self, payload: bytes) -> bool:
                sent.append(json.loads(payload)["seq"])
                return True

        follower.send_at_once(Sender())
        writer = asyncio.create_task(follower.next_batch(timeout=30))
        await asyncio.sleep(0)  # the writer parks in its wait
        for i in range(10):
            await hub.broker.append(lease, [_delta(i)])
        assert sent == list(range(2, 12))
        assert not writer.done()  # no wake-up per frame
        # Seq 12 lost on the way while the writer was busy: seq 13 is not sent at once,
        # the writer reads 12 and 13 from the log.
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await hub.broker.append(lease, [_delta(10)])
        follower.queue.frames.clear()
        writer = asyncio.create_task(follower.next_batch(timeout=30))
        await asyncio.sleep(0)
        await hub.broker.append(lease, [_delta(11)])
        batch = await asyncio.wait_for(writer, 5)
        assert [json.loads(frame)["seq"] for frame in batch] == [12, 13]
        assert sent == list(range(2, 12))
