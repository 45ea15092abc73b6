"""Frames written straight to a connection's transport (``costream.server.wire``) are the
frames websockets itself would write, and reach a live viewer whole at every length the
frame header encodes differently (under 126 bytes, up to 65 535, beyond)."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode

from costream.server.wire import frame
from tests.support.servers import ServerProcess
from tests.support.ws import ahttp, create_conversation, open_session

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
    conversation = await create_conversation(server.url)
    base = f"{server.url}/api/conversations/{conversation['id']}"
    token = conversation["writeToken"]
    status, started = await ahttp("POST", f"{base}/runs", body={"input": "hi"}, token=token)
    assert status == 201, started
    run = f"{base}/runs/{started['runId']}"
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
