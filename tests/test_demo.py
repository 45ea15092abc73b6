"""The demo model through LiteLLM itself: chunk shapes and order, scenarios, segments."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from typing import Any

import litellm
import msgspec
import pytest
from litellm.types.utils import ModelResponseStream

from costream.agent import demo, demo_turns
from costream.agent.tools import TOOL_SPECS
from costream.protocol import Event
from costream.segments import StepSegments

# LiteLLM imports its GitHub Copilot module on the first call, and pydantic warns there
# about ReadOnly TypedDict items; pyproject turns warnings into errors.
pytestmark = pytest.mark.filterwarnings("ignore:.*the .ReadOnly. qualifier:UserWarning")

STORY_PROMPT = (
    "Tell me a long story about LLM streaming, write it to a file, make sure it has "
    "multiple paragraphs."
)
DELETE_PROMPT = (
    "Thank you. Please delete the streaming story file now that I've read it, then "
    "confirm the deletion."
)


@pytest.fixture(autouse=True)
def instant_demo() -> Iterator[None]:
    """The demo registered with no pace, as the tests' servers run it."""
    demo.register(0)
    yield
    demo.register(0)


async def stream(messages: list[dict[str, Any]]) -> list[ModelResponseStream]:
    """Every chunk the caller gets from ``litellm.acompletion(stream=True)``."""
    response = await litellm.acompletion(
        model="costream/demo",
        messages=messages,
        tools=TOOL_SPECS,
        stream=True,
        stream_options={"include_usage": True},
    )
    return [chunk async for chunk in response]


def kind(chunk: ModelResponseStream) -> str:
    """What one chunk carries: reasoning, content, tool_call, finish:<reason> or usage."""
    if not chunk.choices:
        return "usage" if chunk.usage is not None else "empty"
    choice = chunk.choices[0]
    delta = choice.delta
    if getattr(delta, "reasoning_content", None):
        return "reasoning"
    if delta.content:
        return "content"
    if delta.tool_calls:
        return "tool_call"
    return f"finish:{choice.finish_reason}"


def shape(chunks: list[ModelResponseStream]) -> list[str]:
    """The kinds of the chunks with consecutive repeats collapsed."""
    kinds: list[str] = []
    for chunk in chunks:
        if not kinds or kinds[-1] != kind(chunk):
            kinds.append(kind(chunk))
    return kinds


def joined(chunks: list[ModelResponseStream], field: str) -> str:
    """The concatenated ``delta.<field>`` of the chunks."""
    return "".join(
        getattr(chunk.choices[0].delta, field, None) or "" for chunk in chunks if chunk.choices
    )


def tool_fragments(chunks: list[ModelResponseStream]) -> list[Any]:
    """Every ``delta.tool_calls`` element, in order."""
    return [
        fragment
        for chunk in chunks
        if chunk.choices and chunk.choices[0].delta.tool_calls
        for fragment in chunk.choices[0].delta.tool_calls
    ]


def assistant_message(chunks: list[ModelResponseStream]) -> dict[str, Any]:
    """The history entry a runner records for this response."""
    built = litellm.stream_chunk_builder(chunks)
    assert isinstance(built, litellm.ModelResponse)
    message: dict[str, Any] = built.choices[0].message.model_dump(exclude_none=True)
    return message


async def story_turn() -> tuple[list[dict[str, Any]], list[ModelResponseStream]]:
    """The story prompt's conversation and its chunks."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": STORY_PROMPT}]
    return messages, await stream(messages)


async def test_story_request_streams_reasoning_then_content_then_write_file_then_usage() -> None:
    """The story prompt gives reasoning, content, a write_file call, finish, then usage."""
    _, chunks = await story_turn()

    assert all(isinstance(chunk, ModelResponseStream) for chunk in chunks)
    assert shape(chunks) == ["reasoning", "content", "tool_call", "finish:tool_calls", "usage"]
    assert joined(chunks, "content") == (
        "Here is a story about LLM streaming. I'm writing it to story.txt in the shared "
        "workspace now."
    )


async def test_write_file_call_streams_name_first_then_argument_fragments() -> None:
    """The first fragment names the call; the rest carry arguments only, on index 0."""
    _, chunks = await story_turn()
    first, *rest = tool_fragments(chunks)

    assert (first.index, first.function.name, first.function.arguments) == (0, "write_file", "")
    assert first.id.startswith("call_")
    assert len(rest) > 10
    assert {(f.index, f.id, f.function.name) for f in rest} == {(0, None, None)}
    assert all(f.function.arguments for f in rest)


async def test_write_file_arguments_parse_as_a_multi_paragraph_story() -> None:
    """The concatenated arguments are JSON: story.txt and a story of several paragraphs."""
    _, chunks = await story_turn()
    arguments = json.loads("".join(f.function.arguments for f in tool_fragments(chunks)))

    assert set(arguments) == {"path", "content"}
    assert arguments["path"] == "story.txt"
    paragraphs = arguments["content"].split("\n\n")
    assert len(paragraphs) == 5
    assert len(arguments["content"].split()) >= 300
    assert arguments["content"] == demo_turns.story(STORY_PROMPT)


async def test_usage_chunk_counts_a_token_per_four_characters() -> None:
    """Usage: completion and reasoning tokens are the streamed characters over four."""
    _, chunks = await story_turn()
    usage = chunks[-1].usage
    reasoning = joined(chunks, "reasoning_content")
    arguments = "".join(f.function.arguments for f in tool_fragments(chunks))
    reasoning_tokens = math.ceil(len(reasoning) / 4)
    completion_tokens = (
        reasoning_tokens
        + math.ceil(len(joined(chunks, "content")) / 4)
        + math.ceil(len(arguments) / 4)
    )

    assert usage is not None
    assert usage.completion_tokens == completion_tokens
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == reasoning_tokens
    assert usage.prompt_tokens > math.ceil(len(STORY_PROMPT) / 4)
    assert usage.total_tokens == usage.prompt_tokens + completion_tokens


async def test_write_file_result_gets_a_confirmation_with_path_and_size() -> None:
    """After the write_file result the model confirms the file and its size, then stops."""
    messages, chunks = await story_turn()
    call_id = tool_fragments(chunks)[0].id
    messages += [
        assistant_message(chunks),
        {"role": "tool", "tool_call_id": call_id, "content": "Wrote story.txt (2,071 bytes)."},
    ]

    confirmation = await stream(messages)

    assert shape(confirmation) == ["reasoning", "content", "finish:stop", "usage"]
    assert joined(confirmation, "content") == (
        "I wrote story.txt (2,071 bytes) to the shared workspace: a story about LLM "
        "streaming in several paragraphs. Open it from the files panel, or ask me to read "
        "it back or delete it."
    )


async def test_delete_request_deletes_the_written_file_then_confirms() -> None:
    """The two-prompt scenario: delete_file on the path written earlier, then a confirmation."""
    messages, chunks = await story_turn()
    write_id = tool_fragments(chunks)[0].id
    messages += [
        assistant_message(chunks),
        {"role": "tool", "tool_call_id": write_id, "content": "Wrote story.txt (2,071 bytes)."},
    ]
    messages += [assistant_message(await stream(messages))]
    messages += [{"role": "user", "content": DELETE_PROMPT}]

    deletion = await stream(messages)
    fragments = tool_fragments(deletion)
    messages += [
        assistant_message(deletion),
        {"role": "tool", "tool_call_id": fragments[0].id, "content": "Deleted story.txt."},
    ]
    confirmation = await stream(messages)

    assert shape(deletion) == ["reasoning", "tool_call", "finish:tool_calls", "usage"]
    assert fragments[0].function.name == "delete_file"
    assert json.loads("".join(f.function.arguments for f in fragments)) == {"path": "story.txt"}
    assert shape(confirmation) == ["reasoning", "content", "finish:stop", "usage"]
    assert joined(confirmation, "content") == (
        "Done: I deleted story.txt. It is no longer in the shared workspace."
    )


async def test_delete_request_with_nothing_written_answers_without_a_tool() -> None:
    """Asked to delete before writing anything, the model says so and calls no tool."""
    chunks = await stream([{"role": "user", "content": DELETE_PROMPT}])

    assert shape(chunks) == ["reasoning", "content", "finish:stop", "usage"]
    assert joined(chunks, "content").startswith("I haven't written a file in this conversation")


async def test_a_named_file_is_the_path_written() -> None:
    """A file name in the request becomes the write_file path."""
    chunks = await stream(
        [{"role": "user", "content": "Save a story to tales/stream.md as a file"}]
    )
    arguments = json.loads("".join(f.function.arguments for f in tool_fragments(chunks)))

    assert arguments["path"] == "tales/stream.md"


async def test_list_files_request_calls_list_files_with_empty_arguments() -> None:
    """'list files' calls list_files with {} and then shows the listing."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Please list files"}]
    chunks = await stream(messages)
    fragments = tool_fragments(chunks)
    messages += [
        assistant_message(chunks),
        {"role": "tool", "tool_call_id": fragments[0].id, "content": "story.txt (12 bytes)"},
    ]

    listing = await stream(messages)

    assert fragments[0].function.name == "list_files"
    assert "".join(f.function.arguments for f in fragments) == "{}"
    assert joined(listing, "content") == "The workspace holds:\n\nstory.txt (12 bytes)"


async def test_read_request_calls_read_file_on_the_named_path() -> None:
    """'read notes.txt' calls read_file on notes.txt."""
    chunks = await stream([{"role": "user", "content": "read notes.txt please"}])
    fragments = tool_fragments(chunks)

    assert fragments[0].function.name == "read_file"
    assert json.loads("".join(f.function.arguments for f in fragments)) == {"path": "notes.txt"}


async def test_anything_else_gets_thinking_and_the_help_text() -> None:
    """An unscripted message gets reasoning and the help text, with no tool call."""
    chunks = await stream([{"role": "user", "content": "What's the weather like?"}])

    assert shape(chunks) == ["reasoning", "content", "finish:stop", "usage"]
    assert joined(chunks, "content") == demo_turns.HELP


async def test_content_parts_are_read_as_text() -> None:
    """A user message given as OpenAI content parts is understood like a string."""
    parts = [{"type": "text", "text": STORY_PROMPT}]
    chunks = await stream([{"role": "user", "content": parts}])

    assert tool_fragments(chunks)[0].function.name == "write_file"


async def test_register_is_idempotent() -> None:
    """Registering twice leaves one costream entry in LiteLLM's provider map."""
    demo.register(0)
    demo.register(5)

    entries = [e for e in litellm.custom_provider_map if e["provider"] == "costream"]
    assert len(entries) == 1
    assert isinstance(entries[0]["custom_handler"], demo.DemoLLM)


async def test_demo_calls_cost_nothing() -> None:
    """LiteLLM prices the demo model at zero instead of failing to find it."""
    _, chunks = await story_turn()
    built = litellm.stream_chunk_builder(chunks)

    assert litellm.completion_cost(completion_response=built, model="costream/demo") == 0.0


async def test_cancelling_the_consumer_stops_the_stream_between_tokens() -> None:
    """With an hour per token, cancelling after the first chunk ends the call at once."""
    demo.register(3_600_000)
    received: list[ModelResponseStream] = []
    first = asyncio.Event()

    async def consume() -> None:
        async for chunk in await litellm.acompletion(
            model="costream/demo", messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            received.append(chunk)
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    assert [kind(chunk) for chunk in received] == ["reasoning"]


def brief(event: Event) -> tuple[Any, ...]:
    """An event as (type, fields...) without seq and timestamp."""
    fields = msgspec.structs.asdict(event)
    del fields["seq"], fields["timestamp"]
    return (type(event).__struct_config__.tag, *fields.values())


async def test_story_chunks_become_reasoning_text_and_tool_segments_in_order() -> None:
    """Fed to StepSegments, the story turn gives reasoning, then text, then one tool call."""
    ids = iter(["parent", "reasoning"])
    segments = StepSegments(lambda: next(ids))
    _, chunks = await story_turn()
    events: list[Event] = []
    for chunk in chunks:
        events += segments.feed(chunk)
    events += segments.close()
    call_id = tool_fragments(chunks)[0].id
    arguments = "".join(f.function.arguments for f in tool_fragments(chunks))

    collapsed: list[tuple[Any, ...]] = []
    for event in events:
        head = brief(event)[:2]
        if not collapsed or collapsed[-1] != head:
            collapsed.append(head)
    assert collapsed == [
        ("REASONING_START", "reasoning"),
        ("REASONING_MESSAGE_START", "reasoning"),
        ("REASONING_MESSAGE_CONTENT", "reasoning"),
        ("REASONING_MESSAGE_END", "reasoning"),
        ("REASONING_END", "reasoning"),
        ("TEXT_MESSAGE_START", "parent"),
        ("TEXT_MESSAGE_CONTENT", "parent"),
        ("TEXT_MESSAGE_END", "parent"),
        ("TOOL_CALL_START", call_id),
        ("TOOL_CALL_ARGS", call_id),
        ("TOOL_CALL_END", call_id),
    ]
    start = next(brief(e) for e in events if brief(e)[0] == "TOOL_CALL_START")
    assert start == ("TOOL_CALL_START", call_id, "write_file", "parent")
    deltas = {
        tag: "".join(brief(e)[2] for e in events if brief(e)[0] == tag)
        for tag in ("REASONING_MESSAGE_CONTENT", "TEXT_MESSAGE_CONTENT", "TOOL_CALL_ARGS")
    }
    assert deltas == {
        "REASONING_MESSAGE_CONTENT": joined(chunks, "reasoning_content"),
        "TEXT_MESSAGE_CONTENT": joined(chunks, "content"),
        "TOOL_CALL_ARGS": arguments,
    }
    output = segments.output()
    assert (output.content, [c.function.name for c in output.tool_calls]) == (
        joined(chunks, "content"),
        ["write_file"],
    )
