"""One LLM step of a run: ``STEP_STARTED``, the streamed answer's segments, ``STEP_FINISHED``.

A step streams one LiteLLM call (through :mod:`costream.agent.llm`): each chunk goes to the
token callbacks, and its segment events to the log through a ``DeltaMerger``. Transient
failures are retried with exponential backoff: each retry ends the step with
``finishReason`` ``retry`` and starts it again with ``metadata.attempt`` one more
(``CUSTOM step_retry`` first when output was streamed). Waits on the LLM and on backoffs
go through the run's ``Interruptible``, so a stop request cuts them short with
:class:`Stopped`; appends never do, so the log stays well formed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeVar

from costream.agent.llm import LLMMessage, ToolSpec, completion_options, load_litellm
from costream.backoff import Backoff
from costream.chunks import finish_reason_of, usage_of
from costream.config import Settings
from costream.metrics import Metrics
from costream.protocol import (
    Custom,
    Event,
    StepFinished,
    StepFinishedMeta,
    StepStarted,
    StepStartedMeta,
    Usage,
)
from costream.provider import classify, cost_usd, estimate_usage
from costream.segments import DeltaMerger, Sink, StepOutput, StepSegments

log = logging.getLogger(__name__)

TokenCallback = Callable[[object], None]
T = TypeVar("T")

_RETRY_AFTER_CAP_S: Final = 10.0  # a longer Retry-After is not "short": give up at once


class Stopped(Exception):
    """The run was asked to stop (cancel, shutdown, lease lost) at an interruptible point."""


class Interruptible(Protocol):
    """Awaits ``make()``, which a stop request may cut short; raises ``Stopped`` if it does."""

    def __call__(self, make: Callable[[], Awaitable[T]], /) -> Awaitable[T]: ...


@dataclass
class OpenStep:
    """The step whose STEP_STARTED is out and whose STEP_FINISHED is not."""

    name: str
    segments: StepSegments
    merger: DeltaMerger
    streamed: bool = False  # some segment event went out
    messages: list[LLMMessage] = field(default_factory=list)  # what the call was sent
    usage: Usage | None = None  # the provider's count, once its usage chunk came

    def usage_so_far(self, model: str) -> Usage:
        """What the call used, also when its stream was cut before the usage chunk: the
        provider's count if it came, else an estimate from the request and what streamed
        (nothing streamed: nothing is counted, the provider may not have started)."""
        if self.usage is not None:
            return self.usage
        if not self.streamed:
            return Usage()
        output = self.segments.output()
        reasoning = "".join(text for _, text in output.reasoning)
        calls = "".join(c.function.name + c.function.arguments for c in output.tool_calls)
        return estimate_usage(model, self.messages, reasoning + output.content + calls, reasoning)


@dataclass
class Totals:
    """What a run's steps used and cost so far."""

    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0


class Steps:
    """The LLM steps of one run, each framed by STEP_STARTED and STEP_FINISHED."""

    def __init__(
        self,
        *,
        run_id: str,
        model: str,
        provider: str,
        settings: Settings,
        metrics: Metrics,
        token_callbacks: Sequence[TokenCallback],
        tools: Sequence[ToolSpec],
        sink: Sink,
        interruptible: Interruptible,
    ) -> None:
        self.run_id = run_id
        self.model = model
        self.provider = provider
        self.settings = settings
        self.metrics = metrics
        self.token_callbacks = token_callbacks
        self.tools = tools
        self._sink = sink
        self._interruptible = interruptible
        self.open: OpenStep | None = None
        self.totals = Totals()
        self._failed_callbacks: set[int] = set()

    async def _emit(self, *events: Event) -> None:
        await self._sink(list(events))

    async def step(self, name: str, messages: list[LLMMessage]) -> StepOutput:
        """One LLM call, retried on transient failures; its output once it ended."""
        attempt = 1
        # retry_backoff_s, then twice as long each retry; a longer Retry-After wins.
        backoff = Backoff(
            self.settings.retry_backoff_s, math.inf, attempts=self.settings.llm_retries
        )
        while True:
            step = await self._start(name, attempt)
            try:
                reason, usage = await self._stream(step, messages)
            except (Stopped, asyncio.CancelledError):
                raise
            except Exception as error:
                failure = classify(error, self.provider)
                if failure.code == "internal":
                    # Frames only: the exception's text may quote the request, and the key.
                    log.error(
                        "LLM call of run %s failed unexpectedly (%s):\n%s",
                        self.run_id,
                        type(error).__name__,
                        "".join(traceback.format_tb(error.__traceback__)),
                    )
                else:
                    log.warning(
                        "LLM call of run %s failed: %s (%s), attempt %d",
                        self.run_id,
                        failure.code,
                        type(error).__name__,
                        attempt,
                    )
                delay = backoff.next_delay() if failure.transient else None
                if delay is None:
                    raise failure from None
                if failure.retry_after_s is not None:
                    if failure.retry_after_s > _RETRY_AFTER_CAP_S:
                        raise failure from None
                    delay = max(delay, failure.retry_after_s)
                streamed = step.streamed
                used = self._count(step)
                await self.finish("retry", step.segments.close(), used, cost_usd(self.model, used))
                attempt += 1
                if streamed:
                    await self._emit(
                        Custom(
                            name="step_retry", value={"attempt": attempt, "reason": failure.code}
                        )
                    )
                await self._interruptible(functools.partial(asyncio.sleep, delay))
                continue
            output = step.segments.output()
            step.usage = usage
            usage = self._count(step)
            await self.finish(reason, step.segments.close(), usage, cost_usd(self.model, usage))
            return output

    def _count(self, step: OpenStep) -> Usage:
        """Add what ``step`` used so far to the run's totals; its usage."""
        usage = step.usage_so_far(self.model)
        self.totals.usage += usage
        self.totals.cost_usd += cost_usd(self.model, usage)
        return usage

    async def _start(self, name: str, attempt: int) -> OpenStep:
        merger = DeltaMerger(self._sink, self.settings.flush_ms, self.settings.max_event_bytes)
        step = OpenStep(name, StepSegments(), merger)
        await self._emit(
            StepStarted(step_name=name, metadata=StepStartedMeta(model=self.model, attempt=attempt))
        )
        self.open = step
        return step

    async def finish(
        self,
        reason: str,
        closing: list[Event],
        usage: Usage | None = None,
        cost: float = 0.0,
    ) -> None:
        """End the open step: ``closing`` events, then STEP_FINISHED with ``reason``."""
        step, self.open = self.open, None
        assert step is not None
        await step.merger.push(closing)
        await step.merger.aclose()
        await self._emit(_step_finished(step.name, reason, usage or Usage(), cost))

    async def cut_short(self, reason: str) -> list[Event]:
        """End the open step without appending its end: what the step streamed goes out
        now, and the events that close its segments, then STEP_FINISHED with ``reason``,
        are returned, for the run's last append."""
        step, self.open = self.open, None
        assert step is not None
        await step.merger.aclose()
        # A cut stream used tokens too: the run's totals and this step say how many.
        usage = self._count(step)
        cost = cost_usd(self.model, usage)
        return [*step.segments.close(), _step_finished(step.name, reason, usage, cost)]

    async def _stream(self, step: OpenStep, messages: list[LLMMessage]) -> tuple[str, Usage]:
        """Stream one LLM call through the token callbacks; (finish reason, usage)."""
        litellm = await self._interruptible(load_litellm)
        step.messages = messages
        options = completion_options(self.model, messages, self.tools, self.settings)
        timeout = self.settings.llm_timeout_s
        called = time.monotonic()
        stream = await self._interruptible(lambda: _within(timeout, litellm.acompletion(**options)))
        try:
            iterator = stream.__aiter__()
            reason, usage = "stop", Usage()
            while True:
                try:
                    chunk = await self._interruptible(
                        lambda: _within(timeout, iterator.__anext__())
                    )
                except StopAsyncIteration:
                    break
                events = step.segments.feed(chunk)
                if events:
                    if not step.streamed:
                        step.streamed = True
                        self.metrics.first_token_seconds.observe(time.monotonic() - called)
                    await step.merger.push(events)
                self._call_callbacks(chunk)
                reason = finish_reason_of(chunk) or reason
                usage = usage_of(chunk) or usage
                if usage.input_tokens or usage.output_tokens:
                    step.usage = usage
            return reason, usage
        finally:
            await quietly(stream.aclose, False)

    def _call_callbacks(self, chunk: object) -> None:
        for callback in self.token_callbacks:
            try:
                callback(chunk)
            except Exception:
                if id(callback) not in self._failed_callbacks:
                    self._failed_callbacks.add(id(callback))
                    log.exception(
                        "token callback %r raised; skipped for this run", _name_of(callback)
                    )


def _step_finished(name: str, reason: str, usage: Usage, cost: float) -> StepFinished:
    meta = StepFinishedMeta(finish_reason=reason, usage=usage, cost_usd=cost)
    return StepFinished(step_name=name, metadata=meta)


def _name_of(callback: object) -> str:
    return str(getattr(callback, "__qualname__", type(callback).__qualname__))


async def _within(timeout_s: float, awaitable: Awaitable[T]) -> T:
    async with asyncio.timeout(timeout_s):
        return await awaitable


async def quietly(close: Callable[[], Awaitable[object]], skip: bool) -> None:
    """Close a stream or merger on the way out; its failure must not hide the run's."""
    if skip:
        return
    try:
        await close()
    except Exception:
        log.debug("cleanup failed", exc_info=True)
