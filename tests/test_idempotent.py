"""Nothing doubled: an external producer that lost the answer to an append sends the batch
again, and the log holds it once.

Real parts: a real ``costream serve`` or redis-server behind a TCP relay that holds back
or drops the answer to the append after the server stored it, a publisher in its own
thread, a viewer over a WebSocket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from costream.publisher import TokenPublisher
from tests.support.proxy import LosingRelay
from tests.support.redis import RedisServer
from tests.support.servers import ServerProcess
from tests.support.ws import Session, ahttp, assert_well_formed, create_conversation, open_session

StartServer = Callable[..., ServerProcess]
WAIT_S = 30.0  # a bound against hanging, never a measure of speed


async def viewer_of(server: ServerProcess) -> tuple[dict[str, Any], Session]:
    conversation = await create_conversation(server.url)
    session = await open_session(
        server.ws_url(conversation["id"]), conversation["id"], conversation["viewToken"]
    )
    return conversation, session


async def publish_hello_world(publisher: TokenPublisher, relay: LosingRelay) -> None:
    """ "Hello " in a batch whose answer the relay spoils, then "world", then the end."""
    with publisher.run("say hello"):
        publisher("Hello ")
        async with asyncio.timeout(WAIT_S):
            await relay.spoiled.wait()
        publisher("world")
    await publisher.aclose(timeout=WAIT_S)


async def assert_stored_once(
    server: ServerProcess, conversation: dict[str, Any], session: Session
) -> None:
    """The log and the viewer hold each event once, and the text "Hello world"."""
    await session.until_run_ends()
    seen = session.events()
    assert_well_formed(seen)
    status, log = await ahttp(
        "GET",
        f"{server.url}/api/conversations/{conversation['id']}/events",
        token=conversation["viewToken"],
    )
    assert status == 200
    for events in (log, seen):
        types = [event["type"] for event in events]
        assert types.count("STEP_STARTED") == 1 and types.count("TEXT_MESSAGE_START") == 1
        text = "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT")
        assert text == "Hello world"
        assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    await session.close()


async def test_a_batch_whose_http_answer_came_after_the_timeout_is_stored_once(
    start_server: StartServer,
) -> None:
    """The events endpoint's answer arrives after the publisher's timeout, so the
    publisher sends the batch again: the log and viewers get it once, with no error."""
    server = start_server()
    conversation, session = await viewer_of(server)
    async with LosingRelay(
        server.port, b"Hello ", delay_s=1.0, answer_prefix=b"HTTP/1.1 202"
    ) as relay:
        publisher = TokenPublisher(
            url=f"http://127.0.0.1:{relay.port}/c/{conversation['id']}",
            token=conversation["writeToken"],
            timeout_s=0.3,
        )
        await publish_hello_world(publisher, relay)
    await assert_stored_once(server, conversation, session)
    assert (publisher.errors, publisher.dropped) == (0, 0)


async def test_a_redis_append_whose_answer_was_lost_is_stored_once(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """The connection to Redis breaks right after the APPEND script ran, so its answer is
    lost and the batch is sent again: the log and viewers get it once, with no error."""
    server = start_server(redis_url=redis_server.url)
    conversation, session = await viewer_of(server)
    async with LosingRelay(redis_server.port, b"Hello ", drop=True, answer_prefix=b":") as relay:
        parts = urlsplit(redis_server.url)
        netloc = f"{parts.netloc.rpartition('@')[0]}@127.0.0.1:{relay.port}".lstrip("@")
        publisher = TokenPublisher(
            redis_url=urlunsplit(parts._replace(netloc=netloc)),
            conversation_id=conversation["id"],
        )
        await publish_hello_world(publisher, relay)
    await assert_stored_once(server, conversation, session)
    assert (publisher.errors, publisher.dropped) == (0, 0)


async def test_the_events_endpoint_answers_a_repeated_batch_with_the_head_and_a_wrong_one_409(
    start_server: StartServer,
) -> None:
    """With ?expectedHead=N, a batch already stored is answered 202 with the head and not
    appended again (nor refused by the segment grammar); a head that is neither before nor
    after the batch is 409 head_mismatch; a malformed one is 400."""
    server = start_server()
    conversation = await create_conversation(server.url)
    token = conversation["writeToken"]
    runs = f"{server.url}/api/conversations/{conversation['id']}/runs"
    status, started = await ahttp("POST", runs, body={"input": "hi"}, token=token)
    assert status == 201 and started["head"] == 1
    events = f"{runs}/{started['runId']}/events"
    batch = [
        {"type": "TEXT_MESSAGE_START", "messageId": "m1"},
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "delta": "Hello"},
    ]
    for _ in range(2):
        status, answer = await ahttp("POST", f"{events}?expectedHead=1", body=batch, token=token)
        assert (status, answer) == (202, {"head": 3, "cancelRequested": False})
    for wrong in ("0", "2", "7"):
        status, answer = await ahttp(
            "POST", f"{events}?expectedHead={wrong}", body=batch, token=token
        )
        assert (status, answer["error"]["code"]) == (409, "head_mismatch")
    status, answer = await ahttp("POST", f"{events}?expectedHead=-1", body=batch, token=token)
    assert (status, answer["error"]["code"]) == (400, "bad_request")
    end = [{"type": "TEXT_MESSAGE_END", "messageId": "m1"}]
    status, answer = await ahttp("POST", f"{events}?expectedHead=3", body=end, token=token)
    assert (status, answer["head"]) == (202, 4)
    status, log = await ahttp(
        "GET", f"{server.url}/api/conversations/{conversation['id']}/events", token=token
    )
    assert [event["type"] for event in log] == [
        "RUN_STARTED",
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END",
    ]


async def test_a_finish_sent_again_is_answered_200_already_ended_and_ends_the_run_once(
    start_server: StartServer,
) -> None:
    """finish sent again after its answer was lost: 200 with the same runId and head and
    ``alreadyEnded: true``; the log holds one RUN_FINISHED."""
    server = start_server()
    conversation = await create_conversation(server.url)
    token = conversation["writeToken"]
    runs = f"{server.url}/api/conversations/{conversation['id']}/runs"
    status, started = await ahttp("POST", runs, body={"input": "hi"}, token=token)
    assert status == 201
    finish = f"{runs}/{started['runId']}/finish"
    status, first = await ahttp("POST", finish, body={"outcome": "success"}, token=token)
    assert status == 200 and "alreadyEnded" not in first, first
    status, again = await ahttp("POST", finish, body={"outcome": "success"}, token=token)
    assert (status, again) == (200, {**first, "alreadyEnded": True})
    status, log = await ahttp(
        "GET", f"{server.url}/api/conversations/{conversation['id']}/events", token=token
    )
    assert [event["type"] for event in log] == ["RUN_STARTED", "RUN_FINISHED"]


async def test_a_finish_for_a_reaped_run_is_409_no_run(start_server: StartServer) -> None:
    """A run whose lease expired was ended by the server (producer_lost): its producer's
    finish is 409 ``no_run``, not a second ending."""
    server = start_server(env={"COSTREAM_LEASE_TTL_MS": "300"})
    conversation = await create_conversation(server.url)
    token = conversation["writeToken"]
    runs = f"{server.url}/api/conversations/{conversation['id']}/runs"
    status, dead = await ahttp("POST", runs, body={"input": "hi"}, token=token)
    assert status == 201
    async with asyncio.timeout(WAIT_S):  # a new run is refused 409 until the dead one is reaped
        while (
            status := (await ahttp("POST", runs, body={"input": "again"}, token=token))[0]
        ) == 409:
            await asyncio.sleep(0.05)
    assert status == 201
    status, answer = await ahttp(
        "POST", f"{runs}/{dead['runId']}/finish", body={"outcome": "success"}, token=token
    )
    assert (status, answer["error"]["code"]) == (409, "no_run")
    status, log = await ahttp(
        "GET", f"{server.url}/api/conversations/{conversation['id']}/events", token=token
    )
    assert [e.get("code") for e in log if e["type"] == "RUN_ERROR"] == ["producer_lost"]


async def test_an_empty_batch_without_expected_head_answers_the_logs_head(
    start_server: StartServer,
) -> None:
    """``[]`` with no ``expectedHead`` renews the lease and tells the head: how a producer
    that lost count (its retries ran out) finds its place again."""
    server = start_server()
    conversation = await create_conversation(server.url)
    token = conversation["writeToken"]
    runs = f"{server.url}/api/conversations/{conversation['id']}/runs"
    status, started = await ahttp("POST", runs, body={"input": "hi"}, token=token)
    assert status == 201
    events = f"{runs}/{started['runId']}/events"
    batch = [{"type": "CUSTOM", "name": "note", "value": {"n": n}} for n in range(3)]
    status, appended = await ahttp("POST", events, body=batch, token=token)
    assert status == 202 and appended["head"] == started["head"] + 3, appended
    status, answer = await ahttp("POST", events, body=[], token=token)
    assert (status, answer["head"]) == (202, appended["head"])
