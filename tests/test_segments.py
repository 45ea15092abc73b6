"""StepSegments on recorded chunk shapes, as LiteLLM objects and as dicts; DeltaMerger."""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from litellm.types.utils import ModelResponseStream

from costream.protocol import (
    Event,
    ReasoningMessageContent,
    StepStarted,
    StepStartedMeta,
    TextMessageContent,
    TextMessageEnd,
    TextMessageStart,
    ToolCallArgs,
)
from costream.segments import DeltaMerger, StepSegments, merge_key

# Building LiteLLM's types makes pydantic warn about ReadOnly TypedDict items;
# pyproject turns warnings into errors.
pytestmark = pytest.mark.filterwarnings("ignore:.*the .ReadOnly. qualifier:UserWarning")

Chunk = dict[str, Any]
Make = Callable[[Chunk], object]


def chunk(
    delta: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
) -> Chunk:
    """An OpenAI-style stream chunk with one choice carrying ``delta``."""
    body: Chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def tool(
    index: int | None = 0,
    id: str | None = None,
    name: str | None = None,
    arguments: str | None = None,
) -> dict[str, Any]:
    """One ``delta.tool_calls`` fragment; None fields are left out, as providers do."""
    function = {k: v for k, v in (("name", name), ("arguments", arguments)) if v is not None}
    fragment: dict[str, Any] = {"function": function}
    if index is not None:
        fragment["index"] = index
    if id is not None:
        fragment |= {"id": id, "type": "function"}
    return fragment


def calls(*fragments: dict[str, Any]) -> Chunk:
    """A chunk whose delta carries these tool-call fragments."""
    return chunk({"tool_calls": list(fragments)})


USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


@pytest.fixture(params=["dict", "litellm"])
def make(request: pytest.FixtureRequest) -> Make:
    """Chunks as plain dicts, or as LiteLLM builds ``ModelResponseStream`` from them."""
    if request.param == "dict":
        return lambda body: copy.deepcopy(body)
    return lambda body: ModelResponseStream(**copy.deepcopy(body))


def brief(event: Event) -> tuple[Any, ...]:
    """An event as (type, fields...) without seq and timestamp."""
    fields = msgspec.structs.asdict(event)
    del fields["seq"], fields["timestamp"]
    return (type(event).__struct_config__.tag, *fields.values())


def segments() -> StepSegments:
    """StepSegments with ids m0 (the step's message), m1, m2, ..."""
    counter = itertools.count()
    return StepSegments(lambda: f"m{next(counter)}")


def run(make: Make, bodies: list[Chunk]) -> list[tuple[Any, ...]]:
    """Every event of one step fed these chunks, then closed."""
    step = segments()
    events: list[Event] = []
    for body in bodies:
        events += step.feed(make(body))
    events += step.close()
    return [brief(event) for event in events]


def reasoning(message_id: str, *deltas: str) -> list[tuple[Any, ...]]:
    """The events of one whole reasoning segment."""
    return [
        ("REASONING_START", message_id),
        ("REASONING_MESSAGE_START", message_id, "reasoning"),
        *[("REASONING_MESSAGE_CONTENT", message_id, d) for d in deltas],
        ("REASONING_MESSAGE_END", message_id),
        ("REASONING_END", message_id),
    ]


def text(message_id: str, *deltas: str) -> list[tuple[Any, ...]]:
    """The events of one whole text segment."""
    return [
        ("TEXT_MESSAGE_START", message_id, "assistant"),
        *[("TEXT_MESSAGE_CONTENT", message_id, d) for d in deltas],
        ("TEXT_MESSAGE_END", message_id),
    ]


# ---- StepSegments ------------------------------------------------------------------------


def test_reasoning_content_deltas_make_one_reasoning_segment(make: Make) -> None:
    """reasoning_content deltas become one reasoning segment with its own id."""
    events = run(
        make,
        [
            chunk({"role": "assistant", "reasoning_content": "Let me "}),
            chunk({"reasoning_content": "think."}),
            chunk({}, finish_reason="stop"),
        ],
    )

    assert events == reasoning("m1", "Let me ", "think.")


@pytest.mark.parametrize("signature_reasoning", ["The user asks.", None])
def test_anthropic_signature_chunk_repeating_the_thinking_is_not_emitted_again(
    make: Make, signature_reasoning: str | None
) -> None:
    """thinking_blocks beside reasoning_content, and a closing signature chunk that repeats
    the whole thinking text, give the thinking once."""
    events = run(
        make,
        [
            chunk(
                {
                    "reasoning_content": "The user ",
                    "thinking_blocks": [
                        {"type": "thinking", "thinking": "The user ", "signature": None}
                    ],
                }
            ),
            chunk(
                {
                    "reasoning_content": "asks.",
                    "thinking_blocks": [
                        {"type": "thinking", "thinking": "asks.", "signature": None}
                    ],
                }
            ),
            chunk(
                {
                    "reasoning_content": signature_reasoning,
                    "thinking_blocks": [
                        {"type": "thinking", "thinking": "The user asks.", "signature": "EqQB"}
                    ],
                }
            ),
            chunk({"content": "Hi."}),
        ],
    )

    assert events == reasoning("m1", "The user ", "asks.") + text("m0", "Hi.")


def test_thinking_blocks_alone_are_read_and_the_signature_repeat_skipped(make: Make) -> None:
    """With only thinking_blocks (no reasoning_content), their text streams, once."""
    events = run(
        make,
        [
            chunk(
                {"thinking_blocks": [{"type": "thinking", "thinking": "Plan: ", "signature": None}]}
            ),
            chunk(
                {"thinking_blocks": [{"type": "thinking", "thinking": "reply.", "signature": None}]}
            ),
            chunk(
                {
                    "thinking_blocks": [
                        {"type": "thinking", "thinking": "Plan: reply.", "signature": "s"}
                    ]
                }
            ),
            chunk({"content": "Done"}),
        ],
    )

    assert events == reasoning("m1", "Plan: ", "reply.") + text("m0", "Done")


def test_signature_chunk_with_empty_thinking_adds_nothing(make: Make) -> None:
    """LiteLLM's own Anthropic shape: the signature chunk has thinking "" and no event."""
    events = run(
        make,
        [
            chunk(
                {
                    "reasoning_content": "Hmm.",
                    "thinking_blocks": [{"type": "thinking", "thinking": "Hmm."}],
                }
            ),
            chunk(
                {
                    "reasoning_content": "",
                    "thinking_blocks": [{"type": "thinking", "thinking": "", "signature": "s"}],
                }
            ),
        ],
    )

    assert events == reasoning("m1", "Hmm.")


def test_content_deltas_make_the_steps_text_message(make: Make) -> None:
    """Content deltas form one text segment whose id is the step's message id."""
    events = run(
        make, [chunk({"role": "assistant", "content": "Hello"}), chunk({"content": " world"})]
    )

    assert events == text("m0", "Hello", " world")


def test_streamed_tool_call_starts_with_its_name_then_streams_arguments(make: Make) -> None:
    """index/id/name first, then argument fragments; the end comes when the step closes."""
    events = run(
        make,
        [
            calls(tool(0, "call_a", "write_file", "")),
            calls(tool(0, arguments='{"path":')),
            calls(tool(0, arguments=' "a.txt"}')),
            chunk({}, finish_reason="tool_calls"),
        ],
    )

    assert events == [
        ("TOOL_CALL_START", "call_a", "write_file", "m0"),
        ("TOOL_CALL_ARGS", "call_a", '{"path":'),
        ("TOOL_CALL_ARGS", "call_a", ' "a.txt"}'),
        ("TOOL_CALL_END", "call_a"),
    ]


def test_whole_tool_call_in_one_delta(make: Make) -> None:
    """A call given whole (name and arguments in one fragment) starts and streams at once."""
    events = run(make, [calls(tool(0, "call_b", "read_file", '{"path": "a.txt"}'))])

    assert events == [
        ("TOOL_CALL_START", "call_b", "read_file", "m0"),
        ("TOOL_CALL_ARGS", "call_b", '{"path": "a.txt"}'),
        ("TOOL_CALL_END", "call_b"),
    ]


def test_several_tool_calls_stay_open_and_end_in_start_order(make: Make) -> None:
    """Interleaved fragments of two calls go to their own call; both end at close, in order."""
    events = run(
        make,
        [
            calls(tool(0, "call_a", "read_file", "")),
            calls(tool(1, "call_b", "list_files", "")),
            calls(tool(0, arguments='{"path": ')),
            calls(tool(1, arguments="{}")),
            calls(tool(0, arguments='"a.txt"}')),
        ],
    )

    assert events == [
        ("TOOL_CALL_START", "call_a", "read_file", "m0"),
        ("TOOL_CALL_START", "call_b", "list_files", "m0"),
        ("TOOL_CALL_ARGS", "call_a", '{"path": '),
        ("TOOL_CALL_ARGS", "call_b", "{}"),
        ("TOOL_CALL_ARGS", "call_a", '"a.txt"}'),
        ("TOOL_CALL_END", "call_a"),
        ("TOOL_CALL_END", "call_b"),
    ]


def test_two_tool_calls_in_one_delta(make: Make) -> None:
    """Two whole calls in one delta start in their order."""
    events = run(
        make, [calls(tool(0, "call_a", "list_files", "{}"), tool(1, "call_b", "list_files", "{}"))]
    )

    assert events == [
        ("TOOL_CALL_START", "call_a", "list_files", "m0"),
        ("TOOL_CALL_ARGS", "call_a", "{}"),
        ("TOOL_CALL_START", "call_b", "list_files", "m0"),
        ("TOOL_CALL_ARGS", "call_b", "{}"),
        ("TOOL_CALL_END", "call_a"),
        ("TOOL_CALL_END", "call_b"),
    ]


def test_fragments_without_index_continue_the_latest_call(make: Make) -> None:
    """With no index (some providers), a fragment without id continues the latest call and
    a new id starts a new one."""
    events = run(
        make,
        [
            calls(tool(None, "call_a", "read_file", "")),
            calls(tool(None, arguments='{"path": "a"}')),
            calls(tool(None, "call_b", "delete_file", "")),
            calls(tool(None, arguments='{"path": "b"}')),
        ],
    )

    assert events == [
        ("TOOL_CALL_START", "call_a", "read_file", "m0"),
        ("TOOL_CALL_ARGS", "call_a", '{"path": "a"}'),
        ("TOOL_CALL_START", "call_b", "delete_file", "m0"),
        ("TOOL_CALL_ARGS", "call_b", '{"path": "b"}'),
        ("TOOL_CALL_END", "call_a"),
        ("TOOL_CALL_END", "call_b"),
    ]


def test_new_id_on_a_used_index_is_a_new_call(make: Make) -> None:
    """A fragment with a new id on index 0 starts a second call; later fragments go to it."""
    events = run(
        make,
        [
            calls(tool(0, "call_a", "list_files", "{}")),
            calls(tool(0, "call_b", "read_file", "")),
            calls(tool(0, arguments='{"path": "x"}')),
        ],
    )

    assert events == [
        ("TOOL_CALL_START", "call_a", "list_files", "m0"),
        ("TOOL_CALL_ARGS", "call_a", "{}"),
        ("TOOL_CALL_START", "call_b", "read_file", "m0"),
        ("TOOL_CALL_ARGS", "call_b", '{"path": "x"}'),
        ("TOOL_CALL_END", "call_a"),
        ("TOOL_CALL_END", "call_b"),
    ]


def test_fragment_without_id_gets_a_minted_id(make: Make) -> None:
    """A call whose provider sends no id gets one from the id source."""
    events = run(make, [calls(tool(0, None, "list_files", "{}"))])

    assert events == [
        ("TOOL_CALL_START", "m1", "list_files", "m0"),
        ("TOOL_CALL_ARGS", "m1", "{}"),
        ("TOOL_CALL_END", "m1"),
    ]


def test_arguments_before_the_name_follow_the_start(make: Make) -> None:
    """Arguments that arrive before the call's name go out, joined, right after its start."""
    events = run(
        make,
        [calls(tool(0, "call_a", None, '{"path": ')), calls(tool(0, None, "read_file", '"a"}'))],
    )

    assert events == [
        ("TOOL_CALL_START", "call_a", "read_file", "m0"),
        ("TOOL_CALL_ARGS", "call_a", '{"path": "a"}'),
        ("TOOL_CALL_END", "call_a"),
    ]


def test_empty_strings_and_none_never_make_an_event(make: Make) -> None:
    """Empty or missing content, reasoning and tool fragments give no event at all."""
    step = segments()
    bodies = [
        chunk({"role": "assistant"}),
        chunk({"content": ""}),
        chunk({"content": None, "reasoning_content": None}),
        chunk({"reasoning_content": ""}),
        chunk({"tool_calls": None}),
        chunk({"tool_calls": []}),
        calls(tool(0, arguments="")),
        chunk({}, finish_reason="stop"),
    ]

    assert [step.feed(make(body)) for body in bodies] == [[]] * len(bodies)
    assert step.close() == []


def test_usage_chunks_make_no_event(make: Make) -> None:
    """The usage chunk, with choices [] or with one empty choice, gives no event."""
    step = segments()
    no_choices = chunk(usage=USAGE) | {"choices": []}
    empty_choice = chunk({}, finish_reason="stop", usage=USAGE)

    assert step.feed(make(no_choices)) == []
    assert step.feed(make(empty_choice)) == []


def test_text_after_a_tool_call_ends_the_open_tool_calls_first(make: Make) -> None:
    """Text after a call ends the call first; a late fragment for it is dropped; a new call
    after the text ends the text and starts."""
    events = run(
        make,
        [
            calls(tool(0, "call_a", "list_files", "")),
            chunk({"content": "Listing."}),
            calls(tool(0, arguments="{}")),
            calls(tool(1, "call_c", "read_file", '{"path": "a"}')),
        ],
    )

    assert events == [
        ("TOOL_CALL_START", "call_a", "list_files", "m0"),
        ("TOOL_CALL_ARGS", "call_a", "{}"),
        ("TOOL_CALL_END", "call_a"),
        *text("m0", "Listing."),
        ("TOOL_CALL_START", "call_c", "read_file", "m0"),
        ("TOOL_CALL_ARGS", "call_c", '{"path": "a"}'),
        ("TOOL_CALL_END", "call_c"),
    ]


def test_reasoning_and_text_never_interleave(make: Make) -> None:
    """Each reasoning or text segment ends before the next starts, each with its own id."""
    events = run(
        make,
        [
            chunk({"reasoning_content": "a"}),
            chunk({"content": "b"}),
            chunk({"reasoning_content": "c"}),
            chunk({"content": "d"}),
        ],
    )

    assert events == reasoning("m1", "a") + text("m0", "b") + reasoning("m2", "c") + text("m3", "d")


def test_reasoning_and_content_in_one_delta_end_the_reasoning_first(make: Make) -> None:
    """A delta with both reasoning and content gives the reasoning segment, then the text."""
    events = run(make, [chunk({"reasoning_content": "r", "content": "t"})])

    assert events == reasoning("m1", "r") + text("m0", "t")


def test_tool_call_without_arguments_gets_one_empty_object(make: Make) -> None:
    """A call that never streams arguments gets TOOL_CALL_ARGS "{}" before its end."""
    step = segments()
    events = step.feed(make(calls(tool(0, "call_a", "list_files", ""))))
    events += step.close()

    assert [brief(e) for e in events] == [
        ("TOOL_CALL_START", "call_a", "list_files", "m0"),
        ("TOOL_CALL_ARGS", "call_a", "{}"),
        ("TOOL_CALL_END", "call_a"),
    ]
    assert [(c.id, c.function.name, c.function.arguments) for c in step.output().tool_calls] == [
        ("call_a", "list_files", "{}")
    ]


def test_close_is_idempotent(make: Make) -> None:
    """A second close ends nothing more."""
    step = segments()
    step.feed(make(chunk({"content": "x"})))
    step.close()

    assert step.close() == []


def test_output_has_reasoning_content_and_tool_calls(make: Make) -> None:
    """output() gives the step's reasoning segments, its text and its named tool calls."""
    step = segments()
    for body in [
        chunk({"reasoning_content": "why"}),
        chunk({"content": "Hello "}),
        chunk({"content": "there"}),
        calls(tool(0, "call_a", "read_file", '{"path": "a"}')),
        calls(tool(1, None, None, "orphan")),
    ]:
        step.feed(make(body))
    output = step.output()

    assert (output.message_id, output.reasoning, output.content) == (
        "m0",
        [("m1", "why")],
        "Hello there",
    )
    assert [(c.id, c.function.name, c.function.arguments) for c in output.tool_calls] == [
        ("call_a", "read_file", '{"path": "a"}')
    ]


def test_feed_text_is_content() -> None:
    """feed_text streams a plain string as the step's text; an empty one gives nothing."""
    step = segments()
    events = step.feed_text("Hi") + step.feed_text("") + step.close()

    assert [brief(e) for e in events] == text("m0", "Hi")


# ---- DeltaMerger -------------------------------------------------------------------------


class Sink:
    """Records what the merger hands on, one list per call."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[Any, ...]]] = []
        self.received = asyncio.Event()

    async def __call__(self, events: list[Event]) -> None:
        self.batches.append([brief(e) for e in events])
        self.received.set()


def content(message_id: str, delta: str) -> TextMessageContent:
    """A text delta."""
    return TextMessageContent(message_id=message_id, delta=delta)


LONG_MS = 3_600_000  # a window that never expires within a test


async def test_zero_window_passes_every_event_through() -> None:
    """flush_ms=0: each push reaches the sink as it is, nothing merged."""
    sink = Sink()
    merger = DeltaMerger(sink, 0)
    await merger.push([content("t", "a")])
    await merger.push([content("t", "b"), content("t", "c")])
    await merger.aclose()

    assert sink.batches == [
        [("TEXT_MESSAGE_CONTENT", "t", "a")],
        [("TEXT_MESSAGE_CONTENT", "t", "b"), ("TEXT_MESSAGE_CONTENT", "t", "c")],
    ]


async def test_first_delta_of_a_segment_goes_out_at_once() -> None:
    """The first delta reaches the sink within push, before any window passes."""
    sink = Sink()
    merger = DeltaMerger(sink, LONG_MS)
    await merger.push([TextMessageStart(message_id="t"), content("t", "first")])

    assert sink.batches == [
        [("TEXT_MESSAGE_START", "t", "assistant"), ("TEXT_MESSAGE_CONTENT", "t", "first")]
    ]
    await merger.aclose()


async def test_later_deltas_of_a_segment_merge_until_flushed() -> None:
    """Deltas after the first wait and go out as one event on flush."""
    sink = Sink()
    merger = DeltaMerger(sink, LONG_MS)
    for delta in ["a", "b", "c", "d"]:
        await merger.push([content("t", delta)])
    held = list(sink.batches)
    await merger.flush()

    assert held == [[("TEXT_MESSAGE_CONTENT", "t", "a")]]
    assert sink.batches == [
        [("TEXT_MESSAGE_CONTENT", "t", "a")],
        [("TEXT_MESSAGE_CONTENT", "t", "bcd")],
    ]
    await merger.aclose()


async def test_pending_delta_is_flushed_before_any_other_event() -> None:
    """A segment end, or another segment's delta, sends the pending merge first."""
    sink = Sink()
    merger = DeltaMerger(sink, LONG_MS)
    await merger.push([content("t", "a"), content("t", "b"), content("t", "c")])
    await merger.push([TextMessageEnd(message_id="t")])
    await merger.push([ToolCallArgs(tool_call_id="c", delta="{")])
    await merger.push([ToolCallArgs(tool_call_id="c", delta="}")])
    await merger.push([ReasoningMessageContent(message_id="r", delta="x")])
    await merger.aclose()

    assert sink.batches == [
        [("TEXT_MESSAGE_CONTENT", "t", "a")],
        [("TEXT_MESSAGE_CONTENT", "t", "bc"), ("TEXT_MESSAGE_END", "t")],
        [("TOOL_CALL_ARGS", "c", "{")],
        [("TOOL_CALL_ARGS", "c", "}"), ("REASONING_MESSAGE_CONTENT", "r", "x")],
    ]


async def test_aclose_flushes_what_is_pending() -> None:
    """aclose sends the pending merge and stops the timer."""
    sink = Sink()
    merger = DeltaMerger(sink, LONG_MS)
    await merger.push([content("t", "a"), content("t", "b")])
    await merger.aclose()

    assert sink.batches == [
        [("TEXT_MESSAGE_CONTENT", "t", "a")],
        [("TEXT_MESSAGE_CONTENT", "t", "b")],
    ]


async def test_window_flushes_the_merge_by_itself() -> None:
    """With a real small window, the merged delta goes out without an explicit flush."""
    sink = Sink()
    merger = DeltaMerger(sink, 20)
    await merger.push([content("t", "a"), content("t", "b"), content("t", "c")])
    sink.received.clear()
    await asyncio.wait_for(sink.received.wait(), timeout=10)

    assert sink.batches == [
        [("TEXT_MESSAGE_CONTENT", "t", "a")],
        [("TEXT_MESSAGE_CONTENT", "t", "bc")],
    ]
    await merger.aclose()
    assert len(sink.batches) == 2


async def test_merging_never_changes_the_text_or_the_order() -> None:
    """Under a small window with pushes spread over time, the concatenated text of each
    segment and the order of the other events are exactly what was pushed."""
    sink = Sink()
    merger = DeltaMerger(sink, 5)
    words = [f"w{n} " for n in range(60)]
    pushed: list[Event] = [
        StepStarted(step_name="llm-1", metadata=StepStartedMeta(model="m")),
        TextMessageStart(message_id="t"),
    ]
    await merger.push(list(pushed))
    for n, word in enumerate(words):
        event = content("t", word)
        pushed.append(event)
        await merger.push([event])
        if n % 7 == 0:
            await asyncio.sleep(0.004)
    pushed.append(TextMessageEnd(message_id="t"))
    await merger.push([pushed[-1]])
    await merger.aclose()
    out = [event for batch in sink.batches for event in batch]

    assert "".join(e[2] for e in out if e[0] == "TEXT_MESSAGE_CONTENT") == "".join(words)
    assert [e[0] for e in out if e[0] != "TEXT_MESSAGE_CONTENT"] == [
        "STEP_STARTED",
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_END",
    ]
    assert [brief(e)[2] for e in pushed if isinstance(e, TextMessageContent)] == words


async def test_empty_push_sends_nothing() -> None:
    """Pushing no events never calls the sink."""
    sink = Sink()
    merger = DeltaMerger(sink, LONG_MS)
    await merger.push([])
    await merger.aclose()

    assert sink.batches == []


def test_deltas_merge_only_within_one_segment_of_one_kind() -> None:
    """The merge key (used by the merger and the publisher's queue) is the segment: a
    reasoning and a text delta that share an id are two segments, as are two ids."""
    assert merge_key(content("t", "a")) == merge_key(content("t", "b"))
    assert merge_key(content("t", "a")) != merge_key(content("u", "a"))
    assert merge_key(content("t", "a")) != merge_key(
        ReasoningMessageContent(message_id="t", delta="a")
    )
    assert merge_key(ToolCallArgs(tool_call_id="c", delta="{")) == merge_key(
        ToolCallArgs(tool_call_id="c", delta="}")
    )
