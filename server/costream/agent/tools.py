"""The tools the agent may call: a per-conversation workspace of text files in the store.

A tool never raises into the run: bad arguments, bad paths and limits come back as a
result with ``is_error`` set, worded so the model can correct itself.
"""

from __future__ import annotations

import posixpath
import unicodedata
from dataclasses import dataclass
from typing import Any

from costream.bodies import BadInput, decode_json
from costream.store import Store, file_name_problem

_PATH = {"type": "string", "description": "Relative path inside the workspace, e.g. story.txt"}

TOOL_SPECS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "write_file",
            "description": "Create or overwrite a text file in the shared workspace.",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": _PATH,
                    "content": {"type": "string", "description": "The whole file content."},
                },
                "required": ["path", "content"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a text file of the shared workspace.",
            "parameters": {"type": "object", "properties": {"path": _PATH}, "required": ["path"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "delete_file",
            "description": "Delete a file of the shared workspace.",
            "parameters": {"type": "object", "properties": {"path": _PATH}, "required": ["path"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "list_files",
            "description": "List the files of the shared workspace with their sizes.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]

_ARGUMENTS = {
    "write_file": {"path", "content"},
    "read_file": {"path"},
    "delete_file": {"path"},
    "list_files": set(),
}
_MAX_PATH = 200


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    content: str
    is_error: bool = False


class ToolError(Exception):
    """A tool call the model got wrong; its message goes back to the model."""


def normalise_path(path: object) -> str:
    """A clean relative path, or ToolError: no absolute paths, no ``..``, no oddities."""
    if not isinstance(path, str) or not path.strip():
        raise ToolError("path must be a non-empty string")
    if len(path) > _MAX_PATH:
        raise ToolError(f"path is longer than {_MAX_PATH} characters")
    if "\x00" in path or "\\" in path:
        raise ToolError("path may not contain NUL or backslashes")
    if path.startswith("/"):
        raise ToolError("path must be relative to the workspace (no leading /)")
    parts = [part for part in path.strip().split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ToolError("path may not contain '..'")
    if not parts:
        raise ToolError("path names no file")
    # One spelling per name: "é" typed precomposed or decomposed is the same file.
    joined = unicodedata.normalize("NFC", posixpath.join(*parts))
    if (problem := file_name_problem(joined)) is not None:
        raise ToolError(problem)
    return joined


class Workspace:
    """The files of one conversation, as the agent's tools see them."""

    def __init__(
        self, store: Store, conversation_id: str, max_file_bytes: int, max_files: int
    ) -> None:
        self.store = store
        self.conversation_id = conversation_id
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files

    async def call(self, name: str, arguments: str) -> ToolOutcome:
        """Run one tool call; errors become results with ``is_error``."""
        try:
            args = self._parse(name, arguments)
            return ToolOutcome(await self._dispatch(name, args))
        except ToolError as error:
            return ToolOutcome(f"Error: {error}", is_error=True)
        except ValueError as error:  # the store refused a name or text it cannot hold
            return ToolOutcome(f"Error: {str(error)[:200]}", is_error=True)

    @staticmethod
    def _parse(name: str, arguments: str) -> dict[str, Any]:
        if name not in _ARGUMENTS:
            raise ToolError(f"unknown tool {name!r}; the tools are {', '.join(_ARGUMENTS)}")
        try:
            # Bounded: deep nesting and lone surrogates are the model's mistake to fix,
            # not a RecursionError or UnicodeEncodeError that would end the run.
            args: Any = decode_json(arguments or "{}", what="arguments")
        except BadInput as error:
            raise ToolError(error.message) from None
        if not isinstance(args, dict):
            raise ToolError("arguments must be a JSON object")
        missing = _ARGUMENTS[name] - args.keys()
        if missing:
            raise ToolError(f"missing argument(s): {', '.join(sorted(missing))}")
        extra = args.keys() - _ARGUMENTS[name]
        if extra:
            raise ToolError(f"unexpected argument(s): {', '.join(sorted(extra))}")
        return args

    async def _dispatch(self, name: str, args: dict[str, Any]) -> str:
        store, conversation_id = self.store, self.conversation_id
        if name == "list_files":
            files = await store.list_files(conversation_id)
            if not files:
                return "The workspace is empty."
            return "\n".join(f"{path} ({size:,} bytes)" for path, size in files.items())
        path = normalise_path(args["path"])
        if name == "write_file":
            content = args["content"]
            if not isinstance(content, str):
                raise ToolError("content must be a string")
            size = len(content.encode())
            if size > self.max_file_bytes:
                raise ToolError(f"content is {size:,} bytes; the limit is {self.max_file_bytes:,}")
            files = await store.list_files(conversation_id)
            if path not in files and len(files) >= self.max_files:
                raise ToolError(f"the workspace already holds {self.max_files} files")
            await store.write_file(conversation_id, path, content)
            return f"Wrote {path} ({size:,} bytes)."
        if name == "read_file":
            text = await store.read_file(conversation_id, path)
            if text is None:
                raise ToolError(f"no file {path}")
            return text
        if await store.delete_file(conversation_id, path):
            return f"Deleted {path}."
        raise ToolError(f"no file {path}")
