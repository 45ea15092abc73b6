"""One event's frame stays within ``max_event_bytes`` (issue 15): long deltas are split,
from the runner and from ingest alike, and everything else that large is refused (ingest)
or cut with a marker (a tool result), so every client can read every frame of the log."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec

from costream import protocol
from costream.client import connect
from costream.config import Settings
from costream.protocol import (
    Custom,
    Event,
    RunError,
    RunFinished,
    TextMessageContent,
    ToolCallArgs,
)
from costream.segments import DeltaMerger
from costream.sizes import SEQ_ROOM, event_size, fit_text, split_delta, split_deltas
from tests.support.llm_server import LLMServer, content, finish, stream, tool_call, usage
from tests.support.servers import ServerProcess
from tests.support.ws import ahttp, create_conversation
from tests.test_runner import StartServer, llm_env

CAP = Settings.max_event_bytes  # 256 KiB
# Every kind of character a split could get wrong: multi-byte UTF-8, a character outside
# the BMP (a surrogate pair in UTF-16), and escapes that JSON makes longer than the text.
TRICKY = 'naïve 😀 "quoted" back\\slash\n\ttab \x01ctl €'


def _frame_bytes(event: Event, seq: int = 10**18) -> int:
    return len(protocol.with_seq(protocol.encode(event), seq))


def test_a_long_delta_is_split_into_deltas_within_the_cap_that_join_to_the_original() -> None:
    """A 2 MB delta full of multi-byte characters and escapes: each piece's frame (with
    the largest seq) is within the cap, no piece cuts a character, and the pieces joined
    are the original text, in order, all of the same segment."""
    text = TRICKY * (2_000_000 // len(TRICKY))
    delta = TextMessageContent(message_id="m1", delta=text)
    pieces = split_delta(delta, CAP)
    assert len(pieces) > 8
    assert all(_frame_bytes(piece) <= CAP for piece in pieces)
    assert all(piece.message_id == "m1" for piece in pieces)
    assert "".join(piece.delta for piece in pieces) == text
    for piece in pieces:  # whole characters: each piece is valid UTF-8 and UTF-16 alone
        piece.delta.encode("utf-8")
        piece.delta.encode("utf-16-le")
    assert all(_frame_bytes(piece) > CAP // 2 for piece in pieces[:-1])  # pieces are full


def test_a_delta_of_escapes_only_is_measured_escaped() -> None:
    """Control characters take 6 bytes each in JSON: a delta of 100 000 of them (100 KB of
    text, 600 KB encoded) is split by its encoded size."""
    delta = ToolCallArgs(tool_call_id="c1", delta="\x01" * 100_000)
    pieces = split_delta(delta, CAP)
    assert len(pieces) == 3
    assert all(_frame_bytes(piece) <= CAP for piece in pieces)
    assert "".join(piece.delta for piece in pieces) == delta.delta


def test_events_within_the_cap_pass_unchanged() -> None:
    """A short delta and any non-delta event go through as they are."""
    short = TextMessageContent(message_id="m1", delta="hi")
    custom = Custom(name="x", value={"big": "y" * (CAP * 2)})
    assert split_deltas([short, custom], CAP) == [short, custom]
    assert split_delta(short, CAP)[0] is short
    assert event_size(short) == len(protocol.encode(short)) + SEQ_ROOM


async def test_merged_deltas_never_pass_the_cap() -> None:
    """A merger with a long window fed 3 MB of small deltas sends them merged, yet no
    frame passes the cap and the text is intact; a single 1 MB delta is split at once."""
    sent: list[Event] = []

    async def sink(events: list[Event]) -> None:
        sent.extend(events)

    merger = DeltaMerger(sink, flush_ms=10_000, max_event_bytes=CAP)
    pieces = [TRICKY * 40] * (3_000_000 // (40 * len(TRICKY)))
    for piece in pieces:
        await merger.push([TextMessageContent(message_id="m1", delta=piece)])
    await merger.push([TextMessageContent(message_id="m2", delta="z" * 1_000_000)])
    await merger.aclose()
    assert all(_frame_bytes(event) <= CAP for event in sent)
    first = [e.delta for e in sent if isinstance(e, TextMessageContent) and e.message_id == "m1"]
    second = [e.delta for e in sent if isinstance(e, TextMessageContent) and e.message_id == "m2"]
    assert "".join(first) == "".join(pieces) and len(first) < len(pieces) // 10
    assert "".join(second) == "z" * 1_000_000 and len(second) == 4


def test_a_long_text_is_cut_with_a_marker_within_the_bound() -> None:
    """fit_text keeps the start of a text too long for the bound and says it was cut."""
    text = TRICKY * 100_000
    cut = fit_text(text, 10_000)
    assert len(msgspec.json.encode(cut)) - 2 <= 10_000
    assert cut.endswith(f" of {len(text):,} characters kept]")
    assert text.startswith(cut[: cut.rindex("\n[cut: ")])
    assert fit_text("short", 10_000) == "short"


# ---- the runner ----------------------------------------------------------------------


async def _watch_run(server: ServerProcess, conversation: dict[str, Any]) -> list[str]:
    """Every logged frame of the conversation's run as ``costream.client`` (1 MiB frame
    limit) receives it, until the run's end."""
    frames: list[str] = []
    url = server.ws_url(conversation["id"])
    async with connect(url, conversation["viewToken"]) as watcher, asyncio.timeout(60):
        while True:
            item, text = await watcher.next_with_text()
            if text.startswith('{"seq":'):
                frames.append(text)
            if isinstance(item, RunFinished | RunError):
                return frames


async def _post(server: ServerProcess, conversation: dict[str, Any], text: str) -> None:
    status, answer = await ahttp(
        "POST",
        f"{server.url}/api/conversations/{conversation['id']}/messages",
        body={"content": text},
        token=conversation["writeToken"],
    )
    assert status == 202, answer


async def test_a_model_that_streams_one_2_mb_delta_can_be_watched_by_the_client(
    llm_server: LLMServer, start_server: StartServer
) -> None:
    """The model sends its whole 2 MB answer in one delta: the Python client (1 MiB frame
    limit) watches the run to its end, every frame within the cap, the text intact."""
    answer = TRICKY * (2_000_000 // len(TRICKY))
    llm_server.enqueue(stream(content(answer), finish("stop"), usage(10, 5)))
    server = start_server(env=llm_env(llm_server))
    conversation = await create_conversation(server.url)
    watching = asyncio.create_task(_watch_run(server, conversation))
    await asyncio.sleep(0)  # the watcher connects first; a late one would replay anyway
    await _post(server, conversation, "say it all at once")
    frames = await watching
    events = [json.loads(frame) for frame in frames]
    assert events[-1]["type"] == "RUN_FINISHED"
    assert max(len(frame.encode()) for frame in frames) <= CAP
    deltas = [e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT"]
    assert len(deltas) >= 8 and "".join(deltas) == answer


async def test_long_tool_arguments_are_split_and_a_long_tool_result_is_cut(
    llm_server: LLMServer, start_server: StartServer
) -> None:
    """With a 4 KiB cap: a 20 KB write_file's arguments stream as several deltas that join
    to the whole call (the file is written whole), and reading the file back gives a
    result cut within the cap with a marker saying so."""
    body = "line of the file\n" * 1200  # 20 400 characters
    arguments = json.dumps({"path": "big.txt", "content": body})
    llm_server.enqueue(
        stream(
            tool_call(0, id="w", name="write_file", arguments=arguments),
            finish("tool_calls"),
        ),
        stream(
            tool_call(0, id="r", name="read_file", arguments='{"path": "big.txt"}'),
            finish("tool_calls"),
        ),
        stream(content("Done."), finish("stop")),
    )
    server = start_server(env=llm_env(llm_server, COSTREAM_MAX_EVENT_BYTES="4096"))
    conversation = await create_conversation(server.url)
    watching = asyncio.create_task(_watch_run(server, conversation))
    await asyncio.sleep(0)
    await _post(server, conversation, "write and read")
    frames = await watching
    events = [json.loads(frame) for frame in frames]
    assert events[-1]["type"] == "RUN_FINISHED"
    assert max(len(frame.encode()) for frame in frames) <= 4096
    args = [e["delta"] for e in events if e["type"] == "TOOL_CALL_ARGS" and e["toolCallId"] == "w"]
    assert len(args) >= 6 and "".join(args) == arguments
    results = {e["toolCallId"]: e["content"] for e in events if e["type"] == "TOOL_CALL_RESULT"}
    assert results["w"] == "Wrote big.txt (20,400 bytes)."
    assert results["r"].endswith(f" of {len(body):,} characters kept]")
    assert body.startswith(results["r"][: results["r"].rindex("\n[cut: ")])


# ---- ingest ----------------------------------------------------------------------------


async def _ingest_run(server: ServerProcess) -> tuple[str, dict[str, Any], int]:
    conversation = await create_conversation(server.url)
    base = f"{server.url}/api/conversations/{conversation['id']}"
    status, started = await ahttp(
        "POST", f"{base}/runs", body={"input": "hi"}, token=conversation["writeToken"]
    )
    assert status == 201, started
    return f"{base}/runs/{started['runId']}", conversation, started["head"]


async def _log(server: ServerProcess, conversation: dict[str, Any]) -> list[dict[str, Any]]:
    status, logged = await ahttp(
        "GET",
        f"{server.url}/api/conversations/{conversation['id']}/events?limit=10000",
        token=conversation["viewToken"],
    )
    assert status == 200
    return list(logged)


async def test_ingest_splits_a_body_sized_delta_and_answers_a_retry_with_the_same_head(
    server: ServerProcess,
) -> None:
    """A delta as large as a body may be (1 MiB with its JSON around it) is stored as
    several deltas within the cap, in order; the batch sent again with the same
    expectedHead is answered with the same head and stored once."""
    run, conversation, head = await _ingest_run(server)
    token = conversation["writeToken"]
    start = {"type": "TEXT_MESSAGE_START", "messageId": "m1"}
    delta = {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "delta": TRICKY * 15_000}
    # Exactly 1 MiB, the largest body accepted (issue 15: stored as a 1 048 608 B frame).
    delta["delta"] += "x" * (1024 * 1024 - len(msgspec.json.encode([start, delta])))
    delta_text = delta["delta"]
    raw = msgspec.json.encode([start, delta])
    assert len(raw) == 1024 * 1024
    url = f"{run}/events?expectedHead={head}"
    status, answer = await ahttp("POST", url, raw=raw, token=token)
    assert status == 202, answer
    status, again = await ahttp("POST", url, raw=raw, token=token)
    assert status == 202 and again["head"] == answer["head"], again
    logged = await _log(server, conversation)
    deltas = [e["delta"] for e in logged if e["type"] == "TEXT_MESSAGE_CONTENT"]
    assert len(deltas) >= 4 and "".join(deltas) == delta_text
    assert answer["head"] == head + 1 + len(deltas)
    assert (
        max(len(json.dumps(e, ensure_ascii=False, separators=(",", ":")).encode()) for e in logged)
        <= CAP
    )


async def test_ingest_refuses_any_other_event_over_the_cap_with_413(server: ServerProcess) -> None:
    """A tool result or a CUSTOM value whose frame would pass the cap: 413
    event_too_large naming the limit, and nothing of the batch is stored."""
    run, conversation, _ = await _ingest_run(server)
    token = conversation["writeToken"]
    call = [
        {
            "type": "TOOL_CALL_START",
            "toolCallId": "c1",
            "toolCallName": "x",
            "parentMessageId": "p",
        },
        {"type": "TOOL_CALL_END", "toolCallId": "c1"},
    ]
    result = {
        "type": "TOOL_CALL_RESULT",
        "toolCallId": "c1",
        "messageId": "r1",
        "content": "r" * CAP,
    }
    custom = {"type": "CUSTOM", "name": "blob", "value": {"data": "v" * CAP}}
    for batch in ([*call, result], [custom], [custom, {"type": "NOT_AN_EVENT"}]):
        status, answer = await ahttp("POST", f"{run}/events", body=batch, token=token)
        assert status == 413, answer
        assert answer["error"]["code"] == "event_too_large"
        assert f"{CAP:,} bytes" in answer["error"]["message"]
    assert [e["type"] for e in await _log(server, conversation)] == ["RUN_STARTED"]
