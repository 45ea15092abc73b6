"""Byte bounds on what is logged: every event's frame within ``Settings.max_event_bytes``.

A client reads frames of at most 1 MiB (``costream watch``, ``costream.client``): one
larger event in a conversation's log would make the conversation unwatchable for it for
good (it reconnects, is served the same frame, and is closed again). So:

- a delta (reasoning, text, tool-call arguments) whose frame would pass the cap is split
  into consecutive deltas of the same segment (:func:`split_delta`, :func:`split_deltas`):
  their texts concatenated are the original, cut between characters only (never inside
  a UTF-8 sequence; a Python ``str`` holds whole code points, so never inside a
  surrogate pair either);
- any other event that large is refused by ingest (HTTP 413 ``event_too_large``), and the
  runner cuts a tool result short with a marker (:func:`fit_text`).

Sizes are of the frame as logged: the encoded event plus room for the ``seq`` the broker
splices in (:data:`SEQ_ROOM`). They are measured encoded, since JSON escaping makes a
text longer on the wire than in UTF-8 (a ``"`` or a newline takes 2 bytes, a control
character 6).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final, TypeVar

import msgspec

from costream.protocol import (
    SEQ_PREFIX,
    Event,
    MessagesSnapshot,
    ReasoningMessageContent,
    SnapshotMessage,
    TextMessageContent,
    ToolCallArgs,
    encode,
    encoder,
)

Delta = ReasoningMessageContent | TextMessageContent | ToolCallArgs
DELTA_TYPES: Final = (ReasoningMessageContent, TextMessageContent, ToolCallArgs)
D = TypeVar("D", bound=Delta)

# '{"seq":N,' replaces '{': the prefix without its brace, 19 digits at most, the comma.
SEQ_ROOM: Final = len(SEQ_PREFIX) - 1 + 19 + 1
_MIN_ROOM: Final = 16  # bytes for text in one piece at least: any one character fits


def frame_size(body: bytes) -> int:
    """The size of the logged frame an encoded event (without ``seq``) becomes, at most."""
    return len(body) + SEQ_ROOM


def event_size(event: Event) -> int:
    """The size of ``event``'s logged frame, at most."""
    return frame_size(encode(event))


def json_text_size(text: str) -> int:
    """Bytes ``text`` takes inside a JSON string, escapes included (no quotes)."""
    return len(encoder.encode(text)) - 2


def _prefix_within(text: str, start: int, room: int) -> int:
    """How many characters of ``text`` from ``start`` fit in ``room`` bytes encoded (at
    least one). A character takes one byte at least, so ``room`` characters is the
    longest candidate; each try shrinks it in proportion to what it overshot."""
    count = min(room, len(text) - start)
    while count > 1:
        size = json_text_size(text[start : start + count])
        if size <= room:
            break
        count = min(count - 1, max(1, count * room // size))
    return max(count, 1)


def split_delta(event: D, max_bytes: int) -> list[D]:
    """``event`` as consecutive deltas of its segment, each frame within ``max_bytes``;
    ``[event]`` itself when it fits."""
    size = event_size(event)
    if size <= max_bytes:
        return [event]
    text = event.delta
    room = max(max_bytes - (size - json_text_size(text)), _MIN_ROOM)
    pieces: list[D] = []
    start = 0
    while start < len(text):
        count = _prefix_within(text, start, room)
        pieces.append(msgspec.structs.replace(event, delta=text[start : start + count]))
        start += count
    return pieces


def split_deltas(events: Iterable[Event], max_bytes: int) -> list[Event]:
    """``events`` in order, each delta whose frame passes ``max_bytes`` split in several."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, DELTA_TYPES):
            out += split_delta(event, max_bytes)
        else:
            out.append(event)
    return out


def cut_marker(total_chars: int, kept_chars: int) -> str:
    """What replaces the end of a text cut short: says that it was, and how long it was."""
    return f"\n[cut: {kept_chars:,} of {total_chars:,} characters kept]"


_MARKER: Final = re.compile(r"\n\[cut: [0-9,]+ of ([0-9,]+) characters kept\]\Z")
_CUT_PREFIX: Final = '{"cut":"'


def fit_text(text: str, max_bytes: int) -> str:
    """``text``, or its start and :func:`cut_marker`, within ``max_bytes`` JSON-encoded."""
    # A character takes 1 to 6 bytes (``\\u001f``): measure only when neither bound tells.
    if len(text) <= max_bytes // 6 or (
        len(text) <= max_bytes and json_text_size(text) <= max_bytes
    ):
        return text
    total = len(text)
    if (marker := _MARKER.search(text, max(len(text) - 80, 0))) is not None:
        # Cut before (the history keeps tool arguments cut): one marker, the first total.
        text, total = text[: marker.start()], int(marker.group(1).replace(",", ""))
    room = max(max_bytes - json_text_size(cut_marker(total, total)), _MIN_ROOM)
    kept = _prefix_within(text, 0, room)
    return text[:kept] + cut_marker(total, kept)


def fit_arguments(arguments: str, max_bytes: int) -> str:
    """A tool call's ``arguments`` (JSON), or when longer than ``max_bytes`` encoded, a JSON
    object ``{"cut": "<their start and a marker>"}``: still JSON, as providers require,
    and the model can read what it sent."""
    if len(arguments) <= max_bytes // 6 or (
        len(arguments) <= max_bytes and json_text_size(arguments) <= max_bytes
    ):
        return arguments
    if arguments.startswith(_CUT_PREFIX):  # cut before: cut what it kept, not the wrapper
        try:
            arguments = msgspec.json.decode(arguments, type=dict[str, str]).get("cut", arguments)
        except msgspec.DecodeError:
            pass  # the model's own arguments that happen to start so: cut them whole
    wrapper = len(b'{"cut":""}')
    return encoder.encode({"cut": fit_text(arguments, max_bytes - wrapper)}).decode()


def latest_messages(messages: list[SnapshotMessage], max_bytes: int) -> list[SnapshotMessage]:
    """The newest of ``messages`` whose ``MESSAGES_SNAPSHOT`` frame fits in ``max_bytes``
    (the history itself is kept whole; a late joiner is shown its latest part). It never
    starts with a tool result whose call was left out; a single message too long alone
    has its content cut (:func:`fit_text`)."""
    room = max_bytes - frame_size(encode(MessagesSnapshot(messages=[])))
    sizes = [len(encoder.encode(message)) + 1 for message in messages]  # + the comma
    start, used = len(messages), 0
    while start > 0 and used + sizes[start - 1] <= room:
        start -= 1
        used += sizes[start]
    while start < len(messages) and messages[start].role == "tool":
        start += 1
    if start == len(messages) and messages:  # the last message alone is too long: cut it
        last = messages[-1]
        wrapper = len(encoder.encode(msgspec.structs.replace(last, content="", tool_calls=None)))
        content = fit_text(last.content or "", max(room - wrapper - 2, _MIN_ROOM))
        return [msgspec.structs.replace(last, content=content, tool_calls=None)]
    return messages[start:]
