"""The agent loop against LiteLLM talking real HTTP to the scripted OpenAI-compatible server.

Most tests drive a real ``costream serve``; a few build ``Runs`` in this process (memory
broker, store, metrics) where they need a hand on the process: token callbacks, a run
whose task dies, a shutdown, settings the environment does not carry.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import pytest

from costream import protocol
from costream.agent.llm import to_llm_messages
from costream.agent.runner import Runs
from costream.agent.tools import TOOL_SPECS
from costream.broker.memory import MemoryBroker
from costream.config import Settings
from costream.metrics import Metrics
from costream.protocol import FunctionCall, SnapshotMessage, ToolCall
from costream.store import Store
from tests.support.llm_server import (
    LLMServer,
    content,
    cut,
    error,
    finish,
    hang,
    reasoning,
    stream,
    text,
    tool_call,
    usage,
)
from tests.support.processes import free_port
from tests.support.servers import ServerProcess
from tests.support.ws import (
    Session,
    ahttp,
    assert_well_formed,
    create_conversation,
    open_session,
)

API_KEY = "sk-test-9f8e7d6c5b4a39281706f5e4d3c2b1a0"

StartServer = Callable[..., ServerProcess]


def llm_env(llm_server: LLMServer, **extra: str) -> dict[str, str]:
    """A server that uses the scripted LLM through LiteLLM's OpenAI provider."""
    return {
        "LLM_MODEL": "openai/gpt-4o-mini",
        "LLM_API_KEY": API_KEY,
        "LLM_BASE_URL": llm_server.base_url,
        "COSTREAM_LLM_TIMEOUT_S": "2",
        "COSTREAM_RETRY_BACKOFF_S": "0.05",
        "COSTREAM_FLUSH_MS": "0",
        **extra,
    }


async def writer_session(server: ServerProcess, **body: Any) -> tuple[dict[str, Any], Session]:
    conversation = await create_conversation(server.url, **body)
    session = await open_session(
        server.ws_url(conversation["id"]), conversation["id"], conversation["writeToken"]
    )
    return conversation, session


async def run_message(
    server: ServerProcess, text_: str = "hello", **body: Any
) -> tuple[dict[str, Any], Session, list[dict[str, Any]]]:
    """Create a conversation, send one message, wait for the run's end; its events."""
    conversation, session = await writer_session(server, **body)
    await session.send({"type": "message", "content": text_})
    await session.until_run_ends()
    events = session.events()
    assert_well_formed(events)
    return conversation, session, events


def types_of(events: Sequence[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def steps(events: Sequence[dict[str, Any]]) -> list[tuple[str, str, Any]]:
    """(type, stepName, attempt or finishReason) of each step event."""
    out = []
    for e in events:
        if e["type"] == "STEP_STARTED":
            out.append(("STEP_STARTED", e["stepName"], e["metadata"]["attempt"]))
        elif e["type"] == "STEP_FINISHED":
            out.append(("STEP_FINISHED", e["stepName"], e["metadata"]["finishReason"]))
    return out


# ---- streaming, tools, usage -------------------------------------------------------


async def test_reasoning_content_and_two_tool_calls_stream_in_order_and_feed_the_next_call(
    llm_server: LLMServer, start_server: StartServer
) -> None:
    """One step with reasoning, text and two tool calls: segments in protocol order, the
    tools run in start order, and the second LLM call carries both results."""
    llm_server.enqueue(
        stream(
            reasoning("Let me "),
            reasoning("write it."),
            content("Writing "),
            content("now."),
            tool_call(0, id="call_w", name="write_file", arguments='{"path": "a.txt", '),
            tool_call(1, id="call_l", name="list_files"),
            tool_call(0, arguments='"content": "hi"}'),
            finish("tool_calls"),
            usage(40, 12, 3),
        ),
        text("Done.", 80, 2),
    )
    server = start_server(env=llm_env(llm_server))
    conversation, _, events = await run_message(server, "write a.txt", system="Be brief.")

    assert types_of(events) == [
        "RUN_STARTED",
        "STEP_STARTED",
        "REASONING_START",
        "REASONING_MESSAGE_START",
        "REASONING_MESSAGE_CONTENT",
        "REASONING_MESSAGE_CONTENT",
        "REASONING_MESSAGE_END",
        "REASONING_END",
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END",
        "TOOL_CALL_START",
        "TOOL_CALL_ARGS",
        "TOOL_CALL_START",
        "TOOL_CALL_ARGS",
        "TOOL_CALL_END",
        "TOOL_CALL_ARGS",
        "TOOL_CALL_END",
        "STEP_FINISHED",
        "TOOL_CALL_RESULT",
        "TOOL_CALL_RESULT",
        "STEP_STARTED",
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END",
        "STEP_FINISHED",
        "RUN_FINISHED",
    ]
    assert [e["toolCallId"] for e in events if e["type"] == "TOOL_CALL_END"] == [
        "call_w",
        "call_l",
    ]
    results = [e for e in events if e["type"] == "TOOL_CALL_RESULT"]
    assert [(r["toolCallId"], r["content"], r["metadata"]["isError"]) for r in results] == [
        ("call_w", "Wrote a.txt (2 bytes).", False),
        ("call_l", "a.txt (2 bytes)", False),
    ]
    assert steps(events)[1] == ("STEP_FINISHED", "llm-1", "tool_calls")
    assert steps(events)[2] == ("STEP_STARTED", "llm-2", 1)
    assert events[-1]["outcome"]["type"] == "success"

    first, second = llm_server.requests[0].body, llm_server.requests[1].body
    assert first["stream"] is True and first["stream_options"] == {"include_usage": True}
    assert {t["function"]["name"] for t in first["tools"]} >= {"write_file", "list_files"}
    assert first["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "write a.txt"},
    ]
    assistant, *tool_messages = second["messages"][2:]
    assert assistant["role"] == "assistant" and assistant["content"] == "Writing now."
    assert [c["function"] for c in assistant["tool_calls"]] == [
        {"name": "write_file", "arguments": '{"path": "a.txt", "content": "hi"}'},
        {"name": "list_files", "arguments": "{}"},
    ]
    assert tool_messages == [
        {"role": "tool", "tool_call_id": "call_w", "content": "Wrote a.txt (2 bytes)."},
        {"role": "tool", "tool_call_id": "call_l", "content": "a.txt (2 bytes)"},
    ]
    status, files = await ahttp(
        "GET",
        f"{server.url}/api/conversations/{conversation['id']}/files",
        token=conversation["viewToken"],
    )
    assert status == 200 and files == [{"path": "a.txt", "size": 2}]


async def test_usage_and_cost_appear_on_steps_run_and_conversation(
    llm_server: LLMServer, start_server: StartServer
) -> None:
    """gpt-4o-mini is in LiteLLM's price table: each step and the run carry usage and a
    cost above zero, and the conversation totals them."""
    llm_server.enqueue(text("Hi there.", prompt_tokens=1000, completion_tokens=500))
    server = start_server(env=llm_env(llm_server))
    conversation, _, events = await run_message(server)

    step = next(e for e in events if e["type"] == "STEP_FINISHED")
    assert step["metadata"]["usage"] == {
        "inputTokens": 1000,
        "outputTokens": 500,
        "reasoningTokens": 0,
    }
    assert step["metadata"]["costUsd"] > 0
    finished = events[-1]
    assert finished["type"] == "RUN_FINISHED"
    assert finished["usage"] == [
        {
            "model": "openai/gpt-4o-mini",
            "inputTokens": 1000,
            "outputTokens": 500,
            "totalTokens": 1500,
        }
    ]
    assert finished["metadata"]["costUsd"] == pytest.approx(step["metadata"]["costUsd"])
    assert finished["metadata"]["totalCostUsd"] == pytest.approx(step["metadata"]["costUsd"])
    status, info = await ahttp(
        "GET",
        f"{server.url}/api/conversations/{conversation['id']}",
        token=conversation["viewToken"],
    )
    assert status == 200
    assert info["totalCostUsd"] == pytest.approx(step["metadata"]["costUsd"])
    assert info["usage"]["inputTokens"] == 1000


async def test_a_model_without_a_price_costs_nothing_and_still_finishes(
    llm_server: LLMServer, start_server: StartServer
) -> None:
    """A model LiteLLM has no price for: cost 0, the run still succeeds."""
    llm_server.enqueue(text("Fine.", 20, 3))
    server = start_server(
        env={**llm_env(llm_server), "COSTREAM_ALLOWED_MODELS": "openai/costream-unpriced-model"}
    )
    _, _, events = await run_message(server, model="openai/costream-unpriced-model")

    step = next(e for e in events if e["type"] == "STEP_FINISHED")
    assert step["metadata"]["costUsd"] == 0
    assert step["metadata"]["usage"]["inputTokens"] == 20
    assert events[-1]["type"] == "RUN_FINISHED"
    assert events[-1]["outcome"]["type"] == "success"
    assert events[-1]["metadata"]["costUsd"] == 0
    assert llm_server.requests[0].body["model"] == "costream-unpriced-model"


# ---- retries and errors ----------------------------------------------------------


async def test_a_persistent_429_ends_the_run_rate_limited(
    llm_server: LLMServer, start_server: StartServer
) -> None:
    """429 on every attempt: each retry is its own attempt, then RUN_ERROR rate_limited."""
    llm_server.enqueue(*(error(429, retry_after=0) for _ in range(3)))
    server = start_server(env=llm_env(llm_server))
    _, _, events = await run_message(server)

    assert events[-1]["type"] == "RUN_ERROR" and events[-1]["code"] == "rate_limited"
    assert steps(events) == [
        ("STEP_STARTED", "llm-1", 1),
        ("STEP_FINISHED", "llm-1", "retry"),
        ("STEP_STARTED", "llm-1", 2),
        ("STEP_FINISHED", "llm-1", "retry"),
        ("STEP_STARTED", "llm-1", 3),
        ("STEP_FINISHED", "llm-1", "error"),
    ]
    assert "CUSTOM" not in types_of(events)  # no output was streamed before the retries
    assert len(llm_server.requests) == 3


async def test_a_429_once_is_retried_and_the_run_finishes(
    llm_server: LLMServer, start_server: StartServer
) -> None:
    """One 429, then an answer: attempt 2 streams it and the run succeeds."""
    llm_server.enqueue(error(429, retry_after=0), text("Second time lucky."))
    server = start_server(env=llm_env(llm_server))
    _, _, events = await run_message(server)

    assert events[-1]["type"] == "RUN_FINISHED"
    assert steps(events) == [
        ("STEP_STARTED", "llm-1", 1),
        ("STEP_FINISHED", "llm-1", "retry"),
        ("STEP_STARTED", "llm-1", 2),
        ("STEP_FINISHED", "llm-1", "stop"),
    ]
    texts = "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT")
    assert texts == "Second time lucky."


async def test_a_stream_cut_midway_is_retried_after_closing_its_segments(
    llm_server: LLMServer, start_server: StartServer
) -> None:
    """The connection drops after partial text: the text segment ends, STEP_FINISHED
    retry, CUSTOM step_retry, STEP_STARTED attempt 2, and the retry's answer is kept."""
    llm_server.enqueue(
        cut(content("Half "), content("an "), content("answer"), after=2),
        text("Whole answer."),
    )
    server = start_server(env=llm_env(llm_server))
    _, session, events = await run_message(server)

    kinds = types_of(events)
    retry_at = kinds.index("CUSTOM")
    assert kinds[retry_at - 3 : retry_at + 2] == [
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END",
        "STEP_FINISHED",
        "CUSTOM",
        "STEP_STARTED",
    ]
    assert events[retry_at]["name"] == "step_retry"
    assert events[retry_at]["value"] == {"attempt": 2, "reason": "upstream"}
    assert steps(events) == [
        ("STEP_STARTED", "llm-1", 1),
        ("STEP_FINISHED", "llm-1", "retry"),
        ("STEP_STARTED", "llm-1", 2),
        ("STEP_FINISHED", "llm-1", "stop"),
    ]
    assert events[-1]["type"] == "RUN_FINISHED"
    # The history keeps the answer of the attempt that finished, not the abandoned one.
    await session.send({"type": "message", "content": "again"})
    llm_server.enqueue(text("ok"))
    await session.until_run_ends()
    assistant = llm_server.requests[-1].body["messages"][-2]
    assert assistant == {"role": "assistant", "content": "Whole answer."}


async def test_a_silent_stream_times_out_and_the_retry_succeeds(
    llm_server: LLMServer, start_server: StartServer
) -> None:
    """No chunk for the timeout: the call is abandoned and retried; the retry answers."""
    llm_server.enqueue(hang(content("Wait"), content(" for it"), after=1), text("Here."))
    server = start_server(env=llm_env(llm_server))
    _, _, events = await run_message(server)

    retry = next(e for e in events if e["type"] == "CUSTOM")
    assert retry["value"] == {"attempt": 2, "reason": "timeout"}
    assert events[-1]["type"] == "RUN_FINISHED"
    assert events[-1]["outcome"]["type"] == "success"


async def test_an_auth_error_ends_the_run_and_the_key_never_leaves_the_server(
    llm_server: LLMServer, start_server: StartServer
) -> None:
    """A 401 whose body echoes the API key: RUN_ERROR auth, no retry, and the key is in
    no frame, no API answer and no log line, though it reached the provider."""
    echo = {"error": {"message": f"Incorrect API key provided: {API_KEY}", "code": 401}}
    llm_server.enqueue(error(401, body=echo))
    server = start_server(env=llm_env(llm_server))
    conversation, session, events = await run_message(server)

    assert llm_server.requests[0].headers["authorization"] == f"Bearer {API_KEY}"
    assert events[-1]["type"] == "RUN_ERROR" and events[-1]["code"] == "auth"
    assert len(llm_server.requests) == 1
    base = f"{server.url}/api/conversations/{conversation['id']}"
    answers = [
        await ahttp("GET", base, token=conversation["viewToken"]),
        await ahttp("GET", f"{base}/events", token=conversation["viewToken"]),
        await ahttp("GET", f"{server.url}/metrics"),
    ]
    seen = [*session.frames, *(json.dumps(answer) for _, answer in answers)]
    assert all(API_KEY not in text_ for text_ in seen)
    assert "sk-test-9f8e" not in server.log_text()
    assert "RUN_ERROR" in json.dumps(answers[1][1])  # the events answer was the real log


async def test_a_bad_request_ends_the_run_without_retries(
    llm_server: LLMServer, start_server: StartServer
) -> None:
    """A 400 is not retried: RUN_ERROR bad_request after one attempt."""
    llm_server.enqueue(error(400))
    server = start_server(env=llm_env(llm_server))
    _, _, events = await run_message(server)

    assert events[-1]["type"] == "RUN_ERROR" and events[-1]["code"] == "bad_request"
    assert steps(events) == [("STEP_STARTED", "llm-1", 1), ("STEP_FINISHED", "llm-1", "error")]
    assert len(llm_server.requests) == 1


# ---- cancel ------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["websocket", "http"])
async def test_cancel_mid_stream_closes_segments_and_a_new_message_is_accepted(
    via: str, llm_server: LLMServer, start_server: StartServer
) -> None:
    """Cancel while the model is mid-answer (and mid tool call): open segments end,
    STEP_FINISHED cancelled, RUN_FINISHED cancelled, and the next message runs."""
    llm_server.enqueue(
        hang(
            content("Partial"),
            tool_call(0, id="call_x", name="write_file", arguments='{"pa'),
            content("never sent"),
            after=2,
        )
    )
    server = start_server(env=llm_env(llm_server, COSTREAM_LLM_TIMEOUT_S="60"))
    conversation, session = await writer_session(server)
    await session.send({"type": "message", "content": "go"})
    await session.until("TOOL_CALL_ARGS")
    if via == "websocket":
        await session.send({"type": "cancel"})
    else:
        status, answer = await ahttp(
            "POST",
            f"{server.url}/api/conversations/{conversation['id']}/cancel",
            token=conversation["writeToken"],
        )
        assert status == 202 and answer["runId"] == session.events()[0]["runId"]
    end = await session.until_run_ends()

    events = session.events()
    assert_well_formed(events)
    assert end["type"] == "RUN_FINISHED" and end["outcome"]["type"] == "cancelled"
    assert types_of(events)[-4:] == [
        "TOOL_CALL_ARGS",
        "TOOL_CALL_END",
        "STEP_FINISHED",
        "RUN_FINISHED",
    ]
    assert steps(events)[-1] == ("STEP_FINISHED", "llm-1", "cancelled")

    llm_server.enqueue(text("Fresh start."))
    await session.send({"type": "message", "content": "again"})
    accepted = await session.until("accepted", "error")
    assert accepted["type"] == "accepted"
    assert (await session.until_run_ends())["type"] == "RUN_FINISHED"
    # The cancelled text is history; its tool call, which never ran, is not sent back.
    messages = llm_server.requests[-1].body["messages"]
    assert messages[-2:] == [
        {"role": "assistant", "content": "Partial"},
        {"role": "user", "content": "again"},
    ]


async def test_a_cancelled_run_counts_the_tokens_it_streamed(
    llm_server: LLMServer, start_server: StartServer
) -> None:
    """Cancelled before the usage chunk: the step, the run and the conversation count the
    tokens of the request and of the partial answer (estimated), not 0."""
    llm_server.enqueue(
        hang(content("A partial answer of several words "), content("never sent"), after=1)
    )
    server = start_server(env=llm_env(llm_server, COSTREAM_LLM_TIMEOUT_S="60"))
    conversation, session = await writer_session(server)
    await session.send({"type": "message", "content": "tell me a long story"})
    await session.until("TEXT_MESSAGE_CONTENT")
    await session.send({"type": "cancel"})
    end = await session.until_run_ends()

    assert end["type"] == "RUN_FINISHED" and end["outcome"]["type"] == "cancelled"
    step = [e for e in session.events() if e["type"] == "STEP_FINISHED"][-1]
    assert step["metadata"]["finishReason"] == "cancelled"
    usage = step["metadata"]["usage"]
    assert usage["inputTokens"] > 0 and 3 <= usage["outputTokens"] <= 20
    assert step["metadata"]["costUsd"] > 0
    assert end["usage"][0]["outputTokens"] == usage["outputTokens"]
    status, info = await ahttp(
        "GET",
        f"{server.url}/api/conversations/{conversation['id']}",
        token=conversation["viewToken"],
    )
    assert status == 200 and info["usage"]["outputTokens"] == usage["outputTokens"]
    assert info["totalCostUsd"] > 0


async def test_an_llm_at_a_closed_port_fails_saying_the_connection_was_refused(
    start_server: StartServer,
) -> None:
    """LLM_BASE_URL where nothing listens: RUN_ERROR upstream says the connection was
    refused, not an HTTP status nobody sent."""
    env = {
        "LLM_MODEL": "openai/gpt-4o-mini",
        "LLM_API_KEY": API_KEY,
        "LLM_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
        "COSTREAM_RETRY_BACKOFF_S": "0.01",
    }
    server = start_server(env=env)
    _, _, events = await run_message(server)

    assert events[-1]["type"] == "RUN_ERROR" and events[-1]["code"] == "upstream"
    assert "connection refused" in events[-1]["message"]
    assert "HTTP" not in events[-1]["message"]


# ---- in process: callbacks, reaping, shutdown ----------------------------------------------


class Local:
    """``Runs`` in this process on a memory broker, with the log's frames at hand."""

    def __init__(
        self,
        settings: Settings,
        callbacks: Sequence[Callable[[object], None]] = (),
        broker: MemoryBroker | None = None,
    ) -> None:
        self.settings = settings
        self.broker = broker or MemoryBroker()
        self.store = Store(self.broker)
        self.metrics = Metrics()
        self.runs = Runs(settings, self.broker, self.store, self.metrics, callbacks)
        self.frames: list[bytes] = []
        self.ended = asyncio.Event()
        self.seen: asyncio.Event = asyncio.Event()
        self.waiting_for = b""

    def on_frame(self, conversation_id: str, frame: bytes) -> None:
        self.frames.append(frame)
        if b'"type":"RUN_FINISHED"' in frame or b'"type":"RUN_ERROR"' in frame:
            self.ended.set()
        if self.waiting_for and self.waiting_for in frame:
            self.seen.set()

    async def __aenter__(self) -> Local:
        await self.broker.start(self.on_frame, lambda _: None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runs.shutdown(0)
        await self.broker.close()

    async def conversation(self) -> str:
        created = await self.store.create(title="t", model=self.settings.model, system="")
        await self.broker.subscribe(created.conversation.id)
        return created.conversation.id

    async def until(self, event_type: str) -> None:
        self.waiting_for, self.seen = f'"type":"{event_type}"'.encode(), asyncio.Event()
        if any(self.waiting_for in frame for frame in self.frames):
            return
        await asyncio.wait_for(self.seen.wait(), 30)

    async def until_run_ends(self) -> list[dict[str, Any]]:
        await asyncio.wait_for(self.ended.wait(), 30)
        self.ended.clear()
        events = [json.loads(frame) for frame in self.frames]
        assert_well_formed(events)
        return events


_warmed: list[bool] = []


@pytest.fixture
async def litellm_warmed(llm_server: LLMServer) -> None:
    """LiteLLM imported and one streamed call made, before a test whose lease lives a few
    hundred ms: LiteLLM's first call in a process does seconds of synchronous imports and
    setup on the event loop, long enough for such a lease to expire."""
    if not _warmed:
        litellm: Any = importlib.import_module("litellm")
        llm_server.enqueue(text("warm"))
        response = await litellm.acompletion(
            model="openai/gpt-4o-mini",
            messages=[{"role": "user", "content": "warm up"}],
            tools=TOOL_SPECS,
            stream=True,
            stream_options={"include_usage": True},
            api_key=API_KEY,
            api_base=llm_server.base_url,
        )
        async for _ in response:
            pass
        _warmed.append(True)
    llm_server.reset()


def local_settings(llm_server: LLMServer, **changes: Any) -> Settings:
    base = Settings(
        model="openai/gpt-4o-mini",
        api_key=API_KEY,
        base_url=llm_server.base_url,
        flush_ms=0,
        llm_timeout_s=30,
        retry_backoff_s=0.01,
    )
    return replace(base, **changes)


async def test_a_token_callback_that_raises_is_logged_once_and_skipped(
    llm_server: LLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A raising callback is logged once per run and skipped; the callbacks after it
    still get every chunk and the run finishes."""
    caplog.set_level(logging.ERROR, logger="costream.agent")
    received: list[object] = []

    def broken(chunk: object) -> None:
        raise ValueError("callback bug")

    llm_server.enqueue(text("one two three"))
    async with Local(local_settings(llm_server), [broken, received.append]) as local:
        conversation_id = await local.conversation()
        await local.runs.start(conversation_id, "count")
        events = await local.until_run_ends()

    assert events[-1]["type"] == "RUN_FINISHED" and events[-1]["outcome"]["type"] == "success"
    chunk_texts = [
        getattr(c.choices[0].delta, "content", None)  # type: ignore[attr-defined]
        for c in received
        if c.choices  # type: ignore[attr-defined]
    ]
    assert "".join(t for t in chunk_texts if t) == "one two three"
    failures = [r for r in caplog.records if "token callback" in r.getMessage()]
    assert len(failures) == 1


async def test_a_run_whose_process_died_is_reaped_with_its_segments_closed(
    llm_server: LLMServer, litellm_warmed: None
) -> None:
    """A run whose task stops without ending (its process died) keeps the lease until it
    expires; reap then closes its open segments and appends RUN_ERROR producer_lost, and
    the conversation takes a new message."""
    llm_server.enqueue(
        hang(reasoning("Hmm"), content("Part"), tool_call(0, id="c1", name="list_files"), after=3)
    )
    settings = local_settings(llm_server, lease_ttl_ms=300)
    async with Local(settings) as dying:
        conversation_id = await dying.conversation()
        run_id = await dying.runs.start(conversation_id, "go")
        await dying.until("TOOL_CALL_START")
        # Stop the run's task the way a dead process stops: nothing more is appended.
        (task,) = [t for t in asyncio.all_tasks() if t.get_name() == f"run-{run_id}"]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

        survivor = Local(settings, broker=dying.broker)
        while (active := await dying.broker.active_run(conversation_id)) and active.lease_alive:
            await asyncio.sleep(0.05)
        await survivor.runs.reap(conversation_id)
        events = await dying.until_run_ends()

        tail = types_of(events)[types_of(events).index("TOOL_CALL_START") + 1 :]
        assert tail == ["TOOL_CALL_END", "STEP_FINISHED", "RUN_ERROR"]
        assert events[-2]["metadata"]["finishReason"] == "error"
        assert events[-1]["code"] == "producer_lost"
        assert await dying.broker.active_run(conversation_id) is None
        snapshot = await dying.broker.read_snapshot(conversation_id)
        assert snapshot is not None and protocol.seq_of(snapshot) == events[-1]["seq"]

        llm_server.enqueue(text("Back."))
        await survivor.runs.start(conversation_id, "again")
        assert (await dying.until_run_ends())[-1]["type"] == "RUN_FINISHED"


async def test_a_message_to_a_conversation_with_a_dead_run_reaps_it_first(
    llm_server: LLMServer, litellm_warmed: None
) -> None:
    """start() on a conversation whose run's lease expired ends that run, then starts."""
    llm_server.enqueue(hang(content("Stuck"), after=1), text("New run."))
    settings = local_settings(llm_server, lease_ttl_ms=300)
    async with Local(settings) as local:
        conversation_id = await local.conversation()
        run_id = await local.runs.start(conversation_id, "first")
        await local.until("TEXT_MESSAGE_CONTENT")
        (task,) = [t for t in asyncio.all_tasks() if t.get_name() == f"run-{run_id}"]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        while (active := await local.broker.active_run(conversation_id)) and active.lease_alive:
            await asyncio.sleep(0.05)

        second = await local.runs.start(conversation_id, "second")
        await local.until_run_ends()  # the reaped run
        events = await local.until_run_ends()

    ends = [e for e in events if e["type"] in ("RUN_FINISHED", "RUN_ERROR")]
    assert [(e["type"], e.get("code")) for e in ends] == [
        ("RUN_ERROR", "producer_lost"),
        ("RUN_FINISHED", None),
    ]
    assert ends[-1]["runId"] == second


async def test_a_cancel_requested_by_another_process_stops_the_run(
    llm_server: LLMServer, litellm_warmed: None
) -> None:
    """A process without the run flags the cancel in the broker; the running process sees
    it when it renews the lease and ends the run cancelled."""
    llm_server.enqueue(hang(content("Slow "), content("answer"), after=1))
    settings = local_settings(llm_server, lease_ttl_ms=400)
    async with Local(settings) as running:
        conversation_id = await running.conversation()
        run_id = await running.runs.start(conversation_id, "go")
        await running.until("TEXT_MESSAGE_CONTENT")
        other = Runs(settings, running.broker, running.store, Metrics())
        assert await other.cancel(conversation_id) == run_id
        events = await running.until_run_ends()

    assert events[-1]["type"] == "RUN_FINISHED"
    assert events[-1]["outcome"]["type"] == "cancelled"
    assert steps(events)[-1] == ("STEP_FINISHED", "llm-1", "cancelled")


async def test_a_cancel_during_a_retry_backoff_ends_the_run_at_once(
    llm_server: LLMServer, litellm_warmed: None
) -> None:
    """A cancel while the run waits out a long backoff cuts the wait short: the run ends
    cancelled without calling the LLM again."""
    llm_server.enqueue(error(500), text("never asked for"))
    settings = local_settings(llm_server, retry_backoff_s=60)
    async with Local(settings) as local:
        conversation_id = await local.conversation()
        await local.runs.start(conversation_id, "go")
        await local.until("STEP_FINISHED")
        started = asyncio.get_running_loop().time()
        await local.runs.cancel(conversation_id)
        events = await local.until_run_ends()
        assert asyncio.get_running_loop().time() - started < 5

    assert events[-1]["type"] == "RUN_FINISHED"
    assert events[-1]["outcome"]["type"] == "cancelled"
    assert steps(events) == [("STEP_STARTED", "llm-1", 1), ("STEP_FINISHED", "llm-1", "retry")]
    assert len(llm_server.requests) == 1


async def test_a_silent_stream_ends_in_timeout_after_the_retries(llm_server: LLMServer) -> None:
    """Every attempt goes silent: after the retries the run ends RUN_ERROR timeout."""
    llm_server.enqueue(hang(content("a"), after=1), hang(content("b"), after=1))
    settings = local_settings(llm_server, llm_timeout_s=0.3, llm_retries=1)
    async with Local(settings) as local:
        conversation_id = await local.conversation()
        await local.runs.start(conversation_id, "go")
        events = await local.until_run_ends()

    assert events[-1]["type"] == "RUN_ERROR" and events[-1]["code"] == "timeout"
    assert steps(events) == [
        ("STEP_STARTED", "llm-1", 1),
        ("STEP_FINISHED", "llm-1", "retry"),
        ("STEP_STARTED", "llm-1", 2),
        ("STEP_FINISHED", "llm-1", "error"),
    ]
    assert local.metrics.run_errors.value == 1


async def test_shutdown_ends_a_run_that_outlives_the_grace_period(llm_server: LLMServer) -> None:
    """A run still streaming when the grace period ends gets its segments closed and a
    RUN_ERROR, and its lease is released."""
    llm_server.enqueue(hang(content("Long "), content("story"), after=1))
    async with Local(local_settings(llm_server)) as local:
        conversation_id = await local.conversation()
        await local.runs.start(conversation_id, "tell me")
        await local.until("TEXT_MESSAGE_CONTENT")
        await local.runs.shutdown(0.05)
        events = await local.until_run_ends()
        assert await local.broker.active_run(conversation_id) is None

    assert types_of(events)[-4:] == [
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END",
        "STEP_FINISHED",
        "RUN_ERROR",
    ]
    assert events[-1]["code"] == "producer_lost"


async def test_the_step_limit_ends_a_run_that_keeps_calling_tools(llm_server: LLMServer) -> None:
    """A model that still calls tools at the last allowed step: the run ends successfully
    after that step's tool results, and no further LLM call is made."""
    calls = [
        stream(tool_call(0, id=f"t{n}", name="list_files"), finish("tool_calls")) for n in range(3)
    ]
    llm_server.enqueue(*calls)
    async with Local(local_settings(llm_server, max_steps=2)) as local:
        conversation_id = await local.conversation()
        await local.runs.start(conversation_id, "loop")
        events = await local.until_run_ends()

    assert [s for s in steps(events) if s[0] == "STEP_STARTED"] == [
        ("STEP_STARTED", "llm-1", 1),
        ("STEP_STARTED", "llm-2", 1),
    ]
    assert types_of(events)[-2:] == ["TOOL_CALL_RESULT", "RUN_FINISHED"]
    assert len(llm_server.requests) == 2


def test_history_sent_to_the_llm_leaves_out_reasoning_and_unanswered_tool_calls() -> None:
    """Reasoning stays on our side; a tool call with no result (its run was cancelled)
    is not sent, since providers reject it."""
    call = ToolCall(id="c1", function=FunctionCall(name="list_files", arguments="{}"))
    history = [
        SnapshotMessage(id="u", role="user", content="hi"),
        SnapshotMessage(id="r", role="reasoning", content="thinking"),
        SnapshotMessage(id="a", role="assistant", content="Let me look.", tool_calls=[call]),
        SnapshotMessage(id="u2", role="user", content="stop"),
    ]
    assert to_llm_messages("sys", history) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Let me look."},
        {"role": "user", "content": "stop"},
    ]
