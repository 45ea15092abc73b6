"""Idle conversations expire: nobody wrote to, ran in or watched a conversation for
``conversation_ttl_s``, and it is gone whole. Held against memory, SQLite and Redis (a
single Redis and a Redis Cluster), and through the HTTP API and the WebSocket of real
servers.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from websockets.asyncio.client import connect

from costream.broker import Broker
from costream.broker.redis import RedisBroker
from costream.broker.sqlite import SqliteBroker
from costream.broker.sqlite_database import DATABASE_NAME
from costream.config import Settings
from costream.protocol import SUBPROTOCOL
from costream.server.app import make_broker
from tests.support.redis import RedisServer
from tests.support.redis_cluster import RedisCluster
from tests.support.servers import ServerProcess
from tests.support.ws import ahttp, close_code, create_conversation
from tests.test_broker import (
    LONG_TTL_MS,
    WAIT_S,
    delta,
    new_conversation,
    run_finished,
    snapshot_body,
    start,
)
from tests.test_retention import OpenBroker, open_broker

__all__ = ["open_broker"]  # the fixture, shared with test_retention

TTL_S = 0.5


async def write_everything(broker: Broker, conversation_id: str) -> None:
    """A record field, a map, a list, a finished run with its snapshot."""
    await broker.update_record(conversation_id, {"title": b"expiring"})
    await broker.map_set(conversation_id, "files", "a.txt", b"A")
    await broker.list_append(conversation_id, "history", [b"m"])
    lease = await start(broker, conversation_id)
    await broker.append(lease, [delta(1)])
    await broker.finish_run(lease, [run_finished(conversation_id)], snapshot_body())


async def until_gone(broker: Broker, conversation_id: str, keep: Callable[[], object]) -> None:
    """Sweep (what the server's maintenance does) until the conversation reads as unknown,
    calling ``keep`` (activity elsewhere) between sweeps."""
    async with asyncio.timeout(WAIT_S):
        while await broker.get_record(conversation_id) is not None:
            await broker.expire_idle(100)
            result = keep()
            if asyncio.iscoroutine(result):
                await result
            await asyncio.sleep(0.05)


def tagged_keys(client: redis.Redis, conversation_id: str) -> list[bytes]:
    return list(client.scan_iter(match=f"*{{{conversation_id}}}*"))


async def test_an_idle_conversation_is_deleted_whole(
    open_broker: OpenBroker, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """After conversation_ttl_s with no activity: no record, no log, nothing left stored."""
    broker, _ = await open_broker(conversation_ttl_s=TTL_S)
    conversation_id = await new_conversation(broker)
    await write_everything(broker, conversation_id)
    await until_gone(broker, conversation_id, lambda: None)
    assert await broker.log_state(conversation_id) is None
    if isinstance(broker, SqliteBroker):
        (database,) = await asyncio.to_thread(
            lambda: list(tmp_path.glob(f"data-*/{DATABASE_NAME}"))
        )
        with sqlite3.connect(database) as reader:
            for table, column in [
                ("conversations", "id"),
                ("records", "conversation_id"),
                ("log", "conversation_id"),
                ("maps", "conversation_id"),
                ("lists", "conversation_id"),
            ]:
                query = f"SELECT count(*) FROM {table} WHERE {column} = ?"
                assert reader.execute(query, (conversation_id,)).fetchone() == (0,), table
    if isinstance(broker, RedisBroker):
        with request.getfixturevalue("redis_server").client() as client:
            assert tagged_keys(client, conversation_id) == []


async def test_a_running_or_watched_conversation_outlives_an_idle_one(
    open_broker: OpenBroker,
) -> None:
    """Lease renewals and presence are activity: while an idle conversation created after
    them expires, a running one and a watched one stay; once the run ends they expire too."""
    broker, _ = await open_broker(conversation_ttl_s=TTL_S)
    running, watched = await new_conversation(broker), await new_conversation(broker)
    lease = await start(broker, running)
    await broker.presence_join(watched, "viewer", LONG_TTL_MS)
    idle = await new_conversation(broker)  # its last activity is the latest of the three
    await until_gone(broker, idle, lambda: broker.renew_lease(lease, LONG_TTL_MS))
    assert await broker.get_record(running) is not None
    assert await broker.get_record(watched) is not None
    assert (await broker.log_state(running)).head == 1  # type: ignore[union-attr]
    await broker.finish_run(lease, [run_finished(running)], snapshot_body())
    await until_gone(broker, running, lambda: None)
    assert await broker.get_record(watched) is not None


async def test_without_a_ttl_nothing_expires(
    open_broker: OpenBroker, request: pytest.FixtureRequest
) -> None:
    """conversation_ttl_s=0: a sweep deletes nothing, and Redis keys carry no TTL."""
    broker, _ = await open_broker(conversation_ttl_s=0)
    conversation_id = await new_conversation(broker)
    await write_everything(broker, conversation_id)
    assert await broker.expire_idle(100) == 0
    assert await broker.get_record(conversation_id) is not None
    if isinstance(broker, RedisBroker):
        with request.getfixturevalue("redis_server").client() as client:
            keys = tagged_keys(client, conversation_id)
            assert keys and all(client.pttl(key) == -1 for key in keys)


# ---- Redis: every key carries the TTL ------------------------------------------------


async def assert_every_key_has_a_ttl(broker: RedisBroker, clients: list[redis.Redis]) -> None:
    conversation_id = await new_conversation(broker)
    await write_everything(broker, conversation_id)
    await start(broker, conversation_id)  # a run in progress: its run hash and lease
    await broker.presence_join(conversation_id, "v", LONG_TTL_MS, b'{"name":"Ann"}')
    keys = {
        (client, key.decode()) for client in clients for key in tagged_keys(client, conversation_id)
    }
    parts = {key.split("}:", 1)[1] for _, key in keys}
    assert parts == {"meta", "log", "run", "lease", "snapshot", "presence", "people", "names"} | {
        "map:files",
        "list:history",
    }
    ttls = {key.split("}:", 1)[1]: client.pttl(key) for client, key in keys}
    assert all(ttl > 0 for ttl in ttls.values()), ttls
    # Watched for a minute: the conversation's keys live that minute and then the TTL.
    assert ttls["meta"] > LONG_TTL_MS and ttls["map:files"] > LONG_TTL_MS


async def test_every_redis_key_of_a_conversation_has_a_ttl_pushed_back_by_writes(
    redis_url: str, redis_server: RedisServer
) -> None:
    """With conversation_ttl_s, every key of a conversation has a TTL (PTTL > 0), and a
    write pushes the expiry of all of them back."""
    broker = make_broker(Settings(redis_url=redis_url, conversation_ttl_s=600))
    assert isinstance(broker, RedisBroker)
    await broker.start(lambda c, f: None, lambda c: None)
    try:
        with redis_server.client() as client:
            await assert_every_key_has_a_ttl(broker, [client])
            conversation_id = await new_conversation(broker)
            await broker.map_set(conversation_id, "files", "a.txt", b"A")
            map_key = f"costream:{{{conversation_id}}}:map:files"
            before = client.pexpiretime(map_key)
            async with asyncio.timeout(WAIT_S):  # until the clock has moved on a millisecond
                while client.pexpiretime(map_key) == before:
                    await broker.update_record(conversation_id, {"title": b"again"})
            assert client.pexpiretime(map_key) > before > 0
    finally:
        await broker.close()


async def test_every_key_has_a_ttl_on_a_redis_cluster(redis_cluster: RedisCluster) -> None:
    """The scripts reach every key of a conversation on its shard: TTLs on a cluster too."""
    broker = make_broker(Settings(redis_url=redis_cluster.url, conversation_ttl_s=600))
    assert isinstance(broker, RedisBroker)
    await broker.start(lambda c, f: None, lambda c: None)
    clients = [redis_cluster.client(port) for port in redis_cluster.ports]
    try:
        await assert_every_key_has_a_ttl(broker, clients)
    finally:
        for client in clients:
            client.close()
        await broker.close()


# ---- through the server ----------------------------------------------------------------


async def _expires_through_the_api(server: ServerProcess) -> None:
    conversation = await create_conversation(server.url, title="short-lived")
    url = f"{server.url}/api/conversations/{conversation['id']}"
    token = conversation["viewToken"]
    assert (await ahttp("GET", url, token=token))[0] == 200
    async with asyncio.timeout(30):
        while (status := (await ahttp("GET", url, token=token))[0]) == 200:
            await asyncio.sleep(0.1)
    assert status == 404
    ws = await connect(server.ws_url(conversation["id"]), subprotocols=[SUBPROTOCOL])  # type: ignore[list-item]
    hello = f'{{"type":"hello","conversationId":"{conversation["id"]}","token":"{token}"}}'
    await ws.send(hello)
    assert await close_code(ws) == 4404


async def test_an_idle_conversation_answers_404_and_4404_embedded(
    start_server: Callable[..., ServerProcess],
) -> None:
    """A server with COSTREAM_CONVERSATION_TTL_S=1 (SQLite): once idle, the conversation is
    unknown over HTTP (404) and WebSocket (4404)."""
    await _expires_through_the_api(start_server(env={"COSTREAM_CONVERSATION_TTL_S": "1"}))


async def test_an_idle_conversation_answers_404_and_4404_with_redis(
    start_server: Callable[..., ServerProcess], redis_url: str
) -> None:
    """The same with Redis: the keys expire by their TTL."""
    server = start_server(redis_url=redis_url, env={"COSTREAM_CONVERSATION_TTL_S": "1"})
    await _expires_through_the_api(server)
