"""Frames written straight to a connection's transport (``costream.server.wire``) are the
frames websockets itself would write, and reach a live viewer whole at every length the
frame header encodes differently (under 126 bytes, up to 65 535, beyond)."""

from __future__ import annotations

import asyncio

import pytest
import uvicorn
from websockets.frames import Frame, Opcode

from costream.config import Settings
from costream.server.app import create_app
from costream.server.wire import frame
from tests.support.processes import free_port
from tests.support.servers import ServerProcess
from tests.support.ws import ahttp, open_session, start_ingest_run

SIZES = [0, 1, 125, 126, 127, 65_535, 65_536, 200_000]


@pytest.mark.parametrize("size", SIZES)
def test_a_text_frame_is_the_one_websockets_writes(size: int) -> None:
    payload = ("é" * size).encode()[:size]
    assert frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])


async def test_live_frames_of_every_header_length_reach_a_viewer_whole(
    server: ServerProcess,
) -> None:
    """A caught-up viewer gets each live frame as it is logged (written from the fan-out
    loop): deltas whose frames fall on each side of the header's length boundaries arrive
    intact, in order, each once."""
    conversation, run = await start_ingest_run(server.url)
    token = conversation["writeToken"]
    viewer = await open_session(
        server.ws_url(conversation["id"]), conversation["id"], conversation["viewToken"]
    )
    start = {"type": "TEXT_MESSAGE_START", "messageId": "m1", "role": "assistant"}
    status, answer = await ahttp("POST", f"{run}/events", body=[start], token=token)
    assert status == 202, answer
    await viewer.until("TEXT_MESSAGE_START")
    # The frame is the event plus its seq and about 60 bytes of JSON around the delta.
    deltas = ["x", "y" * 60, "z" * 66, "€" * 21_000, "w" * 65_500, "ü" * 100_000]
    for delta in deltas:
        event = {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "delta": delta}
        status, answer = await ahttp("POST", f"{run}/events", body=[event], token=token)
        assert status == 202, answer
        received = await viewer.until("TEXT_MESSAGE_CONTENT")
        assert received["delta"] == delta
    sizes = [len(text.encode()) for text in viewer.logged()[-len(deltas) :]]
    assert min(sizes) < 126 and any(126 <= s < 65_536 for s in sizes) and max(sizes) >= 65_536
    seqs = [event["seq"] for event in viewer.events()]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    await viewer.close()


# uvicorn says its legacy implementation is deprecated; it is the one at hand without a
# transport of the kind wire.py writes to.
@pytest.mark.filterwarnings("ignore:The `websockets` implementation is deprecated:UserWarning")
async def test_another_websocket_implementation_gets_frames_through_asgi() -> None:
    """Served by uvicorn's legacy ``websockets`` implementation, which has no transport to
    write to, a session sends through ASGI: a viewer gets a whole run, in order."""
    app = create_app(Settings(data_dir=None))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, ws="websockets", log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(30):
            while not server.started:
                await asyncio.sleep(0.01)  # uvicorn offers no event for "listening"
        url = f"http://127.0.0.1:{port}"
        conversation, run = await start_ingest_run(url)
        token = conversation["writeToken"]
        viewer = await open_session(
            f"ws://127.0.0.1:{port}/ws/conversations/{conversation['id']}",
            conversation["id"],
            conversation["viewToken"],
        )
        events = [
            {"type": "TEXT_MESSAGE_START", "messageId": "m1", "role": "assistant"},
            *({"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "delta": d} for d in "abc"),
            {"type": "TEXT_MESSAGE_END", "messageId": "m1"},
        ]
        for event in events:
            status, answer = await ahttp("POST", f"{run}/events", body=[event], token=token)
            assert status == 202, answer
        status, answer = await ahttp(
            "POST", f"{run}/finish", body={"outcome": "success"}, token=token
        )
        assert status == 200, answer
        await viewer.until_run_ends()
        log_url = run.rsplit("/runs/", 1)[0] + "/events"
        _, logged = await ahttp("GET", log_url, token=conversation["viewToken"])
        assert viewer.events() == logged
        assert [e["type"] for e in logged][-1] == "RUN_FINISHED" and len(logged) == 7
        await viewer.close()
    finally:
        server.should_exit = True
        await serving
