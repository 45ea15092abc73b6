"""The ``Broker`` contract, held against every broker: memory, SQLite in a temporary data
directory, and Redis on a real redis-server.

With Redis, frames are produced through one broker and watched through another, as two
server processes would.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from costream import protocol
from costream.broker import AppendConflict, Broker, RunLease
from costream.broker.memory import MemoryBroker
from costream.broker.redis import RedisBroker
from costream.broker.sqlite import SqliteBroker
from costream.errors import LeaseLost, RunActive, StorageUnavailable
from costream.store import mint_id
from tests.support.redis import RedisServer

WAIT_S = 20.0  # a bound against hanging, never a measure of speed
LONG_TTL_MS = 60_000


@dataclass
class Listener:
    """What a broker delivered: frames per conversation, and resync calls."""

    frames: dict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    resyncs: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_frame(self, conversation_id: str, frame: bytes) -> None:
        self.frames[conversation_id].append(frame)
        self.changed.set()

    def on_resync(self, conversation_id: str) -> None:
        self.resyncs.append(conversation_id)
        self.changed.set()

    def logged(self, conversation_id: str) -> list[bytes]:
        return [f for f in self.frames[conversation_id] if protocol.is_logged_frame(f)]

    def presence(self, conversation_id: str) -> list[bytes]:
        return [f for f in self.frames[conversation_id] if not protocol.is_logged_frame(f)]

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT_S):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


@dataclass
class Pair:
    """A producing broker and a watching one (the same object for the embedded brokers)."""

    producer: Broker
    viewer: Broker
    listener: Listener


OpenPair = Callable[..., Awaitable[Pair]]


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def open_pair(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenPair]:
    """A factory of started broker pairs of the parametrized kind, closed after the test."""
    opened: list[Broker] = []
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None

    def make(log_retain: int) -> Broker:
        broker: Broker
        if url is not None:
            broker = RedisBroker(url, log_retain=log_retain)
        elif request.param == "sqlite":
            broker = SqliteBroker(tmp_path / f"data-{len(opened)}", log_retain=log_retain)
        else:
            broker = MemoryBroker(log_retain=log_retain)
        opened.append(broker)
        return broker

    async def open_(log_retain: int = 10_000) -> Pair:
        listener = Listener()
        producer = make(log_retain)
        viewer = make(log_retain) if url is not None else producer
        if viewer is not producer:
            await producer.start(Listener().on_frame, Listener().on_resync)
        await viewer.start(listener.on_frame, listener.on_resync)
        return Pair(producer, viewer, listener)

    yield open_
    for broker in opened:
        await broker.close()


@pytest.fixture
async def pair(open_pair: OpenPair) -> Pair:
    """One started pair with the default log retention."""
    return await open_pair()


def run_started(conversation_id: str, run_id: str = "run-1") -> bytes:
    event = protocol.RunStarted(
        thread_id=conversation_id,
        run_id=run_id,
        input=protocol.RunAgentInput(thread_id=conversation_id, run_id=run_id, messages=[]),
    )
    return protocol.encode(event)


def delta(n: int) -> bytes:
    return protocol.encode(protocol.TextMessageContent(message_id="m", delta=f"token {n} "))


def run_finished(conversation_id: str, run_id: str = "run-1") -> bytes:
    event = protocol.RunFinished(
        thread_id=conversation_id,
        run_id=run_id,
        outcome=protocol.RunOutcome(type="success"),
        usage=[],
        metadata=protocol.RunFinishedMeta(),
    )
    return protocol.encode(event)


def snapshot_body(text: str = "hi") -> bytes:
    message = protocol.SnapshotMessage(id="u1", role="user", content=text)
    return protocol.encode(protocol.MessagesSnapshot(messages=[message]))


def seqs(frames: list[bytes]) -> list[int]:
    return [protocol.seq_of(frame) for frame in frames]


async def new_conversation(broker: Broker) -> str:
    conversation_id = mint_id()
    await broker.create_conversation(conversation_id, {"title": b"test"})
    return conversation_id


async def start(broker: Broker, conversation_id: str, ttl_ms: int = LONG_TTL_MS) -> RunLease:
    return await broker.start_run(conversation_id, "run-1", run_started(conversation_id), ttl_ms)


async def wait_for_lease_to_expire(broker: Broker, conversation_id: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while (active := await broker.active_run(conversation_id)) and active.lease_alive:
            await asyncio.sleep(0.01)


# ---- every broker --------------------------------------------------------------------


async def test_seq_starts_at_one_and_is_contiguous_across_a_run(pair: Pair) -> None:
    """start_run, append and finish_run number the events 1, 2, 3... with no gap."""
    broker = pair.producer
    conversation_id = await new_conversation(broker)
    bodies = [run_started(conversation_id), *(delta(n) for n in range(1, 5))]
    bodies.append(run_finished(conversation_id))
    lease = await broker.start_run(conversation_id, "run-1", bodies[0], LONG_TTL_MS)
    assert await broker.append(lease, bodies[1:4]) == 4
    assert await broker.finish_run(lease, bodies[4:], None) == 6
    frames = await broker.read_log(conversation_id, 0, 100)
    # Each frame is its body with the seq spliced in, byte for byte.
    assert frames == [protocol.with_seq(body, n) for n, body in enumerate(bodies, 1)]
    assert seqs(frames) == [1, 2, 3, 4, 5, 6]
    state = await broker.log_state(conversation_id)
    assert state is not None and (state.head, state.first_seq, state.snapshot_seq) == (6, 1, 0)


async def test_new_conversation_has_an_empty_log_and_an_epoch(pair: Pair) -> None:
    """A new conversation's log is empty, its epoch is in its record; unknown ones are None."""
    broker = pair.producer
    conversation_id = await new_conversation(broker)
    state = await broker.log_state(conversation_id)
    assert state is not None and (state.head, state.first_seq, state.snapshot_seq) == (0, 1, 0)
    record = await broker.get_record(conversation_id)
    assert record == {"title": b"test", "epoch": state.epoch.encode()}
    assert await broker.log_state(mint_id()) is None
    assert await broker.get_record(mint_id()) is None
    assert await broker.read_snapshot(conversation_id) is None


async def test_subscriber_gets_frames_in_seq_order_identical_to_the_log(pair: Pair) -> None:
    """Every published frame reaches the subscriber once, in order, byte-identical to the log."""
    conversation_id = await new_conversation(pair.producer)
    await pair.viewer.subscribe(conversation_id)
    lease = await start(pair.producer, conversation_id)
    for batch in range(10):
        await pair.producer.append(lease, [delta(batch * 5 + n) for n in range(5)])
    last = await pair.producer.finish_run(lease, [run_finished(conversation_id)], None)
    await pair.listener.until(lambda: len(pair.listener.logged(conversation_id)) >= last)
    log = await pair.viewer.read_log(conversation_id, 0, 1000)
    assert pair.listener.logged(conversation_id) == log
    assert seqs(log) == list(range(1, last + 1))


async def test_unsubscribed_conversation_delivers_nothing(pair: Pair) -> None:
    """After unsubscribe, frames of that conversation stop; others keep coming."""
    quiet, loud = await new_conversation(pair.producer), await new_conversation(pair.producer)
    await pair.viewer.subscribe(quiet)
    await pair.viewer.subscribe(loud)
    await pair.viewer.unsubscribe(quiet)
    await start(pair.producer, quiet)
    await start(pair.producer, loud)
    await pair.listener.until(lambda: len(pair.listener.logged(loud)) == 1)
    assert pair.listener.frames[quiet] == []


async def test_fenced_out_producer_gets_lease_lost_and_appends_nothing(pair: Pair) -> None:
    """Once a run is taken over, the old producer's appends fail and leave the log alone."""
    broker = pair.producer
    conversation_id = await new_conversation(broker)
    stale = await start(broker, conversation_id, ttl_ms=50)
    await broker.append(stale, [delta(1)])
    await wait_for_lease_to_expire(broker, conversation_id)
    successor = await broker.take_over_run(conversation_id, LONG_TTL_MS)
    assert successor is not None and successor.fence > stale.fence
    assert successor.run_id == stale.run_id
    with pytest.raises(LeaseLost):
        await broker.append(stale, [delta(2)])
    with pytest.raises(LeaseLost):
        await broker.finish_run(stale, [run_finished(conversation_id)], snapshot_body())
    with pytest.raises(LeaseLost):
        await broker.renew_lease(stale, LONG_TTL_MS)
    assert seqs(await broker.read_log(conversation_id, 0, 100)) == [1, 2]
    assert await broker.append(successor, [delta(3)]) == 3
    active = await broker.active_run(conversation_id)
    assert active is not None and active.lease_alive and active.fence == successor.fence


async def test_append_with_the_expected_head_stores_a_retried_batch_once(pair: Pair) -> None:
    """A batch sent again with the same expected head is answered with the head, not stored."""
    broker = pair.producer
    conversation_id = await new_conversation(broker)
    lease = await start(broker, conversation_id)
    batch = [delta(1), delta(2)]
    assert await broker.append(lease, batch, expected_head=1) == 3
    assert await broker.append(lease, batch, expected_head=1) == 3
    assert await broker.append(lease, [delta(3)], expected_head=3) == 4
    assert await broker.append(lease, [], expected_head=4) == 4
    frames = await broker.read_log(conversation_id, 0, 100)
    assert seqs(frames) == [1, 2, 3, 4]
    assert [protocol.event_decoder.decode(frame).delta for frame in frames[1:]] == [  # type: ignore[union-attr]
        "token 1 ",
        "token 2 ",
        "token 3 ",
    ]


async def test_append_with_a_wrong_expected_head_conflicts_and_appends_nothing(
    pair: Pair,
) -> None:
    """An expected head that is neither the head nor the head before this batch raises
    AppendConflict (a LeaseLost) and leaves the log alone."""
    broker = pair.producer
    conversation_id = await new_conversation(broker)
    lease = await start(broker, conversation_id)
    await broker.append(lease, [delta(1), delta(2)], expected_head=1)
    for expected in (0, 1, 4):
        with pytest.raises(AppendConflict) as conflict:
            await broker.append(lease, [delta(3)], expected_head=expected)
        assert conflict.value.head == 3 and conflict.value.expected_head == expected
    assert seqs(await broker.read_log(conversation_id, 0, 100)) == [1, 2, 3]


async def test_retried_batch_under_a_fence_that_moved_on_is_lease_lost(pair: Pair) -> None:
    """A batch already stored is not acknowledged to a producer that lost the lease."""
    broker = pair.producer
    conversation_id = await new_conversation(broker)
    lease = await start(broker, conversation_id, ttl_ms=50)
    await broker.append(lease, [delta(1), delta(2)], expected_head=1)
    await wait_for_lease_to_expire(broker, conversation_id)
    assert await broker.take_over_run(conversation_id, LONG_TTL_MS) is not None
    with pytest.raises(LeaseLost) as lost:
        await broker.append(lease, [delta(1), delta(2)], expected_head=1)
    assert not isinstance(lost.value, AppendConflict)
    assert (await broker.log_state(conversation_id)).head == 3  # type: ignore[union-attr]


async def test_expired_lease_refuses_appends_until_taken_over(pair: Pair) -> None:
    """A producer whose lease expired cannot append, even before anyone takes over."""
    broker = pair.producer
    conversation_id = await new_conversation(broker)
    lease = await start(broker, conversation_id, ttl_ms=50)
    await wait_for_lease_to_expire(broker, conversation_id)
    with pytest.raises(LeaseLost):
        await broker.append(lease, [delta(1)])
    assert (await broker.log_state(conversation_id)).head == 1  # type: ignore[union-attr]


async def test_take_over_refuses_a_run_whose_lease_is_alive(pair: Pair) -> None:
    """take_over_run gives None while the producer keeps its lease, or when nothing runs."""
    broker = pair.producer
    conversation_id = await new_conversation(broker)
    assert await broker.take_over_run(conversation_id, LONG_TTL_MS) is None
    lease = await start(broker, conversation_id)
    assert await broker.take_over_run(conversation_id, LONG_TTL_MS) is None
    assert await broker.append(lease, [delta(1)]) == 2


async def test_start_run_refuses_a_second_run(pair: Pair) -> None:
    """One run at a time: start_run raises RunActive and appends nothing while one is active."""
    broker = pair.producer
    conversation_id = await new_conversation(broker)
    await start(broker, conversation_id)
    with pytest.raises(RunActive):
        await broker.start_run(conversation_id, "run-2", run_started(conversation_id), 1000)
    active = await broker.active_run(conversation_id)
    assert active is not None and (active.run_id, active.start_seq) == ("run-1", 1)
    assert (await broker.log_state(conversation_id)).head == 1  # type: ignore[union-attr]


async def test_finish_run_releases_the_lease_and_stores_the_snapshot(pair: Pair) -> None:
    """After finish_run a new run starts, and the snapshot carries the last body's seq."""
    broker = pair.producer
    conversation_id = await new_conversation(broker)
    lease = await start(broker, conversation_id)
    await broker.append(lease, [delta(1)])
    snapshot = snapshot_body("first")
    last = await broker.finish_run(lease, [run_finished(conversation_id)], snapshot)
    assert last == 3
    assert await broker.read_snapshot(conversation_id) == protocol.with_seq(snapshot, 3)
    assert (await broker.log_state(conversation_id)).snapshot_seq == 3  # type: ignore[union-attr]
    assert await broker.active_run(conversation_id) is None
    second = await broker.start_run(conversation_id, "run-2", run_started(conversation_id), 1000)
    assert second.fence > lease.fence
    active = await broker.active_run(conversation_id)
    assert active is not None and (active.run_id, active.start_seq) == ("run-2", 4)


async def test_trimming_keeps_the_last_events_and_everything_after_the_snapshot(
    open_pair: OpenPair,
) -> None:
    """With log_retain=5 the log keeps the last 5 events and never anything after the snapshot."""
    broker = (await open_pair(log_retain=5)).producer
    conversation_id = await new_conversation(broker)
    lease = await start(broker, conversation_id)
    await broker.append(lease, [delta(n) for n in range(9)])  # seqs 2..10
    # No snapshot yet: a late joiner replays from seq 1, so nothing is trimmed.
    assert seqs(await broker.read_log(conversation_id, 0, 100)) == list(range(1, 11))
    await broker.finish_run(lease, [run_finished(conversation_id)], snapshot_body())  # 11
    assert seqs(await broker.read_log(conversation_id, 0, 100)) == [7, 8, 9, 10, 11]
    lease = await start(broker, conversation_id)  # 12
    await broker.append(lease, [delta(n) for n in range(10)])  # 13..22
    # The snapshot is at 11, so 12..22 stay although that is more than 5.
    assert seqs(await broker.read_log(conversation_id, 0, 100)) == list(range(12, 23))
    state = await broker.log_state(conversation_id)
    assert state is not None and (state.first_seq, state.head, state.snapshot_seq) == (12, 22, 11)
    await broker.finish_run(lease, [run_finished(conversation_id)], snapshot_body())  # 23
    assert seqs(await broker.read_log(conversation_id, 0, 100)) == list(range(19, 24))


async def test_read_log_after_a_seq_and_with_a_limit(pair: Pair) -> None:
    """read_log returns at most ``limit`` frames with a seq above ``after_seq``, in order."""
    broker = pair.producer
    conversation_id = await new_conversation(broker)
    lease = await start(broker, conversation_id)
    await broker.append(lease, [delta(n) for n in range(9)])  # seqs 1..10
    assert seqs(await broker.read_log(conversation_id, 3, 4)) == [4, 5, 6, 7]
    assert seqs(await broker.read_log(conversation_id, 8, 100)) == [9, 10]
    assert await broker.read_log(conversation_id, 10, 100) == []
    assert await broker.read_log(conversation_id, 0, 0) == []


async def test_presence_counts_viewers_and_drops_expired_ones(pair: Pair) -> None:
    """Joins and leaves publish the count; a refresh drops a viewer whose ttl passed."""
    conversation_id = await new_conversation(pair.producer)
    await pair.viewer.subscribe(conversation_id)
    broker = pair.producer
    assert await broker.presence_join(conversation_id, "alive", LONG_TTL_MS) == 1
    assert await broker.presence_join(conversation_id, "dead", 500) == 2
    # The dead viewer's process stops refreshing; the live one's keeps going.
    async with asyncio.timeout(WAIT_S):
        while await broker.presence_refresh(conversation_id, ["alive"], LONG_TTL_MS) != 1:
            await asyncio.sleep(0.05)
    assert await broker.presence_leave(conversation_id, "alive") == 0
    expected = [protocol.encode(protocol.Presence(viewers=n)) for n in (1, 2, 1, 0)]
    await pair.listener.until(lambda: len(pair.listener.presence(conversation_id)) >= 4)
    # Refreshes that changed nothing published nothing.
    assert pair.listener.presence(conversation_id) == expected


async def test_request_cancel_is_seen_by_renew_lease(pair: Pair) -> None:
    """A cancel request reaches the producer through its next lease renewal."""
    broker = pair.producer
    conversation_id = await new_conversation(broker)
    assert await broker.request_cancel(conversation_id) is None
    lease = await start(broker, conversation_id)
    assert await broker.renew_lease(lease, LONG_TTL_MS) is False
    assert await broker.request_cancel(conversation_id) == "run-1"
    assert await broker.renew_lease(lease, LONG_TTL_MS) is True
    await broker.finish_run(lease, [run_finished(conversation_id)], None)
    assert await broker.request_cancel(conversation_id) is None


async def test_records_maps_and_lists_round_trip(pair: Pair) -> None:
    """Record fields, numeric sums, named maps and lists read back as written."""
    broker = pair.producer
    conversation_id = await new_conversation(broker)
    await broker.update_record(conversation_id, {"title": b"renamed", "model": b"m"})
    assert await broker.add_to_record(conversation_id, "cost_usd", 0.25) == 0.25
    assert await broker.add_to_record(conversation_id, "cost_usd", 0.5) == 0.75
    record = await broker.get_record(conversation_id)
    assert record is not None and record["title"] == b"renamed" and record["model"] == b"m"
    assert float(record["cost_usd"]) == 0.75
    await broker.map_set(conversation_id, "files", "a.txt", b"A")
    await broker.map_set(conversation_id, "files", "b.txt", b"B")
    assert await broker.map_get(conversation_id, "files", "a.txt") == b"A"
    assert await broker.map_delete(conversation_id, "files", "a.txt") is True
    assert await broker.map_delete(conversation_id, "files", "a.txt") is False
    assert await broker.map_all(conversation_id, "files") == {"b.txt": b"B"}
    await broker.list_append(conversation_id, "history", [b"1", b"2"])
    await broker.list_append(conversation_id, "history", [b"3"])
    assert await broker.list_all(conversation_id, "history") == [b"1", b"2", b"3"]


# ---- Redis only ----------------------------------------------------------------------


@pytest.fixture
async def redis_pair(redis_url: str) -> AsyncIterator[Pair]:
    """Two started Redis brokers on the test's redis-server: a producer and a viewer."""
    listener = Listener()
    producer, viewer = RedisBroker(redis_url), RedisBroker(redis_url)
    await producer.start(Listener().on_frame, Listener().on_resync)
    await viewer.start(listener.on_frame, listener.on_resync)
    yield Pair(producer, viewer, listener)
    await producer.close()
    await viewer.close()


async def test_every_key_of_a_conversation_carries_its_hash_tag(
    redis_pair: Pair, redis_server: RedisServer
) -> None:
    """All keys of a conversation share the ``{id}`` hash tag, so Redis Cluster keeps them together."""
    broker = redis_pair.producer
    conversation_id = await new_conversation(broker)
    await redis_pair.viewer.subscribe(conversation_id)
    lease = await start(broker, conversation_id)
    await broker.finish_run(lease, [run_finished(conversation_id)], snapshot_body())
    await start(broker, conversation_id)  # a run in progress: its run hash and lease
    await broker.map_set(conversation_id, "files", "a.txt", b"A")
    await broker.list_append(conversation_id, "history", [b"m"])
    await broker.presence_join(conversation_id, "v", LONG_TTL_MS)
    with redis_server.client() as client:
        keys = {key.decode() for key in client.scan_iter(match="*")}
        channels = {channel.decode() for channel in client.pubsub_channels()}
    tag = f"{{{conversation_id}}}"
    parts = {key.split(tag + ":", 1)[1] for key in keys if tag in key}
    assert parts == {"meta", "log", "run", "lease", "snapshot", "presence"} | {
        "map:files",
        "list:history",
    }
    assert all(tag in key for key in keys)
    assert channels == {f"costream:{tag}:live"}


async def test_killed_pubsub_connection_resyncs_and_frames_keep_arriving(
    redis_pair: Pair, redis_server: RedisServer
) -> None:
    """CLIENT KILL TYPE pubsub: the viewer is told to resync, and later frames still arrive."""
    listener = redis_pair.listener
    conversation_id = await new_conversation(redis_pair.producer)
    await redis_pair.viewer.subscribe(conversation_id)
    lease = await start(redis_pair.producer, conversation_id)
    await listener.until(lambda: len(listener.logged(conversation_id)) == 1)
    assert await asyncio.to_thread(redis_server.kill_pubsub) >= 1
    await listener.until(lambda: conversation_id in listener.resyncs)
    last = await redis_pair.producer.append(lease, [delta(1), delta(2)])
    await listener.until(lambda: seqs(listener.logged(conversation_id))[-1:] == [last])
    assert seqs(listener.logged(conversation_id)) == [1, 2, 3]


async def test_stopped_redis_fails_fast_without_leaking_the_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With Redis down every call raises StorageUnavailable, ping is False, no password leaks."""
    caplog.set_level(logging.DEBUG)
    password = "s3cret-Pass-word"
    server = RedisServer(tmp_path / "redis", password=password)
    server.start()
    broker = RedisBroker(server.url)
    listener = Listener()
    try:
        await broker.start(listener.on_frame, listener.on_resync)
        conversation_id = await new_conversation(broker)
        await broker.subscribe(conversation_id)
        lease = await start(broker, conversation_id)
        assert await broker.ping() is True
        await asyncio.to_thread(server.stop)
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: broker.log_state(conversation_id),
            lambda: broker.read_log(conversation_id, 0, 10),
            lambda: broker.append(lease, [delta(1)]),
            lambda: broker.get_record(conversation_id),
            lambda: broker.presence_join(conversation_id, "v", 1000),
        ]
        async with asyncio.timeout(WAIT_S):  # never hangs
            for call in calls:
                with pytest.raises(StorageUnavailable) as raised:
                    await call()
                assert password not in str(raised.value)
                assert raised.value.__cause__ is None
            assert await broker.ping() is False
            while "pub/sub connection lost" not in caplog.text:  # the reader noticed
                await asyncio.sleep(0.05)
        assert password not in caplog.text
    finally:
        await broker.close()
        server.stop()


async def test_restarted_redis_keeps_the_log_and_appends_continue(
    redis_pair: Pair, redis_server: RedisServer
) -> None:
    """After a Redis restart (append-only file) the log reads back and seq goes on from it."""
    listener = redis_pair.listener
    broker = redis_pair.producer
    conversation_id = await new_conversation(broker)
    await redis_pair.viewer.subscribe(conversation_id)
    lease = await start(broker, conversation_id)
    await broker.append(lease, [delta(n) for n in range(4)])
    before = await broker.read_log(conversation_id, 0, 100)
    await asyncio.to_thread(redis_server.restart)
    assert await broker.read_log(conversation_id, 0, 100) == before
    assert await broker.append(lease, [delta(4)]) == 6
    # The viewer's subscription comes back and it is told to read the log.
    await listener.until(lambda: conversation_id in listener.resyncs)
    assert await broker.append(lease, [delta(5)]) == 7
    await listener.until(lambda: seqs(listener.logged(conversation_id))[-1:] == [7])
    assert seqs(await broker.read_log(conversation_id, 0, 100)) == list(range(1, 8))
