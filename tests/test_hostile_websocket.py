"""Hostile WebSocket clients against real servers, embedded and Redis mode: bad frames are
closed 4400 with no traceback, and a client that never reads cannot grow the server's
memory (findings 1, 6 and 8)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
from websockets.asyncio.client import connect

from costream.protocol import CLOSE_BAD_FRAME, CLOSE_SLOW_CONSUMER, SUBPROTOCOL
from tests.support.servers import ServerProcess
from tests.support.ws import ahttp, close_code, create_conversation, http, start_ingest_run


@pytest.fixture(params=["embedded", "redis"])
def any_server(
    request: pytest.FixtureRequest, start_server: Callable[..., ServerProcess]
) -> ServerProcess:
    """A server in embedded mode, or one in Redis mode with its own redis-server."""
    if request.param == "redis":
        redis_url: str = request.getfixturevalue("redis_url")
        return start_server(redis_url=redis_url)
    return start_server()


def _hello(conversation: dict[str, str]) -> str:
    return json.dumps(
        {"type": "hello", "conversationId": conversation["id"], "token": conversation["viewToken"]}
    )


async def test_deeply_nested_first_frame_is_4400_without_traceback(
    any_server: ServerProcess,
) -> None:
    """A first frame of 1 000-deep nested objects, before authentication, closes 4400 and
    logs no traceback."""
    conversation = await create_conversation(any_server.url)
    deep = '{"a":' * 1000 + "1" + "}" * 1000
    for _ in range(3):
        async with connect(
            any_server.ws_url(conversation["id"]),
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        ) as ws:
            await ws.send(deep)
            assert await close_code(ws) == CLOSE_BAD_FRAME
    assert "Traceback" not in any_server.log_text()
    assert "RecursionError" not in any_server.log_text()


@pytest.mark.parametrize(
    "bad", ['{"type":"nope"}', "not json", '{"type":"ping"' + "]" * 3, '["' + "[" * 500]
)
async def test_bad_frame_right_after_hello_is_closed_4400(
    any_server: ServerProcess, bad: str
) -> None:
    """hello and a bad frame sent back to back: welcome, then a 4400 close, in every mode."""
    conversation = await create_conversation(any_server.url)
    async with connect(
        any_server.ws_url(conversation["id"]),
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
    ) as ws:
        await ws.send(_hello(conversation))
        await ws.send(bad)
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert welcome["type"] == "welcome"
        assert await close_code(ws, timeout=10) == CLOSE_BAD_FRAME


async def _large_log(server: ServerProcess, megabytes: int) -> dict[str, str]:
    """A conversation whose log holds ``megabytes`` MB of text, published through ingest."""
    conversation, run = await start_ingest_run(server.url)
    token = conversation["writeToken"]
    batches: list[list[dict[str, str]]] = [[{"type": "TEXT_MESSAGE_START", "messageId": "m"}]]
    for _ in range(2 * megabytes):
        batches.append([{"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "x" * 500_000}])
    batches.append([{"type": "TEXT_MESSAGE_END", "messageId": "m"}])
    for batch in batches:
        status, answer = await ahttp("POST", f"{run}/events", body=batch, token=token)
        assert status == 202, answer
    status, answer = await ahttp("POST", f"{run}/finish", body={"outcome": "success"}, token=token)
    assert status == 200, answer
    return conversation


async def test_client_that_pings_and_never_reads_is_closed(server: ServerProcess) -> None:
    """A client that sends pings and never reads is closed 4008 once its replies waiting to
    be sent pass the limit (64), rather than queueing them without end."""
    conversation = await _large_log(server, megabytes=4)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
    parts = urlsplit(server.url)
    sock.connect((parts.hostname, parts.port))
    async with connect(
        server.ws_url(conversation["id"]),
        sock=sock,
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        max_queue=1,  # the client stops reading from the socket after one frame
        max_size=None,
    ) as ws:
        await ws.send(_hello(conversation))
        # The replay (4 MB) blocks the server's writer on this client; the pings' replies
        # wait behind it.
        for _ in range(200):
            await ws.send('{"type":"ping"}')
        # Reading now drains what was sent before the close, then the close itself.
        assert await close_code(ws, timeout=30) == CLOSE_SLOW_CONSUMER
    assert "Traceback" not in server.log_text()


def _connections(server: ServerProcess) -> float:
    """The server's count of open WebSocket sessions, from /metrics."""
    _, text = http("GET", f"{server.url}/metrics")
    line = next(x for x in text.splitlines() if x.startswith("costream_websocket_connections"))
    return float(line.split()[-1])


async def test_session_that_hit_the_send_timeout_is_gone_promptly(
    start_server: Callable[..., ServerProcess],
) -> None:
    """A client that stops reading is dropped at the send timeout, and its session ends
    within a few seconds after (it does not hang in closing for the WebSocket library's
    own close timeouts)."""
    server = start_server(env={"COSTREAM_SEND_TIMEOUT_S": "1"})
    conversation = await _large_log(server, megabytes=4)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    parts = urlsplit(server.url)
    sock.connect((parts.hostname, parts.port))
    async with connect(
        server.ws_url(conversation["id"]),
        sock=sock,
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        max_queue=1,
        max_size=None,
    ) as ws:
        await ws.send(_hello(conversation))
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with asyncio.timeout(30):
            while await asyncio.to_thread(_connections, server) > 0:
                await asyncio.sleep(0.1)  # polling the server's own count: no event to await
        assert loop.time() - began < 1 + 6  # the send timeout, then at most a few seconds
        ws.transport.abort()
