"""The agent loop: one run per user message, LLM steps through LiteLLM, tools between them.

A run appends, in order: ``RUN_STARTED``; per step ``STEP_STARTED``, the segments of the
streamed answer, ``STEP_FINISHED``, then the ``TOOL_CALL_RESULT`` of each tool call; and
last ``RUN_FINISHED`` (success or cancelled) or ``RUN_ERROR``. Whatever ends a run, it
ends through :func:`costream.lifecycle.end_run`: the open step's closing events (every
``*_START`` has its ``*_END``) and ``STEP_FINISHED``, the ending, the lease released and a
``MESSAGES_SNAPSHOT``, in one atomic append by the run's own exactly-once writer.

- Retries (:mod:`costream.agent.step`): transient failures (connection errors, 5xx, a stream
  cut mid-way, no chunk for ``llm_timeout_s``, 429) are retried ``llm_retries`` times with
  exponential backoff; each retry ends the step with ``finishReason`` ``retry`` and starts
  it again with ``metadata.attempt`` one more (``CUSTOM step_retry`` first when output was
  streamed).
- Cancel: takes effect while the run waits on the LLM or a backoff (each such wait is a
  child task, which a stop request cancels), or before the next tool or step; broker
  appends are never interrupted, so the log stays well formed.
- Storage away (Redis restarting, failing over, paused; :mod:`costream.agent.storage`): the
  run holds what it was about to write (one batch of events; the LLM stream waits unread
  behind it, so nothing grows) and retries with backoff for up to ``STORAGE_RETRY_S``
  (30 s). An append that failed may have run (Redis died mid-script): before trying again
  the log's head says whether it did, so no event is logged twice. Storage back within
  the lease's ttl: the run goes on as if nothing happened. Back later: the lease has
  expired and the run stops; the reaper (:func:`costream.lifecycle.reap`) ends it with
  ``RUN_ERROR`` ``producer_lost`` (as it does after ``STORAGE_RETRY_S``).
- Sizes: no event passes ``max_event_bytes`` (deltas split, a tool result cut), the LLM's
  history stays within ``max_history_bytes`` (``llm.bound_history``), and a run refused
  past ``max_run_bytes`` (``RunTooLarge``) ends with ``RUN_ERROR`` ``too_large``.
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
from typing import Any, Final, Literal, TypeVar

from costream import errors, lifecycle, protocol
from costream.agent.llm import bound_history, bounded_messages, to_llm_messages
from costream.agent.step import Steps, Stopped, TokenCallback, quietly
from costream.agent.storage import STORAGE_RETRY_S, LogWriter, durably
from costream.agent.tools import TOOL_SPECS, Workspace
from costream.broker import Broker, RunLease
from costream.config import Settings
from costream.errors import LeaseLost, NoRun, NotFound, RunActive, StorageUnavailable, TooManyRuns
from costream.lifecycle import Outcome, RunEnd, open_run
from costream.metrics import Metrics
from costream.protocol import (
    ErrorCode,
    Event,
    RunError,
    SnapshotMessage,
    ToolCallResult,
    ToolResultMeta,
)
from costream.provider import LLMFailure, provider_phrase
from costream.segments import StepOutput, new_id, step_messages
from costream.sizes import event_size, fit_text
from costream.store import Store

__all__ = ["Runs", "StopReason", "TokenCallback"]

log = logging.getLogger(__name__)

T = TypeVar("T")

StopReason = Literal["cancelled", "shutdown", "lease_lost", "storage", "too_large"]
_BROKEN: Final[tuple[StopReason, ...]] = ("lease_lost", "storage")  # a reaper ends the run


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
        self.stop_reason: StopReason | None = None
        self.run_limit = 0  # the max_run_bytes the broker refused an append at
        self._waits: set[asyncio.Future[Any]] = set()  # interruptible waits under way
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
    @property
    def broken(self) -> bool:
        """An append was lost (lease or storage): append nothing more; the lease expires
        and a reaper ends the run from its log."""
        return self.stop_reason in _BROKEN

    def request_stop(self, reason: StopReason) -> None:
        """Stop at the next interruptible point: now, if the run waits on the LLM or a
        backoff. A lost lease or storage overrides an earlier reason."""
        if self.stop_reason is None or reason in _BROKEN:
            self.stop_reason = reason
        for wait in self._waits:
            wait.cancel()

    async def _interruptible(self, make: Callable[[], Awaitable[T]]) -> T:
        """Await ``make()`` (an LLM call, a backoff) in a child task that
        :meth:`request_stop` cancels; ``Stopped`` when a stop was requested before or
        during the wait and the wait did not complete."""
        self._check_stop()
        wait = asyncio.ensure_future(make())
        self._waits.add(wait)
        try:
            return await wait
        except BaseException:
            current = asyncio.current_task()
            if self.stop_reason is None or (current is not None and current.cancelling()):
                raise  # a failure of its own, or the run's task itself was cancelled
            raise Stopped from None
        finally:
            self._waits.discard(wait)

    def _check_stop(self) -> None:
        if self.stop_reason is not None:
            raise Stopped

    # ---- appending ----------------------------------------------------------------
    async def _append(self, bodies: list[bytes]) -> None:
        """Append to the log. Never raises: a lost lease or storage stops the run instead."""
        if self.broken or self.stop_reason == "too_large" or not bodies:
            return
        try:
            await self._writer.append(bodies)
        except errors.RunTooLarge as refused:
            log.info("run %s passed max_run_bytes (%d); it ends", self.run_id, refused.limit)
            self.run_limit = refused.limit
            self.request_stop("too_large")
            return
        except LeaseLost:
            log.info("run %s lost its lease; another process ends it", self.run_id)
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
        self.request_stop("storage")

    async def _sink(self, events: list[Event]) -> None:
        await self._append([protocol.encode(event) for event in events])

    # ---- the run -------------------------------------------------------------------
    async def main(self) -> None:
        """The whole run, from after RUN_STARTED to its last event. A cancel of its task
        (the process is going away) ends it with no ending: the reaper ends it later."""
        started = time.monotonic()
        renewer = asyncio.create_task(self._renew())
        try:
            try:
                await self._steps()
                end = self._run_end("success")
            except Stopped:
                end = self._stopped_end()
            except LLMFailure as failure:
                end = self._run_end("error", failure.code, failure.message)
            except StorageUnavailable:
                self._give_up_on_storage()
                return  # the lease expires; the reaper ends the run
            except Exception:
                log.exception("run %s failed", self.run_id)
                end = self._run_end("error", "internal", "the run failed unexpectedly")
            await self._end(end, started)
        finally:
            renewer.cancel()
            if self._llm.open is not None:
                await quietly(self._llm.open.merger.aclose, self.broken)
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    def _run_end(
        self, outcome: Outcome, code: ErrorCode = "internal", message: str = "the run failed"
    ) -> RunEnd:
        totals = self._llm.totals
        return RunEnd(
            outcome,
            usage=totals.usage,
            cost_usd=totals.cost_usd,
            model=self.model,
            error_code=code,
            error_message=message,
        )

    def _stopped_end(self) -> RunEnd:
        if self.stop_reason == "too_large":
            limit = f"{self.run_limit:,} bytes per run (max_run_bytes)"
            return self._run_end("error", "too_large", f"the run's events passed {limit}")
        if self.stop_reason == "shutdown":
            return self._run_end("error", "producer_lost", "the server shut down during this run")
        return self._run_end("cancelled")

    async def _end(self, end: RunEnd, started: float) -> None:
        """Close the open step and end the run (:func:`costream.lifecycle.end_run`) with
        this run's retrying storage calls; a broken run is left to the reaper."""
        if self.broken:
            return
        closing: list[Event] = []
        if self._llm.open is not None:
            # Keep what viewers saw of the step, but not tool calls that never ran.
            seen = step_messages(self._llm.open.segments.output(), with_tool_calls=False)
            end.messages = bounded_messages(seen, self.settings.max_event_bytes)
            reason = "error" if end.outcome == "error" else "cancelled"
            closing = await self._llm.cut_short(reason)
            if self.broken:
                return  # flushing the step lost the lease or storage
            # The cut step's tokens (reported or estimated) count in the run's usage too.
            end.usage, end.cost_usd = self._llm.totals.usage, self._llm.totals.cost_usd
        if self.stop_reason == "too_large":
            # Some events were refused, maybe a segment's start: close what the log shows.
            closing = await durably(self._writer.logged_closing)
        metrics = self.runs.metrics
        try:
            ended = await lifecycle.end_run(
                self.runs.broker,
                self.runs.store,
                self.lease,
                end,
                closing,
                durably=durably,
                write=self._writer.finish,
                max_snapshot_bytes=self.settings.max_event_bytes,
            )
        except LeaseLost:
            log.info("run %s lost its lease before it ended; another process ends it", self.run_id)
            return
        except StorageUnavailable:
            log.warning("storage unavailable: run %s not ended; its lease will expire", self.run_id)
            return
        metrics.events_appended.inc(ended.events)
        metrics.run_seconds.observe(time.monotonic() - started)
        if isinstance(ended.ending, RunError):
            metrics.run_errors.inc()
            log.info("run %s ended: %s", self.run_id, ended.ending.code)

    async def _renew(self) -> None:
        """Keep the lease alive; a cancel requested by any process stops the run."""
        ttl = self.settings.lease_ttl_ms
        while True:
            await asyncio.sleep(ttl / 4000)
            try:
                if await self.runs.broker.renew_lease(self.lease, ttl):
                    self.request_stop("cancelled")
            except LeaseLost:
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
            messages = to_llm_messages(self.system, history)
            output = await self._llm.step(
                f"llm-{number}", bound_history(messages, self.settings.max_history_bytes)
            )
            recorded = bounded_messages(step_messages(output), self.settings.max_event_bytes)
            await durably(functools.partial(store.append_messages, self.conversation_id, recorded))
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
            message_id, meta = new_id(), ToolResultMeta(is_error=is_error)
            event = ToolCallResult(
                message_id=message_id, tool_call_id=call.id, content="", metadata=meta
            )
            # Within one event's size, the marker included; the history keeps the same.
            room = self.settings.max_event_bytes - event_size(event)
            event.content = content = fit_text(content, room)
            await self._sink([event])
            result = SnapshotMessage(
                id=message_id,
                role="tool",
                content=content,
                tool_call_id=call.id,
                error=content if is_error else None,  # AG-UI's mark of a failed tool
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
        self._opening = 0  # starts past the cap check, not yet in _local

    async def start(
        self,
        conversation_id: str,
        content: str,
        *,
        run_id: str | None = None,
        message_id: str | None = None,
        sender: str | None = None,
    ) -> str:
        """Start a run; returns its id once RUN_STARTED is in the log. TooManyRuns
        when this process already runs ``max_runs``."""
        if len(self._local) + self._opening >= self.settings.max_runs:
            raise TooManyRuns(conversation_id)
        self._opening += 1
        try:
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
                run_id=run_id,
                message_id=message_id,
                sender=sender,
            )
        finally:
            self._opening -= 1
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
        if run is not None and run.task is not None and not run.task.done():
            run.request_stop("cancelled")
            return run.run_id
        run_id = await self.broker.request_cancel(conversation_id)
        if run_id is None:
            raise NoRun(conversation_id)
        return run_id

    async def reap(self, conversation_id: str) -> None:
        """End a run whose lease expired: close its open segments, append producer_lost."""
        ended = await lifecycle.reap(
            self.broker, self.store, conversation_id, self.settings.lease_ttl_ms
        )
        if ended is not None:
            self.metrics.events_appended.inc(ended.events)
            self.metrics.run_errors.inc()

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
