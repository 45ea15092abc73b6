"""Generated hostile input against a real server: every WebSocket frame type and every
HTTP body gets only PROTOCOL.md's answers (documented statuses, error codes and close
codes, never a 500 or a 1011), and afterwards the server is healthy, an honest viewer
streams a whole run, and its log holds no traceback.

Hypothesis generates the input, derandomized (the same examples on every run, no
example database), so a failure is reproducible and shrunk to a small case.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from costream.protocol import SUBPROTOCOL
from tests.support.servers import ServerProcess
from tests.support.ws import assert_well_formed, create_conversation, open_session

EXAMPLES = 60
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Small frame and body limits, so that oversized input is cheap to send.
ENV = {
    "COSTREAM_CREATE_RATE": "0",
    "COSTREAM_MESSAGE_RATE": "0",
    "COSTREAM_MAX_MESSAGE_CHARS": "2000",
}

HTTP_STATUSES = {200, 201, 202, 400, 401, 403, 404, 409, 413, 415, 429}
CLOSE_CODES = {1000, 1007, 1009, 4400, 4401, 4404}
ERROR_CODES = {
    "run_active",
    "external_producer",
    "no_run",
    "forbidden",
    "too_large",
    "bad_request",
    "rate_limited",
}
SERVER_FRAMES = {"welcome", "presence", "heartbeat", "pong", "error", "accepted"}

# ---- generated input --------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
# Raw texts no JSON encoder writes: nesting past 64 levels, lone surrogates, numbers past
# the float range, NaN, bad syntax, nothing at all.
hostile_texts = st.sampled_from(
    [
        "[" * 65 + "]" * 65,
        "[" * 100_000,
        '{"a":' * 5_000 + "1" + "}" * 5_000,
        '"\\ud800"',
        '{"type":"hello","conversationId":"\\udfff","token":"x"}',
        '{"type":"message","content":"\\ud83d"}',
        "1e400",
        "-1e99999",
        "9" * 5_000,
        '{"lastSeq":1e400}',
        "NaN",
        "{",
        "",
        "null",
        '{"type":null}',
        '{"type":["hello"]}',
    ]
)


def _shaped(kind: str, fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Objects with the frame's or body's own fields, each sometimes missing and
    sometimes of the wrong type, sometimes with an extra field."""
    value = st.fixed_dictionaries(
        {"type": st.just(kind)} if kind else {},
        optional={name: strategy | json_values for name, strategy in fields.items()},
    )
    extra = st.dictionaries(st.text(max_size=8), json_values, max_size=2)
    return st.builds(lambda v, e: {**e, **v}, value, extra)


texts = st.text(max_size=50) | st.sampled_from(["", " ", "\x00", "\u202e", "a" * 3000])
ints = st.integers(min_value=-(2**64), max_value=2**64)
frames = (
    st.one_of(
        _shaped(
            "hello",
            {
                "conversationId": texts,
                "token": texts,
                "lastSeq": ints,
                "epoch": texts,
                "name": texts,
            },
        ),
        _shaped("ping", {}),
        _shaped("message", {"content": texts}),
        _shaped("cancel", {}),
        _shaped("", {"type": texts}),
        json_values,
    ).map(json.dumps)
    | hostile_texts
)


# ---- WebSocket ---------------------------------------------------------------------------


async def _answers(ws: Any, timeout: float = 15.0) -> tuple[list[dict[str, Any]], int | None]:
    """Frames until the pong of a final ping (the session lives on), or until the close
    (its code)."""
    received: list[dict[str, Any]] = []
    try:
        await ws.send('{"type":"ping"}')
        async with asyncio.timeout(timeout):
            while True:
                frame = json.loads(await ws.recv())
                received.append(frame)
                if frame.get("type") == "pong":
                    return received, None
    except ConnectionClosed as closed:
        return received, closed.rcvd.code if closed.rcvd else None


def _check_frames(received: list[dict[str, Any]]) -> None:
    for frame in received:
        if "seq" in frame:
            continue  # a logged event (a run a fuzzed message started)
        assert frame.get("type") in SERVER_FRAMES, frame
        if frame["type"] == "error":
            assert frame["code"] in ERROR_CODES, frame


async def _ws_example(
    server: ServerProcess, conv: dict[str, Any], hello: str | None, sent: list[str | bytes]
) -> int | None:
    async with connect(
        server.ws_url(conv["id"]),
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        max_size=None,
        open_timeout=15,
    ) as ws:
        try:
            if hello is not None:
                await ws.send(hello)
            for frame in sent:
                await ws.send(frame)
        except ConnectionClosed:
            pass  # closed already: the close code is checked below
        received, code = await _answers(ws)
    _check_frames(received)
    assert code is None or code in CLOSE_CODES, (code, received[-3:])
    return code


def test_websocket_frames_get_documented_answers(
    start_server: Callable[..., ServerProcess],
) -> None:
    """Generated frames before and after hello, text and binary: answered with
    PROTOCOL.md's frames, error codes and close codes; the server stays healthy."""
    server = start_server(env=ENV)
    conv = asyncio.run(create_conversation(server.url))

    def hello(token: str) -> str:
        return json.dumps({"type": "hello", "conversationId": conv["id"], "token": token})

    hellos = st.sampled_from(
        [None, hello(conv["writeToken"]), hello(conv["viewToken"]), hello("wrong")]
    )
    binaries = st.binary(max_size=64) | st.just(b"\xff" * 10) | st.just(b"x" * (1024 * 1024 + 1))

    seen: set[int | None] = set()

    @FUZZ
    @given(hello=hellos, sent=st.lists(frames | binaries, min_size=1, max_size=4))
    def check(hello: str | None, sent: list[str | bytes]) -> None:
        seen.add(asyncio.run(_ws_example(server, conv, hello, sent)))

    check()
    # The examples reached past hello and into every kind of refusal.
    assert {None, 4400, 4401, 1009} <= seen, seen
    _assert_healthy(server)


# ---- HTTP --------------------------------------------------------------------------------

_content_types = st.sampled_from(
    ["application/json"] * 6 + ["application/json; charset=utf-8", "text/plain", ""]
)
_agui_message = _shaped(
    "", {"id": texts, "role": st.sampled_from(["user", "system"]), "content": texts}
)
_agui_input = _shaped(
    "",
    {
        "threadId": texts,
        "runId": texts,
        "messages": st.lists(_agui_message, max_size=3),
        "tools": st.lists(json_values, max_size=2),
        "context": st.lists(json_values, max_size=2),
        "state": json_values,
        "forwardedProps": _shaped("", {"follow": st.booleans()}),
    },
)
_events = st.lists(
    _shaped(
        "",
        {
            "type": st.sampled_from(
                [
                    "TEXT_MESSAGE_START",
                    "TEXT_MESSAGE_CONTENT",
                    "TEXT_MESSAGE_END",
                    "RUN_STARTED",
                    "X",
                ]
            ),
            "messageId": texts,
            "delta": texts,
            "role": texts,
        },
    ),
    max_size=4,
)
BODIES: dict[str, st.SearchStrategy[Any]] = {
    "create": _shaped("", {"title": texts, "model": texts, "system": texts}),
    "message": _shaped("", {"content": texts}),
    "ingest start": _shaped("", {"input": texts, "model": texts, "exclusive": st.booleans()}),
    "ingest events": _events,
    "ingest finish": _shaped(
        "",
        {
            "outcome": st.sampled_from(["success", "cancelled", "error", "maybe"]),
            "usage": json_values,
            "costUsd": st.floats(allow_nan=False) | ints,
            "model": texts,
            "messages": st.lists(json_values, max_size=2),
        },
    ),
    "agui run": _agui_input,
    "agui connect": _agui_input,
}


def _path(endpoint: str, conversation_id: str) -> str:
    base = f"/api/conversations/{conversation_id}"
    return {
        "create": "/api/conversations",
        "message": f"{base}/messages",
        "ingest start": f"{base}/runs",
        "ingest events": f"{base}/runs/fuzzed-run/events",
        "ingest finish": f"{base}/runs/fuzzed-run/finish",
        "agui run": f"{base}/agui",
        "agui connect": f"{base}/agui/connect",
    }[endpoint]


def test_http_bodies_get_documented_statuses(start_server: Callable[..., ServerProcess]) -> None:
    """Generated bodies for every endpoint that takes one (shaped like its own, or
    hostile text, sent as JSON or not, with a write, view or wrong token): only
    PROTOCOL.md's statuses; the server stays healthy."""
    server = start_server(env=ENV)
    conv = asyncio.run(create_conversation(server.url))
    tokens = st.sampled_from([conv["writeToken"]] * 4 + [conv["viewToken"], "wrong", ""])
    endpoints = st.sampled_from(list(BODIES))
    payloads = st.one_of(
        endpoints.flatmap(
            lambda e: st.tuples(st.just(e), BODIES[e].map(lambda b: json.dumps(b).encode()))
        ),
        st.tuples(endpoints, hostile_texts.map(str.encode)),
        st.tuples(endpoints, st.binary(max_size=64)),
    )

    seen: set[int] = set()
    with httpx.Client(base_url=server.url, timeout=30) as client:

        @FUZZ
        @given(payload=payloads, token=tokens, content_type=_content_types)
        def check(payload: tuple[str, bytes], token: str, content_type: str) -> None:
            endpoint, body = payload
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            if content_type:
                headers["Content-Type"] = content_type
            path = _path(endpoint, conv["id"])
            with client.stream("POST", path, content=body, headers=headers) as answer:
                status = answer.status_code  # an SSE stream (agui) is not read to its end
            assert status in HTTP_STATUSES, (endpoint, status, body[:200])
            seen.add(status)

        check()
    # The examples reached past every check into the handlers.
    assert {400, 401, 403, 415} <= seen and seen & {200, 201, 202}, seen
    _assert_healthy(server)


# ---- afterwards ---------------------------------------------------------------------------


def _assert_healthy(server: ServerProcess) -> None:
    """/healthz answers, an honest viewer streams a whole run, and no traceback was logged."""
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200

    async def honest_run() -> None:
        conv = await create_conversation(server.url)
        url = server.ws_url(conv["id"])
        viewer = await open_session(url, conv["id"], conv["viewToken"])
        writer = await open_session(url, conv["id"], conv["writeToken"])
        await writer.send({"type": "message", "content": "hello after the fuzzing"})
        assert (await viewer.until_run_ends())["type"] == "RUN_FINISHED"
        assert_well_formed(viewer.events())
        await viewer.close()
        await writer.close()

    asyncio.run(honest_run())
    log = server.log_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
