"""costream.publisher: another program's LiteLLM stream, published through Redis or HTTP.

Real parts throughout: LiteLLM streams over real HTTP from the scripted LLM server, the
publisher writes into a real redis-server or a real ``costream serve``, and a viewer
watches over a WebSocket. A built-in run of the same stream is the reference: viewers of
a published run must see the same events in the same order.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from costream.publisher import TokenPublisher
from tests.support.llm_server import (
    LLMServer,
    Reply,
    content,
    error,
    finish,
    reasoning,
    stream,
    text,
    tool_call,
    usage,
)
from tests.support.redis import RedisServer
from tests.support.servers import ServerProcess
from tests.support.ws import (
    Session,
    ahttp,
    assert_well_formed,
    create_conversation,
    open_session,
)

API_KEY = "sk-test-0a1b2c3d4e5f60718293a4b5c6d7e8f9"
MODEL = "openai/gpt-4o-mini"
MERGEABLE = ("REASONING_MESSAGE_CONTENT", "TEXT_MESSAGE_CONTENT", "TOOL_CALL_ARGS")

StartServer = Callable[..., ServerProcess]


def llm_env(llm_server: LLMServer) -> dict[str, str]:
    """A server whose built-in runs use the scripted LLM through LiteLLM."""
    return {
        "LLM_MODEL": MODEL,
        "LLM_API_KEY": API_KEY,
        "LLM_BASE_URL": llm_server.base_url,
        "COSTREAM_FLUSH_MS": "0",
    }


def tool_step() -> Reply:
    """Reasoning, text and two tool calls whose fragments interleave, then usage."""
    return stream(
        reasoning("Let me "),
        reasoning("write it."),
        content("Writing "),
        content("now."),
        tool_call(0, id="call_w", name="write_file", arguments='{"path": "a.txt", '),
        tool_call(1, id="call_l", name="list_files"),
        tool_call(0, arguments='"content": "hi"}'),
        finish("tool_calls"),
        usage(40, 12, 3),
    )


def litellm() -> Any:
    return importlib.import_module("litellm")


def completion_options(llm_server: LLMServer) -> dict[str, Any]:
    return {
        "model": MODEL,
        "api_key": API_KEY,
        "api_base": llm_server.base_url,
        "messages": [{"role": "user", "content": "write a.txt"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_retries": 0,
    }


def tool_calls_of(chunks: Sequence[Any]) -> list[tuple[str, str]]:
    """(id, name) of the tool calls of a streamed answer, as an agent would run them."""
    built = litellm().stream_chunk_builder(list(chunks))
    calls = built.choices[0].message.tool_calls or []
    return [(call.id, call.function.name) for call in calls]


async def litellm_agent(publisher: TokenPublisher, llm_server: LLMServer, message: str) -> str:
    """A plain LiteLLM agent loop: stream, publish every chunk, run the tools, repeat;
    the final answer."""
    with publisher.run(message):
        while True:
            answer = ""  # the last step's text is the answer
            response = await litellm().acompletion(**completion_options(llm_server))
            chunks = []
            async for chunk in response:
                publisher(chunk)
                chunks.append(chunk)
                answer += chunk.choices[0].delta.content or "" if chunk.choices else ""
            calls = tool_calls_of(chunks)
            if not calls:
                return answer
            for call_id, name in calls:
                publisher.tool_result(call_id, f"ran {name}")


def shape(events: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What a viewer sees, without ids and timestamps, consecutive deltas merged (a
    producer's flush window may merge them; PROTOCOL.md allows it)."""
    out: list[tuple[Any, ...]] = []
    for event in events:
        kind = event["type"]
        if kind in MERGEABLE:
            if out and out[-1][0] == kind:
                out[-1] = (kind, out[-1][1] + event["delta"])
            else:
                out.append((kind, event["delta"]))
        elif kind == "TOOL_CALL_START":
            out.append((kind, event["toolCallId"], event["toolCallName"]))
        elif kind in ("TOOL_CALL_END", "TOOL_CALL_RESULT"):
            out.append((kind, event["toolCallId"]))
        elif kind in ("STEP_STARTED", "STEP_FINISHED"):
            out.append((kind, event["stepName"], event["metadata"]))
        elif kind == "RUN_FINISHED":
            out.append((kind, event["outcome"], event["usage"], event["metadata"]))
        elif kind == "RUN_STARTED":
            out.append((kind, event["input"]["messages"][0]["content"]))
        else:
            out.append((kind,))
    return out


async def built_in_run(server: ServerProcess, message: str) -> list[dict[str, Any]]:
    """The events of a built-in run of ``message``, as its writer's session saw them."""
    conversation = await create_conversation(server.url)
    session = await open_session(
        server.ws_url(conversation["id"]), conversation["id"], conversation["writeToken"]
    )
    await session.send({"type": "message", "content": message})
    await session.until_run_ends()
    await session.close()
    return session.events()


async def viewer_of(server: ServerProcess) -> tuple[dict[str, Any], Session]:
    """A new conversation and a viewer watching it."""
    conversation = await create_conversation(server.url)
    session = await open_session(
        server.ws_url(conversation["id"]), conversation["id"], conversation["viewToken"]
    )
    return conversation, session


def http_publisher(
    server: ServerProcess, conversation: dict[str, Any], **options: Any
) -> TokenPublisher:
    return TokenPublisher(
        url=f"{server.url}/c/{conversation['id']}",
        token=conversation["writeToken"],
        model=MODEL,
        **options,
    )


async def watched(session: Session) -> list[dict[str, Any]]:
    """The viewer's events up to the end of the run, checked well formed."""
    await session.until_run_ends()
    events = session.events()
    assert_well_formed(events)
    return events


# ---- the two transports ------------------------------------------------------------------


async def test_a_litellm_loop_published_through_redis_looks_like_a_built_in_run(
    llm_server: LLMServer, start_server: StartServer, redis_url: str
) -> None:
    """Chunks published straight into Redis reach a viewer of another server process as
    the same events, in the same order, as a built-in run of the same stream."""
    server = start_server(redis_url=redis_url, env=llm_env(llm_server))
    llm_server.enqueue(tool_step(), text("Done.", 80, 2))
    reference = await built_in_run(server, "write a.txt")

    conversation, session = await viewer_of(server)
    llm_server.enqueue(tool_step(), text("Done.", 80, 2))
    publisher = TokenPublisher(redis_url=redis_url, conversation_id=conversation["id"], model=MODEL)
    answer = await litellm_agent(publisher, llm_server, "write a.txt")
    await publisher.aclose()
    events = await watched(session)

    assert answer == "Done."
    assert shape(events) == shape(reference)
    assert [e["type"] for e in events if e["type"].startswith(("RUN_", "STEP_"))] == [
        "RUN_STARTED",
        "STEP_STARTED",
        "STEP_FINISHED",
        "STEP_STARTED",
        "STEP_FINISHED",
        "RUN_FINISHED",
    ]
    assert events[-1]["runId"] == publisher.run_id
    assert (publisher.errors, publisher.dropped) == (0, 0)


async def test_a_litellm_loop_published_through_http_looks_like_a_built_in_run(
    llm_server: LLMServer, start_server: StartServer
) -> None:
    """Chunks published through the server's ingest endpoints with the write token reach
    a viewer as the same events as a built-in run, usage and cost included."""
    server = start_server(env=llm_env(llm_server))
    llm_server.enqueue(tool_step(), text("Done.", 80, 2))
    reference = await built_in_run(server, "write a.txt")

    conversation, session = await viewer_of(server)
    llm_server.enqueue(tool_step(), text("Done.", 80, 2))
    publisher = http_publisher(server, conversation)
    await litellm_agent(publisher, llm_server, "write a.txt")
    await publisher.aclose()
    events = await watched(session)

    assert shape(events) == shape(reference)
    finished = events[-1]
    assert finished["usage"][0]["inputTokens"] == 120 and finished["metadata"]["costUsd"] > 0
    status, state = await ahttp(
        "GET",
        f"{server.url}/api/conversations/{conversation['id']}",
        token=conversation["viewToken"],
    )
    assert status == 200 and state["status"] == "idle"
    assert state["usage"]["inputTokens"] == 120
    assert (publisher.errors, publisher.dropped) == (0, 0)


async def test_a_late_joiner_of_a_published_run_gets_its_history_in_the_snapshot(
    llm_server: LLMServer, start_server: StartServer
) -> None:
    """The run's messages are recorded, so a viewer resuming from a trimmed or foreign
    log rebuilds from a MESSAGES_SNAPSHOT holding the user's message and the answer."""
    server = start_server(env=llm_env(llm_server))
    conversation, session = await viewer_of(server)
    llm_server.enqueue(text("Hello there.", 10, 3))
    publisher = http_publisher(server, conversation)
    await litellm_agent(publisher, llm_server, "hi")
    await publisher.aclose()
    await watched(session)

    late = await open_session(
        server.ws_url(conversation["id"]),
        conversation["id"],
        conversation["viewToken"],
        epoch="another-epoch",
    )
    snapshot = await late.next()
    assert late.welcome["mode"] == "snapshot" and snapshot["type"] == "MESSAGES_SNAPSHOT"
    assert [(m["role"], m.get("content")) for m in snapshot["messages"]] == [
        ("user", "hi"),
        ("assistant", "Hello there."),
    ]


# ---- the OpenHands shape ---------------------------------------------------------------------


async def test_token_callbacks_called_from_an_agent_thread_holding_its_lock_are_published(
    llm_server: LLMServer, start_server: StartServer, redis_url: str
) -> None:
    """OpenHands calls ``token_callbacks`` in turn, per chunk, from the thread running the
    agent and inside its state lock: the publisher among them publishes the same events
    as a built-in run. (openhands-sdk needs Python 3.12; this is its calling pattern.)"""
    server = start_server(redis_url=redis_url, env=llm_env(llm_server))
    llm_server.enqueue(tool_step(), text("Done.", 80, 2))
    reference = await built_in_run(server, "write a.txt")

    conversation, session = await viewer_of(server)
    llm_server.enqueue(tool_step(), text("Done.", 80, 2))
    publisher = TokenPublisher(redis_url=redis_url, conversation_id=conversation["id"], model=MODEL)
    state_lock = threading.RLock()  # OpenHands' ConversationState lock
    printed: list[str] = []
    called_in: set[tuple[int, bool]] = set()

    def on_token(chunk: Any) -> None:
        called_in.add((threading.get_ident(), state_lock._is_owned()))  # type: ignore[attr-defined]
        for choice in chunk.choices:
            printed.append(choice.delta.content or "")

    token_callbacks: list[Callable[[Any], None]] = [on_token, publisher]

    def conversation_run() -> None:
        with publisher.run("write a.txt"):
            while True:
                with state_lock:  # held through the agent's step, LLM call included
                    chunks = list(litellm().completion(**completion_options(llm_server)))
                    for chunk in chunks:  # LLM.completion(on_token=...): each, in turn
                        for callback in token_callbacks:
                            callback(chunk)
                calls = tool_calls_of(chunks)
                if not calls:
                    return
                for call_id, name in calls:
                    publisher.tool_result(call_id, f"ran {name}")

    await asyncio.to_thread(conversation_run)
    publisher.close()
    events = await watched(session)

    assert called_in and all(owned for _, owned in called_in)
    assert threading.get_ident() not in {ident for ident, _ in called_in}
    assert "".join(printed) == "Writing now.Done."
    assert shape(events) == shape(reference)
    assert (publisher.errors, publisher.dropped) == (0, 0)


# ---- failures never reach the agent ----------------------------------------------------------


async def test_a_publisher_whose_redis_is_down_leaves_the_agent_unharmed(
    llm_server: LLMServer, start_server: StartServer, redis_server: RedisServer
) -> None:
    """With Redis stopped, the agent streams to the end without an exception, and the
    publisher counts the failure and the events it could not publish."""
    server = start_server(redis_url=redis_server.url, env=llm_env(llm_server))
    conversation = await create_conversation(server.url)
    await asyncio.to_thread(redis_server.stop)
    publisher = TokenPublisher(redis_url=redis_server.url, conversation_id=conversation["id"])
    llm_server.enqueue(text("still answering", 10, 2))

    answer = await litellm_agent(publisher, llm_server, "hello")
    await publisher.aclose()

    assert answer == "still answering"
    assert publisher.errors == 1  # the run could not start; nothing more was tried
    assert publisher.dropped > 0
    assert publisher.run_id is None


async def test_failed_publishes_are_logged_without_the_token(
    llm_server: LLMServer, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong token is refused by the server; the publisher logs the refusal in words
    that say what to check, and never the token."""
    server = start_server(env=llm_env(llm_server))
    conversation = await create_conversation(server.url)
    wrong = "wrong-token-5f4e3d2c1b0a99887766"
    publisher = TokenPublisher(url=f"{server.url}/c/{conversation['id']}", token=wrong)
    llm_server.enqueue(text("fine", 10, 2))

    with caplog.at_level(logging.INFO, logger="costream.client.publisher"):
        assert await litellm_agent(publisher, llm_server, "hello") == "fine"
        await publisher.aclose()

    assert publisher.errors == 1
    assert "starting a run failed" in caplog.text and "HTTP 401" in caplog.text
    assert "write token" in caplog.text
    assert wrong not in caplog.text


async def test_a_view_token_cannot_publish(start_server: StartServer) -> None:
    """The ingest endpoints take the write token only: a view token gets 403."""
    server = start_server()
    conversation = await create_conversation(server.url)
    runs = f"{server.url}/api/conversations/{conversation['id']}/runs"
    status, answer = await ahttp(
        "POST", runs, body={"input": "hi"}, token=conversation["viewToken"]
    )
    assert (status, answer["error"]["code"]) == (403, "forbidden")
    status, answer = await ahttp("POST", runs, body={"input": "hi"})
    assert (status, answer["error"]["code"]) == (401, "unauthorized")
    status, answer = await ahttp(
        "POST", f"{server.url}/api/conversations/nope/runs", body={"input": "hi"}
    )
    assert (status, answer["error"]["code"]) == (404, "not_found")


# ---- runs ------------------------------------------------------------------------------------


async def test_plain_text_chunks_are_published_as_one_text_segment(
    start_server: StartServer,
) -> None:
    """Agents that hand text rather than chunks (OpenHands' ACP agents) get a step with
    one text message holding the text in order."""
    server = start_server()
    conversation, session = await viewer_of(server)
    publisher = http_publisher(server, conversation)

    with publisher.run("say hello"):
        for piece in ("Hello", ", ", "world", "!"):
            publisher(piece)
    publisher.close()
    events = await watched(session)

    assert [kind for kind, *_ in shape(events)] == [
        "RUN_STARTED",
        "STEP_STARTED",
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END",
        "STEP_FINISHED",
        "RUN_FINISHED",
    ]
    assert ("TEXT_MESSAGE_CONTENT", "Hello, world!") in shape(events)
    assert events[-1]["outcome"] == {"type": "success"}


async def test_an_exception_inside_the_run_ends_it_in_run_error_and_goes_on(
    start_server: StartServer,
) -> None:
    """The run's open segments are closed, RUN_ERROR names the exception's type only,
    and the exception reaches the caller unchanged."""
    server = start_server()
    conversation, session = await viewer_of(server)
    publisher = http_publisher(server, conversation)

    with pytest.raises(RuntimeError, match="secret detail"), publisher.run("go"):
        publisher({"choices": [{"delta": {"reasoning_content": "Thinking"}}]})
        raise RuntimeError("secret detail")
    publisher.close()
    events = await watched(session)

    assert [e["type"] for e in events] == [
        "RUN_STARTED",
        "STEP_STARTED",
        "REASONING_START",
        "REASONING_MESSAGE_START",
        "REASONING_MESSAGE_CONTENT",
        "REASONING_MESSAGE_END",
        "REASONING_END",
        "STEP_FINISHED",
        "RUN_ERROR",
    ]
    assert events[-2]["metadata"]["finishReason"] == "error"
    assert events[-1]["code"] == "internal"
    assert events[-1]["message"] == "the agent failed (RuntimeError)"


async def test_an_llm_error_inside_the_run_gets_the_runners_error_code(
    llm_server: LLMServer, start_server: StartServer
) -> None:
    """A LiteLLM error that escapes the agent is worded as the built-in runner words it."""
    server = start_server(env=llm_env(llm_server))
    conversation, session = await viewer_of(server)
    publisher = http_publisher(server, conversation)
    llm_server.enqueue(error(429))

    with pytest.raises(Exception, match="429"):
        await litellm_agent(publisher, llm_server, "hello")
    await publisher.aclose()
    events = await watched(session)

    assert [e["type"] for e in events] == ["RUN_STARTED", "RUN_ERROR"]
    assert events[-1]["code"] == "rate_limited"
    assert API_KEY not in events[-1]["message"]


async def test_a_publisher_too_far_behind_ends_its_run_well_formed(
    start_server: StartServer,
) -> None:
    """Past its queue's bound the publisher drops the run's queued output, counts it,
    and ends the run with RUN_ERROR; the agent goes on and the next run publishes."""
    server = start_server()
    conversation, session = await viewer_of(server)
    publisher = http_publisher(server, conversation, max_pending_events=8)
    burst = {
        "choices": [
            {
                "delta": {
                    "reasoning_content": "a",
                    "content": "b",
                    "tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f"}}],
                }
            }
        ]
    }

    with publisher.run("first"):
        publisher(burst)  # eleven events at once, STEP_STARTED first: past the bound
        publisher(burst)
    publisher.flush()
    first = await watched(session)
    with publisher.run("second"):
        publisher("ok")
    publisher.close()
    await session.until("RUN_STARTED")
    second = await watched(session)

    assert [e["type"] for e in first] == ["RUN_STARTED", "RUN_ERROR"]
    assert publisher.dropped > 0 and publisher.errors == 0
    assert second[-1]["type"] == "RUN_FINISHED"


async def test_the_events_endpoint_refuses_run_boundaries_and_a_second_run(
    start_server: StartServer,
) -> None:
    """A producer cannot append RUN_FINISHED itself nor start a run while one is active;
    after finish the conversation is idle and the run's endpoints answer 409."""
    server = start_server()
    conversation = await create_conversation(server.url)
    token = conversation["writeToken"]
    runs = f"{server.url}/api/conversations/{conversation['id']}/runs"
    status, started = await ahttp("POST", runs, body={"input": "hi"}, token=token)
    assert status == 201 and started["leaseTtlMs"] > 0
    events = f"{runs}/{started['runId']}/events"

    status, answer = await ahttp("POST", runs, body={"input": "again"}, token=token)
    assert (status, answer["error"]["code"]) == (409, "run_active")
    finished = {"type": "RUN_ERROR", "message": "x", "code": "internal"}
    status, answer = await ahttp("POST", events, body=[finished], token=token)
    assert (status, answer["error"]["code"]) == (400, "bad_request")
    status, answer = await ahttp("POST", events, body=[{"type": "TEXT_MESSAGE_START"}], token=token)
    assert status == 400 and "messageId" in answer["error"]["message"]
    status, answer = await ahttp(
        "POST", events, raw=b"[" + b" " * (1024 * 1024) + b"]", token=token
    )
    assert status == 413
    status, answer = await ahttp(
        "POST", events, body=[{"type": "TEXT_MESSAGE_START", "messageId": "m1"}], token=token
    )
    assert status == 202 and answer == {"head": 2, "cancelRequested": False}

    status, answer = await ahttp(
        "POST", f"{runs}/{started['runId']}/finish", body={"outcome": "success"}, token=token
    )
    assert status == 200
    log = await ahttp(
        "GET", f"{server.url}/api/conversations/{conversation['id']}/events", token=token
    )
    assert [e["type"] for e in log[1]] == [
        "RUN_STARTED",
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_END",  # closed by the server: the producer left it open
        "RUN_FINISHED",
    ]
    status, answer = await ahttp("POST", events, body=[], token=token)
    assert (status, answer["error"]["code"]) == (409, "no_run")


def test_importing_the_publisher_loads_neither_the_server_nor_litellm_nor_redis() -> None:
    """An agent's process pays for what it uses: no Starlette, no LiteLLM, no redis, no
    OpenHands (its events are read by attribute)."""
    check = (
        "import sys, costream.publisher; "
        "print(sorted({'starlette', 'litellm', 'redis', 'uvicorn', 'openhands'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


async def test_a_new_ingest_run_forgets_what_was_kept_for_a_reaped_one(
    start_server: StartServer, redis_url: str
) -> None:
    """A producer that died mid-run never calls finish; once its run is reaped and the next
    ingest run starts, nothing of the dead run stays kept beside the conversation."""
    from redis.asyncio import Redis

    from costream.broker.redis.scripts import key

    server = start_server(redis_url=redis_url, env={"COSTREAM_LEASE_TTL_MS": "1500"})
    conversation = await create_conversation(server.url)
    token = conversation["writeToken"]
    runs = f"{server.url}/api/conversations/{conversation['id']}/runs"
    status, dead = await ahttp("POST", runs, body={"input": "first"}, token=token)
    assert status == 201
    opening = [{"type": "TEXT_MESSAGE_START", "messageId": "m1"}]
    status, _ = await ahttp("POST", f"{runs}/{dead['runId']}/events", body=opening, token=token)
    assert status == 202
    # The producer is gone: the next run starts once the dead run's lease has expired
    # (the server reaps it then), and is refused with 409 until that moment.
    async with asyncio.timeout(60):
        while True:
            status, started = await ahttp("POST", runs, body={"input": "second"}, token=token)
            if status == 201:
                break
            assert started["error"]["code"] == "run_active"
            await asyncio.sleep(0.2)
    redis = Redis.from_url(redis_url)
    try:
        fences = await redis.hkeys(key(conversation["id"], "map:ingest_fences"))
        grammars = await redis.hkeys(key(conversation["id"], "map:ingest_grammar"))
    finally:
        await redis.aclose()
    assert [f.decode() for f in fences] == [started["runId"]]
    assert grammars == []
