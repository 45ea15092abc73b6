"""The official AG-UI client runs and watches a conversation through the AG-UI endpoints.

``tests/agui/drive.mjs`` drives ``@ag-ui/client``'s ``HttpAgent`` (installed from the npm
registry into ``tests/agui/node_modules`` by ``npm ci`` when missing) with the machine's
Node.js against a real ``costream serve``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ag_ui.core import Event as AguiEvent
from pydantic import BaseModel, TypeAdapter

from tests.support.llm_server import (
    LLMServer,
    content,
    cut,
    error,
    finish,
    hang,
    stream,
    text,
    tool_call,
    usage,
)
from tests.support.servers import ServerProcess
from tests.support.ws import Session, ahttp, create_conversation, open_session

STORY = (
    "Tell me a long story about LLM streaming, write it to a file, "
    "make sure it has multiple paragraphs."
)
DELETE = (
    "Thank you. Please delete the streaming story file now that I've read it, "
    "then confirm the deletion."
)
AGUI_DIR = Path(__file__).parent / "agui"
agui_event: TypeAdapter[Any] = TypeAdapter(AguiEvent)


@pytest.fixture(scope="session")
def agui_client() -> Path:
    """``tests/agui`` with ``@ag-ui/client`` installed (``npm ci`` when it is missing)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(
            "tests/test_agui.py needs Node.js (20 or later) and npm on PATH: "
            "it installs @ag-ui/client from the npm registry and runs it"
        )
    if not (AGUI_DIR / "node_modules" / "@ag-ui" / "client").is_dir():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=AGUI_DIR, check=True, timeout=600
        )
    return AGUI_DIR


async def drive(agui_dir: Path, *args: str) -> dict[str, Any]:
    """Run ``drive.mjs`` (``shared``: a writer runs both prompts, a viewer follows the
    second run live, a late joiner connects after both; ``run``: one prompt); the clients'
    messages and events, and what the client library printed."""
    process = await asyncio.create_subprocess_exec(
        "node",
        "drive.mjs",
        *args,
        cwd=agui_dir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()
    assert stderr == b"", stderr.decode()
    result: dict[str, Any] = json.loads(stdout)
    return result


def unknown_fields(model: Any, path: str = "$") -> list[str]:
    """Every field of a parsed AG-UI model that the protocol does not define."""
    if isinstance(model, BaseModel):
        found = [f"{path}.{name}" for name in model.model_extra or {}]
        for name in type(model).model_fields:
            found += unknown_fields(getattr(model, name), f"{path}.{name}")
        return found
    if isinstance(model, list | tuple):
        return [p for i, v in enumerate(model) for p in unknown_fields(v, f"{path}[{i}]")]
    return []


def shape(events: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """What a viewer can tell of a run without its ids, text and timing: each event's type
    and fields (runs of merged deltas count once)."""
    shapes = []
    for event in events:
        nested = [
            f"{key}.{sub}"
            for key in ("metadata", "input")
            if isinstance(event.get(key), dict)
            for sub in event[key]
        ]
        shapes.append((event["type"], *sorted(event), *sorted(nested)))
    return [key for key, _ in itertools.groupby(shapes)]


async def run_events(session: Session) -> list[dict[str, Any]]:
    """The logged events of the next run a session sees, RUN_STARTED to its end."""
    await session.until("RUN_STARTED")
    start = len(session.frames) - 1
    await session.until_run_ends()
    return [json.loads(f) for f in session.frames[start:] if f.startswith('{"seq":')]


def assert_valid_agui(events: list[dict[str, Any]]) -> None:
    """Every event parses with ag-ui-protocol's models, strictly, with no unknown field."""
    for event in events:
        parsed = agui_event.validate_json(json.dumps(event), strict=True)
        assert unknown_fields(parsed) == [], event


async def costream_snapshot(server: ServerProcess, conv: dict[str, Any]) -> list[Any]:
    """The conversation's messages as costream's own MESSAGES_SNAPSHOT gives them."""
    stale = await open_session(
        server.ws_url(conv["id"]), conv["id"], conv["viewToken"], epoch="stale"
    )
    snapshot = await stale.next()
    await stale.close()
    assert snapshot["type"] == "MESSAGES_SNAPSHOT"
    messages: list[Any] = snapshot["messages"]
    return messages


async def runs_seen(session: Session, count: int) -> list[list[dict[str, Any]]]:
    return [await run_events(session) for _ in range(count)]


async def test_http_agent_runs_and_watches_a_shared_conversation(
    start_server: Any, agui_client: Path
) -> None:
    """HttpAgent's runAgent() resolves for both demo prompts with costream's snapshot as its
    messages, a view-token client and a late joiner after trimming see the same, every
    event is valid AG-UI for both official libraries, and nothing is printed."""
    server = start_server(env={"COSTREAM_LOG_RETAIN": "20"})
    conv = await create_conversation(server.url)
    page_viewer = await open_session(server.ws_url(conv["id"]), conv["id"], conv["viewToken"])
    seen = asyncio.create_task(runs_seen(page_viewer, 2))

    result = await drive(
        agui_client,
        "shared",
        server.url,
        conv["id"],
        conv["writeToken"],
        conv["viewToken"],
        STORY,
        DELETE,
    )
    watched = await asyncio.wait_for(seen, 60)

    assert result["printed"] == []  # no warning, no error from the client library
    assert result["invalid"] == []  # @ag-ui/core's zod schemas accept every event
    for client in ("writer", "viewer", "late"):
        assert_valid_agui(result[client]["events"])

    messages = await costream_snapshot(server, conv)
    assert len(messages) == 12
    assert result["writer"]["messages"] == messages
    assert result["viewer"]["messages"] == messages
    assert result["late"]["messages"] == messages

    # The late joiner came after trimming: a snapshot wrapped in a run of its own.
    status, logged = await ahttp(
        "GET", f"{server.url}/api/conversations/{conv['id']}/events", token=conv["viewToken"]
    )
    assert status == 200 and logged[0]["seq"] > 1
    assert [e["type"] for e in result["late"]["events"]] == [
        "RUN_STARTED",
        "MESSAGES_SNAPSHOT",
        "RUN_FINISHED",
    ]

    # The client's run ids and user message ids are the run's; seq rides in rawEvent.
    users = [m for m in result["writer"]["messages"] if m["role"] == "user"]
    for run, run_id, user in zip(watched, result["runIds"], users, strict=True):
        assert run[0]["runId"] == run_id
        assert run[0]["input"]["messages"] == [
            {"id": user["id"], "content": user["content"], "role": "user"}
        ]
    writer_events = result["writer"]["events"]
    assert [e["rawEvent"]["seq"] for e in writer_events] == [
        e["seq"] for run in watched for e in run
    ]
    assert all(e["protocolVersion"] == "1.0" for e in writer_events if e["type"] == "RUN_STARTED")

    # A run from the page, in a conversation of its own, looks the same to a viewer.
    other = await create_conversation(server.url)
    page = await open_session(server.ws_url(other["id"]), other["id"], other["writeToken"])
    await page.send({"type": "message", "content": STORY})
    from_page = await run_events(page)
    assert shape(from_page) == shape(watched[0])
    for session in (page_viewer, page):
        await session.close()


async def test_agui_run_refusals_keep_the_http_codes(start_server: Any) -> None:
    """Before the stream starts, the AG-UI endpoint answers PROTOCOL.md's codes."""
    server = start_server(env={"COSTREAM_DEMO_DELAY_MS": "20"})  # a run that lasts
    conv = await create_conversation(server.url)
    url = f"{server.url}/api/conversations/{conv['id']}/agui"
    body = {
        "threadId": conv["id"],
        "runId": "run-1",
        "messages": [{"id": "m-1", "role": "user", "content": STORY}],
    }
    assert (await ahttp("POST", url, body=body))[0] == 401
    assert (await ahttp("POST", url, body=body, token=conv["viewToken"]))[0] == 403
    wrong_thread = {**body, "threadId": "elsewhere"}
    assert (await ahttp("POST", url, body=wrong_thread, token=conv["writeToken"]))[0] == 400
    no_user = {**body, "messages": []}
    assert (await ahttp("POST", url, body=no_user, token=conv["writeToken"]))[0] == 400
    missing = f"{server.url}/api/conversations/nope/agui"
    assert (await ahttp("POST", missing, body=body, token=conv["writeToken"]))[0] == 404

    writer = await open_session(server.ws_url(conv["id"]), conv["id"], conv["writeToken"])
    await writer.send({"type": "message", "content": STORY})
    await writer.until("accepted")
    status, answer = await ahttp(
        "POST", url, body={**body, "runId": "run-2"}, token=conv["writeToken"]
    )
    assert (status, answer["error"]["code"]) == (409, "run_active")
    await writer.until_run_ends()
    await writer.close()


def llm_env(llm_server: LLMServer) -> dict[str, str]:
    """A server that uses the scripted LLM through LiteLLM's OpenAI provider."""
    return {
        "LLM_MODEL": "openai/gpt-4o-mini",
        "LLM_API_KEY": "sk-test-agui",
        "LLM_BASE_URL": llm_server.base_url,
        "COSTREAM_LLM_TIMEOUT_S": "60",
        "COSTREAM_RETRY_BACKOFF_S": "0.05",
        "COSTREAM_FLUSH_MS": "0",
    }


async def test_a_retried_step_leaves_the_client_with_costreams_messages(
    llm_server: LLMServer, start_server: Any, agui_client: Path
) -> None:
    """A stream cut after partial text is retried: before RUN_FINISHED the client gets
    costream's snapshot, so the abandoned partial answer does not stay in its messages."""
    llm_server.enqueue(
        cut(content("Half "), content("an "), content("answer"), after=2),
        text("Whole answer."),
    )
    server = start_server(env=llm_env(llm_server))
    conv = await create_conversation(server.url)
    result = await drive(agui_client, "run", server.url, conv["id"], conv["writeToken"], "Hi")

    assert result["printed"] == [] and result["invalid"] == []
    events = result["writer"]["events"]
    assert_valid_agui(events)
    assert [e["type"] for e in events][-2:] == ["MESSAGES_SNAPSHOT", "RUN_FINISHED"]
    messages = await costream_snapshot(server, conv)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"] == "Whole answer."
    assert result["writer"]["messages"] == messages


async def test_a_tool_call_cut_by_a_cancel_leaves_the_client_with_costreams_messages(
    llm_server: LLMServer, start_server: Any, agui_client: Path
) -> None:
    """A cancel during a tool call's arguments: the client's truncated call is replaced by
    costream's snapshot (the call never ran, so it is not history)."""
    llm_server.enqueue(
        hang(
            content("Partial"),
            tool_call(0, id="call_x", name="write_file", arguments='{"pa'),
            after=2,
        )
    )
    server = start_server(env=llm_env(llm_server))
    conv = await create_conversation(server.url)
    watcher = await open_session(server.ws_url(conv["id"]), conv["id"], conv["viewToken"])
    running = asyncio.create_task(
        drive(agui_client, "run", server.url, conv["id"], conv["writeToken"], "Write it")
    )
    await watcher.until("TOOL_CALL_ARGS")
    status, _ = await ahttp(
        "POST", f"{server.url}/api/conversations/{conv['id']}/cancel", token=conv["writeToken"]
    )
    assert status == 202
    result = await running
    await watcher.close()

    assert result["printed"] == [] and result["invalid"] == []
    events = result["writer"]["events"]
    assert_valid_agui(events)
    assert events[-1]["outcome"] == {"type": "cancelled"}
    assert events[-2]["type"] == "MESSAGES_SNAPSHOT"
    messages = await costream_snapshot(server, conv)
    assert messages[1:] == [{"id": messages[1]["id"], "role": "assistant", "content": "Partial"}]
    assert result["writer"]["messages"] == messages


async def test_a_failed_tool_is_an_error_tool_message_for_the_client(
    llm_server: LLMServer, start_server: Any, agui_client: Path
) -> None:
    """A tool that fails: before RUN_FINISHED the client gets the snapshot with AG-UI's
    ``error`` on that tool message; ``isError`` rides in the result's ``rawEvent``."""
    llm_server.enqueue(
        stream(
            tool_call(0, id="call_1", name="delete_file", arguments='{"path": "nope.txt"}'),
            finish("tool_calls"),
            usage(10, 5),
        ),
        text("That file does not exist."),
    )
    server = start_server(env=llm_env(llm_server))
    conv = await create_conversation(server.url)
    result = await drive(agui_client, "run", server.url, conv["id"], conv["writeToken"], "Rm")

    assert result["printed"] == [] and result["invalid"] == []
    events = result["writer"]["events"]
    assert_valid_agui(events)
    (tool_result,) = [e for e in events if e["type"] == "TOOL_CALL_RESULT"]
    assert "metadata" not in tool_result
    assert tool_result["rawEvent"]["metadata"] == {"isError": True}
    assert [e["type"] for e in events][-2:] == ["MESSAGES_SNAPSHOT", "RUN_FINISHED"]
    (tool,) = [m for m in result["writer"]["messages"] if m["role"] == "tool"]
    assert tool["error"] == tool["content"] == "Error: no file nope.txt"
    # Everything else is costream's snapshot (which keeps `error` once the runner stores it).
    without_error = [
        {k: v for k, v in m.items() if k != "error"} for m in result["writer"]["messages"]
    ]
    assert without_error == [
        {k: v for k, v in m.items() if k != "error"} for m in await costream_snapshot(server, conv)
    ]


async def test_a_client_that_joins_mid_run_after_trimming_is_accepted(
    start_server: Any, agui_client: Path
) -> None:
    """connectAgent() in the middle of a run, the log trimmed: the conversation so far as a
    snapshot in a run of its own, then the run under way from its RUN_STARTED; it resolves
    when that run ends, with costream's messages."""
    server = start_server(env={"COSTREAM_LOG_RETAIN": "20", "COSTREAM_DEMO_DELAY_MS": "5"})
    conv = await create_conversation(server.url)
    writer = await open_session(server.ws_url(conv["id"]), conv["id"], conv["writeToken"])
    await writer.send({"type": "message", "content": STORY})
    await writer.until_run_ends()
    await writer.send({"type": "message", "content": STORY})  # long enough to join
    await writer.until("REASONING_MESSAGE_CONTENT")
    result = await drive(agui_client, "watch", server.url, conv["id"], conv["viewToken"])
    await writer.until_run_ends()
    await writer.close()

    assert result["printed"] == [] and result["invalid"] == []
    events = result["watcher"]["events"]
    assert_valid_agui(events)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["RUN_STARTED", "MESSAGES_SNAPSHOT", "RUN_FINISHED", "RUN_STARTED"]
    assert kinds[-1] == "RUN_FINISHED"
    assert events[0]["runId"] == f"snapshot-{events[1]['rawEvent']['seq']}"
    status, logged = await ahttp(
        "GET", f"{server.url}/api/conversations/{conv['id']}/events", token=conv["viewToken"]
    )
    assert status == 200 and logged[0]["seq"] > 1  # the first run's events were trimmed
    assert result["watcher"]["messages"] == await costream_snapshot(server, conv)


async def test_a_new_client_on_an_old_conversation_gets_its_history(
    server: ServerProcess, agui_client: Path
) -> None:
    """A fresh HttpAgent (holding only its new message) runs in a conversation with
    history: a MESSAGES_SNAPSHOT right after RUN_STARTED gives it costream's history."""
    conv = await create_conversation(server.url)
    writer = await open_session(server.ws_url(conv["id"]), conv["id"], conv["writeToken"])
    await writer.send({"type": "message", "content": STORY})
    await writer.until_run_ends()
    await writer.close()
    result = await drive(agui_client, "run", server.url, conv["id"], conv["writeToken"], DELETE)

    assert result["printed"] == [] and result["invalid"] == []
    events = result["writer"]["events"]
    assert_valid_agui(events)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["RUN_STARTED", "MESSAGES_SNAPSHOT", "MESSAGES_SNAPSHOT", "STEP_STARTED"]
    messages = await costream_snapshot(server, conv)
    assert len(messages) == 12
    assert result["writer"]["messages"] == messages


async def test_a_failed_run_ends_the_clients_stream_with_run_error(
    llm_server: LLMServer, start_server: Any, agui_client: Path
) -> None:
    """The model refuses the request: the stream ends with RUN_ERROR, which the client
    accepts, and its messages are costream's."""
    llm_server.enqueue(error(400, {"error": {"message": "bad"}}))
    server = start_server(env=llm_env(llm_server))
    conv = await create_conversation(server.url)
    result = await drive(agui_client, "run", server.url, conv["id"], conv["writeToken"], "Hi")

    assert result["printed"] == [] and result["invalid"] == []
    events = result["writer"]["events"]
    assert_valid_agui(events)
    assert [e["type"] for e in events] == [
        "RUN_STARTED",
        "STEP_STARTED",
        "STEP_FINISHED",
        "RUN_ERROR",
    ]
    assert events[-1]["code"] == "bad_request"
    assert result["writer"]["messages"] == await costream_snapshot(server, conv)
