"""The WebSocket protocol against a real ``costream serve`` (embedded broker, demo model)."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect

from costream.protocol import SUBPROTOCOL
from tests.support.proxy import StallingProxy
from tests.support.servers import ServerProcess
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
DELETE = (
    "Thank you. Please delete the streaming story file now that I've read it, "
    "then confirm the deletion."
)


async def test_writer_run_streams_ordered_complete_log(server: ServerProcess) -> None:
    """A message from a writer gives `accepted` and a well-formed run, seq 1 upwards."""
    conv = await create_conversation(server.url)
    writer = await open_session(server.ws_url(conv["id"]), conv["id"], conv["writeToken"])
    assert writer.welcome["role"] == "writer"
    assert writer.welcome["mode"] == "replay"
    assert writer.welcome["model"] == "costream/demo"
    await writer.send({"type": "message", "content": STORY})
    accepted = await writer.until("accepted")
    end = await writer.until_run_ends()
    assert end["type"] == "RUN_FINISHED"
    events = writer.events()
    assert_well_formed(events)
    assert events[0]["type"] == "RUN_STARTED"
    assert events[0]["runId"] == accepted["runId"] == end["runId"]
    types = [e["type"] for e in events]
    for expected in ("REASONING_MESSAGE_CONTENT", "TEXT_MESSAGE_CONTENT", "TOOL_CALL_START"):
        assert expected in types
    result = next(e for e in events if e["type"] == "TOOL_CALL_RESULT")
    assert result["metadata"]["isError"] is False
    await writer.close()


async def test_two_viewers_get_identical_frames(server: ServerProcess) -> None:
    """Two viewers of one conversation receive byte-identical logged frames."""
    conv = await create_conversation(server.url)
    url = server.ws_url(conv["id"])
    first = await open_session(url, conv["id"], conv["viewToken"])
    second = await open_session(url, conv["id"], conv["viewToken"])
    writer = await open_session(url, conv["id"], conv["writeToken"])
    await writer.send({"type": "message", "content": STORY})
    for session in (first, second, writer):
        await session.until_run_ends()
    assert first.logged() == second.logged() == writer.logged()
    assert first.welcome["role"] == "viewer"
    for session in (first, second, writer):
        await session.close()


async def test_late_joiner_and_resumed_viewer_get_exactly_what_they_missed(
    server: ServerProcess,
) -> None:
    """A late joiner replays from seq 1; a viewer resuming at lastSeq gets only what follows."""
    conv = await create_conversation(server.url)
    url = server.ws_url(conv["id"])
    writer = await open_session(url, conv["id"], conv["writeToken"])
    await writer.send({"type": "message", "content": STORY})
    await writer.until_run_ends()
    full = writer.logged()

    late = await open_session(url, conv["id"], conv["viewToken"])
    assert late.welcome["head"] == len(full)
    while len(late.logged()) < len(full):
        await late.next()
    assert late.logged() == full

    resumed = await open_session(
        url, conv["id"], conv["viewToken"], last_seq=10, epoch=writer.welcome["epoch"]
    )
    assert resumed.welcome["mode"] == "replay"
    while len(resumed.logged()) < len(full) - 10:
        await resumed.next()
    assert resumed.logged() == full[10:]

    # The second run is seen live by both, with no gap after the replay.
    await writer.send({"type": "message", "content": DELETE})
    await late.until_run_ends()
    await resumed.until_run_ends()
    assert_well_formed(late.events())
    assert late.logged()[-1] == resumed.logged()[-1]
    for session in (writer, late, resumed):
        await session.close()


async def test_wrong_epoch_gets_snapshot_then_following_events(server: ServerProcess) -> None:
    """A client whose epoch is stale is sent a snapshot of the finished runs, then the rest."""
    conv = await create_conversation(server.url)
    url = server.ws_url(conv["id"])
    writer = await open_session(url, conv["id"], conv["writeToken"])
    await writer.send({"type": "message", "content": STORY})
    end = await writer.until_run_ends()

    stale = await open_session(url, conv["id"], conv["viewToken"], last_seq=3, epoch="old-epoch")
    assert stale.welcome["mode"] == "snapshot"
    snapshot = await stale.next()
    assert snapshot["type"] == "MESSAGES_SNAPSHOT"
    assert snapshot["seq"] == end["seq"]
    roles = [m["role"] for m in snapshot["messages"]]
    assert roles[0] == "user" and "assistant" in roles and "tool" in roles
    assert snapshot["messages"][0]["content"] == STORY
    await writer.close()
    await stale.close()


async def test_presence_counts_viewers_as_they_come_and_go(server: ServerProcess) -> None:
    """Every viewer is told the number of viewers when it changes."""
    conv = await create_conversation(server.url)
    url = server.ws_url(conv["id"])
    first = await open_session(url, conv["id"], conv["viewToken"])
    assert first.welcome["viewers"] == 1
    second = await open_session(url, conv["id"], conv["writeToken"])
    assert second.welcome["viewers"] == 2
    assert (await first.until("presence"))["viewers"] == 2
    await second.close()
    assert (await first.until("presence"))["viewers"] == 1
    await first.close()


async def test_ping_pong_and_refusals_keep_connection_open(server: ServerProcess) -> None:
    """ping gets pong; a refused frame gets an `error` with its code and the socket stays open."""
    conv = await create_conversation(server.url)
    url = server.ws_url(conv["id"])
    viewer = await open_session(url, conv["id"], conv["viewToken"])
    await viewer.send({"type": "ping"})
    assert (await viewer.until("pong"))["type"] == "pong"
    await viewer.send({"type": "message", "content": "hi"})
    assert (await viewer.until("error"))["code"] == "forbidden"

    writer = await open_session(url, conv["id"], conv["writeToken"])
    await writer.send({"type": "cancel"})
    assert (await writer.until("error"))["code"] == "no_run"
    await writer.send({"type": "message", "content": "x" * 100_001})
    assert (await writer.until("error"))["code"] == "too_large"
    await writer.send({"type": "message", "content": "   "})
    assert (await writer.until("error"))["code"] == "bad_request"
    await writer.send({"type": "ping"})
    assert (await writer.until("pong"))["type"] == "pong"
    await viewer.close()
    await writer.close()


async def test_message_while_running_is_refused_run_active(start_server) -> None:  # type: ignore[no-untyped-def]
    """A second message during a run gets `run_active`; the run goes on."""
    slow = start_server(env={"COSTREAM_DEMO_DELAY_MS": "5"})
    conv = await create_conversation(slow.url)
    writer = await open_session(slow.ws_url(conv["id"]), conv["id"], conv["writeToken"])
    await writer.send({"type": "message", "content": STORY})
    await writer.until("accepted")
    await writer.send({"type": "message", "content": "another"})
    assert (await writer.until("error"))["code"] == "run_active"
    assert (await writer.until_run_ends())["type"] == "RUN_FINISHED"
    await writer.close()


async def test_cancel_closes_open_segments_and_finishes_cancelled(start_server) -> None:  # type: ignore[no-untyped-def]
    """cancel mid-stream ends the run with outcome cancelled and every segment closed."""
    slow = start_server(env={"COSTREAM_DEMO_DELAY_MS": "20"})
    conv = await create_conversation(slow.url)
    writer = await open_session(slow.ws_url(conv["id"]), conv["id"], conv["writeToken"])
    await writer.send({"type": "message", "content": STORY})
    await writer.until("REASONING_MESSAGE_CONTENT", "TEXT_MESSAGE_CONTENT")
    await writer.send({"type": "cancel"})
    end = await writer.until_run_ends()
    assert end["type"] == "RUN_FINISHED"
    assert end["outcome"]["type"] == "cancelled"
    events = writer.events()
    assert_well_formed(events)
    step_end = next(e for e in reversed(events) if e["type"] == "STEP_FINISHED")
    assert step_end["metadata"]["finishReason"] == "cancelled"
    # The conversation is idle again: a new message is accepted.
    await writer.send({"type": "message", "content": "hello"})
    await writer.until("accepted")
    await writer.close()


async def _counter(server: ServerProcess, name: str) -> float:
    """One of the server's counters, from ``/metrics``."""
    _, metrics = await ahttp("GET", f"{server.url}/metrics")
    line = next(line for line in metrics.splitlines() if line.startswith(f"{name} "))
    return float(line.split()[1])


async def _catch_ups(server: ServerProcess) -> float:
    """The server's count of viewers switched from the live tail to the log."""
    return await _counter(server, "costream_slow_viewer_catchups_total")


async def test_stalled_viewer_delays_no_one_and_catches_up(start_server) -> None:  # type: ignore[no-untyped-def]
    """A viewer that reads nothing for 10 s: the others get every run meanwhile, its queue
    overflows, and when it reads again it receives every event once, in order, from the log."""
    busy = start_server(
        env={
            "COSTREAM_FLUSH_MS": "0",
            "COSTREAM_VIEWER_QUEUE": "16",
            "COSTREAM_SEND_BUFFER_BYTES": "8192",
        }
    )
    conv = await create_conversation(busy.url)
    url = busy.ws_url(conv["id"])
    async with StallingProxy(busy.port) as proxy:
        stalled = await open_session(
            url.replace(f":{busy.port}/", f":{proxy.port}/"),
            conv["id"],
            conv["viewToken"],
            compression=None,  # uncompressed, a run's frames fill the buffers sooner
        )
        proxy.pause()
        stalled_since = asyncio.get_running_loop().time()
        attentive = await open_session(url, conv["id"], conv["viewToken"])
        writer = await open_session(url, conv["id"], conv["writeToken"])
        # Runs until the stalled viewer's queue overflowed (the sockets' buffers take the
        # first tens of kilobytes; a run is about 60 KB of frames unmerged).
        for _ in range(5):
            await writer.send({"type": "message", "content": STORY})
            assert (await attentive.until_run_ends())["type"] == "RUN_FINISHED"
            if await _catch_ups(busy) >= 1:
                break
        assert await _catch_ups(busy) >= 1, "the stalled viewer's queue never overflowed"
        # Every run reached the attentive viewer while the stalled one read nothing.
        full = attentive.logged()
        await asyncio.sleep(max(0.0, 10.0 - (asyncio.get_running_loop().time() - stalled_since)))
        proxy.resume()
        async with asyncio.timeout(60):
            while len(stalled.logged()) < len(full):
                await stalled.next()
        assert stalled.logged() == full
        assert_well_formed(stalled.events())
        for session in (stalled, attentive, writer):
            await session.close()


# ---- rejections: close codes -----------------------------------------------------------


async def _raw(server: ServerProcess, conversation_id: str, **options):  # type: ignore[no-untyped-def]
    options.setdefault("subprotocols", [SUBPROTOCOL])
    return await connect(server.ws_url(conversation_id), **options)


async def test_no_subprotocol_is_closed_4400(server: ServerProcess) -> None:
    """A client offering no subprotocol is accepted with none, then closed 4400."""
    conv = await create_conversation(server.url)
    ws = await connect(server.ws_url(conv["id"]))
    assert ws.subprotocol is None
    assert await close_code(ws) == 4400


async def test_other_subprotocol_is_selected_then_closed_4400(server: ServerProcess) -> None:
    """A client offering only other subprotocols gets the first selected, then 4400."""
    conv = await create_conversation(server.url)
    ws = await connect(server.ws_url(conv["id"]), subprotocols=["chat.v2", "other"])  # type: ignore[list-item]
    assert ws.subprotocol == "chat.v2"
    assert await close_code(ws) == 4400


@pytest.mark.parametrize(
    "first_frame",
    [
        "not json",
        '{"type":"bogus"}',
        '{"type":"ping"}',
        '{"type":"hello","token":"x"}',
        '{"type":"hello","conversationId":"someone-else","token":"x"}',
        '{"type":"hello","conversationId":"{id}","token":"x","lastSeq":-1}',
    ],
    ids=[
        "unparseable",
        "unknown-type",
        "not-hello",
        "hello-missing-id",
        "hello-other-id",
        "negative-seq",
    ],
)
async def test_bad_first_frame_is_closed_4400(server: ServerProcess, first_frame: str) -> None:
    """Unparseable JSON, an unknown type, a non-hello first frame: close 4400."""
    conv = await create_conversation(server.url)
    ws = await _raw(server, conv["id"])
    await ws.send(first_frame.replace("{id}", conv["id"]))
    assert await close_code(ws) == 4400


async def test_second_hello_and_unknown_type_later_are_closed_4400(server: ServerProcess) -> None:
    """A second hello, or garbage after welcome, closes 4400."""
    conv = await create_conversation(server.url)
    for frame in ({"type": "hello", "conversationId": conv["id"], "token": "t"}, {"type": "x"}):
        session = await open_session(server.ws_url(conv["id"]), conv["id"], conv["viewToken"])
        await session.send(frame)
        assert await close_code(session.ws) == 4400


async def test_binary_frame_first_or_later_is_closed_4400(server: ServerProcess) -> None:
    """A binary frame, as the first frame or after welcome, closes 4400 (text frames only)."""
    conv = await create_conversation(server.url)
    ws = await _raw(server, conv["id"])
    await ws.send(b'{"type":"ping"}')
    assert await close_code(ws) == 4400
    session = await open_session(server.ws_url(conv["id"]), conv["id"], conv["viewToken"])
    await session.ws.send(b'{"type":"ping"}')
    assert await close_code(session.ws) == 4400


async def test_viewer_not_reading_is_closed_4008_after_the_send_timeout(start_server) -> None:  # type: ignore[no-untyped-def]
    """A viewer whose socket takes no data for ``send_timeout_s`` is closed 4008; the
    writer of the same conversation keeps its connection."""
    busy = start_server(
        env={
            "COSTREAM_FLUSH_MS": "0",
            "COSTREAM_SEND_TIMEOUT_S": "1",
            "COSTREAM_VIEWER_QUEUE": "16",
            "COSTREAM_SEND_BUFFER_BYTES": "8192",
        }
    )
    conv = await create_conversation(busy.url)
    url = busy.ws_url(conv["id"])
    async with StallingProxy(busy.port) as proxy:
        stalled = await open_session(
            url.replace(f":{busy.port}/", f":{proxy.port}/"),
            conv["id"],
            conv["viewToken"],
            compression=None,
        )
        proxy.pause()
        writer = await open_session(url, conv["id"], conv["writeToken"])
        # Runs until the stalled viewer's queue overflowed: by then its sends are stuck
        # behind full buffers (the sockets' and the WebSocket's, some 100 KB).
        for _ in range(5):
            await writer.send({"type": "message", "content": STORY})
            assert (await writer.until_run_ends())["type"] == "RUN_FINISHED"
            if await _catch_ups(busy) >= 1:
                break
        # The send timeout fires while the viewer's sends are stuck; then it may read again
        # and take the close frame.
        async with asyncio.timeout(60):
            while await _counter(busy, "costream_slow_viewer_closes_total") < 1:
                await asyncio.sleep(0.05)
        proxy.resume()
        assert await close_code(stalled.ws, timeout=30) == 4008
        await writer.send({"type": "ping"})
        assert (await writer.until("pong"))["type"] == "pong"
        await writer.close()


async def test_no_hello_in_time_is_closed_4400(start_server) -> None:  # type: ignore[no-untyped-def]
    """A client that sends nothing is closed 4400 after the hello timeout."""
    quick = start_server(env={"COSTREAM_HELLO_TIMEOUT_S": "0.5"})
    conv = await create_conversation(quick.url)
    ws = await _raw(quick, conv["id"])
    assert await close_code(ws, timeout=5) == 4400


async def test_wrong_token_is_closed_4401(server: ServerProcess) -> None:
    """A wrong, empty or missing token closes 4401."""
    conv = await create_conversation(server.url)
    for hello in (
        {"type": "hello", "conversationId": conv["id"], "token": "wrong"},
        {"type": "hello", "conversationId": conv["id"], "token": ""},
        {"type": "hello", "conversationId": conv["id"]},
    ):
        ws = await _raw(server, conv["id"])
        await ws.send(json.dumps(hello))
        assert await close_code(ws) == 4401


async def test_unknown_conversation_is_closed_4404_before_token(server: ServerProcess) -> None:
    """An unknown conversation closes 4404, whatever the token."""
    ws = await _raw(server, "no-such-conversation")
    await ws.send(
        json.dumps({"type": "hello", "conversationId": "no-such-conversation", "token": "x"})
    )
    assert await close_code(ws) == 4404


async def test_foreign_origin_is_closed_4403(server: ServerProcess) -> None:
    """A browser page from another origin is closed 4403; the server's own origin is fine."""
    conv = await create_conversation(server.url)
    ws = await _raw(server, conv["id"], origin="https://evil.example")
    assert await close_code(ws) == 4403
    own = await open_session(
        server.ws_url(conv["id"]), conv["id"], conv["viewToken"], origin=server.url
    )
    assert own.welcome["type"] == "welcome"
    await own.close()


async def test_frame_over_one_mebibyte_is_closed_1009(server: ServerProcess) -> None:
    """A frame over 1 MiB closes 1009."""
    conv = await create_conversation(server.url)
    session = await open_session(server.ws_url(conv["id"]), conv["id"], conv["writeToken"])
    await session.ws.send(json.dumps({"type": "message", "content": "x" * (1024 * 1024 + 10)}))
    assert await close_code(session.ws) == 1009


async def test_too_many_viewers_is_closed_1013(start_server) -> None:  # type: ignore[no-untyped-def]
    """Past the per-conversation viewer limit a new viewer is closed 1013."""
    small = start_server(env={"COSTREAM_MAX_VIEWERS": "2"})
    conv = await create_conversation(small.url)
    url = small.ws_url(conv["id"])
    sessions = [await open_session(url, conv["id"], conv["viewToken"]) for _ in range(2)]
    ws = await _raw(small, conv["id"])
    await ws.send(
        json.dumps({"type": "hello", "conversationId": conv["id"], "token": conv["viewToken"]})
    )
    assert await close_code(ws) == 1013
    for session in sessions:
        await session.close()


async def test_heartbeat_when_idle(start_server) -> None:  # type: ignore[no-untyped-def]
    """An idle connection receives heartbeats carrying the log head."""
    quick = start_server(env={"COSTREAM_HEARTBEAT_S": "0.3"})
    conv = await create_conversation(quick.url)
    session = await open_session(quick.ws_url(conv["id"]), conv["id"], conv["viewToken"])
    heartbeat = await session.until("heartbeat", timeout=5)
    assert heartbeat["head"] == 0
    await session.close()


async def test_server_shutdown_closes_viewers_1001(start_server) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM closes connected viewers with 1001 so they reconnect elsewhere."""
    doomed = start_server()
    conv = await create_conversation(doomed.url)
    session = await open_session(doomed.ws_url(conv["id"]), conv["id"], conv["viewToken"])
    await asyncio.to_thread(doomed.stop)
    assert await close_code(session.ws) == 1001
