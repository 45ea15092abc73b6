"""The fault matrix: every producer path, in every storage mode, through every fault.

Rows: the HTTP publisher on an embedded (SQLite) server, the HTTP publisher on a Redis
server, the Redis publisher (straight into the servers' Redis). Columns: the producer's
endpoint (the server for HTTP, Redis for the Redis publisher) killed mid-run with
SIGKILL and started again, down when the run starts, hung (SIGSTOP) mid-run then going
on, Redis restarted mid-run (Redis mode only), and an answer held past the producer's
timeout (so it sends the batch again). The built-in runner's faults are in
``test_faults.py``.

Every cell: a ``costream.client`` viewer and the events API end with the same log, every
seq once and in order, well formed; the text is all there once; every run ends; and the
publisher's counters say what the log holds (nothing dropped, nothing unconfirmed).
One redis-server serves the whole module.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from costream.publisher import TokenPublisher
from tests.support.proxy import LosingRelay
from tests.support.redis import RedisServer
from tests.support.servers import ServerProcess
from tests.support.ws import assert_well_formed, create_conversation
from tests.test_publisher_outage import (
    WAIT_S,
    Viewer,
    gaps_of,
    log_of,
    pieces,
    publish,
    published_by_producer,
    runs_of,
    text_of,
    until,
)

StartServer = Callable[..., ServerProcess]
ROWS = [("http", "sqlite"), ("http", "redis"), ("redis", "redis")]
FAULTS = ["kill", "down_at_start", "hung", "redis_restart", "slow_ack"]
CELLS = [
    pytest.param(path, mode, fault, id=f"{path}-{mode}-{fault}")
    for path, mode in ROWS
    for fault in FAULTS
    if fault != "redis_restart" or mode == "redis"
]


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the module (a cell may stop, kill, pause and restart it)."""
    server = RedisServer(Path(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


class Endpoint:
    """What the producer talks to: the server (HTTP) or Redis (the Redis publisher)."""

    def __init__(self, server: ServerProcess | None, redis: RedisServer | None) -> None:
        self.server, self.redis = server, redis

    @property
    def pid(self) -> int:
        process = self.server.process if self.server else self.redis.process  # type: ignore[union-attr]
        assert process is not None
        return process.pid

    def kill(self) -> None:
        (self.server or self.redis).kill()  # type: ignore[union-attr]

    def start(self) -> None:
        (self.server or self.redis).start()  # type: ignore[union-attr]


def redis_url_through(redis: RedisServer, port: int) -> str:
    parts = urlsplit(redis.url)
    return urlunsplit(parts._replace(netloc=f"127.0.0.1:{port}"))


async def run_cell(
    path: str,
    fault: str,
    server: ServerProcess,
    redis: RedisServer,
    conversation: dict[str, Any],
    relay: LosingRelay | None,
) -> TokenPublisher:
    """Publish one run of 60 pieces through the fault; the closed publisher."""
    endpoint = Endpoint(server if path == "http" else None, redis if path == "redis" else None)
    port = relay.port if relay is not None else None
    if path == "http":
        base = f"http://127.0.0.1:{port}" if port else server.url
        publisher = TokenPublisher(
            url=f"{base}/c/{conversation['id']}",
            token=conversation["writeToken"],
            timeout_s=0.5,
            retry_cap_s=0.5,
        )
    else:
        url = redis_url_through(redis, port) if port else redis.url
        publisher = TokenPublisher(
            redis_url=url, conversation_id=conversation["id"], retry_cap_s=0.5
        )
    if fault == "down_at_start":
        endpoint.kill()
        publisher.start_run("go")
        publish(publisher, pieces(0, 20))
        await until(lambda: publisher.retried >= 1)
        await asyncio.to_thread(endpoint.start)
    else:
        publisher.start_run("go")
        publish(publisher, pieces(0, 20))
        assert await publisher.aflush(WAIT_S)
    if fault == "kill":
        endpoint.kill()
        publish(publisher, pieces(20, 20))
        await until(lambda: publisher.retried >= 1)
        await asyncio.to_thread(endpoint.start)
    elif fault == "hung":
        os.kill(endpoint.pid, signal.SIGSTOP)
        try:
            publish(publisher, pieces(20, 20))
            await until(lambda: publisher.retried >= 1)
        finally:
            os.kill(endpoint.pid, signal.SIGCONT)
    elif fault == "redis_restart":
        await asyncio.to_thread(redis.stop)
        publish(publisher, pieces(20, 20))
        await asyncio.to_thread(redis.start)
    elif fault == "slow_ack":
        assert relay is not None
        publish(publisher, pieces(20, 20))  # the trigger, p025, is in there
        await until(relay.spoiled.is_set)
    else:
        publish(publisher, pieces(20, 20))
    publish(publisher, pieces(40, 20))
    publisher.finish_run()
    await publisher.aclose(timeout=WAIT_S)
    return publisher


@pytest.mark.parametrize(("path", "mode", "fault"), CELLS)
async def test_viewers_get_every_event_once_and_the_counters_say_so(
    path: str, mode: str, fault: str, start_server: StartServer, shared_redis: RedisServer
) -> None:
    """One cell of the matrix (see the module's docstring)."""
    server = start_server(redis_url=shared_redis.url if mode == "redis" else None)
    conversation = await create_conversation(server.url)
    async with contextlib.AsyncExitStack() as stack:
        relay = None
        if fault == "slow_ack":
            upstream = server.port if path == "http" else shared_redis.port
            # HTTP: the 202 held past the publisher's 0.5 s timeout; Redis: the script's
            # answer lost with its connection (as in test_idempotent.py).
            options: dict[str, Any] = (
                {"delay_s": 1.0, "answer_prefix": b"HTTP/1.1 202"}
                if path == "http"
                else {"drop": True, "answer_prefix": b":"}
            )
            relay = await stack.enter_async_context(LosingRelay(upstream, b"p025", **options))
        viewer = None
        if fault != "down_at_start":
            viewer = await stack.enter_async_context(
                Viewer(server.ws_url(conversation["id"]), conversation["viewToken"])
            )
        try:
            publisher = await run_cell(path, fault, server, shared_redis, conversation, relay)
        finally:
            shared_redis.start()  # a failed cell leaves Redis running for the next
        if viewer is None:
            viewer = await stack.enter_async_context(
                Viewer(server.ws_url(conversation["id"]), conversation["viewToken"])
            )
        log = await log_of(server.url, conversation)
        seen = await viewer.until_seq(log[-1]["seq"])

    assert seen == log
    assert_well_formed(log)
    runs = runs_of(log)
    # The embedded server ends at start-up the runs its killed process left open; in
    # every other cell the run rides the fault out whole.
    assert len(runs) == (2 if (mode, fault) == ("sqlite", "kill") else 1)
    for cut, resumed in itertools.pairwise(runs):  # a cut run goes on in the next
        assert (cut[-1]["type"], cut[-1]["code"]) == ("RUN_ERROR", "producer_lost")
        assert gaps_of(resumed)[0]["resumes"] == cut[0]["runId"]
    assert runs[-1][-1]["type"] == "RUN_FINISHED"
    assert text_of(log) == "".join(pieces(0, 60))
    assert all(gap["lost"] == gap["unconfirmed"] == 0 for gap in gaps_of(log))
    assert (publisher.errors, publisher.dropped, publisher.unconfirmed) == (0, 0, 0)
    assert published_by_producer(log) == publisher.delivered
    if fault != "redis_restart":
        assert publisher.retried >= 1
