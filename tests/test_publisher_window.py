"""costream.publisher: its flush window, the model it shows and the conversations it owns.

Real parts as in ``test_publisher.py``: LiteLLM streams from the scripted LLM server at a
model's pace, the publisher writes into a real redis-server or a real ``costream serve``,
and viewers watch over WebSockets. A built-in run of the same stream, with the runner's
30 ms flush window, is the reference for the number of events.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import pytest

from costream.publisher import TokenPublisher
from tests.support.llm_server import (
    LLMServer,
    Reply,
    content,
    finish,
    reasoning,
    stream,
    text,
    usage,
)
from tests.support.ws import ahttp, create_conversation, open_session
from tests.test_publisher import (
    MODEL,
    StartServer,
    built_in_run,
    completion_options,
    http_publisher,
    litellm,
    litellm_agent,
    llm_env,
    viewer_of,
    watched,
)

TOKENS_PER_S = 100


def paced_answer() -> Reply:
    """40 reasoning and 110 content tokens at 100 tokens/s, then usage."""
    thinking = [reasoning(f"step {i}, ") for i in range(40)]
    words = [content(f"word{i} ") for i in range(110)]
    return stream(*thinking, *words, finish("stop"), usage(50, 150), chunk_delay_s=1 / TOKENS_PER_S)


def run_events(events: list[dict[str, Any]]) -> int:
    """Events of the last run, RUN_STARTED to its end."""
    starts = [i for i, e in enumerate(events) if e["type"] == "RUN_STARTED"]
    return len(events) - starts[-1]


def texts(events: list[dict[str, Any]]) -> tuple[str, str]:
    """(reasoning, content) as a viewer concatenates them."""
    return (
        "".join(e["delta"] for e in events if e["type"] == "REASONING_MESSAGE_CONTENT"),
        "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT"),
    )


@pytest.mark.parametrize("transport", ["http", "redis"])
async def test_at_100_tokens_per_second_a_published_run_makes_about_as_many_events_as_a_built_in_one(
    transport: str, llm_server: LLMServer, start_server: StartServer, redis_url: str
) -> None:
    """With the 30 ms flush window on both sides, a published run of a stream makes at
    most 1.5 times the events a built-in run of the same stream makes, text unchanged."""
    server = start_server(
        redis_url=redis_url, env={**llm_env(llm_server), "COSTREAM_FLUSH_MS": "30"}
    )
    # Warm both LiteLLMs up first: a process's first stream is read late, in bursts.
    llm_server.enqueue(text("Ready."), text("Ready."), paced_answer())
    await built_in_run(server, "warm up")
    async for _ in await litellm().acompletion(**completion_options(llm_server)):
        pass
    reference = await built_in_run(server, "think aloud")

    conversation, session = await viewer_of(server)
    publisher = (
        TokenPublisher(redis_url=redis_url, conversation_id=conversation["id"], model=MODEL)
        if transport == "redis"
        else http_publisher(server, conversation)
    )
    llm_server.enqueue(paced_answer())
    await litellm_agent(publisher, llm_server, "think aloud")
    await publisher.aclose()
    events = await watched(session)

    built_in, published = run_events(reference), run_events(events)
    print(
        f"events per run at {TOKENS_PER_S} tokens/s: built-in {built_in}, {transport} {published}"
    )
    assert texts(events) == texts(reference)
    assert published <= 1.5 * built_in
    assert (publisher.errors, publisher.dropped) == (0, 0)


async def test_a_long_delta_reaches_viewers_whole(start_server: StartServer) -> None:
    """A delta is never cut: 100 000 characters handed at once arrive as one event."""
    server = start_server()
    conversation, session = await viewer_of(server)
    publisher = http_publisher(server, conversation)
    long_text = "ü" * 100_000

    with publisher.run("paste it"):
        publisher(long_text)
    await publisher.aclose()
    events = await watched(session)

    deltas = [e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT"]
    assert deltas == [long_text]


@pytest.mark.parametrize("transport", ["http", "redis"])
async def test_a_published_run_sets_the_model_and_owns_the_conversation(
    transport: str, llm_server: LLMServer, start_server: StartServer, redis_url: str
) -> None:
    """After a published run, REST and welcome show its model, and the write link's
    messages start no server-side run (409 external_producer); exclusive=False leaves them free."""
    server = start_server(redis_url=redis_url)
    owned = await create_conversation(server.url)
    shared = await create_conversation(server.url)
    for conversation, exclusive in ((owned, True), (shared, False)):
        publisher = (
            TokenPublisher(
                redis_url=redis_url,
                conversation_id=conversation["id"],
                model=MODEL,
                exclusive=exclusive,
            )
            if transport == "redis"
            else http_publisher(server, conversation, exclusive=exclusive)
        )
        with publisher.run("hello"):
            publisher("Hello.")
        await publisher.aclose()
        assert (publisher.errors, publisher.dropped) == (0, 0)

    api = f"{server.url}/api/conversations"
    status, state = await ahttp("GET", f"{api}/{owned['id']}", token=owned["viewToken"])
    assert (status, state["model"]) == (200, MODEL)
    viewer = await open_session(server.ws_url(owned["id"]), owned["id"], owned["viewToken"])
    assert viewer.welcome["model"] == MODEL
    await viewer.close()
    message = {"content": "a run on the server"}
    status, refused = await ahttp(
        "POST", f"{api}/{owned['id']}/messages", body=message, token=owned["writeToken"]
    )
    assert (status, refused["error"]["code"]) == (409, "external_producer")
    writer = await open_session(server.ws_url(owned["id"]), owned["id"], owned["writeToken"])
    await writer.send({"type": "message", "content": "a run on the server"})
    refusal = await writer.until("error")
    assert refusal["code"] == "external_producer"
    await writer.close()
    status, _ = await ahttp(
        "POST", f"{api}/{shared['id']}/messages", body=message, token=shared["writeToken"]
    )
    assert status == 202


async def test_a_publisher_whose_server_is_down_leaves_the_agent_unharmed(
    llm_server: LLMServer, start_server: StartServer
) -> None:
    """With the server stopped, the agent streams to the end without an exception; the
    publisher counts the failure and the events it could not send."""
    server = start_server()
    conversation = await create_conversation(server.url)
    server.stop()
    publisher = http_publisher(server, conversation)
    llm_server.enqueue(text("still answering", 10, 2))

    answer = await litellm_agent(publisher, llm_server, "hello")
    await publisher.aclose()

    assert answer == "still answering"
    assert publisher.errors == 1 and publisher.dropped > 0 and publisher.run_id is None


async def test_a_program_that_ends_without_close_still_publishes_its_last_run(
    start_server: StartServer,
) -> None:
    """The publisher publishes what is queued when the interpreter exits: a program
    that never calls close() loses nothing."""
    server = start_server()
    conversation = await create_conversation(server.url)
    program = (
        "import sys; from costream.publisher import TokenPublisher; "
        "p = TokenPublisher(url=sys.argv[1]); p.start_run('hi'); "
        "[p(f'word {i} ') for i in range(200)]; p.finish_run()"
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", program, conversation["writeUrl"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr

    status, log = await ahttp(
        "GET",
        f"{server.url}/api/conversations/{conversation['id']}/events",
        token=conversation["viewToken"],
    )
    assert status == 200 and log[-1]["type"] == "RUN_FINISHED"
    assert texts(log)[1] == "".join(f"word {i} " for i in range(200))
