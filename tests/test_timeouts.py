"""Request read timeouts: a request's headers, then its body, must arrive in time, else
408 (where an answer is still possible) and the connection is closed; a WebSocket and an
honest request are not touched."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from tests.support.servers import ServerProcess
from tests.support.ws import ahttp, create_conversation, open_session

TIMEOUTS = {"COSTREAM_HEADER_TIMEOUT_S": "1", "COSTREAM_BODY_TIMEOUT_S": "1"}
DEADLINE_S = 30.0  # for every socket to be closed; the timeouts are 1 s


async def _open(server: ServerProcess, data: bytes) -> tuple[asyncio.StreamReader, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    if data:
        writer.write(data)
        await writer.drain()
    return reader, writer


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (EOF or reset)."""
    received = b""
    try:
        while chunk := await reader.read(4096):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def _status(answer: bytes) -> int | None:
    if not answer.startswith(b"HTTP/1.1 "):
        return None
    return int(answer.split(b" ", 2)[1])


def _post_head(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"content-length: {length}\r\n\r\n"
    ).encode()


async def test_two_hundred_half_open_requests_are_closed_while_honest_requests_go_on(
    start_server: Callable[..., ServerProcess],
) -> None:
    """Sockets that send nothing, part of the headers, or headers and part of a body are
    all closed by the server (408 where a request was begun), and meanwhile a client
    that sends whole requests creates a conversation and reads it."""
    # No per-client rate: the half-open creations would spend the honest client's.
    server = start_server(env={**TIMEOUTS, "COSTREAM_CREATE_RATE": "0"})
    kinds = {
        "nothing": b"",
        "partial headers": b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ",
        "partial body": _post_head("/api/conversations", 100) + b'{"title": "slo',
    }
    sockets = []
    for i in range(200):
        kind, data = list(kinds.items())[i % len(kinds)]
        sockets.append((kind, await _open(server, data)))

    created = await create_conversation(server.url, title="honest")
    status, got = await ahttp(
        "GET", f"{server.url}/api/conversations/{created['id']}", token=created["viewToken"]
    )
    assert status == 200 and got["title"] == "honest"

    async with asyncio.timeout(DEADLINE_S):
        answers = await asyncio.gather(*(_until_closed(reader) for _, (reader, _) in sockets))
    by_kind: dict[str, set[int | None]] = {}
    for (kind, (_, writer)), answer in zip(sockets, answers, strict=True):
        by_kind.setdefault(kind, set()).add(_status(answer))
        writer.close()
    assert by_kind == {"nothing": {None}, "partial headers": {408}, "partial body": {408}}
    body = answers[1].split(b"\r\n\r\n", 1)[1]
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert (await ahttp("GET", f"{server.url}/healthz"))[0] == 200
    assert "Traceback" not in server.log_text()


async def test_a_kept_alive_connection_that_starts_a_request_and_stops_gets_408(
    start_server: Callable[..., ServerProcess],
) -> None:
    """After a whole request and its answer, the first bytes of a second request start
    the header timer: the connection gets that answer, then 408, then is closed."""
    server = start_server(env=TIMEOUTS)
    reader, writer = await _open(
        server, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /healthz HTTP/1.1\r\nHo"
    )
    async with asyncio.timeout(DEADLINE_S):
        answer = await _until_closed(reader)
    writer.close()
    first, _, second = answer.partition(b'{"status":"ok"}')
    assert _status(first) == 200
    assert _status(second) == 408


async def test_a_body_nobody_reads_cannot_be_trickled_forever(
    start_server: Callable[..., ServerProcess],
) -> None:
    """A request answered without its body being read (405 here) whose client keeps
    sending a byte of body at a time is closed once the body timeout is past."""
    server = start_server(env=TIMEOUTS)
    reader, writer = await _open(server, _post_head("/healthz", 10_000))
    answer = asyncio.ensure_future(_until_closed(reader))
    async with asyncio.timeout(DEADLINE_S):
        while not answer.done():
            try:
                writer.write(b" ")
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.wait({answer}, timeout=0.1)  # a byte every 100 ms until closed
        received = await answer
    writer.close()
    assert _status(received) == 405


async def test_a_websocket_outlives_the_request_timeouts(
    start_server: Callable[..., ServerProcess],
) -> None:
    """A WebSocket is not a half-open request: after a socket opened later than it has
    been closed for sending nothing, the WebSocket still answers a ping."""
    server = start_server(env=TIMEOUTS)
    created = await create_conversation(server.url)
    session = await open_session(server.ws_url(created["id"]), created["id"], created["viewToken"])
    reader, writer = await _open(server, b"")
    async with asyncio.timeout(DEADLINE_S):
        assert await _until_closed(reader) == b""  # the header timeout has passed
    writer.close()
    await session.send({"type": "ping"})
    assert (await session.until("pong", timeout=10))["type"] == "pong"
    await session.close()
