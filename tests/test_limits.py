"""Abuse limits of a public deployment, against real ``costream serve`` processes: the
models a creator may choose, runs per process, requests per client, SSE viewers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from costream.config import Settings
from costream.protocol import CLOSE_OVERLOADED, SUBPROTOCOL
from costream.server.ratelimit import ClientLimits
from tests.support.servers import ServerProcess
from tests.support.ws import close_code, open_session

StartServer = Callable[..., ServerProcess]


async def _create(client: httpx.AsyncClient, url: str, **body: Any) -> httpx.Response:
    return await client.post(f"{url}/api/conversations", json=body)


async def _message(
    client: httpx.AsyncClient, url: str, conversation: dict[str, Any], **headers: str
) -> httpx.Response:
    return await client.post(
        f"{url}/api/conversations/{conversation['id']}/messages",
        json={"content": "Tell me a long story about streaming."},
        headers={"Authorization": f"Bearer {conversation['writeToken']}", **headers},
    )


@asynccontextmanager
async def _sse(
    client: httpx.AsyncClient, url: str, conversation: dict[str, Any]
) -> AsyncIterator[httpx.Response]:
    request = client.build_request(
        "GET",
        f"{url}/api/conversations/{conversation['id']}/events",
        headers={
            "Accept": "text/event-stream",
            "Authorization": f"Bearer {conversation['viewToken']}",
        },
    )
    response = await client.send(request, stream=True)
    try:
        yield response
    finally:
        await response.aclose()


async def test_a_model_outside_the_allow_list_is_refused_naming_the_allowed_ones(
    start_server: StartServer,
) -> None:
    """By default only the server's model may be chosen; COSTREAM_ALLOWED_MODELS widens it."""
    default = start_server()
    listed = start_server(env={"COSTREAM_ALLOWED_MODELS": "costream/demo, openai/gpt-4o-mini"})
    async with httpx.AsyncClient(timeout=30) as client:
        refused = await _create(client, default.url, model="openai/gpt-4o-mini")
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "bad_request"
        assert "costream/demo" in refused.json()["error"]["message"]
        own = await _create(client, default.url, model="costream/demo")
        assert own.status_code == 201
        assert (await _create(client, default.url)).json()["model"] == "costream/demo"

        allowed = await _create(client, listed.url, model="openai/gpt-4o-mini")
        assert allowed.status_code == 201
        assert allowed.json()["model"] == "openai/gpt-4o-mini"
        other = await _create(client, listed.url, model="anthropic/claude-opus-4")
        assert other.status_code == 400
        message = other.json()["error"]["message"]
        assert "costream/demo" in message and "openai/gpt-4o-mini" in message


async def test_runs_over_the_process_cap_get_429_and_a_rate_limited_frame(
    start_server: StartServer,
) -> None:
    """Past COSTREAM_MAX_RUNS a message gets 429 + Retry-After (HTTP) or `rate_limited`
    (WebSocket); once a run ends, a run may start again."""
    server = start_server(env={"COSTREAM_MAX_RUNS": "1", "COSTREAM_DEMO_DELAY_MS": "500"})
    async with httpx.AsyncClient(timeout=30) as client:
        first = (await _create(client, server.url)).json()
        second = (await _create(client, server.url)).json()
        watcher = await open_session(server.ws_url(first["id"]), first["id"], first["viewToken"])
        assert (await _message(client, server.url, first)).status_code == 202

        refused = await _message(client, server.url, second)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["Retry-After"]) >= 1

        writer = await open_session(server.ws_url(second["id"]), second["id"], second["writeToken"])
        await writer.send({"type": "message", "content": "hello"})
        reply = await writer.until("error", "accepted")
        assert reply == {"type": "error", "code": "rate_limited", "message": reply["message"]}

        cancel = await client.post(
            f"{server.url}/api/conversations/{first['id']}/cancel",
            headers={"Authorization": f"Bearer {first['writeToken']}"},
        )
        assert cancel.status_code == 202
        await watcher.until_run_ends()
        # The run's task ends just after its last event: the slot frees with it.
        async with asyncio.timeout(10):
            while (answer := await _message(client, server.url, second)).status_code == 429:
                await asyncio.sleep(0.05)
        assert answer.status_code == 202
        await watcher.close()
        await writer.close()


async def test_creating_conversations_is_rate_limited_per_client(
    start_server: StartServer,
) -> None:
    """Past COSTREAM_CREATE_RATE per minute a client gets 429 + Retry-After; its own
    X-Forwarded-For does not help, a trusted proxy's (FORWARDED_ALLOW_IPS) tells clients apart."""
    # Loopback is not a trusted proxy here: the test client is a client, as on the internet.
    server = start_server(env={"COSTREAM_CREATE_RATE": "2", "FORWARDED_ALLOW_IPS": "192.0.2.1"})
    trusting = start_server(env={"COSTREAM_CREATE_RATE": "1"})
    async with httpx.AsyncClient(timeout=30) as client:
        assert [(await _create(client, server.url)).status_code for _ in range(2)] == [201, 201]
        refused = await _create(client, server.url)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 30
        spoofed = await client.post(
            f"{server.url}/api/conversations", json={}, headers={"X-Forwarded-For": "203.0.113.9"}
        )
        assert spoofed.status_code == 429

        def via(address: str) -> dict[str, str]:
            return {"X-Forwarded-For": f"198.51.100.1, {address}"}

        url = f"{trusting.url}/api/conversations"
        assert (await client.post(url, json={}, headers=via("203.0.113.1"))).status_code == 201
        assert (await client.post(url, json={}, headers=via("203.0.113.1"))).status_code == 429
        assert (await client.post(url, json={}, headers=via("203.0.113.2"))).status_code == 201


async def test_posting_messages_is_rate_limited_per_client(start_server: StartServer) -> None:
    """Past COSTREAM_MESSAGE_RATE per minute a client's messages get 429 + Retry-After."""
    server = start_server(env={"COSTREAM_MESSAGE_RATE": "1"})
    async with httpx.AsyncClient(timeout=30) as client:
        first = (await _create(client, server.url)).json()
        second = (await _create(client, server.url)).json()
        assert (await _message(client, server.url, first)).status_code == 202
        refused = await _message(client, server.url, second)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        unknown = {"id": "AAAAAAAAAAAAAAAAAAAAAA", "writeToken": "x"}
        assert (await _message(client, server.url, unknown)).status_code == 429  # before 404


def test_the_per_client_buckets_are_bounded_dropping_the_least_recent() -> None:
    """At most max_clients buckets are kept; the least recently seen client is dropped."""
    limits = ClientLimits(per_minute=1, max_clients=3)
    for client in ("a", "b", "c"):
        assert limits.retry_after(client) is None
    assert limits.retry_after("a") is not None  # a is now the most recent
    assert limits.retry_after("d") is None  # b, the least recent, is dropped
    assert len(limits) == 3
    assert limits.retry_after("b") is None  # a fresh bucket: b was forgotten
    assert limits.retry_after("a") is not None  # a was kept
    assert ClientLimits(per_minute=60).max_clients == 10_000


def test_the_limits_default_to_the_documented_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """20 runs per process, 60 creations and 120 messages per client per minute, the
    server's model only; each read from its environment variable."""
    for name in (
        "COSTREAM_MAX_RUNS",
        "COSTREAM_CREATE_RATE",
        "COSTREAM_MESSAGE_RATE",
        "COSTREAM_ALLOWED_MODELS",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LLM_MODEL", "openai/gpt-4o-mini")
    settings = Settings.from_env()
    assert (settings.max_runs, settings.create_rate, settings.message_rate) == (20, 60, 120)
    assert settings.models == ("openai/gpt-4o-mini",)
    monkeypatch.setenv("COSTREAM_MAX_RUNS", "3")
    monkeypatch.setenv("COSTREAM_CREATE_RATE", "0")
    monkeypatch.setenv("COSTREAM_MESSAGE_RATE", "7.5")
    monkeypatch.setenv("COSTREAM_ALLOWED_MODELS", "a/b, c/d")
    settings = Settings.from_env()
    assert (settings.max_runs, settings.create_rate, settings.message_rate) == (3, 0, 7.5)
    assert settings.models == ("a/b", "c/d")
    assert ClientLimits(settings.create_rate).retry_after("anyone") is None  # 0: no limit


async def test_sse_streams_count_toward_the_viewer_limit(start_server: StartServer) -> None:
    """SSE streams count as viewers: over COSTREAM_MAX_VIEWERS an SSE request gets 503 +
    Retry-After and a WebSocket 1013; a closed stream frees its place."""
    server = start_server(env={"COSTREAM_MAX_VIEWERS": "2", "COSTREAM_HEARTBEAT_S": "0.2"})
    async with httpx.AsyncClient(timeout=30) as client, AsyncExitStack() as streams:
        conversation = (await _create(client, server.url)).json()
        held = [
            await streams.enter_async_context(_sse(client, server.url, conversation))
            for _ in range(2)
        ]
        assert [stream.status_code for stream in held] == [200, 200]

        async with _sse(client, server.url, conversation) as over:
            assert over.status_code == 503
            assert int(over.headers["Retry-After"]) >= 1
            await over.aread()
            assert over.json()["error"]["code"] == "overloaded"

        ws = await connect(server.ws_url(conversation["id"]), subprotocols=[SUBPROTOCOL])  # type: ignore[list-item]
        hello = {
            "type": "hello",
            "conversationId": conversation["id"],
            "token": conversation["viewToken"],
            "lastSeq": 0,
        }
        await ws.send(json.dumps(hello))
        assert await close_code(ws) == CLOSE_OVERLOADED

        await held[0].aclose()  # the server sees it at its next heartbeat write
        async with asyncio.timeout(10):
            while True:
                async with _sse(client, server.url, conversation) as again:
                    if again.status_code == 200:
                        break
                await asyncio.sleep(0.05)
