"""The terminal viewer: protocol events printed the way a token callback prints chunks.

The format is the one of the OpenHands SDK's streaming example (``THINKING:``,
``CONTENT:``, ``TOOL NAME:``, ``TOOL ARGS:``, each new label on a new line), plus
``TOOL RESULT:`` and a ``──`` line at each run boundary and retry::

    ── run started: Tell me a story
    THINKING: The user wants a story...
    CONTENT: Once upon a time...
    TOOL NAME: write_file
    TOOL ARGS: {"path": "story.txt", "content": "..."}
    TOOL RESULT: wrote 1234 characters to story.txt
    ── run finished: 1,234 in / 567 out tokens, $0.0012 (conversation total $0.0034)

The renderer writes to any text stream, so it is tested without a network.
"""

from __future__ import annotations

import os
from typing import Final, TextIO

from costream import names, protocol
from costream.protocol import Event, Person, Presence

RESET: Final = "\x1b[0m"
BOLD: Final = "1"
DIM: Final = "2"
RED: Final = "31"
GREEN: Final = "32"
YELLOW: Final = "33"
BLUE: Final = "34"
MAGENTA: Final = "35"
CYAN: Final = "36"

RULE: Final = "──"
MAX_PROMPT_CHARS: Final = 200


def use_color(stream: TextIO) -> bool:
    """ANSI colours for a terminal, none in a pipe, with ``NO_COLOR`` or ``TERM=dumb``."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def one_line(text: str, limit: int = MAX_PROMPT_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def gap_line(value: dict[str, object]) -> str:
    """What a publisher's CUSTOM ``stream_gap`` tells: ``stream gap: continues the
    interrupted run, 3 events missing here``."""
    parts = ["continues the interrupted run"] if value.get("resumes") else []
    lost, unconfirmed = value.get("lost"), value.get("unconfirmed")
    if isinstance(lost, int) and lost > 0:
        parts.append(f"{lost} events missing here")
    if isinstance(unconfirmed, int) and unconfirmed > 0:
        parts.append(f"{unconfirmed} more may be missing")
    return "stream gap: " + (", ".join(parts) or "nothing missing")


def usage_line(event: protocol.RunFinished) -> str:
    """``1,234 in / 567 out tokens, $0.0012 (conversation total $0.0034)``."""
    tokens_in = sum(u.input_tokens for u in event.usage)
    tokens_out = sum(u.output_tokens for u in event.usage)
    meta = event.metadata
    return (
        f"{tokens_in:,} in / {tokens_out:,} out tokens, ${meta.cost_usd:.4f} "
        f"(conversation total ${meta.total_cost_usd:.4f})"
    )


def who(person: Person) -> str:
    """``Ann (writer)``; ``a viewer`` for someone who gave no name."""
    if person.name is None:
        return f"a {person.role}"
    return f"{one_line(person.name, names.NAME_MAX_CHARS)} ({person.role})"


def header_line(role: str, viewers: int, model: str, people: list[Person], own_id: str = "") -> str:
    """What ``costream watch`` says once connected: ``connected as viewer · 3 watching
    (Ann, Bob and 1 more) · model costream/demo``."""
    others = [p.name for p in people if p.id != own_id and p.name is not None]
    named = ""
    if others:
        shown = ", ".join(one_line(name, names.NAME_MAX_CHARS) for name in others[:3])
        more = viewers - 1 - len(others[:3])
        named = f" ({shown}{f' and {more} more' if more > 0 else ''})"
    return f"connected as {role} · {viewers} watching{named} · model {model}"


class PresenceReporter:
    """Who joins and who leaves, told from one ``presence`` list to the next.

    Lists are bounded (the first 50 by join time): someone who moves up into the list
    when another leaves joined earlier than anyone seen, so is not announced as joining.
    """

    def __init__(self, people: list[Person], own_id: str = "") -> None:
        self._own_id = own_id
        self._known = {p.id: p for p in people if p.id != own_id}
        self._newest = max((p.since for p in people), default=0)

    def changes(self, people: list[Person]) -> list[str]:
        """``Ann (viewer) joined`` / ``Bob (writer) left`` lines, joins first."""
        now = {p.id: p for p in people if p.id != self._own_id}
        lines = [
            f"{who(p)} joined"
            for key, p in now.items()
            if key not in self._known and p.since >= self._newest
        ]
        lines += [f"{who(p)} left" for key, p in self._known.items() if key not in now]
        self._known = now
        self._newest = max([self._newest, *(p.since for p in people)])
        return lines


class TerminalRenderer:
    """Prints protocol events to ``out`` as labelled streams of text.

    A label is printed when a new segment begins (a segment is keyed by its kind and id),
    preceded by a newline when something was printed before it, as the token-callback
    example does. Tool results longer than ``result_limit`` characters are cut.
    """

    def __init__(self, out: TextIO, *, color: bool = False, result_limit: int = 2000) -> None:
        self.out = out
        self.color = color
        self.result_limit = result_limit
        self._segment: tuple[str, str] | None = None
        self._at_line_start = True
        self._wrote = False

    # ---- output primitives ----------------------------------------------------------

    def _style(self, text: str, *codes: str) -> str:
        if not self.color or not codes or not text:
            return text
        return f"\x1b[{';'.join(codes)}m{text}{RESET}"

    def _write(self, text: str, *codes: str) -> None:
        if not text:
            return
        self.out.write(self._style(text, *codes))
        self._at_line_start = text.endswith("\n")
        self._wrote = True

    def _label(self, kind: str, key: str, label: str, *codes: str) -> None:
        """Start a labelled segment unless ``(kind, key)`` is the one being printed."""
        if self._segment == (kind, key):
            return
        if self._segment is not None or not self._at_line_start:
            self._write("\n")
        self._write(f"{label}: ", BOLD, *codes)
        self._segment = (kind, key)

    def _rule(self, text: str, *codes: str) -> None:
        """A ``──`` line of its own; the next segment starts with a fresh label."""
        if not self._at_line_start:
            self._write("\n")
        self._write(f"{RULE} {text}", *codes)
        self._write("\n")
        self._segment = None

    def finish(self) -> None:
        """End the current line (at exit, so the shell prompt starts on its own line)."""
        if not self._at_line_start:
            self._write("\n")
        self._segment = None
        self.out.flush()

    # ---- events ---------------------------------------------------------------------

    def render(self, event: Event | Presence) -> None:
        """Print one frame; frames with nothing to show (ends, presence) only move state."""
        match event:
            case protocol.RunStarted():
                prompt = " ".join(m.content for m in event.input.messages)
                senders = [m.name for m in event.input.messages if isinstance(m.name, str)]
                by = f" by {one_line(senders[0], names.NAME_MAX_CHARS)}" if senders else ""
                if self._wrote:
                    self._blank_line()
                self._rule(f"run started{by}: {one_line(prompt)}", BOLD)
            case protocol.ReasoningMessageContent():
                self._label("thinking", event.message_id, "THINKING", MAGENTA)
                self._write(event.delta, DIM)
            case protocol.TextMessageContent():
                self._label("content", event.message_id, "CONTENT", GREEN)
                self._write(event.delta)
            case protocol.ToolCallStart():
                self._label("tool_name", event.tool_call_id, "TOOL NAME", YELLOW)
                self._write(event.tool_call_name)
            case protocol.ToolCallArgs():
                self._label("tool_args", event.tool_call_id, "TOOL ARGS", CYAN)
                self._write(event.delta)
            case protocol.ToolCallResult():
                error = event.metadata.is_error
                label = "TOOL RESULT (error)" if error else "TOOL RESULT"
                self._label("tool_result", event.tool_call_id, label, RED if error else BLUE)
                self._write(self._cut(event.content))
            case protocol.Custom(name="stream_gap"):
                self._rule(gap_line(event.value), YELLOW)
            case protocol.Custom(name="step_retry"):
                attempt = event.value.get("attempt", "?")
                reason = event.value.get("reason", "")
                because = f": {one_line(str(reason))}" if reason else ""
                self._rule(
                    f"retry, attempt {attempt}{because} (the output above is abandoned)", YELLOW
                )
            case protocol.RunFinished():
                if event.outcome.type == "cancelled":
                    self._rule(f"run cancelled: {usage_line(event)}", YELLOW)
                else:
                    self._rule(f"run finished: {usage_line(event)}", BOLD)
            case protocol.RunError():
                self._rule(f"run failed ({event.code}): {one_line(event.message)}", BOLD, RED)
            case protocol.MessagesSnapshot():
                self._snapshot(event)
            case _:
                pass
        self.out.flush()

    def _blank_line(self) -> None:
        if not self._at_line_start:
            self._write("\n")
        self._write("\n")
        self._segment = None

    def _cut(self, text: str) -> str:
        if len(text) <= self.result_limit:
            return text
        return f"{text[: self.result_limit]}… ({len(text) - self.result_limit:,} more characters)"

    def _snapshot(self, event: protocol.MessagesSnapshot) -> None:
        """The conversation so far, from a snapshot: the same labels, one per message."""
        if self._wrote:
            self._blank_line()
        if not event.messages:
            self._rule("the conversation's log starts over", DIM)
            return
        self._rule("conversation so far (snapshot)", DIM)
        for message in event.messages:
            content = message.content or ""
            if message.role == "user":
                self._rule(f"user: {one_line(content)}", BOLD)
            elif message.role == "reasoning" and content:
                self._label("thinking", message.id, "THINKING", MAGENTA)
                self._write(content, DIM)
            elif message.role == "assistant":
                if content:
                    self._label("content", message.id, "CONTENT", GREEN)
                    self._write(content)
                for call in message.tool_calls or []:
                    self._label("tool_name", call.id, "TOOL NAME", YELLOW)
                    self._write(call.function.name)
                    self._label("tool_args", call.id, "TOOL ARGS", CYAN)
                    self._write(call.function.arguments)
            elif message.role == "tool":
                key = message.tool_call_id or message.id
                self._label("tool_result", key, "TOOL RESULT", BLUE)
                self._write(self._cut(content))
        self._rule("live from here", DIM)
