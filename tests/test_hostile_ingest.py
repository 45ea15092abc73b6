"""Ingest refuses events that break the segment grammar (finding 10), with the index of the
offending event; the checker itself (``costream.grammar``) on its own."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from costream import protocol
from costream.grammar import MAX_REMEMBERED, GrammarError, RunGrammar
from tests.support.servers import ServerProcess
from tests.support.ws import ahttp, start_ingest_run


def _text(kind: str, message_id: str = "m1", **fields: Any) -> dict[str, Any]:
    return {"type": kind, "messageId": message_id, **fields}


def _tool(kind: str, call_id: str = "c1", **fields: Any) -> dict[str, Any]:
    return {"type": kind, "toolCallId": call_id, **fields}


START = _text("TEXT_MESSAGE_START")
DELTA = _text("TEXT_MESSAGE_CONTENT", delta="hi")
END = _text("TEXT_MESSAGE_END")
CALL = [
    _tool("TOOL_CALL_START", toolCallName="read_file", parentMessageId="m1"),
    _tool("TOOL_CALL_ARGS", delta="{}"),
    _tool("TOOL_CALL_END"),
]
RESULT = _tool("TOOL_CALL_RESULT", messageId="r1", content="ok")

BROKEN = {
    "orphan-delta": ([DELTA], 0, "not open"),
    "duplicate-start": ([START, DELTA, START], 2, "already started"),
    "end-without-start": ([END], 0, "not open"),
    "restart-after-end": ([START, END, START], 2, "already started"),
    "result-for-no-call": ([RESULT], 0, "never started"),
    "result-before-end": ([CALL[0], RESULT], 1, "before its TOOL_CALL_END"),
    "second-result": ([*CALL, RESULT, {**RESULT, "messageId": "r2"}], 4, "second"),
    "orphan-args": ([CALL[1]], 0, "not open"),
    "step-not-open": (
        [{"type": "STEP_FINISHED", "stepName": "s", "metadata": {"finishReason": "stop"}}],
        0,
        "no open step",
    ),
    "negative-tokens": (
        [
            {
                "type": "STEP_FINISHED",
                "stepName": "s",
                "metadata": {"finishReason": "stop", "usage": {"inputTokens": -1000}},
            }
        ],
        0,
        ">= 0",
    ),
    "negative-cost": (
        [
            {
                "type": "STEP_FINISHED",
                "stepName": "s",
                "metadata": {"finishReason": "stop", "costUsd": -5},
            }
        ],
        0,
        ">= 0",
    ),
}


async def _run(server: ServerProcess) -> tuple[str, str, str]:
    conversation, run = await start_ingest_run(server.url)
    return run, conversation["writeToken"], conversation["viewToken"]


@pytest.mark.parametrize("case", list(BROKEN))
async def test_ingest_refuses_events_that_break_the_grammar(
    server: ServerProcess, case: str
) -> None:
    """Each kind of broken event is 400 naming its index, and nothing of the batch is logged."""
    events, index, problem = BROKEN[case]
    run, write_token, view_token = await _run(server)
    status, answer = await ahttp("POST", f"{run}/events", body=events, token=write_token)
    assert status == 400, answer
    assert answer["error"]["message"].startswith(f"event {index}: ")
    assert problem in answer["error"]["message"]
    log_url = run.rsplit("/runs/", 1)[0] + "/events"
    _, logged = await ahttp("GET", log_url, token=view_token)
    assert [event["type"] for event in logged] == ["RUN_STARTED"]


async def test_ingest_grammar_spans_requests(server: ServerProcess) -> None:
    """The grammar state of a run carries from one request to the next: a segment opened in
    one request may be continued and ended in later ones, but not started twice."""
    run, write_token, _ = await _run(server)
    for batch in ([START], [DELTA], [END, *CALL], [RESULT]):
        status, answer = await ahttp("POST", f"{run}/events", body=batch, token=write_token)
        assert status == 202, answer
    status, answer = await ahttp("POST", f"{run}/events", body=[START], token=write_token)
    assert status == 400, answer
    assert "already started" in answer["error"]["message"]
    status, answer = await ahttp(
        "POST", f"{run}/finish", body={"outcome": "success"}, token=write_token
    )
    assert status == 200, answer


def _events(items: list[dict[str, Any]]) -> list[protocol.Event]:
    return [msgspec.convert(item, protocol.Event) for item in items]


def test_grammar_accepts_what_the_runner_emits() -> None:
    """Reasoning, text, a tool call and its result inside a step pass the checker."""
    reasoning = [
        {"type": kind, "messageId": "r"}
        for kind in (
            "REASONING_START",
            "REASONING_MESSAGE_START",
            "REASONING_MESSAGE_END",
            "REASONING_END",
        )
    ]
    step = {"type": "STEP_STARTED", "stepName": "s", "metadata": {"model": "m"}}
    done = {"type": "STEP_FINISHED", "stepName": "s", "metadata": {"finishReason": "stop"}}
    grammar = RunGrammar()
    grammar.check(_events([step, *reasoning, START, DELTA, END, *CALL, done, RESULT]))
    assert grammar.open == {}


def test_grammar_refuses_reasoning_end_before_its_message_ends() -> None:
    """REASONING_END while its reasoning message is still open breaks the grammar."""
    items = [
        {"type": kind, "messageId": "r"}
        for kind in ("REASONING_START", "REASONING_MESSAGE_START", "REASONING_END")
    ]
    with pytest.raises(GrammarError) as refused:
        RunGrammar().check(_events(items))
    assert refused.value.index == 2


def test_grammar_state_stays_bounded() -> None:
    """However many segments a run has, the checker remembers at most MAX_REMEMBERED ids."""
    grammar = RunGrammar()
    for n in range(3 * MAX_REMEMBERED):
        grammar.check(
            _events([_text("TEXT_MESSAGE_START", f"m{n}"), _text("TEXT_MESSAGE_END", f"m{n}")])
        )
    assert len(grammar.closed) == MAX_REMEMBERED
    assert grammar.open == {}
