"""What an AG-UI client builds from the events costream sends it: its messages, as
@ag-ui/client's ``defaultApplyEvents`` builds them, so the AG-UI transport can tell when
they differ from costream's own snapshot and correct them. No I/O.
"""

from __future__ import annotations

from typing import Any

Json = dict[str, Any]


class ClientMessages:
    """The messages an AG-UI client holds, rebuilt from the events it was sent.

    Follows ``@ag-ui/client`` 1.0's ``defaultApplyEvents`` for the events costream sends
    (none of which carries ``metadata`` into a message), so the rendering knows when the
    client's view differs from costream's snapshot.
    """

    def __init__(self, messages: list[Json]) -> None:
        self.messages = [dict(m) for m in messages]

    def _find(self, message_id: str) -> Json | None:
        return next((m for m in self.messages if m.get("id") == message_id), None)

    def _owner_of_call(self, tool_call_id: str) -> Json | None:
        for message in self.messages:
            for call in message.get("toolCalls") or ():
                if call.get("id") == tool_call_id:
                    return message
        return None

    def _call(self, tool_call_id: str) -> Json | None:
        owner = self._owner_of_call(tool_call_id)
        calls = owner.get("toolCalls") or [] if owner else []
        return next((c for c in calls if c.get("id") == tool_call_id), None)

    def apply(self, event: Json) -> None:
        kind = event["type"]
        if kind == "RUN_STARTED":
            for message in (event.get("input") or {}).get("messages") or ():
                if self._find(message["id"]) is None:
                    self.messages.append(dict(message))
        elif kind in ("TEXT_MESSAGE_START", "REASONING_MESSAGE_START"):
            if self._find(event["messageId"]) is None:
                role = "reasoning" if kind == "REASONING_MESSAGE_START" else event.get("role")
                self.messages.append(
                    {"id": event["messageId"], "role": role or "assistant", "content": ""}
                )
        elif kind in ("TEXT_MESSAGE_CONTENT", "REASONING_MESSAGE_CONTENT"):
            message = self._find(event["messageId"])
            if message is not None:
                message["content"] = (message.get("content") or "") + event["delta"]
        elif kind == "TOOL_CALL_START":
            self._start_call(event)
        elif kind == "TOOL_CALL_ARGS":
            call = self._call(event["toolCallId"])
            if call is not None:
                call["function"]["arguments"] += event["delta"]
        elif kind == "TOOL_CALL_RESULT":
            self._add_result(event)
        elif kind == "MESSAGES_SNAPSHOT":
            self.replace(event["messages"])

    def _start_call(self, event: Json) -> None:
        call_id, parent_id = event["toolCallId"], event.get("parentMessageId")
        if self._call(call_id) is not None:
            return
        parent = self._find(parent_id) if parent_id else None
        if parent is None or parent.get("role") != "assistant":
            parent = {"id": call_id if parent or not parent_id else parent_id}
            parent.update(role="assistant", toolCalls=[])
            self.messages.append(parent)
        calls = parent.setdefault("toolCalls", [])
        name = event["toolCallName"]
        calls.append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        )

    def _add_result(self, event: Json) -> None:
        message = {
            "id": event["messageId"],
            "toolCallId": event["toolCallId"],
            "role": event.get("role") or "tool",
            "content": event["content"],
        }
        owner = self._owner_of_call(event["toolCallId"])
        if owner is None or owner.get("role") != "assistant":
            self.messages.append(message)
            return
        at = self.messages.index(owner) + 1
        while at < len(self.messages) and self.messages[at].get("role") == "tool":
            at += 1
        self.messages.insert(at, message)

    def replace(self, snapshot: list[Json]) -> None:
        """Apply a ``MESSAGES_SNAPSHOT``."""
        self.messages = self.replaced(snapshot)

    def replaced(self, snapshot: list[Json]) -> list[Json]:
        """What the client holds after a ``MESSAGES_SNAPSHOT``: it keeps its own order,
        takes the snapshot's versions, drops what the snapshot lacks (its reasoning only
        when the snapshot has none), and appends the snapshot's new messages."""
        by_id = {m["id"]: m for m in snapshot}
        has_reasoning = any(m.get("role") == "reasoning" for m in snapshot)
        kept = [
            by_id.get(m.get("id"), m)
            for m in self.messages
            if m.get("id") in by_id or (m.get("role") == "reasoning" and not has_reasoning)
        ]
        known = {m.get("id") for m in kept}
        return [dict(m) for m in kept + [m for m in snapshot if m["id"] not in known]]
