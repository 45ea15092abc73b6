"""The agent loop: one run per user message, LLM steps through LiteLLM, tools between them.

A run appends, in order: ``RUN_STARTED``; per step ``STEP_STARTED``, the segments of the
streamed answer, ``STEP_FINISHED``, then the ``TOOL_CALL_RESULT`` of each tool call; and
last ``RUN_FINISHED`` (success or cancelled) or ``RUN_ERROR``, released with the lease and
a ``MESSAGES_SNAPSHOT`` in one atomic step. Whatever ends a run, open segments are closed
first, so every ``*_START`` has its ``*_END``.

- Retries (:mod:`costream.agent.step`): transient failures (connection errors, 5xx, a stream
  cut mid-way, no chunk for ``llm_timeout_s``, 429) are retried ``llm_retries`` times with
  exponential backoff; each retry ends the step with ``finishReason`` ``retry`` and starts
  it again with ``metadata.attempt`` one more (``CUSTOM step_retry`` first when output was
  streamed).
- Cancel: takes effect while the run waits on the LLM or a backoff, or before the next
  tool or step; broker appends are never interrupted, so the log stays well formed.
- Storage away (Redis restarting, failing over, paused; :mod:`costream.agent.storage`): the
  run holds what it was about to write (one batch of events; the LLM stream waits unread
  behind it, so nothing grows) and retries with backoff for up to ``STORAGE_RETRY_S``
  (30 s). An append that failed may have run (Redis died mid-script): before trying again
  the log's head says whether it did, so no event is logged twice. Storage back within
  the lease's ttl: the run goes on as if nothing happened. Back later: the lease has
  expired and the run stops; the reaper (:func:`costream.lifecycle.reap`) ends it with
  ``RUN_ERROR`` ``producer_lost`` (as it does after ``STORAGE_RETRY_S``).
- ``max_steps``: a model that still calls tools after the last step ends the run with
  ``RUN_FINISHED`` success; its tool results are in the history, so the next message
  continues from there.
- Secrets: error messages are our own words (status, provider; ``llm.classify``), never
  LiteLLM's text, which may quote the request or the provider's answer, and so the API key.

LiteLLM is called by the run's steps only (:mod:`costream.agent.step`), through
:mod:`costream.agent.llm` (its lazy import, the request's messages and options, the chunks'
usage, errors and prices): the import takes seconds and ~200 MB, so it happens at the
process's first LLM call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, TypeVar

from costream import lifecycle, protocol
from costream.agent.llm import to_llm_messages
from costream.agent.step import Steps, Stopped, TokenCallback, quietly
from costream.agent.storage import STORAGE_RETRY_S, LogWriter, durably
from costream.agent.tools import TOOL_SPECS, Workspace
from costream.broker import Broker, RunLease
from costream.config import Settings
from costream.errors import LeaseLost, NoRun, NotFound, RunActive, StorageUnavailable
from costream.lifecycle import open_run
from costream.metrics import Metrics
from costream.protocol import (
    Event,
    MessagesSnapshot,
    RunError,
    RunFinished,
    RunFinishedMeta,
    RunOutcome,
    SnapshotMessage,
    TokenUsage,
    ToolCallResult,
    ToolResultMeta,
)
from costream.provider import LLMFailure, provider_phrase
from costream.segments import StepOutput, new_id, step_messages
from costream.store import Store

__all__ = ["Runs", "StopReason", "TokenCallback"]

log = logging.getLogger(__name__)

T = TypeVar("T")

StopReason = Literal["cancelled", "shutdown", "lease_lost", "storage"]


# ---- one run ----------------------------------------------------------------------


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
        self._writer = LogWriter(runs.broker, lease)
        self._llm = Steps(
            run_id=self.run_id,
            model=model,
            provider=provider,
            settings=self.settings,
            metrics=runs.metrics,
            token_callbacks=runs.token_callbacks,
            tools=TOOL_SPECS,
            sink=self._sink,
            interruptible=self._interruptible,
        )

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
            raise Stopped
        self._waiting = True
        try:
            result = await make()
        except BaseException:
            if self._interrupting:
                self._uncancel()
                raise Stopped from None
            raise
        finally:
            self._waiting = False
        if self._interrupting:  # the awaited code swallowed the cancellation
            self._uncancel()
            raise Stopped
        return result

    def _uncancel(self) -> None:
        self._interrupting = False
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            task.uncancel()

    def _check_stop(self) -> None:
        if self.stop_reason is not None:
            raise Stopped

    # ---- appending ----------------------------------------------------------------
    async def _append(self, bodies: list[bytes]) -> None:
        """Append to the log. Never raises: a lost lease or storage stops the run instead."""
        if self._broken or not bodies:
            return
        try:
            await self._writer.write(bodies)
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
            except Stopped:
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
            if self._llm.open is not None:
                await quietly(self._llm.open.merger.aclose, self._broken)
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    def _stop_ending(self) -> Event:
        if self.stop_reason == "shutdown":
            return RunError(message="the server shut down during this run", code="producer_lost")
        return self._run_finished("cancelled")

    def _run_finished(self, outcome: Literal["success", "cancelled"]) -> RunFinished:
        usage = self._llm.totals.usage
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
            metadata=RunFinishedMeta(cost_usd=self._llm.totals.cost_usd),
        )

    async def _end(self, ending: Event, started: float) -> None:
        """Close what is open, count the cost, append the last event with the snapshot."""
        runs, metrics = self.runs, self.runs.metrics
        self.finishing = True
        if self._broken:
            return  # the lease expires and a reaper closes the run from the log
        reason = "cancelled" if isinstance(ending, RunFinished) else "error"
        store = runs.store
        if self._llm.open is not None:
            # Keep what viewers saw of the step, but not tool calls that never ran.
            partial = step_messages(self._llm.open.segments.output(), with_tool_calls=False)
            await self._llm.finish(reason, self._llm.open.segments.close())
            with contextlib.suppress(StorageUnavailable):
                await durably(lambda: store.append_messages(self.conversation_id, partial))
        if self._broken:
            return
        try:
            await durably(lambda: store.add_usage(self.conversation_id, self._llm.totals.usage))
            total = await durably(
                lambda: store.add_cost(self.conversation_id, self._llm.totals.cost_usd)
            )
            if isinstance(ending, RunFinished):
                ending.metadata.total_cost_usd = total
            history = await durably(lambda: store.messages(self.conversation_id))
            snapshot = protocol.encode(MessagesSnapshot(messages=history))
            await self._writer.write([protocol.encode(ending)], finish=True, snapshot=snapshot)
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
            history = await durably(lambda: store.messages(self.conversation_id))
            output = await self._llm.step(f"llm-{number}", to_llm_messages(self.system, history))
            await durably(
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
                outcome = await durably(
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
            await durably(
                functools.partial(self.runs.store.append_messages, self.conversation_id, [result])
            )


# ---- the runs of a process ------------------------------------------------------------


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
        await lifecycle.reap(
            self.broker, self.store, self.metrics, conversation_id, self.settings.lease_ttl_ms
        )

    async def closing_events(self, conversation_id: str, start_seq: int) -> list[Event]:
        """The events that end what a dead run left open, read from its log."""
        return await lifecycle.closing_events(self.broker, conversation_id, start_seq)

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
