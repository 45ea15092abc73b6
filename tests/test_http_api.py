"""The HTTP API and SSE against a real ``costream serve`` (embedded broker, demo model)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import pytest

from tests.support.ready import until_ready
from tests.support.servers import ServerProcess
from tests.support.ws import ahttp, assert_well_formed, create_conversation, http

STORY = "Tell me a long story about LLM streaming, write it to a file, make sure it has multiple paragraphs."


async def _finished_run(
    server: ServerProcess, conv: dict[str, Any], content: str = STORY
) -> list[dict[str, Any]]:
    """Post a message and wait until its run is in the log; the log as JSON."""
    base = f"{server.url}/api/conversations/{conv['id']}"
    status, answer = await ahttp(
        "POST", f"{base}/messages", body={"content": content}, token=conv["writeToken"]
    )
    assert status == 202, answer
    async with asyncio.timeout(60):
        while True:
            _, info = await ahttp("GET", base, token=conv["viewToken"])
            if info["status"] == "idle":
                break
            await asyncio.sleep(0.05)
    _, events = await ahttp("GET", f"{base}/events", token=conv["viewToken"])
    assert events[0]["runId"] == answer["runId"]
    return list(events)


async def test_create_returns_ids_tokens_and_share_links(server: ServerProcess) -> None:
    """POST /api/conversations answers 201 with the id, both tokens and fragment share links."""
    status, created = await ahttp("POST", f"{server.url}/api/conversations", body={"title": "Demo"})
    assert status == 201
    assert len(created["id"]) == 22
    assert created["viewUrl"] == f"{server.url}/c/{created['id']}#t={created['viewToken']}"
    assert created["writeUrl"] == f"{server.url}/c/{created['id']}#t={created['writeToken']}"
    assert created["viewToken"] != created["writeToken"]


async def test_conversation_info_reports_model_status_and_cost(server: ServerProcess) -> None:
    """GET a conversation: model, status, head, epoch, usage and cost after a run."""
    conv = await create_conversation(server.url, title="T")
    events = await _finished_run(server, conv)
    _, info = await ahttp(
        "GET", f"{server.url}/api/conversations/{conv['id']}", token=conv["viewToken"]
    )
    assert info["model"] == "costream/demo"
    assert info["title"] == "T"
    assert info["status"] == "idle"
    assert info["head"] == len(events)
    assert info["usage"]["outputTokens"] > 0
    assert info["totalCostUsd"] == 0.0


async def test_events_endpoint_pages_with_after_and_limit(server: ServerProcess) -> None:
    """The events endpoint returns the log after ?after=N, at most ?limit=M, in order."""
    conv = await create_conversation(server.url)
    events = await _finished_run(server, conv)
    assert_well_formed(events)
    base = f"{server.url}/api/conversations/{conv['id']}/events"
    _, page = await ahttp("GET", f"{base}?after=5&limit=3", token=conv["viewToken"])
    assert page == events[5:8]
    _, rest = await ahttp("GET", f"{base}?after={len(events)}", token=conv["viewToken"])
    assert rest == []
    assert all(e["type"] != "MESSAGES_SNAPSHOT" for e in events)


async def test_sse_streams_log_then_live_with_ids(server: ServerProcess) -> None:
    """Accept: text/event-stream gives `id:`/`data:` events from Last-Event-ID onwards."""
    conv = await create_conversation(server.url)
    events = await _finished_run(server, conv)

    def read_sse(count: int, last_event_id: int) -> list[tuple[int, dict[str, Any]]]:
        request = urllib.request.Request(f"{server.url}/api/conversations/{conv['id']}/events")
        request.add_header("Accept", "text/event-stream")
        request.add_header("Authorization", f"Bearer {conv['viewToken']}")
        request.add_header("Last-Event-ID", str(last_event_id))
        received: list[tuple[int, dict[str, Any]]] = []
        with urllib.request.urlopen(request, timeout=30) as stream:
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            event_id = 0
            for raw in stream:
                line = raw.decode().rstrip("\n")
                if line.startswith("id: "):
                    event_id = int(line[4:])
                elif line.startswith("data: "):
                    received.append((event_id, json.loads(line[6:])))
                    if len(received) == count:
                        return received
        return received

    received = await asyncio.to_thread(read_sse, len(events) - 4, 4)
    assert [e for _, e in received] == events[4:]
    assert [i for i, _ in received] == [e["seq"] for e in events[4:]]


def _read_sse(url: str, token: str, count: int, last_event_id: int) -> list[tuple[int, Any]]:
    """The first ``count`` SSE events (id, data) after ``last_event_id``; fewer if it ends."""
    request = urllib.request.Request(url)
    request.add_header("Accept", "text/event-stream")
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Last-Event-ID", str(last_event_id))
    received: list[tuple[int, Any]] = []
    with urllib.request.urlopen(request, timeout=30) as stream:
        event_id = 0
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("data: "):
                received.append((event_id, json.loads(line[6:])))
                if len(received) == count:
                    break
    return received


async def test_events_after_trimmed_ones_start_with_the_snapshot(start_server: Any) -> None:
    """When the events after ?after / Last-Event-ID were trimmed (or it is past the head),
    SSE and the JSON endpoint answer as a WebSocket does: the latest MESSAGES_SNAPSHOT,
    then the events after it."""
    server = start_server(env={"COSTREAM_LOG_RETAIN": "20"})
    conv = await create_conversation(server.url)
    base = f"{server.url}/api/conversations/{conv['id']}"
    status, _ = await ahttp(
        "POST", f"{base}/messages", body={"content": STORY}, token=conv["writeToken"]
    )
    assert status == 202
    async with asyncio.timeout(60):
        while (await ahttp("GET", base, token=conv["viewToken"]))[1]["status"] != "idle":
            await asyncio.sleep(0.05)
    _, info = await ahttp("GET", base, token=conv["viewToken"])

    _, answer = await ahttp("GET", f"{base}/events?after=0", token=conv["viewToken"])
    snapshot = answer[0]
    assert snapshot["type"] == "MESSAGES_SNAPSHOT" and snapshot["seq"] == info["head"]
    assert snapshot["messages"][0]["role"] == "user" and len(snapshot["messages"]) > 2
    assert info["head"] > 20 and answer[1:] == []  # the run ended: the snapshot covers it all
    _, ahead = await ahttp(
        "GET", f"{base}/events?after={info['head'] + 5}", token=conv["viewToken"]
    )
    assert ahead == [snapshot]  # after > head: the client's log is not this one

    received = await asyncio.to_thread(_read_sse, f"{base}/events", conv["viewToken"], 1, 0)
    assert received == [(info["head"], snapshot)]


async def test_files_endpoint_lists_and_serves_workspace(server: ServerProcess) -> None:
    """The files the tools wrote are listed with sizes and served as text."""
    conv = await create_conversation(server.url)
    await _finished_run(server, conv)
    base = f"{server.url}/api/conversations/{conv['id']}/files"
    _, files = await ahttp("GET", base, token=conv["viewToken"])
    assert len(files) == 1 and files[0]["size"] > 200
    status, text = await ahttp("GET", f"{base}/{files[0]['path']}", token=conv["viewToken"])
    assert status == 200 and "\n\n" in text
    status, missing = await ahttp("GET", f"{base}/nope.txt", token=conv["viewToken"])
    assert status == 404 and missing["error"]["code"] == "not_found"


async def test_cancel_over_http(start_server) -> None:  # type: ignore[no-untyped-def]
    """POST cancel answers 202 with the run id and the run ends cancelled; again: 409."""
    slow = start_server(env={"COSTREAM_DEMO_DELAY_MS": "20"})
    conv = await create_conversation(slow.url)
    base = f"{slow.url}/api/conversations/{conv['id']}"
    _, started = await ahttp(
        "POST", f"{base}/messages", body={"content": STORY}, token=conv["writeToken"]
    )
    status, cancelled = await ahttp("POST", f"{base}/cancel", token=conv["writeToken"])
    assert status == 202 and cancelled["runId"] == started["runId"]
    async with asyncio.timeout(30):
        while (await ahttp("GET", base, token=conv["viewToken"]))[1]["status"] != "idle":
            await asyncio.sleep(0.05)
    _, events = await ahttp("GET", f"{base}/events", token=conv["viewToken"])
    assert events[-1]["type"] == "RUN_FINISHED" and events[-1]["outcome"]["type"] == "cancelled"
    status, again = await ahttp("POST", f"{base}/cancel", token=conv["writeToken"])
    assert status == 409 and again["error"]["code"] == "no_run"


# ---- errors, in PROTOCOL.md's order ---------------------------------------------------


def test_unknown_conversation_is_404_before_auth(server: ServerProcess) -> None:
    """An unknown conversation is 404 with or without a token, on every endpoint."""
    for method, path in [
        ("GET", ""),
        ("POST", "/messages"),
        ("POST", "/cancel"),
        ("GET", "/events"),
        ("GET", "/files"),
    ]:
        status, body = http(method, f"{server.url}/api/conversations/nope{path}", body={})
        assert status == 404, (method, path)
        assert body["error"]["code"] == "not_found"


def test_missing_or_wrong_token_is_401(server: ServerProcess) -> None:
    """No token or a wrong one is 401, and the answer does not echo the token."""
    _, conv = http("POST", f"{server.url}/api/conversations", body={})
    url = f"{server.url}/api/conversations/{conv['id']}"
    status, body = http("GET", url)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    status, body = http("GET", url, token="guess-123")
    assert status == 401 and "guess-123" not in json.dumps(body)


def test_view_token_cannot_write_403(server: ServerProcess) -> None:
    """A view token may read but not post messages or cancel: 403."""
    _, conv = http("POST", f"{server.url}/api/conversations", body={})
    url = f"{server.url}/api/conversations/{conv['id']}"
    assert http("GET", url, token=conv["viewToken"])[0] == 200
    status, body = http("POST", f"{url}/messages", body={"content": "hi"}, token=conv["viewToken"])
    assert status == 403 and body["error"]["code"] == "forbidden"
    assert http("POST", f"{url}/cancel", token=conv["viewToken"])[0] == 403


def test_too_large_is_413_before_bad_request(server: ServerProcess) -> None:
    """A body over 1 MiB or a message over the maximum is 413, even if malformed."""
    _, conv = http("POST", f"{server.url}/api/conversations", body={})
    url = f"{server.url}/api/conversations/{conv['id']}/messages"
    status, body = http("POST", url, raw=b"{" * (1024 * 1024 + 1), token=conv["writeToken"])
    assert status == 413 and body["error"]["code"] == "too_large"
    status, body = http("POST", url, body={"content": "x" * 100_001}, token=conv["writeToken"])
    assert status == 413


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[1,2]", b'{"content": 5}', b'{"content": ""}', b"{}"],
    ids=["not-json", "not-object", "not-string", "empty", "missing"],
)
def test_bad_message_body_is_400(server: ServerProcess, raw: bytes) -> None:
    """A message body that is not {"content": "<text>"} is 400."""
    _, conv = http("POST", f"{server.url}/api/conversations", body={})
    url = f"{server.url}/api/conversations/{conv['id']}/messages"
    status, body = http("POST", url, raw=raw, token=conv["writeToken"])
    assert status == 400 and body["error"]["code"] == "bad_request"


def test_bad_events_query_is_400(server: ServerProcess) -> None:
    """?limit over 10 000 or a non-number is 400."""
    _, conv = http("POST", f"{server.url}/api/conversations", body={})
    url = f"{server.url}/api/conversations/{conv['id']}/events"
    assert http("GET", f"{url}?limit=10001", token=conv["viewToken"])[0] == 400
    assert http("GET", f"{url}?after=-1", token=conv["viewToken"])[0] == 400


async def test_second_message_while_running_is_409(start_server) -> None:  # type: ignore[no-untyped-def]
    """Posting while a run is active is 409 run_active."""
    slow = start_server(env={"COSTREAM_DEMO_DELAY_MS": "5"})
    conv = await create_conversation(slow.url)
    url = f"{slow.url}/api/conversations/{conv['id']}/messages"
    assert (await ahttp("POST", url, body={"content": STORY}, token=conv["writeToken"]))[0] == 202
    status, body = await ahttp("POST", url, body={"content": "again"}, token=conv["writeToken"])
    assert status == 409 and body["error"]["code"] == "run_active"


def test_create_key_is_required_when_configured(start_server) -> None:  # type: ignore[no-untyped-def]
    """With COSTREAM_CREATE_KEY set, creating needs it as a Bearer token (401 otherwise)."""
    guarded = start_server(env={"COSTREAM_CREATE_KEY": "operator-secret"})
    url = f"{guarded.url}/api/conversations"
    assert http("POST", url, body={})[0] == 401
    assert http("POST", url, body={}, token="wrong")[0] == 401
    assert http("POST", url, body={}, token="operator-secret")[0] == 201
    assert "operator-secret" not in guarded.log_text()


async def test_health_ready_and_metrics(server: ServerProcess) -> None:
    """/healthz answers 200 at once, /readyz 200 once the server is ready (LiteLLM loaded);
    /metrics is Prometheus text with our counters."""
    assert http("GET", f"{server.url}/healthz")[0] == 200
    await until_ready(server)
    status, text = http("GET", f"{server.url}/metrics")
    assert status == 200
    for name in (
        "costream_viewers",
        "costream_events_appended_total",
        "costream_time_to_first_token_seconds_bucket",
    ):
        assert name in text


def test_page_is_served_at_root_and_share_links(server: ServerProcess) -> None:
    """The web client is served at / and /c/{id}, its assets under /assets/."""
    for path in ("/", "/c/some-id"):
        status, html = http("GET", f"{server.url}{path}")
        assert status == 200 and "<html" in html.lower()
    assert http("GET", f"{server.url}/assets/app.js")[0] == 200


def test_page_forbids_foreign_scripts_and_framing(server: ServerProcess) -> None:
    """The page is served with a Content-Security-Policy: own scripts only, no framing."""
    with urllib.request.urlopen(f"{server.url}/c/some-id", timeout=10) as answer:
        policy = answer.headers["Content-Security-Policy"]
        assert answer.headers["Referrer-Policy"] == "no-referrer"
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy
