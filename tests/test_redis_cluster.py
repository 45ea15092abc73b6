"""The Redis broker on a real three-master Redis Cluster: conversations spread over the
shards by their hash tag, the live tail goes over sharded pub/sub, and two server
processes on the cluster show every viewer the writer's log, byte for byte.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from costream.broker import RunLease
from costream.broker.redis import RedisBroker
from costream.errors import StorageUnavailable
from costream.store import mint_id
from tests.support.ready import until_ready
from tests.support.redis_cluster import RedisCluster
from tests.support.servers import ServerProcess
from tests.support.ws import assert_well_formed, create_conversation, open_session
from tests.test_broker import WAIT_S, Listener, delta, run_finished, run_started, seqs

LONG_TTL_MS = 60_000
STORY = "Tell me a story about sharded pub/sub, and write it to a file."


@dataclass
class ClusterPair:
    """A producing broker and a watching one, both on the cluster, as two processes would be."""

    producer: RedisBroker
    viewer: RedisBroker
    listener: Listener


@pytest.fixture
async def cluster_pair(redis_cluster: RedisCluster) -> AsyncIterator[ClusterPair]:
    """Two started brokers on the module's cluster."""
    listener = Listener()
    producer, viewer = RedisBroker(redis_cluster.url), RedisBroker(redis_cluster.url)
    await producer.start(Listener().on_frame, Listener().on_resync)
    await viewer.start(listener.on_frame, listener.on_resync)
    yield ClusterPair(producer, viewer, listener)
    await producer.close()
    await viewer.close()


async def new_conversations(broker: RedisBroker, count: int) -> list[str]:
    ids = [mint_id() for _ in range(count)]
    for conversation_id in ids:
        await broker.create_conversation(conversation_id, {"title": b"cluster"})
    return ids


async def start(broker: RedisBroker, conversation_id: str) -> RunLease:
    return await broker.start_run(
        conversation_id, "run-1", run_started(conversation_id), LONG_TTL_MS
    )


def live_channel(conversation_id: str) -> str:
    return f"costream:{{{conversation_id}}}:live"


def closed_port() -> int:
    """A port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ---- the broker on a cluster -----------------------------------------------------------


async def test_conversations_spread_over_all_masters_each_whole_on_one(
    cluster_pair: ClusterPair,
    redis_cluster: RedisCluster,
) -> None:
    """Many conversations land on all three masters, every key of one on the same master."""
    broker = cluster_pair.producer
    ids = await new_conversations(broker, 24)
    holders: set[int] = set()
    for conversation_id in ids:
        lease = await start(broker, conversation_id)
        await broker.map_set(conversation_id, "files", "a.txt", b"A")
        await broker.presence_join(conversation_id, "v", LONG_TTL_MS)
        port = redis_cluster.node_holding(f"costream:{{{conversation_id}}}:meta")
        with redis_cluster.client(port) as client:
            keys = {key.decode() for key in client.scan_iter(match=f"*{{{conversation_id}}}*")}
        tag = f"costream:{{{conversation_id}}}:"
        assert keys == {tag + part for part in ("meta", "log", "run", "lease", "presence")} | {
            tag + "map:files"
        }
        assert await broker.finish_run(lease, [run_finished(conversation_id)], None) == 2
        holders.add(port)
    assert holders == set(redis_cluster.ports)


async def test_viewer_on_another_broker_gets_every_append_identical_to_the_log(
    cluster_pair: ClusterPair,
) -> None:
    """A second broker watching conversations on every shard gets each frame once, in order,
    byte-identical to the log."""
    producer, viewer, listener = cluster_pair.producer, cluster_pair.viewer, cluster_pair.listener
    ids = await new_conversations(producer, 12)
    for conversation_id in ids:
        await viewer.subscribe(conversation_id)
    leases = [await start(producer, conversation_id) for conversation_id in ids]
    for batch in range(5):  # interleaved, as concurrent runs would be
        for lease in leases:
            await producer.append(lease, [delta(batch * 3 + n) for n in range(3)])
    last = {
        lease.conversation_id: await producer.finish_run(
            lease, [run_finished(lease.conversation_id)], None
        )
        for lease in leases
    }
    await listener.until(lambda: all(len(listener.logged(c)) >= last[c] for c in ids))
    for conversation_id in ids:
        log = await viewer.read_log(conversation_id, 0, 1000)
        assert listener.logged(conversation_id) == log
        assert seqs(log) == list(range(1, last[conversation_id] + 1))


async def test_subscriptions_are_sharded_on_the_conversations_master(
    cluster_pair: ClusterPair,
    redis_cluster: RedisCluster,
) -> None:
    """The live tail is an SSUBSCRIBE on the master owning the conversation, not a SUBSCRIBE."""
    ids = await new_conversations(cluster_pair.producer, 6)
    for conversation_id in ids:
        await cluster_pair.viewer.subscribe(conversation_id)
    for conversation_id in ids:
        channel = live_channel(conversation_id)
        owner = redis_cluster.node_holding(channel)
        for port in redis_cluster.ports:
            with redis_cluster.client(port) as client:
                _, sharded = client.execute_command("PUBSUB", "SHARDNUMSUB", channel)
                _, plain = client.execute_command("PUBSUB", "NUMSUB", channel)
            assert (sharded, plain) == ((1, 0) if port == owner else (0, 0))


async def test_killed_sharded_pubsub_connections_resync_and_frames_keep_arriving(
    cluster_pair: ClusterPair,
    redis_cluster: RedisCluster,
) -> None:
    """CLIENT KILL TYPE pubsub on every master: each conversation is resynced, later frames arrive."""
    producer, viewer, listener = cluster_pair.producer, cluster_pair.viewer, cluster_pair.listener
    # Three conversations on each master (random ids leave one without any in 8% of runs),
    # so every master has a pub/sub connection of the viewer to kill.
    by_master: dict[int, list[str]] = {port: [] for port in redis_cluster.ports}
    while any(len(held) < 3 for held in by_master.values()):
        conversation_id = mint_id()
        held = by_master[redis_cluster.node_holding(live_channel(conversation_id))]
        if len(held) < 3:
            held.append(conversation_id)
    ids = [conversation_id for held in by_master.values() for conversation_id in held]
    for conversation_id in ids:
        await producer.create_conversation(conversation_id, {"title": b"cluster"})
        await viewer.subscribe(conversation_id)
    leases = [await start(producer, conversation_id) for conversation_id in ids]
    await listener.until(lambda: all(len(listener.logged(c)) == 1 for c in ids))
    # One sharded pub/sub connection per master for the viewer (the producer has none);
    # connections of brokers closed by earlier tests may still be counted.
    assert await asyncio.to_thread(redis_cluster.kill_pubsub) >= 3
    await listener.until(lambda: set(ids) <= set(listener.resyncs))
    for lease in leases:
        assert await producer.append(lease, [delta(1), delta(2)]) == 3
    await listener.until(lambda: all(seqs(listener.logged(c))[-1:] == [3] for c in ids))
    for conversation_id in ids:
        assert seqs(listener.logged(conversation_id)) == [1, 2, 3]


async def test_subscription_follows_its_slot_to_another_master(
    cluster_pair: ClusterPair,
    redis_cluster: RedisCluster,
) -> None:
    """Resharding a conversation's slot: the viewer re-subscribes on the new master, is told
    to resync, and the producer's next appends reach it."""
    producer, viewer, listener = cluster_pair.producer, cluster_pair.viewer, cluster_pair.listener
    [conversation_id] = await new_conversations(producer, 1)
    await viewer.subscribe(conversation_id)
    lease = await start(producer, conversation_id)
    await listener.until(lambda: len(listener.logged(conversation_id)) == 1)
    channel = live_channel(conversation_id)
    old = redis_cluster.node_holding(channel)
    new = next(port for port in redis_cluster.ports if port != old)
    await asyncio.to_thread(redis_cluster.move_slot, channel, new)
    await listener.until(lambda: conversation_id in listener.resyncs)
    # The producer learns the move from MOVED; the log moved with the slot.
    assert await producer.append(lease, [delta(1), delta(2)]) == 3
    await listener.until(lambda: seqs(listener.logged(conversation_id))[-1:] == [3])
    assert listener.logged(conversation_id) == await viewer.read_log(conversation_id, 0, 100)
    with redis_cluster.client(new) as client:
        _, sharded = client.execute_command("PUBSUB", "SHARDNUMSUB", channel)
    assert sharded == 1


async def test_cluster_url_with_user_and_password_authenticates_every_master(
    redis_cluster: RedisCluster,
) -> None:
    """An ACL user in the URL reaches every master, for commands and for sharded pub/sub."""
    redis_cluster.add_user("costream", "s3cret-Cluster-pass")
    url = redis_cluster.url.replace("://", "://costream:s3cret-Cluster-pass@")
    producer, viewer, listener = RedisBroker(url), RedisBroker(url), Listener()
    try:
        await producer.start(Listener().on_frame, Listener().on_resync)
        await viewer.start(listener.on_frame, listener.on_resync)
        assert await viewer.ping() is True
        ids = await new_conversations(producer, 6)
        for conversation_id in ids:
            await viewer.subscribe(conversation_id)
            await start(producer, conversation_id)
        await listener.until(lambda: all(len(listener.logged(c)) == 1 for c in ids))
    finally:
        await producer.close()
        await viewer.close()


async def test_wrong_cluster_password_fails_without_leaking_it(
    redis_cluster: RedisCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong password: StorageUnavailable, ping False, and the password in no message."""
    caplog.set_level(logging.DEBUG)
    password = "wrong-Cluster-s3cret"
    redis_cluster.add_user("costream", "s3cret-Cluster-pass")
    url = redis_cluster.url.replace("://", f"://costream:{password}@")
    broker = RedisBroker(url)
    try:
        await broker.start(Listener().on_frame, Listener().on_resync)
        calls: list[Callable[[], object]] = [
            lambda: broker.create_conversation(mint_id(), {}),
            lambda: broker.log_state(mint_id()),
            lambda: broker.subscribe(mint_id()),
        ]
        async with asyncio.timeout(WAIT_S):  # never hangs
            for call in calls:
                with pytest.raises(StorageUnavailable) as raised:
                    await call()  # type: ignore[misc]
                assert password not in str(raised.value)
                assert raised.value.__cause__ is None
            assert await broker.ping() is False
    finally:
        await broker.close()
    assert password not in caplog.text


async def test_cluster_url_with_several_startup_nodes_skips_one_that_is_down(
    redis_cluster: RedisCluster,
) -> None:
    """``redis+cluster://dead,alive``: the broker discovers the cluster through the live node."""
    alive = redis_cluster.ports[1]
    broker = RedisBroker(f"redis+cluster://127.0.0.1:{closed_port()},127.0.0.1:{alive}")
    try:
        await broker.start(Listener().on_frame, Listener().on_resync)
        [conversation_id] = await new_conversations(broker, 1)
        state = await broker.log_state(conversation_id)
        assert state is not None and state.head == 0
        assert await broker.ping() is True
    finally:
        await broker.close()


# ---- two server processes on the cluster ------------------------------------------------


async def test_viewers_on_another_process_get_the_writers_log_for_every_conversation(
    start_server: Callable[..., ServerProcess],
    redis_cluster: RedisCluster,
) -> None:
    """Six conversations, each written on one process and watched on the other: every run
    ends, and each viewer's log is complete, well-formed and byte-identical to the writer's."""
    a = start_server(redis_url=redis_cluster.url, env={"COSTREAM_DEMO_DELAY_MS": "1"})
    b = start_server(redis_url=redis_cluster.url)
    await until_ready(a, b)
    conversations = [await create_conversation(a.url) for _ in range(6)]

    async def watch_and_write(index: int, conv: dict[str, str]) -> tuple[list[str], list[str]]:
        writes_on, watched_on = (a, b) if index % 2 == 0 else (b, a)
        cid = conv["id"]
        viewer = await open_session(watched_on.ws_url(cid), cid, conv["viewToken"])
        writer = await open_session(writes_on.ws_url(cid), cid, conv["writeToken"])
        await writer.send({"type": "message", "content": STORY})
        await writer.until_run_ends()
        await viewer.until_run_ends()
        assert_well_formed(viewer.events())
        await viewer.close()
        await writer.close()
        return viewer.logged(), writer.logged()

    results = await asyncio.gather(*(watch_and_write(i, c) for i, c in enumerate(conversations)))
    for viewed, written in results:
        assert viewed == written
        assert viewed[-1].startswith('{"seq":') and '"RUN_FINISHED"' in viewed[-1]
