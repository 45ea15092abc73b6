"""A published run's events: its steps read from chunks, and how the run ends.

No I/O: a :class:`~costream.publisher.TokenPublisher` calls :class:`StepReader` from its
callers' threads, under its lock.

:class:`StepReader` turns LiteLLM ``ModelResponseStream`` chunks (or plain ``str``) into
the events a built-in run appends, with the same :class:`~costream.segments.StepSegments`:
per step ``STEP_STARTED``, the segments, ``STEP_FINISHED`` with usage and cost; between
steps ``TOOL_CALL_RESULT``; and at the end the run's :class:`RunEnd` with its usage, cost,
history snapshot and, for ``RUN_ERROR``, a code and a message safe to show.

- Steps: a chunk with output after a ``finish_reason``, a new response id, or
  :meth:`StepReader.end_step` starts the next step. ``STEP_FINISHED`` waits for the
  stream's usage chunk (``stream_options={"include_usage": True}``) for at most
  ``_USAGE_GRACE_S`` after the finish reason; a usage chunk after that still counts in
  the run's usage and cost.
- Cut short (abandoned: its queued events dropped): the publisher's thread follows what
  the log holds open with :class:`costream.lifecycle.OpenSegments`, so the run's end
  closes every segment and ends the step ``error``.
- Prices and LiteLLM's error wording come from ``llm.py``, and only when LiteLLM is
  already loaded: nothing here imports it. Chunks are read by attribute like
  ``segments`` does.

Not thread-safe by itself: :class:`StepReader` is called under the publisher's lock.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Final

from costream.chunks import as_usage, chunk_text, finish_reason_of, has_output, usage_of
from costream.lifecycle import Outcome, RunEnd
from costream.protocol import (
    ErrorCode,
    Event,
    SnapshotMessage,
    StepFinished,
    StepFinishedMeta,
    StepStarted,
    StepStartedMeta,
    ToolCallResult,
    ToolResultMeta,
    Usage,
)
from costream.segments import StepSegments, new_id, step_messages

_USAGE_GRACE_S: Final = 1.0  # STEP_FINISHED waits this long for the usage chunk
_MAX_ERROR_CHARS: Final = 500


def _step_cost(model: str, usage: Usage) -> float:
    """The runner's price of a step, when LiteLLM is loaded (never imported for this)."""
    if "litellm" not in sys.modules:
        return 0.0
    from costream.provider import cost_usd

    return cost_usd(model, usage)


def _failure_of(error: BaseException | str | None, model: str) -> tuple[ErrorCode, str]:
    """RUN_ERROR's code and a message safe to show: LiteLLM's errors as the runner words
    them, anything else by its type only (an exception's text may quote a secret)."""
    if error is None:
        return "internal", "the run failed"
    if isinstance(error, str):
        return "internal", error[:_MAX_ERROR_CHARS] or "the run failed"
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:  # OpenHands wraps LLM errors
        seen.add(id(current))
        if type(current).__module__.startswith("litellm"):
            from costream.provider import classify, provider_phrase

            failure = classify(current, provider_phrase(model))
            return failure.code, failure.message
        current = current.__cause__ or current.__context__
    return "internal", f"the agent failed ({type(error).__name__})"


# ---- the steps of a run ----------------------------------------------------------------


@dataclass
class _OpenStep:
    """The step whose STEP_STARTED is queued and whose STEP_FINISHED is not."""

    name: str
    model: str
    segments: StepSegments
    response_id: str
    finish_reason: str | None = None
    finished_at: float = 0.0  # monotonic time of the finish reason
    usage: Usage | None = None


class StepReader:
    """Turns a run's chunks into its steps' events and sums the run's usage, cost and history."""

    def __init__(self, model: str) -> None:
        self._model = model  # the publisher's model=, over the chunks' own
        self._step: _OpenStep | None = None
        self._step_count = 0
        self._last_model = ""  # kept across runs: a text-only run still names a model
        self._run_usage = Usage()
        self._run_cost = 0.0
        self._run_messages: list[SnapshotMessage] = []

    def start_run(self) -> None:
        """Forget the previous run's step and sums: the next chunk starts step ``llm-1``."""
        self._step, self._step_count = None, 0
        self._run_usage, self._run_cost, self._run_messages = Usage(), 0.0, []

    def chunk(self, chunk: object) -> list[Event]:
        """One stream chunk's events, ending the open step first when this chunk starts a new one."""
        events: list[Event] = []
        output = has_output(chunk)
        response_id = chunk_text(chunk, "id")
        step = self._step
        if step is not None and output:
            new_response = bool(
                response_id and step.response_id and response_id != step.response_id
            )
            if step.finish_reason is not None or new_response:
                events += self.end_step()
                step = None
        if step is None:
            if not output:
                late = usage_of(chunk)  # a usage chunk after its step was settled
                if late is not None:
                    self._run_usage += late
                    self._run_cost += _step_cost(self._last_model, late)
                return events
            step = self._begin_step(chunk_text(chunk, "model"), response_id, events)
        events += step.segments.feed(chunk)
        step.response_id = step.response_id or response_id
        reason = finish_reason_of(chunk)
        if reason and step.finish_reason is None:
            step.finish_reason, step.finished_at = reason, time.monotonic()
            events += step.segments.close()
        usage = usage_of(chunk)
        if usage is not None:
            step.usage = usage
        if step.finish_reason is not None and step.usage is not None:
            events += self.end_step()
        return events

    def text(self, text: str) -> list[Event]:
        """A piece of plain text's events: the open step's text, or a new step's."""
        events: list[Event] = []
        if self._step is not None and self._step.finish_reason is not None:
            events += self.end_step()
        step = self._step or self._begin_step("", "", events)
        return events + step.segments.feed_text(text)

    def tool_result(self, tool_call_id: str, content: str, *, is_error: bool) -> list[Event]:
        """End the open step, then TOOL_CALL_RESULT; the result joins the run's history."""
        events = self.end_step()
        message_id = new_id()
        events.append(
            ToolCallResult(
                message_id=message_id,
                tool_call_id=tool_call_id,
                content=content,
                metadata=ToolResultMeta(is_error=is_error),
            )
        )
        self._run_messages.append(
            SnapshotMessage(id=message_id, role="tool", content=content, tool_call_id=tool_call_id)
        )
        return events

    def _begin_step(self, model: str, response_id: str, events: list[Event]) -> _OpenStep:
        self._step_count += 1
        model = self._model or model or self._last_model or "unknown"
        self._last_model = model
        step = _OpenStep(f"llm-{self._step_count}", model, StepSegments(), response_id)
        events.append(
            StepStarted(step_name=step.name, metadata=StepStartedMeta(model=model, attempt=1))
        )
        self._step = step
        return step

    def end_step(self, reason: str | None = None) -> list[Event]:
        """Close the open step (``reason``: why it was cut short, None: it completed)."""
        step, self._step = self._step, None
        if step is None:
            return []
        events = step.segments.close()
        usage = step.usage or Usage()
        cost = _step_cost(step.model, usage)
        self._run_usage += usage
        self._run_cost += cost
        output = step.segments.output()
        self._run_messages += step_messages(output, with_tool_calls=reason is None)
        events.append(
            StepFinished(
                step_name=step.name,
                metadata=StepFinishedMeta(
                    finish_reason=reason or step.finish_reason or "stop", usage=usage, cost_usd=cost
                ),
            )
        )
        return events

    def usage_due_at(self) -> float | None:
        """The monotonic time the open step stops waiting for its usage chunk; None: not waiting."""
        step = self._step
        if step is None or step.finish_reason is None:
            return None
        return step.finished_at + _USAGE_GRACE_S

    def usage_overdue(self) -> bool:
        """Whether the open step has its finish reason and waited its usage chunk long enough."""
        step = self._step
        if step is not None and step.finish_reason is not None:
            return time.monotonic() - step.finished_at >= _USAGE_GRACE_S
        return False

    def run_end(
        self,
        outcome: Outcome,
        usage: object,
        cost_usd: float | None,
        error: BaseException | str | None,
    ) -> RunEnd:
        """How the run ends, after :meth:`end_step`: ``usage`` and ``cost_usd`` when given
        (else the steps' sums), the history, and RUN_ERROR's code and message."""
        model = self._model or self._last_model
        end = RunEnd(
            outcome,
            usage=self._run_usage if usage is None else as_usage(usage),
            cost_usd=self._run_cost if cost_usd is None else float(cost_usd),
            model=model,
            messages=self._run_messages,
        )
        if outcome == "error":
            end.error_code, end.error_message = _failure_of(error, model)
        return end
