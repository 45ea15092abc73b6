"""Faults with real parts: processes killed or stopped, Redis restarted, paused, cut off.

Each test states the bound it holds the server to; the timeouts are failure bounds, not
measurements. Every server uses the demo model at a pace (``COSTREAM_DEMO_DELAY_MS``) that
keeps the run going while the fault happens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from typing import Any

import pytest

from costream.client import CLOSE_ABNORMAL, connect
from costream.config import Settings
from costream.protocol import CLOSE_GOING_AWAY, RunFinished
from costream.server.app import _maintain_once, create_app
from costream.server.deps import Services
from costream.server.viewer_queue import ViewerQueue
from tests.support.front import Failover
from tests.support.ready import until_ready
from tests.support.redis import RedisServer
from tests.support.ws import (
    TERMINAL,
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
LEASE_TTL_MS = 2000  # with _maintain's 2 s: a dead producer's run ends within ~4 s
PRESENCE_TTL_MS = 2000  # with _maintain's 2 s: a dead process's viewers drop within ~4 s


async def _post_message(base_url: str, conv: dict[str, Any]) -> None:
    status, body = await ahttp(
        "POST",
        f"{base_url}/api/conversations/{conv['id']}/messages",
        body={"content": STORY},
        token=conv["writeToken"],
    )
    assert status == 202, body


async def _log(base_url: str, conv: dict[str, Any]) -> list[str]:
    """The conversation's log from the events endpoint, each frame as compact JSON."""
    status, events = await ahttp(
        "GET",
        f"{base_url}/api/conversations/{conv['id']}/events?limit=10000",
        token=conv["viewToken"],
    )
    assert status == 200
    return [_canonical(event) for event in events]


def _canonical(event: dict[str, Any]) -> str:
    return json.dumps(event, sort_keys=True)


async def _collect_until_run_ends(conversation: Any, texts: list[str], timeout: float) -> Any:
    """Iterate a ``costream.client`` subscription, keeping each logged frame's text, until
    the run ends; returns the ending event."""
    async with asyncio.timeout(timeout):
        while True:
            frame, text = await conversation.next_with_text()
            if text.startswith('{"seq":'):
                texts.append(text)
                if json.loads(text)["type"] in TERMINAL:
                    return frame


def _seqs(texts: list[str]) -> list[int]:
    return [json.loads(text)["seq"] for text in texts]


async def test_killed_producer_clients_resume_elsewhere_with_no_gap(
    start_server, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL mid-run: a client of the dead process resumes on the other with no gap,
    and the other process ends the run RUN_ERROR producer_lost (bound: lease ttl + 2 s)."""
    env = {"COSTREAM_LEASE_TTL_MS": str(LEASE_TTL_MS)}
    producer = start_server(redis_url=redis_url, env={**env, "COSTREAM_DEMO_DELAY_MS": "20"})
    survivor = start_server(redis_url=redis_url, env=env)
    await until_ready(producer, survivor)  # the bounds below are the run's, not start-up's
    conv = await create_conversation(producer.url)
    watcher = await open_session(survivor.ws_url(conv["id"]), conv["id"], conv["viewToken"])
    async with Failover([producer.port, survivor.port]) as front:
        async with connect(front.ws_url(conv["id"]), conv["viewToken"]) as client:
            await _post_message(producer.url, conv)
            texts: list[str] = []
            async with asyncio.timeout(30):
                while not any('"TEXT_MESSAGE_CONTENT"' in text for text in texts):
                    _, text = await client.next_with_text()
                    if text.startswith('{"seq":'):
                        texts.append(text)
            producer.kill()
            end = await watcher.until_run_ends(timeout=15)
            assert end["type"] == "RUN_ERROR" and end["code"] == "producer_lost"
            last = await _collect_until_run_ends(client, texts, timeout=30)
            assert last.code == "producer_lost"
            assert client.reconnects >= 1 and CLOSE_ABNORMAL in client.close_codes
    assert front.connections[0] == producer.port and front.connections[-1] == survivor.port
    assert _seqs(texts) == list(range(1, len(texts) + 1))
    assert [_canonical(json.loads(text)) for text in texts] == await _log(survivor.url, conv)
    assert_well_formed([json.loads(text) for text in texts])
    await watcher.close()


async def test_sigterm_lets_a_run_finish_within_the_grace(start_server, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM: the process stops accepting, closes its viewers 1001, and its run
    finishes RUN_FINISHED within the grace (COSTREAM_SHUTDOWN_GRACE_S=30)."""
    leaving = start_server(
        redis_url=redis_url,
        env={"COSTREAM_DEMO_DELAY_MS": "3", "COSTREAM_SHUTDOWN_GRACE_S": "30"},
    )
    staying = start_server(redis_url=redis_url)
    conv = await create_conversation(staying.url)
    on_leaving = await open_session(leaving.ws_url(conv["id"]), conv["id"], conv["viewToken"])
    on_staying = await open_session(staying.ws_url(conv["id"]), conv["id"], conv["viewToken"])
    await _post_message(leaving.url, conv)
    await on_staying.until("TEXT_MESSAGE_CONTENT", "REASONING_MESSAGE_CONTENT")
    assert leaving.process is not None
    leaving.process.send_signal(signal.SIGTERM)
    assert await close_code(on_leaving.ws, timeout=15) == CLOSE_GOING_AWAY
    with pytest.raises(OSError):  # no longer accepting once its viewers were told to go
        await asyncio.open_connection("127.0.0.1", leaving.port)
    end = await on_staying.until_run_ends(timeout=30)
    assert end["type"] == "RUN_FINISHED" and end["outcome"]["type"] == "success"
    # uvicorn re-raises the signal once it has shut down: the status says "ended by SIGTERM".
    assert await asyncio.to_thread(leaving.process.wait, 30) in (0, -signal.SIGTERM)
    assert_well_formed(on_staying.events())
    assert [_canonical(e) for e in on_staying.events()] == await _log(staying.url, conv)
    await on_staying.close()


async def test_sigterm_ends_a_run_that_outlasts_the_grace_with_run_error(
    start_server, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM with a run longer than the grace (1 s): the leaving process itself ends it
    RUN_ERROR producer_lost, segments closed, and exits; a viewer elsewhere sees it."""
    leaving = start_server(
        redis_url=redis_url,
        env={"COSTREAM_DEMO_DELAY_MS": "100", "COSTREAM_SHUTDOWN_GRACE_S": "1"},
    )
    staying = start_server(redis_url=redis_url)
    conv = await create_conversation(staying.url)
    viewer = await open_session(staying.ws_url(conv["id"]), conv["id"], conv["viewToken"])
    await _post_message(leaving.url, conv)
    await viewer.until("REASONING_MESSAGE_CONTENT", "TEXT_MESSAGE_CONTENT")
    assert leaving.process is not None
    leaving.process.send_signal(signal.SIGTERM)
    # The lease ttl is the default 10 s: an ending before it came from the leaving process.
    end = await viewer.until_run_ends(timeout=30)
    assert end["type"] == "RUN_ERROR" and end["code"] == "producer_lost"
    assert end["message"] == "the server shut down during this run"
    # uvicorn re-raises the signal once it has shut down: the status says "ended by SIGTERM".
    assert await asyncio.to_thread(leaving.process.wait, 30) in (0, -signal.SIGTERM)
    assert_well_formed(viewer.events())
    status, state = await ahttp(
        "GET", f"{staying.url}/api/conversations/{conv['id']}", token=conv["viewToken"]
    )
    assert status == 200 and state["status"] == "idle"
    await viewer.close()


async def test_redis_restart_mid_run_ends_with_the_complete_log(
    start_server, redis_server: Any, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    """Redis (append-only) down mid-run, until the producer has had to wait and retry: the
    run rides it out and finishes, and resuming clients on both processes end with the
    complete log."""
    # A lease far longer than the outage, however slowly a loaded machine restarts Redis.
    env = {"COSTREAM_LEASE_TTL_MS": "60000"}
    producer = start_server(redis_url=redis_url, env={**env, "COSTREAM_DEMO_DELAY_MS": "20"})
    other = start_server(redis_url=redis_url, env=env)
    await until_ready(producer, other)
    conv = await create_conversation(producer.url)
    async with (
        connect(producer.ws_url(conv["id"]), conv["viewToken"]) as on_producer,
        connect(other.ws_url(conv["id"]), conv["viewToken"]) as on_other,
    ):
        await _post_message(producer.url, conv)
        texts_producer: list[str] = []
        texts_other: list[str] = []
        async with asyncio.timeout(30):
            while not any('_CONTENT"' in text for text in texts_other):
                _, text = await on_other.next_with_text()
                if text.startswith('{"seq":'):
                    texts_other.append(text)
        await asyncio.to_thread(redis_server.stop)
        async with asyncio.timeout(60):  # the producer's next append finds Redis gone
            while "storage unavailable: run" not in producer.log_text():
                await asyncio.sleep(0.05)
        await asyncio.to_thread(redis_server.start)
        end = await _collect_until_run_ends(on_other, texts_other, timeout=60)
        await _collect_until_run_ends(on_producer, texts_producer, timeout=60)
    assert isinstance(end, RunFinished) and end.outcome.type == "success"
    log = await _log(other.url, conv)
    for texts in (texts_producer, texts_other):
        assert [_canonical(json.loads(text)) for text in texts] == log
    assert_well_formed([json.loads(text) for text in texts_other])


async def test_redis_pause_disconnects_no_viewer(
    start_server, redis_server: Any, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    """CLIENT PAUSE for 3 s mid-run: no viewer is disconnected, the stream resumes in order."""
    producer = start_server(redis_url=redis_url, env={"COSTREAM_DEMO_DELAY_MS": "5"})
    other = start_server(redis_url=redis_url)
    conv = await create_conversation(producer.url)
    viewers = [
        await open_session(server.ws_url(conv["id"]), conv["id"], conv["viewToken"])
        for server in (producer, other)
    ]
    await _post_message(producer.url, conv)
    await viewers[1].until("TEXT_MESSAGE_CONTENT", "REASONING_MESSAGE_CONTENT")
    await asyncio.to_thread(redis_server.pause, 3000)
    for viewer in viewers:  # a closed session would raise here
        end = await viewer.until_run_ends(timeout=60)
        assert end["type"] == "RUN_FINISHED"
        assert_well_formed(viewer.events())
        await viewer.send({"type": "ping"})
        assert (await viewer.until("pong", timeout=10))["type"] == "pong"
    assert viewers[0].logged() == viewers[1].logged()
    assert [_canonical(e) for e in viewers[0].events()] == await _log(other.url, conv)
    for viewer in viewers:
        await viewer.close()


async def test_pubsub_killed_repeatedly_during_a_long_run_loses_nothing(
    start_server, redis_server: Any, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    """Every pub/sub connection killed every 0.3 s for the whole run: viewers on both
    processes get every event, in order."""
    producer = start_server(redis_url=redis_url, env={"COSTREAM_DEMO_DELAY_MS": "5"})
    other = start_server(redis_url=redis_url)
    conv = await create_conversation(producer.url)
    viewers = [
        await open_session(server.ws_url(conv["id"]), conv["id"], conv["viewToken"])
        for server in (producer, other, other)
    ]
    await _post_message(producer.url, conv)
    await viewers[1].until("REASONING_MESSAGE_CONTENT", "TEXT_MESSAGE_CONTENT")
    ends = asyncio.gather(*(viewer.until_run_ends(timeout=60) for viewer in viewers))
    kills = 0
    while not ends.done():
        kills += await asyncio.to_thread(redis_server.kill_pubsub)
        await asyncio.wait([ends], timeout=0.3)
    assert [end["type"] for end in ends.result()] == ["RUN_FINISHED"] * 3
    assert kills >= 6  # both processes' links, at least three times
    log = await _log(other.url, conv)
    for viewer in viewers:
        assert_well_formed(viewer.events())
        assert [_canonical(e) for e in viewer.events()] == log
        await viewer.close()


async def test_presence_drops_the_viewers_of_a_killed_process(start_server, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    """A process killed: its viewers stop counting within the presence ttl (2 s) plus one
    maintenance round (2 s)."""
    env = {"COSTREAM_PRESENCE_TTL_MS": str(PRESENCE_TTL_MS)}
    doomed = start_server(redis_url=redis_url, env=env)
    survivor = start_server(redis_url=redis_url, env=env)
    conv = await create_conversation(survivor.url)
    watcher = await open_session(survivor.ws_url(conv["id"]), conv["id"], conv["viewToken"])
    doomed_viewers = [
        await open_session(doomed.ws_url(conv["id"]), conv["id"], conv["viewToken"])
        for _ in range(2)
    ]
    async with asyncio.timeout(15):
        while (await watcher.until("presence"))["viewers"] != 3:
            pass
    doomed.kill()
    async with asyncio.timeout(15):
        while (await watcher.until("presence"))["viewers"] != 1:
            pass
    status, state = await ahttp(
        "GET", f"{survivor.url}/api/conversations/{conv['id']}", token=conv["viewToken"]
    )
    assert status == 200 and state["viewers"] == 1
    for session in (watcher, *doomed_viewers):
        await session.close()


async def test_maintenance_sweep_in_a_redis_outage_logs_one_line(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With Redis down, one maintenance sweep over three followed conversations logs one
    warning that counts them, with no traceback, instead of one line per conversation."""
    app = create_app(Settings(redis_url=redis_server.url, data_dir=None))
    services: Services = app.state.services
    await services.broker.start(services.hub.on_frame, services.hub.on_resync)
    try:
        for conversation_id in ("a", "b", "c"):
            await services.hub.attach(conversation_id, ViewerQueue(10, services.metrics))
        await asyncio.to_thread(redis_server.stop)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="costream.server.app"):
            await _maintain_once(services)
        records = [r for r in caplog.records if r.name == "costream.server.app"]
        assert [(r.levelname, r.getMessage(), r.exc_info) for r in records] == [
            (
                "WARNING",
                "maintenance: storage unavailable for 3 of 3 conversations; will retry",
                None,
            )
        ]
    finally:
        await services.broker.close()
