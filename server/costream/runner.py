"""The agent loop: one run per user message, LLM steps through LiteLLM, tools between them.

A run appends, in order: ``RUN_STARTED``; per step ``STEP_STARTED``, the segments of the
streamed answer, ``STEP_FINISHED``, then the ``TOOL_CALL_RESULT`` of each tool call; and
last ``RUN_FINISHED`` (success or cancelled) or ``RUN_ERROR``, released with the lease and
a ``MESSAGES_SNAPSHOT`` in one atomic step. Whatever ends a run, open segments are closed
first, so every ``*_START`` has its ``*_END``.

- Retries: transient failures (connection errors, 5xx, a stream cut mid-way, no chunk for
  ``llm_timeout_s``, 429) are retried ``llm_retries`` times with exponential backoff; each
  retry ends the step with ``finishReason`` ``retry`` and starts it again with
  ``metadata.attempt`` one more (``CUSTOM step_retry`` first when output was streamed).
- Cancel: takes effect while the run waits on the LLM or a backoff, or before the next
  tool or step; broker appends are never interrupted, so the log stays well formed.
- Storage away (Redis restarting, failing over, paused): the run holds what it was about
  to write (one batch of events; the LLM stream waits unread behind it, so nothing grows)
  and retries with backoff for up to ``STORAGE_RETRY_S`` (30 s). An append that failed may
  have run (Redis died mid-script): before trying again the log's head says whether it
  did, so no event is logged twice. Storage back within the lease's ttl: the run goes on
  as if nothing happened. Back later: the lease has expired and the run stops; the reaper
  ends it with ``RUN_ERROR`` ``producer_lost`` (as it does after ``STORAGE_RETRY_S``).
- ``max_steps``: a model that still calls tools after the last step ends the run with
  ``RUN_FINISHED`` success; its tool results are in the history, so the next message
  continues from there.
- Secrets: error messages are our own words (status, provider; ``llm.classify``), never
  LiteLLM's text, which may quote the request or the provider's answer, and so the API key.

LiteLLM is called here only, through :mod:`costream.llm` (its lazy import, the request's
messages and options, the chunks' usage, errors and prices): the import takes seconds and
~200 MB, so it happens at the process's first LLM call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, TypeVar

from . import protocol
from .broker import Broker, RunLease
from .config import Settings
from .errors import LeaseLost, NoRun, NotFound, RunActive, StorageUnavailable
from .llm import (
    LLMFailure,
    LLMMessage,
    classify,
    completion_options,
    cost_usd,
    load_litellm,
    provider_phrase,
    to_llm_messages,
)
from .metrics import Metrics
from .protocol import (
    Custom,
    Event,
    MessagesSnapshot,
    ReasoningEnd,
    ReasoningMessageEnd,
    RunAgentInput,
    RunError,
    RunFinished,
    RunFinishedMeta,
    RunOutcome,
    RunStarted,
    SnapshotMessage,
    StepFinished,
    StepFinishedMeta,
    StepStarted,
    StepStartedMeta,
    TextMessageEnd,
    TokenUsage,
    ToolCallEnd,
    ToolCallResult,
    ToolResultMeta,
    Usage,
    UserMessage,
)
from .segments import (
    DeltaMerger,
    StepOutput,
    StepSegments,
    finish_reason_of,
    new_id,
    usage_of,
)
from .store import Store
from .tools import Workspace

log = logging.getLogger("costream.runner")

TokenCallback = Callable[[object], None]
T = TypeVar("T")

_RETRY_AFTER_CAP_S: Final = 10.0  # a longer Retry-After is not "short": give up at once
STORAGE_RETRY_S: Final = 30.0  # how long a run waits for storage before it gives up
_STORAGE_BACKOFF_S: Final = (0.05, 1.0)  # first and longest pause between attempts
_REAP_PAGE: Final = 1000
StopReason = Literal["cancelled", "shutdown", "lease_lost", "storage"]


# ---- history ----------------------------------------------------------------------


def step_messages(output: StepOutput, with_tool_calls: bool = True) -> list[SnapshotMessage]:
    """A step's output as history messages: its reasoning, then the assistant message."""
    messages = [
        SnapshotMessage(id=message_id, role="reasoning", content=text)
        for message_id, text in output.reasoning
        if text
    ]
    tool_calls = output.tool_calls if with_tool_calls else []
    if output.content or tool_calls:
        messages.append(
            SnapshotMessage(
                id=output.message_id,
                role="assistant",
                content=output.content or None,
                tool_calls=list(tool_calls) or None,
            )
        )
    return messages


# ---- one run ----------------------------------------------------------------------


class _Stopped(Exception):
    """The run was asked to stop (cancel, shutdown, lease lost) at an interruptible point."""


@dataclass
class _Step:
    """The step whose STEP_STARTED is out and whose STEP_FINISHED is not."""

    name: str
    segments: StepSegments
    merger: DeltaMerger
    streamed: bool = False  # some segment event went out


@dataclass
class _Totals:
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0


class _Run:
    """One run on this process: its task, its lease renewal, its way of ending."""

    def __init__(self, runs: Runs, lease: RunLease, model: str, system: str, provider: str) -> None:
        self.runs = runs
        self.settings = runs.settings
        self.lease = lease
        self.conversation_id = lease.conversation_id
        self.run_id = lease.run_id
        self.model = model
        self.system = system
        self.provider = provider
        self.task: asyncio.Task[None] | None = None
        self.finishing = False
        self.stop_reason: StopReason | None = None
        self._waiting = False
        self._interrupting = False
        self._broken = False  # an append was lost: append nothing more, let the lease expire
        self._head: int | None = None  # seq of this run's last logged event, once known
        self._open_step: _Step | None = None
        self._totals = _Totals()
        self._failed_callbacks: set[int] = set()

    # ---- stopping ----------------------------------------------------------------
    def request_stop(self, reason: StopReason) -> None:
        """Stop at the next interruptible point (now, if the run waits on the LLM)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self._waiting and not self._interrupting and self.task is not None:
            self._interrupting = True
            self.task.cancel()

    async def _interruptible(self, make: Callable[[], Awaitable[T]]) -> T:
        """Await something a cancel may cut short (an LLM call, a backoff)."""
        if self.stop_reason is not None:
            raise _Stopped
        self._waiting = True
        try:
            result = await make()
        except BaseException:
            if self._interrupting:
                self._uncancel()
                raise _Stopped from None
            raise
        finally:
            self._waiting = False
        if self._interrupting:  # the awaited code swallowed the cancellation
            self._uncancel()
            raise _Stopped
        return result

    def _uncancel(self) -> None:
        self._interrupting = False
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            task.uncancel()

    def _check_stop(self) -> None:
        if self.stop_reason is not None:
            raise _Stopped

    # ---- appending ----------------------------------------------------------------
    async def _append(self, bodies: list[bytes]) -> None:
        """Append to the log. Never raises: a lost lease or storage stops the run instead."""
        if self._broken or not bodies:
            return
        try:
            await self._write_log(bodies)
        except LeaseLost:
            log.info("run %s lost its lease; another process ends it", self.run_id)
            self._broken = True
            self.request_stop("lease_lost")
            return
        except StorageUnavailable:
            self._give_up_on_storage()
            return
        self.runs.metrics.events_appended.inc(len(bodies))

    def _give_up_on_storage(self) -> None:
        log.warning(
            "storage unavailable for %.0f s: run %s stops; its lease will expire",
            STORAGE_RETRY_S,
            self.run_id,
        )
        self._broken = True
        self.request_stop("storage")

    async def _write_log(
        self, bodies: list[bytes], *, finish: bool = False, snapshot: bytes | None = None
    ) -> None:
        """Append ``bodies`` (``finish``: and end the run, with ``snapshot``) exactly once,
        retrying while storage is away. Raises ``LeaseLost``, or ``StorageUnavailable``
        once storage stayed away for ``STORAGE_RETRY_S``.

        Redis may die after it ran an append's script and before it answered: before trying
        again, the log's head (and the seq of our last event) tells whether it ran.
        """
        broker = self.runs.broker
        deadline = time.monotonic() + STORAGE_RETRY_S
        delay, longest = _STORAGE_BACKOFF_S
        failed = False
        while True:
            try:
                if failed and await self._already_written(len(bodies), finish):
                    return
                if finish:
                    self._head = await broker.finish_run(self.lease, bodies, snapshot)
                else:
                    self._head = await broker.append(self.lease, bodies)
                return
            except StorageUnavailable:
                if time.monotonic() + delay > deadline:
                    raise
                if not failed:
                    log.warning("storage unavailable: run %s waits and retries", self.run_id)
                failed = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, longest)

    async def _already_written(self, count: int, finish: bool) -> bool:
        """After a failed write of ``count`` events: whether it ran anyway.
        ``LeaseLost`` when the log moved on without this run."""
        broker = self.runs.broker
        before = self._head
        active = await broker.active_run(self.conversation_id)
        mine = active is not None and active.run_id == self.run_id
        if before is None:
            if not mine:
                # Nothing of ours after RUN_STARTED was logged yet, and the run is gone.
                raise LeaseLost(self.conversation_id)
            assert active is not None
            before = active.start_seq  # our RUN_STARTED: nothing else logged since
        state = await broker.log_state(self.conversation_id)
        head = state.head if state is not None else 0
        if head == before + count and (mine != finish):
            self._head = head
            log.info("run %s: the write that failed had gone through", self.run_id)
            return True
        if head != before or not mine:
            raise LeaseLost(self.conversation_id)
        return False

    async def _durably(self, make: Callable[[], Awaitable[T]]) -> T:
        """A storage call other than a log write (the history, totals, files), retried while
        storage is away. Such writes are not checked like appends: one that failed after it
        ran (Redis died mid-command, rare) may be applied twice."""
        deadline = time.monotonic() + STORAGE_RETRY_S
        delay, longest = _STORAGE_BACKOFF_S
        while True:
            try:
                return await make()
            except StorageUnavailable:
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, longest)

    async def _sink(self, events: list[Event]) -> None:
        await self._append([protocol.encode(event) for event in events])

    async def _emit(self, *events: Event) -> None:
        await self._sink(list(events))

    # ---- the run -------------------------------------------------------------------
    async def main(self) -> None:
        """The whole run, from after RUN_STARTED to its last event."""
        started = time.monotonic()
        renewer = asyncio.create_task(self._renew())
        ending: Event
        try:
            try:
                await self._steps()
                ending = self._run_finished("success")
            except _Stopped:
                ending = self._stop_ending()
            except LLMFailure as failure:
                ending = RunError(message=failure.message, code=failure.code)
            except StorageUnavailable:
                self._give_up_on_storage()  # the lease expires; the reaper ends the run
                ending = RunError(message="storage unavailable", code="internal")
            except asyncio.CancelledError:
                if self._interrupting or self.stop_reason is not None:
                    self._uncancel()
                    ending = self._stop_ending()
                else:
                    raise  # killed from outside (tests simulate a dead process): no ending
            except Exception:
                log.exception("run %s failed", self.run_id)
                ending = RunError(message="the run failed unexpectedly", code="internal")
            await self._end(ending, started)
        finally:
            renewer.cancel()
            if self._open_step is not None:
                await _quietly(self._open_step.merger.aclose, self._broken)
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    def _stop_ending(self) -> Event:
        if self.stop_reason == "shutdown":
            return RunError(message="the server shut down during this run", code="producer_lost")
        return self._run_finished("cancelled")

    def _run_finished(self, outcome: Literal["success", "cancelled"]) -> RunFinished:
        usage = self._totals.usage
        return RunFinished(
            thread_id=self.conversation_id,
            run_id=self.run_id,
            outcome=RunOutcome(type=outcome),
            usage=[
                TokenUsage(
                    model=self.model,
                    input_tokens=usage.input_tokens,
                    output_tokens=usage.output_tokens,
                    reasoning_tokens=usage.reasoning_tokens,
                    total_tokens=usage.input_tokens + usage.output_tokens,
                )
            ],
            metadata=RunFinishedMeta(cost_usd=self._totals.cost_usd),
        )

    async def _end(self, ending: Event, started: float) -> None:
        """Close what is open, count the cost, append the last event with the snapshot."""
        runs, metrics = self.runs, self.runs.metrics
        self.finishing = True
        if self._broken:
            return  # the lease expires and a reaper closes the run from the log
        reason = "cancelled" if isinstance(ending, RunFinished) else "error"
        store = runs.store
        if self._open_step is not None:
            # Keep what viewers saw of the step, but not tool calls that never ran.
            partial = step_messages(self._open_step.segments.output(), with_tool_calls=False)
            await self._finish_step(reason, self._open_step.segments.close())
            with contextlib.suppress(StorageUnavailable):
                await self._durably(lambda: store.append_messages(self.conversation_id, partial))
        if self._broken:
            return
        try:
            await self._durably(lambda: store.add_usage(self.conversation_id, self._totals.usage))
            total = await self._durably(
                lambda: store.add_cost(self.conversation_id, self._totals.cost_usd)
            )
            if isinstance(ending, RunFinished):
                ending.metadata.total_cost_usd = total
            history = await self._durably(lambda: store.messages(self.conversation_id))
            snapshot = protocol.encode(MessagesSnapshot(messages=history))
            await self._write_log([protocol.encode(ending)], finish=True, snapshot=snapshot)
        except LeaseLost:
            log.info("run %s lost its lease before it ended; another process ends it", self.run_id)
            return
        except StorageUnavailable:
            log.warning("storage unavailable: run %s not ended; its lease will expire", self.run_id)
            return
        metrics.events_appended.inc()
        metrics.run_seconds.observe(time.monotonic() - started)
        if isinstance(ending, RunError):
            metrics.run_errors.inc()
            log.info("run %s ended: %s", self.run_id, ending.code)

    async def _renew(self) -> None:
        """Keep the lease alive; a cancel requested by any process stops the run."""
        ttl = self.settings.lease_ttl_ms
        while True:
            await asyncio.sleep(ttl / 4000)
            try:
                if await self.runs.broker.renew_lease(self.lease, ttl):
                    self.request_stop("cancelled")
            except LeaseLost:
                self._broken = True
                self.request_stop("lease_lost")
                return
            except StorageUnavailable:
                log.warning("storage unavailable: could not renew the lease of run %s", self.run_id)

    async def _steps(self) -> None:
        store = self.runs.store
        workspace = Workspace(
            store, self.conversation_id, self.settings.max_file_bytes, self.settings.max_files
        )
        for number in range(1, self.settings.max_steps + 1):
            self._check_stop()
            history = await self._durably(lambda: store.messages(self.conversation_id))
            output = await self._step(f"llm-{number}", to_llm_messages(self.system, history))
            await self._durably(
                functools.partial(
                    store.append_messages, self.conversation_id, step_messages(output)
                )
            )
            if not output.tool_calls:
                return
            await self._run_tools(workspace, output)
        log.info("run %s reached max_steps (%d)", self.run_id, self.settings.max_steps)

    async def _run_tools(self, workspace: Workspace, output: StepOutput) -> None:
        limit = self.settings.max_tool_calls_per_step
        for position, call in enumerate(output.tool_calls):
            self._check_stop()
            if position < limit:
                outcome = await self._durably(
                    functools.partial(workspace.call, call.function.name, call.function.arguments)
                )
                content, is_error = outcome.content, outcome.is_error
            else:
                content = f"Error: at most {limit} tool calls per step; this one did not run"
                is_error = True
            message_id = new_id()
            await self._emit(
                ToolCallResult(
                    message_id=message_id,
                    tool_call_id=call.id,
                    content=content,
                    metadata=ToolResultMeta(is_error=is_error),
                )
            )
            result = SnapshotMessage(
                id=message_id, role="tool", content=content, tool_call_id=call.id
            )
            await self._durably(
                functools.partial(self.runs.store.append_messages, self.conversation_id, [result])
            )

    # ---- one step --------------------------------------------------------------------
    async def _start_step(self, name: str, attempt: int) -> _Step:
        step = _Step(name, StepSegments(), DeltaMerger(self._sink, self.settings.flush_ms))
        await self._emit(
            StepStarted(step_name=name, metadata=StepStartedMeta(model=self.model, attempt=attempt))
        )
        self._open_step = step
        return step

    async def _finish_step(
        self,
        reason: str,
        closing: list[Event],
        usage: Usage | None = None,
        cost: float = 0.0,
    ) -> None:
        step, self._open_step = self._open_step, None
        assert step is not None
        await step.merger.push(closing)
        await step.merger.aclose()
        await self._emit(
            StepFinished(
                step_name=step.name,
                metadata=StepFinishedMeta(
                    finish_reason=reason, usage=usage or Usage(), cost_usd=cost
                ),
            )
        )

    async def _step(self, name: str, messages: list[LLMMessage]) -> StepOutput:
        """One LLM call, retried on transient failures; its output once it ended."""
        attempt = 1
        while True:
            step = await self._start_step(name, attempt)
            try:
                reason, usage = await self._stream(step, messages)
            except (_Stopped, asyncio.CancelledError):
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
                if not failure.transient or attempt > self.settings.llm_retries:
                    raise failure from None
                if failure.retry_after_s is not None and failure.retry_after_s > _RETRY_AFTER_CAP_S:
                    raise failure from None
                streamed = step.streamed
                await self._finish_step("retry", step.segments.close())
                attempt += 1
                if streamed:
                    await self._emit(
                        Custom(
                            name="step_retry", value={"attempt": attempt, "reason": failure.code}
                        )
                    )
                backoff = self.settings.retry_backoff_s * 2 ** (attempt - 2)
                if failure.retry_after_s is not None:
                    backoff = max(backoff, failure.retry_after_s)
                await self._interruptible(functools.partial(asyncio.sleep, backoff))
                continue
            output = step.segments.output()
            cost = cost_usd(self.model, usage)
            self._totals.usage += usage
            self._totals.cost_usd += cost
            await self._finish_step(reason, step.segments.close(), usage, cost)
            return output

    async def _stream(self, step: _Step, messages: list[LLMMessage]) -> tuple[str, Usage]:
        """Stream one LLM call through the token callbacks; (finish reason, usage)."""
        litellm = await self._interruptible(load_litellm)
        options = completion_options(self.model, messages, self.settings)
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
                        self.runs.metrics.first_token_seconds.observe(time.monotonic() - called)
                    await step.merger.push(events)
                self._call_callbacks(chunk)
                reason = finish_reason_of(chunk) or reason
                usage = usage_of(chunk) or usage
            return reason, usage
        finally:
            await _quietly(stream.aclose, False)

    def _call_callbacks(self, chunk: object) -> None:
        for callback in self.runs.token_callbacks:
            try:
                callback(chunk)
            except Exception:
                if id(callback) not in self._failed_callbacks:
                    self._failed_callbacks.add(id(callback))
                    log.exception(
                        "token callback %r raised; skipped for this run", _name_of(callback)
                    )


def _name_of(callback: object) -> str:
    return str(getattr(callback, "__qualname__", type(callback).__qualname__))


async def _within(timeout_s: float, awaitable: Awaitable[T]) -> T:
    async with asyncio.timeout(timeout_s):
        return await awaitable


async def _quietly(close: Callable[[], Awaitable[object]], skip: bool) -> None:
    """Close a stream or merger on the way out; its failure must not hide the run's."""
    if skip:
        return
    try:
        await close()
    except Exception:
        log.debug("cleanup failed", exc_info=True)


# ---- the runs of a process ------------------------------------------------------------


async def open_run(
    broker: Broker,
    store: Store,
    conversation_id: str,
    content: str,
    ttl_ms: int,
    reap: Callable[[str], Awaitable[None]],
) -> RunLease:
    """Take the run lease and append RUN_STARTED in one step, and record the user message:
    how every run starts, built-in or published. A run whose lease expired is reaped
    (``reap``) first. ``NotFound``; ``RunActive`` while a live run holds the lease."""
    if await store.get(conversation_id) is None:
        raise NotFound(conversation_id)
    run_id = new_id()
    user = UserMessage(id=new_id(), content=content)
    body = protocol.encode(
        RunStarted(
            thread_id=conversation_id,
            run_id=run_id,
            input=RunAgentInput(thread_id=conversation_id, run_id=run_id, messages=[user]),
        )
    )
    try:
        lease = await broker.start_run(conversation_id, run_id, body, ttl_ms)
    except RunActive:
        active = await broker.active_run(conversation_id)
        if active is None or active.lease_alive:
            raise
        await reap(conversation_id)
        lease = await broker.start_run(conversation_id, run_id, body, ttl_ms)
    await store.append_messages(
        conversation_id, [SnapshotMessage(id=user.id, role="user", content=content)]
    )
    return lease


class Runs:
    """Starts, cancels and ends runs; reaps runs whose process died."""

    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        store: Store,
        metrics: Metrics,
        token_callbacks: Sequence[TokenCallback] = (),
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.store = store
        self.metrics = metrics
        self.token_callbacks = tuple(token_callbacks)
        self._local: dict[str, _Run] = {}  # conversation id -> its run on this process

    async def start(self, conversation_id: str, content: str) -> str:
        """Start a run; returns its id once RUN_STARTED is in the log."""
        conversation = await self.store.get(conversation_id)
        if conversation is None:
            raise NotFound(conversation_id)
        lease = await open_run(
            self.broker,
            self.store,
            conversation_id,
            content,
            self.settings.lease_ttl_ms,
            self._reap_unless_local,
        )
        self.metrics.runs_started.inc()
        self.metrics.events_appended.inc()
        model = conversation.model
        run = _Run(self, lease, model, conversation.system, provider_phrase(model))
        run.task = asyncio.create_task(run.main(), name=f"run-{lease.run_id}")
        self._local[conversation_id] = run
        run.task.add_done_callback(lambda _: self._forget(run))
        return lease.run_id

    async def _reap_unless_local(self, conversation_id: str) -> None:
        if conversation_id in self._local:
            raise RunActive(conversation_id)  # ours, only slow to renew: not dead
        await self.reap(conversation_id)

    def _forget(self, run: _Run) -> None:
        if self._local.get(run.conversation_id) is run:
            del self._local[run.conversation_id]

    async def cancel(self, conversation_id: str) -> str:
        """Cancel the conversation's run, here or on another process; its run id."""
        run = self._local.get(conversation_id)
        if run is not None and not run.finishing:
            run.request_stop("cancelled")
            return run.run_id
        run_id = await self.broker.request_cancel(conversation_id)
        if run_id is None:
            raise NoRun(conversation_id)
        return run_id

    async def reap(self, conversation_id: str) -> None:
        """End a run whose lease expired: close its open segments, append producer_lost."""
        active = await self.broker.active_run(conversation_id)
        if active is None or active.lease_alive:
            return
        lease = await self.broker.take_over_run(conversation_id, self.settings.lease_ttl_ms)
        if lease is None:
            return
        closing = await self.closing_events(conversation_id, active.start_seq)
        closing.append(
            RunError(message="the run's server process stopped responding", code="producer_lost")
        )
        history = await self.store.messages(conversation_id)
        snapshot = protocol.encode(MessagesSnapshot(messages=history))
        try:
            await self.broker.finish_run(
                lease, [protocol.encode(event) for event in closing], snapshot
            )
        except LeaseLost:
            return  # another process reaped it first
        self.metrics.events_appended.inc(len(closing))
        self.metrics.run_errors.inc()
        log.info("run %s of %s ended: producer_lost", lease.run_id, conversation_id)

    async def closing_events(self, conversation_id: str, start_seq: int) -> list[Event]:
        """The events that end what a dead run left open, read from its log."""
        reasoning: dict[str, None] = {}
        texts: dict[str, None] = {}
        tools: dict[str, None] = {}
        step: str | None = None
        after = start_seq - 1
        while True:
            frames = await self.broker.read_log(conversation_id, after, _REAP_PAGE)
            for frame in frames:
                event = protocol.event_decoder.decode(frame)
                match event:
                    case protocol.ReasoningMessageStart(message_id=i):
                        reasoning[i] = None
                    case protocol.ReasoningEnd(message_id=i):
                        reasoning.pop(i, None)
                    case protocol.TextMessageStart(message_id=i):
                        texts[i] = None
                    case protocol.TextMessageEnd(message_id=i):
                        texts.pop(i, None)
                    case protocol.ToolCallStart(tool_call_id=i):
                        tools[i] = None
                    case protocol.ToolCallEnd(tool_call_id=i):
                        tools.pop(i, None)
                    case StepStarted(step_name=name):
                        step = name
                    case StepFinished():
                        step = None
            if len(frames) < _REAP_PAGE:
                break
            after = protocol.seq_of(frames[-1])
        events: list[Event] = []
        for message_id in reasoning:
            events += [
                ReasoningMessageEnd(message_id=message_id),
                ReasoningEnd(message_id=message_id),
            ]
        events += [TextMessageEnd(message_id=message_id) for message_id in texts]
        events += [ToolCallEnd(tool_call_id=tool_call_id) for tool_call_id in tools]
        if step is not None:
            events.append(
                StepFinished(step_name=step, metadata=StepFinishedMeta(finish_reason="error"))
            )
        return events

    async def shutdown(self, grace_s: float) -> None:
        """Let this process's runs finish for ``grace_s``, then end them with RUN_ERROR."""
        runs = list(self._local.values())
        tasks = [run.task for run in runs if run.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        if not pending:
            return
        for run in runs:
            run.request_stop("shutdown")
        _, pending = await asyncio.wait(pending, timeout=5.0)
        for task in pending:  # stuck on storage: the lease expires and another process reaps
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
