"""Pacing one WebSocket session: a rate limit for what the client sends, a send timeout
for what the server sends, and stopping the reader when the writer ends. No I/O of their
own."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Final


@dataclass(slots=True)
class RateLimit:
    """A token bucket: ``rate`` frames per second, bursts of ``burst``."""

    rate: float
    burst: float
    tokens: float = 0.0
    stamp: float = 0.0

    def allow(self) -> bool:
        now = time.monotonic()
        if self.stamp == 0.0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class SendWatchdog:
    """The send timeout of one writer: a batch still not sent after ``timeout_s`` ends
    the writer's ``asyncio.timeout`` block with TimeoutError.

    The block is entered once for the writer's life with no deadline; a batch calls
    :meth:`begin` and :meth:`end`. One timer, armed by a ``begin`` when none is, wakes at
    most every ``timeout_s`` while batches go out and, when the batch that began at
    ``since`` is overdue, moves the block's deadline to now; it is not armed again while
    the writer is idle (an idle viewer holds no timer of it). So a batch costs no timer
    scheduled and cancelled, and asyncio's own timeout owns the cancellation.
    """

    __slots__ = ("_deadline", "_loop", "_timeout_s", "_timer", "since")

    def __init__(self, deadline: asyncio.Timeout, timeout_s: float) -> None:
        self.since: float | None = None  # loop time the batch being sent began
        self._deadline = deadline
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None

    def begin(self) -> None:
        """A batch starts being sent now."""
        self.since = now = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(now + self._timeout_s, self._check)

    def end(self) -> None:
        """The batch is sent."""
        self.since = None

    def _check(self) -> None:
        self._timer = None
        now, since = self._loop.time(), self.since
        if since is None:
            return  # idle: the next ``begin`` arms the timer again
        if now - since >= self._timeout_s:
            self._deadline.reschedule(now)
            return
        self._timer = self._loop.call_at(since + self._timeout_s, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class StopReader:
    """Called when a writer fails: cancels the reader's ``task``, and again every
    ``AGAIN_S`` until the reader ends (a cancel can be lost in a Redis command). Its
    cancels are undone with ``uncancel`` once the reader has ended, as ``asyncio.timeout``
    does, so a cancellation from outside is told apart."""

    __slots__ = ("_cancels", "_ended", "_task", "_timer")
    AGAIN_S: Final = 0.05

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self._task = task
        self._cancels = 0
        self._ended = False
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, _: object = None) -> None:
        self._timer = None
        if self._ended:
            return
        self._cancels += 1
        self._task.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.AGAIN_S, self)

    def reader_ended(self) -> bool:
        """Stop cancelling and undo this one's cancels; whether the task is still being
        cancelled from elsewhere."""
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._cancels:
            self._cancels -= 1
            self._task.uncancel()
        return self._task.cancelling() > 0
