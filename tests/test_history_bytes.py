"""What one run may cost in bytes (issue 15): the history sent to the LLM stays within
``max_history_bytes`` (whole turns dropped oldest first, huge fields cut with a marker),
and a run whose logged events would pass ``max_run_bytes`` ends with ``RUN_ERROR``
``too_large`` (runner) or is refused 413 ``run_too_large`` (ingest)."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from costream.agent.llm import LLMMessage, bound_history
from costream.broker.memory import MemoryBroker
from tests.support.llm_server import LLMServer, content, finish, stream, text, tool_call
from tests.support.servers import ServerProcess
from tests.support.ws import ahttp, assert_well_formed, create_conversation
from tests.test_event_cap import _ingest_run, _log
from tests.test_runner import Local, StartServer, llm_env, local_settings


def _size(messages: list[LLMMessage]) -> int:
    return sum(len(msgspec.json.encode(m)) + 1 for m in messages)


def _turn(n: int, filler: int = 400) -> list[LLMMessage]:
    """A user message, a tool call and its result, and the answer: about 4 x filler bytes."""
    call = {
        "id": f"c{n}",
        "type": "function",
        "function": {"name": "list_files", "arguments": "{}"},
    }
    return [
        {"role": "user", "content": f"question {n} " + "q" * filler},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": f"c{n}", "content": "r" * filler},
        {"role": "assistant", "content": f"answer {n} " + "a" * filler},
    ]


def _calls_answered(messages: list[LLMMessage]) -> bool:
    """Every tool call has its result right after it, and every result its call."""
    pending: set[str] = set()
    for message in messages:
        if message["role"] == "tool":
            if message["tool_call_id"] not in pending:
                return False
            pending.discard(str(message["tool_call_id"]))
            continue
        if pending:
            return False
        for call in message.get("tool_calls") or ():  # type: ignore[attr-defined]
            pending.add(call["id"])
    return not pending


def test_the_oldest_whole_turns_go_first_and_the_system_prompt_stays() -> None:
    """Ten turns of ~1.7 KB within 6 KB: the system prompt and the latest turns stay,
    whole, in order; no tool call is parted from its result."""
    history = [m for n in range(10) for m in _turn(n)]
    messages: list[LLMMessage] = [{"role": "system", "content": "be brief"}, *history]
    bounded = bound_history(messages, 6000)
    assert _size(bounded) <= 6000
    assert bounded[0] == {"role": "system", "content": "be brief"}
    assert bounded[1:] == history[-len(bounded) + 1 :]  # a suffix of whole turns
    assert bounded[1]["role"] == "user" and (len(bounded) - 1) % 4 == 0
    assert str(bounded[-4]["content"]).startswith("question 9 ")
    assert _calls_answered(bounded[1:])
    assert bound_history(messages, 10**6) == messages  # within the bound: unchanged


def test_huge_arguments_and_results_are_cut_with_a_marker_and_stay_json() -> None:
    """A 5 MB write_file's arguments and a 5 MB tool result in the latest turn: both cut
    with a marker, the arguments still a JSON object, the whole within the bound."""
    big_args = json.dumps({"path": "a.txt", "content": "x" * 5_000_000})
    call = {
        "id": "w",
        "type": "function",
        "function": {"name": "write_file", "arguments": big_args},
    }
    messages: list[LLMMessage] = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "write"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "w", "content": "y" * 5_000_000},
    ]
    bounded = bound_history(messages, 64 * 1024)
    assert _size(bounded) <= 64 * 1024
    assert [m["role"] for m in bounded] == ["system", "user", "assistant", "tool"]
    arguments = bounded[2]["tool_calls"][0]["function"]["arguments"]  # type: ignore[index]
    assert json.loads(arguments)["cut"].endswith(f" of {len(big_args):,} characters kept]")
    assert str(bounded[3]["content"]).endswith(" of 5,000,000 characters kept]")


def test_in_a_long_last_turn_the_oldest_replies_go_but_never_the_users_message() -> None:
    """One turn of many tool rounds over the bound: the user's message stays, the oldest
    rounds go (each call with its result), the latest stays."""
    rounds = [m for n in range(20) for m in _turn(n)[1:3]]
    messages: list[LLMMessage] = [{"role": "user", "content": "do it all"}, *rounds]
    bounded = bound_history(messages, 5000)
    assert _size(bounded) <= 5000
    assert bounded[0] == messages[0] and bounded[-2:] == rounds[-2:]
    assert _calls_answered(bounded[1:])


async def test_a_50_mb_class_write_file_is_not_resent_to_the_llm(
    llm_server: LLMServer, start_server: StartServer
) -> None:
    """The model sends a 3 MB write_file (refused by the workspace's limit): the next LLM
    call is sent at most max_history_bytes of history, with the call's arguments cut."""
    arguments = json.dumps({"path": "big.txt", "content": "z" * 3_000_000})
    llm_server.enqueue(
        stream(tool_call(0, id="w", name="write_file", arguments=arguments), finish("tool_calls")),
        text("Too big, sorry."),
    )
    env = llm_env(llm_server, COSTREAM_MAX_HISTORY_BYTES="65536")
    server = start_server(env=env)
    conversation = await create_conversation(server.url)
    status, answer = await ahttp(
        "POST",
        f"{server.url}/api/conversations/{conversation['id']}/messages",
        body={"content": "write a big file"},
        token=conversation["writeToken"],
    )
    assert status == 202, answer
    events = await _until_run_ends(server, conversation)
    assert events[-1]["type"] == "RUN_FINISHED"
    second = llm_server.requests[1].body["messages"]
    assert _size(second) <= 65536
    sent_args = second[-2]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(sent_args)["cut"].endswith(f" of {len(arguments):,} characters kept]")
    assert second[-1]["content"].startswith("Error: content is 3,000,0")


async def _until_run_ends(server: ServerProcess, conversation: dict[str, Any]) -> list[Any]:
    from costream.client import connect
    from costream.protocol import RunError, RunFinished

    events: list[Any] = []
    async with connect(server.ws_url(conversation["id"]), conversation["viewToken"]) as watcher:
        while True:
            item, frame = await watcher.next_with_text()
            if frame.startswith('{"seq":'):
                events.append(json.loads(frame))
            if isinstance(item, RunFinished | RunError):
                return events


# ---- max_run_bytes ----------------------------------------------------------------------


async def test_a_run_past_max_run_bytes_ends_with_run_error_too_large(
    llm_server: LLMServer,
) -> None:
    """A model that streams more than the run may log: the run ends with RUN_ERROR
    too_large naming the limit, every segment the log shows open is closed, the log
    stays under the limit plus its ending, and the next message runs."""
    llm_server.enqueue(
        stream(*(content("w" * 1000) for _ in range(200)), finish("stop")), text("Back.")
    )
    broker = MemoryBroker(max_run_bytes=50_000)
    async with Local(local_settings(llm_server), broker=broker) as local:
        conversation_id = await local.conversation()
        await local.runs.start(conversation_id, "talk a lot")
        events = await local.until_run_ends()
        assert events[-1]["type"] == "RUN_ERROR" and events[-1]["code"] == "too_large"
        assert "50,000 bytes" in events[-1]["message"]
        assert_well_formed(events)
        assert sum(len(frame) for frame in local.frames) < 50_000 + 2_000
        assert await broker.active_run(conversation_id) is None
        await local.runs.start(conversation_id, "again")
        assert (await local.until_run_ends())[-1]["type"] == "RUN_FINISHED"


async def test_ingest_answers_413_run_too_large_and_the_run_can_still_finish(
    start_server: StartServer,
) -> None:
    """An ingest batch that would take the run past COSTREAM_MAX_RUN_BYTES: 413
    run_too_large naming the limit, nothing of it stored; finish is still accepted."""
    server = start_server(env={"COSTREAM_MAX_RUN_BYTES": "20000"})
    run, conversation, _ = await _ingest_run(server)
    token = conversation["writeToken"]
    start = {"type": "TEXT_MESSAGE_START", "messageId": "m1"}
    status, answer = await ahttp("POST", f"{run}/events", body=[start], token=token)
    assert status == 202, answer
    delta = {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "delta": "d" * 30_000}
    status, answer = await ahttp("POST", f"{run}/events", body=[delta], token=token)
    assert status == 413, answer
    assert answer["error"]["code"] == "run_too_large"
    assert "20,000 bytes" in answer["error"]["message"]
    status, answer = await ahttp(
        "POST",
        f"{run}/finish",
        body={"outcome": "error", "error": {"code": "too_large", "message": "too much"}},
        token=token,
    )
    assert status == 200, answer
    logged = await _log(server, conversation)
    assert [e["type"] for e in logged] == [
        "RUN_STARTED",
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_END",
        "RUN_ERROR",
    ]
    assert logged[-1]["code"] == "too_large"
