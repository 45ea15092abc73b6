"""Pacing one WebSocket session: a rate limit for what the client sends, a send timeout
for what the server sends. No I/O of their own."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass
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

    The block is entered once for the writer's life with no deadline; one timer wakes at
    most every ``timeout_s`` and, when the batch marked in ``since`` is overdue, moves the
    block's deadline to now. So each batch costs an attribute write, not a timer
    scheduled and cancelled, and asyncio's own timeout owns the cancellation.
    """

    def __init__(self, deadline: asyncio.Timeout, timeout_s: float) -> None:
        self.since: float | None = None  # loop time the batch being sent began
        self._deadline = deadline
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(timeout_s, self._check)

    def _check(self) -> None:
        now, since = self._loop.time(), self.since
        if since is not None and now - since >= self._timeout_s:
            self._timer = None
            self._deadline.reschedule(now)
            return
        start = now if since is None else since
        self._timer = self._loop.call_at(start + self._timeout_s, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
