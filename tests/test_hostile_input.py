"""Hostile HTTP input against a real ``costream serve``: answered 4xx with a clear message,
never a 500 or a traceback (issue "Safe on the open internet", findings 4, 5, 7, 9)."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from costream.bodies import MAX_JSON_DEPTH, BadInput, decode_json
from tests.support.servers import ServerProcess
from tests.support.ws import ahttp, create_conversation

DEEP = b"[" * 100_000 + b"]" * 100_000
SURROGATE = rb'"\ud800"'


def _object_with(name: str, raw_value: bytes) -> bytes:
    return b'{"' + name.encode() + b'":' + raw_value + b"}"


async def _assert_no_traceback(server: ServerProcess) -> None:
    """The server is healthy and its log has no traceback."""
    status, _ = await ahttp("GET", f"{server.url}/healthz")
    assert status == 200
    assert "Traceback" not in server.log_text()


@pytest.mark.parametrize("raw", [DEEP, _object_with("title", DEEP)], ids=["array", "in-field"])
async def test_deeply_nested_body_is_400_on_create(server: ServerProcess, raw: bytes) -> None:
    """A 100 000-deep JSON body on create is 400 with a message naming the nesting."""
    status, answer = await ahttp("POST", f"{server.url}/api/conversations", raw=raw)
    assert status == 400, answer
    assert "nests deeper" in answer["error"]["message"]
    await _assert_no_traceback(server)


@pytest.mark.parametrize("field", ["title", "model", "system"])
async def test_lone_surrogate_on_create_is_400(server: ServerProcess, field: str) -> None:
    """A lone surrogate in title, model or system is 400 (it could never be stored as UTF-8)."""
    status, answer = await ahttp(
        "POST", f"{server.url}/api/conversations", raw=_object_with(field, SURROGATE)
    )
    assert status == 400, answer
    assert answer["error"]["code"] == "bad_request"
    await _assert_no_traceback(server)


@pytest.mark.parametrize("path", ["messages", "runs"])
@pytest.mark.parametrize("raw", [DEEP, SURROGATE], ids=["deep", "surrogate"])
async def test_hostile_bodies_on_messages_and_ingest_are_400(
    server: ServerProcess, path: str, raw: bytes
) -> None:
    """Deep nesting or a lone surrogate in a message or an ingest start is 400."""
    conversation = await create_conversation(server.url)
    field = "content" if path == "messages" else "input"
    body = raw if raw is DEEP else _object_with(field, raw)
    status, answer = await ahttp(
        "POST",
        f"{server.url}/api/conversations/{conversation['id']}/{path}",
        raw=body,
        token=conversation["writeToken"],
    )
    assert status == 400, answer
    await _assert_no_traceback(server)


@pytest.mark.parametrize("query", ["after=²", "limit=²", "after=٣", "limit=99999999999999999999"])
async def test_non_ascii_digits_in_query_are_400(server: ServerProcess, query: str) -> None:
    """``?after=`` and ``?limit=`` take ASCII digits only (``str.isdigit`` also takes ``²``)."""
    conversation = await create_conversation(server.url)
    status, answer = await ahttp(
        "GET",
        f"{server.url}/api/conversations/{conversation['id']}/events?{quote(query, safe='=')}",
        token=conversation["viewToken"],
    )
    assert status == 400, answer
    assert "must be an integer" in answer["error"]["message"]
    await _assert_no_traceback(server)


def _post(url: str, body: bytes, content_type: str | None) -> tuple[int, bytes]:
    """A raw HTTP/1.1 POST with the given Content-Type (or none)."""
    parts = urlsplit(url)
    head = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
    if content_type is not None:
        head.append(f"Content-Type: {content_type}")
    head.append(f"Content-Length: {len(body)}")
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("content_type", ["text/plain", None, "application/x-www-form-urlencoded"])
async def test_create_refuses_a_body_not_sent_as_json(
    server: ServerProcess, content_type: str | None
) -> None:
    """Creation refuses a non-JSON content type (a cross-site ``text/plain`` post) with 415."""
    status, answer = await asyncio.to_thread(
        _post, f"{server.url}/api/conversations", b'{"title":"x"}', content_type
    )
    assert status == 415, answer
    assert b"application/json" in answer


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/x+json"])
async def test_create_accepts_json_media_types(server: ServerProcess, content_type: str) -> None:
    """``application/json`` with a charset, and ``application/...+json``, are JSON."""
    status, answer = await asyncio.to_thread(
        _post, f"{server.url}/api/conversations", b'{"title":"x"}', content_type
    )
    assert status == 201, answer


async def test_invalid_utf8_body_is_400(server: ServerProcess) -> None:
    """A body that is not valid UTF-8 is 400."""
    status, answer = await ahttp("POST", f"{server.url}/api/conversations", raw=b'{"title":"\xff"}')
    assert status == 400, answer


def test_json_nesting_limit_is_64_levels() -> None:
    """64 levels of nesting decode; 65 are refused before decoding, brackets inside strings
    not counted."""
    assert decode_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is not None
    with pytest.raises(BadInput, match="nests deeper than 64"):
        decode_json(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))
    in_string = b'["' + b"[" * 1000 + b'"]'
    assert decode_json(in_string) == ["[" * 1000]
    assert decode_json(in_string.decode()) == ["[" * 1000]


async def test_client_leaving_mid_body_logs_no_traceback(server: ServerProcess) -> None:
    """A client that disconnects before its body ends leaves no traceback in the log."""
    parts = urlsplit(server.url)
    assert parts.hostname is not None and parts.port is not None
    for _ in range(3):
        with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
            sock.sendall(
                b"POST /api/conversations HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{" + b" " * 1000
            )
    # The server has seen each disconnect once it answers the next requests in order.
    for _ in range(20):
        status, _ = await ahttp("POST", f"{server.url}/api/conversations", body={})
        assert status == 201
    await _assert_no_traceback(server)


async def _ingest_run(server: ServerProcess) -> tuple[dict[str, Any], str]:
    conversation = await create_conversation(server.url)
    status, started = await ahttp(
        "POST",
        f"{server.url}/api/conversations/{conversation['id']}/runs",
        body={"input": "hi"},
        token=conversation["writeToken"],
    )
    assert status == 201, started
    return conversation, started["runId"]


@pytest.mark.parametrize(
    "finish",
    [
        b'{"outcome":"success","costUsd":1e309}',
        b'{"outcome":"success","costUsd":1e308}',
        b'{"outcome":"success","costUsd":-1}',
        b'{"outcome":"success","usage":{"inputTokens":-1000}}',
        b'{"outcome":"success","usage":{"outputTokens":1e3}}',
        b'{"outcome":"success","usage":{"reasoningTokens":99999999999999999999}}',
    ],
    ids=["inf", "huge", "negative-cost", "negative-tokens", "float-tokens", "huge-tokens"],
)
async def test_ingest_finish_range_checks_cost_and_tokens(
    server: ServerProcess, finish: bytes
) -> None:
    """Ingest finish refuses costs that are not finite, negative or huge, and token counts
    that are negative, fractional or huge (400); the conversation stays readable."""
    conversation, run_id = await _ingest_run(server)
    base = f"{server.url}/api/conversations/{conversation['id']}"
    for _ in range(2):
        status, answer = await ahttp(
            "POST", f"{base}/runs/{run_id}/finish", raw=finish, token=conversation["writeToken"]
        )
        assert status == 400, answer
    status, info = await ahttp("GET", base, token=conversation["viewToken"])
    assert status == 200, info
    assert info["totalCostUsd"] == 0
    assert min(info["usage"].values()) >= 0
    await _assert_no_traceback(server)


def _event_stream_status(url: str, token: str, last_event_id: str) -> tuple[int, bytes]:
    """GET the SSE stream with a ``Last-Event-ID``; the status and the start of the body."""
    request = urllib.request.Request(url)
    request.add_header("Accept", "text/event-stream")
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Last-Event-ID", last_event_id)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read(1)
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.mark.parametrize("last_event_id", [str(2**63), "²", "-1", "1e3"])
async def test_a_last_event_id_out_of_range_or_not_digits_is_400(
    server: ServerProcess, last_event_id: str
) -> None:
    """SSE resumption with a ``Last-Event-ID`` that is not an integer from 0 to 2**62 is a
    400 naming the header, not a stream that dies."""
    conv = await create_conversation(server.url)
    url = f"{server.url}/api/conversations/{conv['id']}/events"
    status, body = await asyncio.to_thread(
        _event_stream_status, url, conv["viewToken"], last_event_id
    )
    assert status == 400, body
    assert b"Last-Event-ID" in body
