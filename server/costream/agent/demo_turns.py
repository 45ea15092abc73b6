"""The demo model's script: what ``costream/demo`` says next, read from the conversation.

The model reads the conversation and plays one of a few scripted turns: a story written
to a file, a confirmation after a tool result, a file deleted, listed or read, or a short
help text. It is deterministic. Messages are read as LiteLLM passes them (dicts or
objects with OpenAI's fields); nothing here imports LiteLLM.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Final

DEFAULT_PATH: Final = "story.txt"

_FILE_NAME = re.compile(r"[\w][\w./-]*\.[A-Za-z0-9]{1,8}\b")


# ---- reading the conversation ----------------------------------------------------------


def _get(obj: object, name: str) -> object:
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def message_text(message: object) -> str:
    content = _get(message, "content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(t for part in content if isinstance(t := _get(part, "text"), str))
    return ""


@dataclass(frozen=True)
class _Call:
    id: str
    name: str
    arguments: dict[str, Any]


def _tool_calls(message: object) -> list[_Call]:
    calls = _get(message, "tool_calls")
    out: list[_Call] = []
    if not isinstance(calls, list):
        return out
    for call in calls:
        function = _get(call, "function")
        name, raw = _get(function, "name"), _get(function, "arguments")
        try:
            arguments = json.loads(raw) if isinstance(raw, str) and raw else {}
        except ValueError:
            arguments = {}
        call_id = _get(call, "id")
        if isinstance(name, str) and isinstance(arguments, dict):
            out.append(_Call(call_id if isinstance(call_id, str) else "", name, arguments))
    return out


def _last_written_path(messages: list[object]) -> str | None:
    """The path of the latest ``write_file`` call in the history, if any."""
    for message in reversed(messages):
        for call in reversed(_tool_calls(message)):
            path = call.arguments.get("path")
            if call.name == "write_file" and isinstance(path, str):
                return path
    return None


def _named_file(text: str) -> str | None:
    match = _FILE_NAME.search(text)
    return match.group(0) if match else None


# ---- the scripted turns ----------------------------------------------------------------


@dataclass
class Turn:
    """What the demo model says in one step."""

    reasoning: str
    content: str = ""
    tool_name: str | None = None
    tool_arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_name else "stop"


_HEROES = ("Ada", "Tomas", "Mira", "Jun", "Priya", "Leo")


def story(prompt: str) -> str:
    """A multi-paragraph story about LLM token streaming; the hero varies with the prompt."""
    hero = _HEROES[sum(map(ord, prompt)) % len(_HEROES)]
    paragraphs = [
        f"{hero} had always been impatient with loading spinners. So on the night the "
        "new model went live, she sat in front of three screens and watched the first "
        "answer arrive the way rain arrives on a window: one drop, then another, then a "
        "steady patter of tokens, each a few letters long, each landing the moment the "
        "model had decided on it.",
        "Behind the glass, the model was not writing sentences. It was choosing the next "
        "token, and then the next, every choice conditioned on everything before it. The "
        "server wrapped each choice in a small chunk, a delta, and sent it on at once "
        "instead of waiting for the whole reply. Thinking came first, in its own quiet "
        "grey stream; then the answer in plain text; then, when the model wanted to act, "
        "a tool call whose arguments trickled in as fragments of JSON that only made "
        "sense once the last brace closed.",
        f"What delighted {hero} most was that she was not alone. Her colleague in another "
        "city opened the same conversation and saw the very same words, at the very same "
        "moment. A friend joined late, from a train with a shaky connection, and the "
        "page quietly replayed what he had missed, numbered event by numbered event, "
        "until he was caught up with the live edge. Nobody saw a gap, and nobody saw a "
        "word twice.",
        "When the train went through a tunnel his screen froze mid-sentence. On the other "
        "side it reconnected, said which event it had seen last, and the server sent "
        "exactly the rest. A slow laptop in the corner fell behind for a minute; the "
        "server simply fed it from the log at its own pace while everyone else kept "
        "streaming, and then let it rejoin the live tail as if nothing had happened.",
        f"Late that night {hero} asked the model to write the whole story down. She "
        "watched the file's contents arrive as arguments of a tool call, a few characters "
        "at a time, and when the final quote and brace landed, the tool ran and the file "
        "appeared in the shared workspace for everyone to read. Streaming, she decided, "
        "was not about speed at all. It was about being there while the thinking "
        "happened, together, one token at a time.",
    ]
    return "\n\n".join(paragraphs)


HELP = (
    "I'm the costream demo model: a small scripted model built into the server, so "
    "everything works without an API key. I stream my thinking, then my answer, token by "
    "token, to everyone watching this conversation.\n\n"
    "Things I can do:\n"
    "- tell a story about LLM streaming and write it to a file "
    '(try: "Tell me a long story about LLM streaming and write it to a file")\n'
    '- list the workspace files ("list files")\n'
    '- read a file back ("read story.txt")\n'
    '- delete the file I wrote ("delete the story file")\n\n'
    "To talk to a real model, start the server with LLM_API_KEY (and LLM_MODEL) set."
)


def plan_turn(messages: list[object]) -> Turn:
    """The demo model's next turn for this conversation."""
    if not messages:
        return Turn("Nothing was said yet; I'll introduce myself.", HELP)
    last = messages[-1]
    if _get(last, "role") == "tool":
        return _after_tool(messages)
    request = message_text(last)
    lowered = request.lower()
    written = _last_written_path(messages)
    named = _named_file(request)
    if "delete" in lowered or "remove" in lowered:
        path = named or written
        if path is None:
            return Turn(
                "The user wants a file deleted, but I have not written one in this "
                "conversation and no file name was given.",
                "I haven't written a file in this conversation yet, so there is nothing of "
                "mine to delete. Tell me the file name, or ask me to list the files.",
            )
        return Turn(
            f"The user asks me to delete the file I wrote. Looking back at the "
            f"conversation, I saved the story as {path}. I'll call delete_file on that "
            "path and confirm once the tool answers.",
            tool_name="delete_file",
            tool_arguments={"path": path},
        )
    if ("write" in lowered or "save" in lowered) and ("file" in lowered or named):
        path = named or DEFAULT_PATH
        return Turn(
            "The user wants a long story about LLM streaming, with several paragraphs, "
            f"saved to a file. I'll tell it from the point of view of someone watching "
            f"tokens arrive live, keep each paragraph on one idea, and write it to {path} "
            "with the write_file tool.",
            "Here is a story about LLM streaming. I'm writing it to "
            f"{path} in the shared workspace now.",
            tool_name="write_file",
            tool_arguments={"path": path, "content": story(request)},
        )
    if "list" in lowered:
        return Turn(
            "The user wants to see the workspace. I'll call list_files.",
            tool_name="list_files",
        )
    if "read" in lowered or "show" in lowered:
        path = named or written
        if path is not None:
            return Turn(
                f"The user wants to read {path}. I'll call read_file.",
                tool_name="read_file",
                tool_arguments={"path": path},
            )
    if "story" in lowered:
        return Turn(
            "The user wants a story about LLM streaming, told here rather than saved. "
            "I'll tell it in a few paragraphs.",
            story(request),
        )
    return Turn(
        "This is not one of my scripted requests, so I'll explain what I am and what I can do.",
        HELP,
    )


def _after_tool(messages: list[object]) -> Turn:
    result = messages[-1]
    output = message_text(result)
    call_id = _get(result, "tool_call_id")
    call = next(
        (
            c
            for message in reversed(messages)
            for c in _tool_calls(message)
            if c.id == call_id or not call_id
        ),
        None,
    )
    name = call.name if call else "the tool"
    path = call.arguments.get("path") if call else None
    if output.startswith("Error"):
        return Turn(
            f"{name} failed: {output} I'll tell the user.",
            f"That didn't work: {output}",
        )
    if name == "write_file":
        size = _size_in(output)
        size_text = f" ({size} bytes)" if size else ""
        return Turn(
            "The file was written. I'll confirm briefly.",
            f"I wrote {path}{size_text} to the shared workspace: a story about LLM "
            "streaming in several paragraphs. Open it from the files panel, or ask me to "
            "read it back or delete it.",
        )
    if name == "delete_file":
        return Turn(
            "The tool confirms the deletion. I'll let the user know.",
            f"Done: I deleted {path}. It is no longer in the shared workspace.",
        )
    if name == "list_files":
        return Turn(
            "I have the listing; I'll show it.",
            f"The workspace holds:\n\n{output}",
        )
    if name == "read_file":
        words = len(output.split())
        return Turn(
            "I have the file's text; I'll summarise it.",
            f"{path} has {words} words. It begins: {output[:120].strip()}...",
        )
    return Turn("The tool answered; I'll pass its answer on.", output or "Done.")


def _size_in(output: str) -> str | None:
    match = re.search(r"\(([\d,]+) bytes\)", output)
    return match.group(1) if match else None
