"""A bare protocol client for the tests: raw frames, nothing hidden (no resume, no retries).

Tests of the server's protocol use this rather than ``costream.client`` so that they see
exactly the bytes and close codes the server produces.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from costream.protocol import SUBPROTOCOL

TERMINAL = ("RUN_FINISHED", "RUN_ERROR")


def http(
    method: str, url: str, body: Any = None, token: str | None = None, raw: bytes | None = None
) -> tuple[int, Any]:
    """A blocking HTTP call; returns (status, parsed JSON or text)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            status, payload = answer.status, answer.read()
    except urllib.error.HTTPError as error:
        status, payload = error.code, error.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode()


async def ahttp(method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    return await asyncio.to_thread(http, method, url, **kwargs)


async def create_conversation(base_url: str, **body: Any) -> dict[str, Any]:
    status, created = await ahttp("POST", f"{base_url}/api/conversations", body=body)
    assert status == 201, created
    return dict(created)


async def start_ingest_run(base_url: str) -> tuple[dict[str, Any], str]:
    """A new conversation whose run an external producer has started (ingest): the
    conversation and the run's URL (``/events`` and ``/finish`` go under it)."""
    conversation = await create_conversation(base_url)
    base = f"{base_url}/api/conversations/{conversation['id']}"
    token = conversation["writeToken"]
    status, started = await ahttp("POST", f"{base}/runs", body={"input": "hi"}, token=token)
    assert status == 201, started
    return conversation, f"{base}/runs/{started['runId']}"


@dataclass
class Session:
    """One raw WebSocket session past ``welcome``."""

    ws: ClientConnection
    welcome: dict[str, Any]
    frames: list[str] = field(default_factory=list)  # every text frame after welcome

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def next(self, timeout: float = 30.0) -> dict[str, Any]:
        text = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(text, str), "the server sends text frames only"
        self.frames.append(text)
        frame: dict[str, Any] = json.loads(text)
        return frame

    async def until(self, *types: str, timeout: float = 60.0) -> dict[str, Any]:
        """Read frames until one of ``types``; returns it."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.next(timeout)
                if frame["type"] in types:
                    return frame

    async def until_run_ends(self, timeout: float = 60.0) -> dict[str, Any]:
        return await self.until(*TERMINAL, timeout=timeout)

    def logged(self) -> list[str]:
        """The logged frames received so far, as the server's exact text."""
        return [f for f in self.frames if f.startswith('{"seq":')]

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(f) for f in self.logged()]

    async def close(self) -> None:
        await self.ws.close()


async def open_session(
    ws_url: str,
    conversation_id: str,
    token: str,
    *,
    last_seq: int = 0,
    epoch: str | None = None,
    **connect_options: Any,
) -> Session:
    ws = await connect(ws_url, subprotocols=[SUBPROTOCOL], **connect_options)  # type: ignore[list-item]
    hello = {
        "type": "hello",
        "conversationId": conversation_id,
        "token": token,
        "lastSeq": last_seq,
        "epoch": epoch,
    }
    await ws.send(json.dumps(hello))
    welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert welcome["type"] == "welcome", welcome
    return Session(ws, welcome)


async def close_code(ws: ClientConnection, timeout: float = 15.0) -> int | None:
    """Wait for the server to close; the close code it sent."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None
    raise AssertionError("unreachable")


def assert_well_formed(events: list[dict[str, Any]], first_seq: int = 1) -> None:
    """Contiguous seq from ``first_seq``, and every segment start has its end."""
    assert [e["seq"] for e in events] == list(range(first_seq, first_seq + len(events)))
    open_ids: set[str] = set()
    pairs = {
        "REASONING_MESSAGE_START": "REASONING_MESSAGE_END",
        "TEXT_MESSAGE_START": "TEXT_MESSAGE_END",
        "TOOL_CALL_START": "TOOL_CALL_END",
    }
    ends = {end: start for start, end in pairs.items()}
    for event in events:
        key = event.get("messageId") or event.get("toolCallId")
        if event["type"] in pairs:
            open_ids.add(f"{event['type']}:{key}")
        elif event["type"] in ends:
            open_ids.remove(f"{ends[event['type']]}:{key}")
        elif event["type"] in TERMINAL:
            assert not open_ids, f"segments left open at {event['type']}: {open_ids}"
