"""OpenHands' conversation events, read by a :class:`~costream.publisher.TokenPublisher`.

Passed in ``Conversation(callbacks=[publisher])`` (beside ``token_callbacks=[publisher]``,
which streams the LLM's chunks), the publisher sees the conversation's events and marks
its runs by them, so no ``with publisher.run(...)`` is needed:

- the user's ``MessageEvent`` starts a run with that exact text (``RUN_STARTED.input``);
- an ``ObservationEvent`` becomes ``TOOL_CALL_RESULT`` for its tool call (``isError``
  when the observation says so); a ``UserRejectObservation`` (a user or a hook rejected
  the action) and an ``AgentErrorEvent`` (the tool call failed) too, with ``isError``;
- the end of ``run()``: the agent's answer (a ``MessageEvent`` from the agent), the
  ``finish`` tool's observation, or a ``ConversationStateUpdateEvent`` whose execution
  status is ``finished`` ends the run with ``RUN_FINISHED`` and the usage and cost of
  the stream's usage chunks (OpenHands asks for them); ``error`` or ``stuck``, or a
  ``ConversationErrorEvent``, ends it with ``RUN_ERROR`` (the error's code, never its
  text, which may quote a request); ``paused``, a ``PauseEvent`` or an ``InterruptEvent``
  ends it ``cancelled``.

Nothing here imports OpenHands: events are told apart by their class name and read by
attribute, so ``import costream.publisher`` stays light and any openhands-sdk release with
these names works. Other events are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Final, Literal, Protocol


class RunMarks(Protocol):
    """What the events mark on their publisher (a ``TokenPublisher``)."""

    def start_run(self, content: str) -> None: ...

    def finish_run(
        self,
        usage: object = None,
        cost_usd: float | None = None,
        *,
        outcome: Literal["success", "cancelled"] = "success",
        error: BaseException | str | None = None,
    ) -> None: ...

    def tool_result(self, tool_call_id: str, content: str, *, is_error: bool = False) -> None: ...

    def _failed(self, what: str) -> None: ...


log = logging.getLogger("costream.client.publisher")

_FINISH_TOOL: Final = "finish"  # OpenHands' built-in FinishTool
_ENDING_STATUS_ERRORS: Final = {"stuck": "the agent got stuck"}


def is_openhands_event(item: object) -> bool:
    """Whether ``item`` is one of OpenHands' conversation events (not a stream chunk)."""
    return type(item).__module__.startswith("openhands.sdk.event")


def _texts(parts: object) -> str:
    """The text of a list of OpenHands content parts (``TextContent.text``); images skipped."""
    if not isinstance(parts, Iterable) or isinstance(parts, str | bytes):
        return ""
    return "".join(text for part in parts if isinstance(text := getattr(part, "text", None), str))


class OpenHandsEvents:
    """Turns one OpenHands conversation's events into its publisher's runs and results."""

    def __init__(self, publisher: RunMarks) -> None:
        self._publisher = publisher

    def on_event(self, event: object) -> None:
        """Take one conversation event; never raises."""
        try:
            self._on_event(type(event).__name__, event)
        except Exception:
            self._publisher._failed(f"reading OpenHands' {type(event).__name__}")

    def _on_event(self, kind: str, event: object) -> None:
        publisher = self._publisher
        if kind == "MessageEvent":
            source = getattr(event, "source", "")
            message = getattr(event, "llm_message", None)
            if source == "user":
                publisher.start_run(_texts(getattr(message, "content", None)))
            elif source == "agent":
                publisher.finish_run()
        elif kind == "ObservationEvent":
            observation = getattr(event, "observation", None)
            content = _texts(getattr(observation, "to_llm_content", None))
            is_error = bool(getattr(observation, "is_error", False))
            tool_name = str(getattr(event, "tool_name", ""))
            publisher.tool_result(
                str(getattr(event, "tool_call_id", "")), content, is_error=is_error
            )
            if tool_name == _FINISH_TOOL and not is_error:
                publisher.finish_run()
        elif kind == "UserRejectObservation":
            reason = str(getattr(event, "rejection_reason", "rejected"))
            call_id = str(getattr(event, "tool_call_id", ""))
            publisher.tool_result(call_id, f"Action rejected: {reason}", is_error=True)
        elif kind == "AgentErrorEvent":
            call_id = str(getattr(event, "tool_call_id", ""))
            publisher.tool_result(call_id, str(getattr(event, "error", "")), is_error=True)
        elif kind == "ConversationErrorEvent":
            publisher.finish_run(error=f"the agent failed ({getattr(event, 'code', 'error')})")
        elif kind in ("PauseEvent", "InterruptEvent"):
            publisher.finish_run(outcome="cancelled")
        elif kind == "ConversationStateUpdateEvent":
            self._on_state(getattr(event, "key", ""), getattr(event, "value", None))

    def _on_state(self, key: object, value: object) -> None:
        if key == "full_state" and isinstance(value, dict):
            key, value = "execution_status", value.get("execution_status")
        if key != "execution_status":
            return
        status = str(getattr(value, "value", value)).lower()  # an enum, or its value
        if status in _ENDING_STATUS_ERRORS:
            self._publisher.finish_run(error=_ENDING_STATUS_ERRORS[status])
        elif status == "error":
            self._publisher.finish_run(error="the agent failed")
        elif status == "paused":
            self._publisher.finish_run(outcome="cancelled")
        elif status == "finished":
            self._publisher.finish_run()
