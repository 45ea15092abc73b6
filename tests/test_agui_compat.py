"""A real log produced by the server validates against AG-UI's own event models."""

from __future__ import annotations

from typing import Any

from ag_ui.core import Event as AguiEvent
from pydantic import TypeAdapter

from tests.support.servers import ServerProcess
from tests.support.ws import create_conversation, open_session

STORY = (
    "Tell me a long story about LLM streaming, write it to a file, "
    "make sure it has multiple paragraphs."
)
agui_event: TypeAdapter[Any] = TypeAdapter(AguiEvent)


async def test_every_logged_event_and_snapshot_is_valid_agui(server: ServerProcess) -> None:
    """Each event of a run with reasoning, text and tool calls, and the snapshot, parse as AG-UI."""
    conv = await create_conversation(server.url)
    url = server.ws_url(conv["id"])
    writer = await open_session(url, conv["id"], conv["writeToken"])
    await writer.send({"type": "message", "content": STORY})
    await writer.until_run_ends()
    events = writer.events()
    types = set()
    for event in events:
        parsed = agui_event.validate_python(event)
        types.add(parsed.type.value)
        # seq and timestamp ride along as extras; nothing we send is dropped silently.
        assert parsed.model_extra.get("seq") == event["seq"]
        assert parsed.timestamp == event["timestamp"]
    assert {
        "RUN_STARTED",
        "STEP_STARTED",
        "REASONING_START",
        "REASONING_MESSAGE_START",
        "REASONING_MESSAGE_CONTENT",
        "TEXT_MESSAGE_CONTENT",
        "TOOL_CALL_START",
        "TOOL_CALL_ARGS",
        "TOOL_CALL_END",
        "TOOL_CALL_RESULT",
        "STEP_FINISHED",
        "RUN_FINISHED",
    } <= types

    stale = await open_session(url, conv["id"], conv["viewToken"], epoch="stale", last_seq=1)
    snapshot = await stale.next()
    parsed = agui_event.validate_python(snapshot)
    assert parsed.type.value == "MESSAGES_SNAPSHOT"
    roles = [type(m).__name__ for m in parsed.messages]
    assert roles[:1] == ["UserMessage"]
    assert {"ReasoningMessage", "AssistantMessage", "ToolMessage"} <= set(roles)
    await writer.close()
    await stale.close()
