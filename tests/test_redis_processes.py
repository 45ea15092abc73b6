"""Several ``costream serve`` processes sharing one real Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

from tests.support.ws import (
    ahttp,
    assert_well_formed,
    close_code,
    create_conversation,
    open_session,
)

STORY = (
    "Tell me a long story about LLM streaming, write it to a file, "
    "make sure it has multiple paragraphs."
)


async def test_viewers_on_two_processes_get_byte_identical_frames(
    start_server, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    """A viewer on process A and one on process B see exactly the same frames."""
    a = start_server(redis_url=redis_url)
    b = start_server(redis_url=redis_url, env={"COSTREAM_DEMO_DELAY_MS": "1"})
    conv = await create_conversation(a.url)
    on_a = await open_session(a.ws_url(conv["id"]), conv["id"], conv["viewToken"])
    on_b = await open_session(b.ws_url(conv["id"]), conv["id"], conv["viewToken"])
    writer = await open_session(b.ws_url(conv["id"]), conv["id"], conv["writeToken"])
    await writer.send({"type": "message", "content": STORY})
    for session in (on_a, on_b, writer):
        await session.until_run_ends()
    assert on_a.logged() == on_b.logged()
    assert_well_formed(on_a.events())
    # The viewer on A counted the viewers of B too.
    assert on_b.welcome["viewers"] == 2
    for session in (on_a, on_b, writer):
        await session.close()


async def test_pubsub_connection_killed_mid_run_loses_nothing(
    start_server, redis_server: Any, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    """Killing every pub/sub connection mid-run: viewers still get every event, in order."""
    a = start_server(redis_url=redis_url, env={"COSTREAM_DEMO_DELAY_MS": "3"})
    b = start_server(redis_url=redis_url)
    conv = await create_conversation(a.url)
    viewer = await open_session(b.ws_url(conv["id"]), conv["id"], conv["viewToken"])
    writer = await open_session(a.ws_url(conv["id"]), conv["id"], conv["writeToken"])
    await writer.send({"type": "message", "content": STORY})
    await viewer.until("TEXT_MESSAGE_CONTENT")
    for _ in range(3):
        await asyncio.to_thread(redis_server.kill_pubsub)
        await asyncio.sleep(0.2)
    await viewer.until_run_ends()
    await writer.until_run_ends()
    assert_well_formed(viewer.events())
    assert viewer.logged() == writer.logged()
    await viewer.close()
    await writer.close()


async def test_killed_producer_ends_as_producer_lost(start_server, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    """A process killed mid-run: the other appends RUN_ERROR producer_lost once the lease expires."""
    env = {"COSTREAM_LEASE_TTL_MS": "1500"}
    producer = start_server(redis_url=redis_url, env={**env, "COSTREAM_DEMO_DELAY_MS": "50"})
    survivor = start_server(redis_url=redis_url, env=env)
    conv = await create_conversation(producer.url)
    viewer = await open_session(survivor.ws_url(conv["id"]), conv["id"], conv["viewToken"])
    status, _ = await ahttp(
        "POST",
        f"{producer.url}/api/conversations/{conv['id']}/messages",
        body={"content": STORY},
        token=conv["writeToken"],
    )
    assert status == 202
    await viewer.until("REASONING_MESSAGE_CONTENT", "TEXT_MESSAGE_CONTENT")
    producer.kill()
    end = await viewer.until_run_ends(timeout=15)
    assert end["type"] == "RUN_ERROR" and end["code"] == "producer_lost"
    assert_well_formed(viewer.events())
    # The conversation is idle again and takes a new message.
    status, _ = await ahttp(
        "POST",
        f"{survivor.url}/api/conversations/{conv['id']}/messages",
        body={"content": "hello"},
        token=conv["writeToken"],
    )
    assert status == 202
    await viewer.close()


async def test_redis_stopped_mid_run_gives_clear_outcome(
    start_server, redis_server: Any, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    """Redis going away: viewers are closed 4000, the API answers 503, nothing hangs."""
    server = start_server(
        redis_url=redis_url,
        env={
            "COSTREAM_DEMO_DELAY_MS": "20",
            "COSTREAM_HEARTBEAT_S": "0.5",
            "COSTREAM_SHUTDOWN_GRACE_S": "1",
        },
    )
    conv = await create_conversation(server.url)
    viewer = await open_session(server.ws_url(conv["id"]), conv["id"], conv["viewToken"])
    await ahttp(
        "POST",
        f"{server.url}/api/conversations/{conv['id']}/messages",
        body={"content": STORY},
        token=conv["writeToken"],
    )
    await viewer.until("REASONING_MESSAGE_CONTENT", "TEXT_MESSAGE_CONTENT")
    await asyncio.to_thread(redis_server.stop)
    try:
        assert await close_code(viewer.ws, timeout=20) == 4000
        status, body = await ahttp(
            "GET", f"{server.url}/api/conversations/{conv['id']}", token=conv["viewToken"]
        )
        assert status == 503 and body["error"]["code"] == "unavailable"
        assert (await ahttp("GET", f"{server.url}/readyz"))[0] == 503
    finally:
        await asyncio.to_thread(redis_server.start)
    async with asyncio.timeout(20):
        while (await ahttp("GET", f"{server.url}/readyz"))[0] != 200:
            await asyncio.sleep(0.2)


async def test_workers_serve_one_conversation_from_several_processes(
    start_server, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    """`--workers 2` on one port: sessions spread over the workers see one conversation."""
    server = start_server(redis_url=redis_url, args=["--workers", "2"])
    conv = await create_conversation(server.url)
    url = server.ws_url(conv["id"])
    viewers = [await open_session(url, conv["id"], conv["viewToken"]) for _ in range(4)]
    writer = await open_session(url, conv["id"], conv["writeToken"])
    await writer.send({"type": "message", "content": STORY})
    for session in (*viewers, writer):
        assert (await session.until_run_ends())["type"] == "RUN_FINISHED"
    assert all(viewer.logged() == writer.logged() for viewer in viewers)
    assert_well_formed(writer.events())
    for session in (*viewers, writer):
        await session.close()


def test_workers_without_redis_are_refused() -> None:
    """`--workers 2` with the embedded broker exits 2 and says Redis is needed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "COSTREAM_"))}
    done = subprocess.run(
        [sys.executable, "-m", "costream.cli", "serve", "--workers", "2", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 2
    assert "--workers needs Redis" in done.stderr
