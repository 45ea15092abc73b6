"""The wire protocol of PROTOCOL.md: every frame as a msgspec Struct, one encoder, one decoder.

Logged events use AG-UI 1.0's names and camelCase fields. A producer encodes an event
*without* its ``seq``; the broker splices ``"seq":N`` into the front of the bytes when it
appends (:func:`with_seq`), so a frame is encoded once and the broker never parses JSON.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import UNSET, UnsetType

from costream.names import NAME_MAX_INPUT_CHARS

SUBPROTOCOL: Final = "costream.v1"

# Close codes (PROTOCOL.md, "Close codes").
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_TOO_BIG: Final = 1009
CLOSE_SERVER_ERROR: Final = 1011
CLOSE_OVERLOADED: Final = 1013
CLOSE_LOST_TAIL: Final = 4000
CLOSE_SLOW_CONSUMER: Final = 4008
CLOSE_BAD_FRAME: Final = 4400
CLOSE_BAD_TOKEN: Final = 4401
CLOSE_BAD_ORIGIN: Final = 4403
CLOSE_UNKNOWN_CONVERSATION: Final = 4404

# RUN_ERROR codes.
ErrorCode = Literal[
    "rate_limited",
    "auth",
    "timeout",
    "bad_request",
    "upstream",
    "producer_lost",
    "too_large",
    "internal",
]
# Codes of the `error` control frame.
RefusalCode = Literal[
    "run_active",
    "external_producer",
    "no_run",
    "forbidden",
    "too_large",
    "bad_request",
    "rate_limited",
]


def now_ms() -> int:
    """Milliseconds since 1970, the unit of every ``timestamp``."""
    return time.time_ns() // 1_000_000


class Frame(msgspec.Struct, tag_field="type", rename="camel", kw_only=True):
    """Base of every frame; ``type`` is the tag."""


class LoggedEvent(Frame, kw_only=True):
    """An event that goes into a conversation's log and gets a ``seq``."""

    seq: int | UnsetType = UNSET
    timestamp: int = msgspec.field(default_factory=now_ms)


# ---- payload shapes -------------------------------------------------------------------


class UserMessage(msgspec.Struct, rename="camel", kw_only=True):
    id: str
    content: str
    role: Literal["user"] = "user"
    # Who sent it: the sender's display name (AG-UI's optional ``name``), absent when the
    # sender gave none. Untrusted text, already cleaned by :func:`costream.names.clean_name`.
    name: str | UnsetType = UNSET


class RunAgentInput(msgspec.Struct, rename="camel", kw_only=True):
    thread_id: str
    run_id: str
    messages: list[UserMessage]


# What a producer reports is range-checked when decoded: a negative or absurd count, or a
# cost that is not finite, would poison the conversation's totals for good.
MAX_TOKENS: Final = 10**10  # per kind, per step or run
MAX_COST_USD: Final = 1_000_000.0  # per step or run
Tokens = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)]
CostUsd = Annotated[float, msgspec.Meta(ge=0, le=MAX_COST_USD)]


class Usage(msgspec.Struct, rename="camel", kw_only=True):
    """Token counts of a step or a run (each from 0 to :data:`MAX_TOKENS` when decoded)."""

    input_tokens: Tokens = 0
    output_tokens: Tokens = 0
    reasoning_tokens: Tokens = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
        )


class TokenUsage(msgspec.Struct, rename="camel", kw_only=True, omit_defaults=True):
    """AG-UI's ``TokenUsage``, the element of ``RUN_FINISHED.usage``."""

    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0


class StepStartedMeta(msgspec.Struct, rename="camel", kw_only=True):
    model: str
    attempt: int = 1


StepFinishReason = str  # the model's own (`stop`, `tool_calls`, ...) or retry/cancelled/error


class StepFinishedMeta(msgspec.Struct, rename="camel", kw_only=True):
    finish_reason: StepFinishReason
    usage: Usage = msgspec.field(default_factory=Usage)
    cost_usd: CostUsd = 0.0


class ToolResultMeta(msgspec.Struct, rename="camel", kw_only=True):
    is_error: bool = False


class RunOutcome(msgspec.Struct, rename="camel", kw_only=True):
    type: Literal["success", "cancelled"]


class RunFinishedMeta(msgspec.Struct, rename="camel", kw_only=True):
    cost_usd: float = 0.0
    total_cost_usd: float = 0.0


class FunctionCall(msgspec.Struct, kw_only=True):
    name: str
    arguments: str


class ToolCall(msgspec.Struct, kw_only=True):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class SnapshotMessage(msgspec.Struct, rename="camel", kw_only=True, omit_defaults=True):
    """An AG-UI message in ``MESSAGES_SNAPSHOT``: user, assistant, tool or reasoning."""

    id: str
    role: Literal["user", "assistant", "tool", "reasoning", "system"]
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    error: str | None = None
    name: str | None = None  # a user message's sender, as in RUN_STARTED


# ---- logged events --------------------------------------------------------------------


class RunStarted(LoggedEvent, tag="RUN_STARTED", kw_only=True):
    thread_id: str
    run_id: str
    input: RunAgentInput


class StepStarted(LoggedEvent, tag="STEP_STARTED", kw_only=True):
    step_name: str
    metadata: StepStartedMeta


class ReasoningStart(LoggedEvent, tag="REASONING_START", kw_only=True):
    message_id: str


class ReasoningMessageStart(LoggedEvent, tag="REASONING_MESSAGE_START", kw_only=True):
    message_id: str
    role: Literal["reasoning"] = "reasoning"


class ReasoningMessageContent(LoggedEvent, tag="REASONING_MESSAGE_CONTENT", kw_only=True):
    message_id: str
    delta: str


class ReasoningMessageEnd(LoggedEvent, tag="REASONING_MESSAGE_END", kw_only=True):
    message_id: str


class ReasoningEnd(LoggedEvent, tag="REASONING_END", kw_only=True):
    message_id: str


class TextMessageStart(LoggedEvent, tag="TEXT_MESSAGE_START", kw_only=True):
    message_id: str
    role: Literal["assistant"] = "assistant"


class TextMessageContent(LoggedEvent, tag="TEXT_MESSAGE_CONTENT", kw_only=True):
    message_id: str
    delta: str


class TextMessageEnd(LoggedEvent, tag="TEXT_MESSAGE_END", kw_only=True):
    message_id: str


class ToolCallStart(LoggedEvent, tag="TOOL_CALL_START", kw_only=True):
    tool_call_id: str
    tool_call_name: str
    parent_message_id: str


class ToolCallArgs(LoggedEvent, tag="TOOL_CALL_ARGS", kw_only=True):
    tool_call_id: str
    delta: str


class ToolCallEnd(LoggedEvent, tag="TOOL_CALL_END", kw_only=True):
    tool_call_id: str


class ToolCallResult(LoggedEvent, tag="TOOL_CALL_RESULT", kw_only=True):
    message_id: str
    tool_call_id: str
    content: str
    role: Literal["tool"] = "tool"
    metadata: ToolResultMeta = msgspec.field(default_factory=ToolResultMeta)


class StepFinished(LoggedEvent, tag="STEP_FINISHED", kw_only=True):
    step_name: str
    metadata: StepFinishedMeta


class RunFinished(LoggedEvent, tag="RUN_FINISHED", kw_only=True):
    thread_id: str
    run_id: str
    outcome: RunOutcome
    usage: list[TokenUsage]
    metadata: RunFinishedMeta


class RunError(LoggedEvent, tag="RUN_ERROR", kw_only=True):
    message: str
    code: ErrorCode


class MessagesSnapshot(LoggedEvent, tag="MESSAGES_SNAPSHOT", kw_only=True):
    messages: list[SnapshotMessage]


class Custom(LoggedEvent, tag="CUSTOM", kw_only=True):
    name: str
    value: dict[str, Any]


Event = (
    RunStarted
    | StepStarted
    | ReasoningStart
    | ReasoningMessageStart
    | ReasoningMessageContent
    | ReasoningMessageEnd
    | ReasoningEnd
    | TextMessageStart
    | TextMessageContent
    | TextMessageEnd
    | ToolCallStart
    | ToolCallArgs
    | ToolCallEnd
    | ToolCallResult
    | StepFinished
    | RunFinished
    | RunError
    | MessagesSnapshot
    | Custom
)

# ---- control frames -------------------------------------------------------------------

PRESENCE_MAX_PEOPLE: Final = 50


class Person(msgspec.Struct, rename="camel", kw_only=True, omit_defaults=True):
    """One viewer in ``presence`` and ``welcome``: its session's id, role, when it joined
    (ms since 1970), the colour the server gave it, and its display name if it gave one."""

    id: str
    role: Literal["viewer", "writer"]
    since: int
    color: str
    name: str | None = None


class Hello(Frame, tag="hello", kw_only=True):
    conversation_id: str
    token: str = ""  # missing: rejected as a wrong token (4401), not as a bad frame
    last_seq: Annotated[int, msgspec.Meta(ge=0)] = 0
    epoch: str | None = None
    # The display name the viewer chose; cut and cleaned by :func:`costream.names.clean_name`.
    name: Annotated[str, msgspec.Meta(max_length=NAME_MAX_INPUT_CHARS)] | None = None


class SendMessage(Frame, tag="message", kw_only=True):
    content: str


class Cancel(Frame, tag="cancel", kw_only=True):
    pass


class Ping(Frame, tag="ping", kw_only=True):
    pass


ClientFrame = Hello | SendMessage | Cancel | Ping


class Welcome(Frame, tag="welcome", kw_only=True):
    conversation_id: str
    epoch: str
    head: int
    role: Literal["viewer", "writer"]
    viewers: int
    mode: Literal["replay", "snapshot"]
    model: str
    people: list[Person] = msgspec.field(default_factory=list)
    viewer_id: str | UnsetType = UNSET  # the recipient's own ``id`` in ``people``


class Presence(Frame, tag="presence", kw_only=True, omit_defaults=True):
    """The viewers of a conversation: how many, and the first ``PRESENCE_MAX_PEOPLE`` of
    them (``people``, in the order they joined; absent when nobody is listed)."""

    viewers: int
    people: list[Person] = msgspec.field(default_factory=list)


class Heartbeat(Frame, tag="heartbeat", kw_only=True):
    head: int


class Pong(Frame, tag="pong", kw_only=True):
    pass


class Accepted(Frame, tag="accepted", kw_only=True):
    run_id: str


class Error(Frame, tag="error", kw_only=True):
    code: RefusalCode
    message: str


ServerFrame = Welcome | Presence | Heartbeat | Pong | Accepted | Error | Event

# ---- encoding -------------------------------------------------------------------------

encoder: Final = msgspec.json.Encoder()
client_frame_decoder: Final = msgspec.json.Decoder(ClientFrame)
server_frame_decoder: Final = msgspec.json.Decoder(ServerFrame)
event_decoder: Final = msgspec.json.Decoder(Event)

# The frame layout, known here and nowhere else (the Redis broker's Lua scripts splice
# these same constants into the frames they build). A logged frame starts with its seq,
# so a seq is read and spliced without parsing the JSON; a presence frame has one field.
SEQ_PREFIX: Final = '{"seq":'
PRESENCE_PREFIX: Final = '{"type":"presence","viewers":'
PEOPLE_FIELD: Final = ',"people":['
_PRESENCE_PREFIX_BYTES: Final = PRESENCE_PREFIX.encode()
_PEOPLE_FIELD_BYTES: Final = PEOPLE_FIELD.encode()
_SEQ_PREFIX_BYTES: Final = SEQ_PREFIX.encode()
_SEQ_DIGITS_FROM: Final = len(SEQ_PREFIX)


def encode(frame: Frame) -> bytes:
    """Encode any frame. A logged event without ``seq`` is encoded without it."""
    return encoder.encode(frame)


def with_seq(body: bytes, seq: int) -> bytes:
    """Splice ``seq`` into an encoded event: ``{"type":..}`` becomes ``{"seq":N,"type":..}``."""
    return b"%s%d,%s" % (_SEQ_PREFIX_BYTES, seq, body[1:])


def presence_frame(viewers: int, people: Sequence[bytes]) -> bytes:
    """The ``presence`` frame for ``viewers`` and the encoded :class:`Person` entries
    ``people`` (the Redis broker's script builds the same bytes)."""
    if not people:
        return b"%s%d}" % (_PRESENCE_PREFIX_BYTES, viewers)
    return b"%s%d%s%s]}" % (_PRESENCE_PREFIX_BYTES, viewers, _PEOPLE_FIELD_BYTES, b",".join(people))


def is_logged_frame(frame: bytes) -> bool:
    """Whether a frame from the broker is a logged event (as opposed to presence)."""
    return frame.startswith(_SEQ_PREFIX_BYTES)


def seq_of(frame: bytes) -> int:
    """The ``seq`` of a frame made by :func:`with_seq`, read without decoding the JSON."""
    return int(frame[_SEQ_DIGITS_FROM : frame.index(b",", _SEQ_DIGITS_FROM)])


def seq_of_text(frame: str) -> int:
    """The ``seq`` of a logged frame as text, 0 for a frame that is not logged (presence)."""
    if not frame.startswith(SEQ_PREFIX):
        return 0
    return int(frame[_SEQ_DIGITS_FROM : frame.index(",", _SEQ_DIGITS_FROM)])
