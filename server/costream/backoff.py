"""Exponential backoff: the one schedule of delays every retry loop in costream follows.

    backoff = Backoff(first_s=0.05, cap_s=2.0, budget_s=30.0)
    while True:
        try:
            return await call()
        except StorageUnavailable:
            delay = backoff.next_delay()
            if delay is None:
                raise  # the budget is spent
            await asyncio.sleep(delay)

No I/O and no clock of its own beyond ``time.monotonic``: sync code (``time.sleep``) and
async code (``asyncio.sleep``) use it alike. Delays grow ``first_s``, ``2 * first_s``, ...
up to ``cap_s``; with ``jitter`` each is drawn from ``[delay / 2, delay]`` so that many
clients cut off at once do not come back at once.
"""

from __future__ import annotations

import random
import time


class Backoff:
    """Delays for one retry loop: exponential, capped, optionally jittered, bounded by a
    number of ``attempts`` and/or a time ``budget_s`` (from construction or :meth:`reset`)."""

    def __init__(
        self,
        first_s: float,
        cap_s: float,
        *,
        factor: float = 2.0,
        jitter: bool = False,
        attempts: int | None = None,
        budget_s: float | None = None,
    ) -> None:
        self.first_s, self.cap_s, self.factor = first_s, cap_s, factor
        self.jitter, self.attempts, self.budget_s = jitter, attempts, budget_s
        self.reset()

    def reset(self) -> None:
        """Start again from ``first_s`` with the whole budget (the call went through)."""
        self.failures = 0
        self._deadline = None if self.budget_s is None else time.monotonic() + self.budget_s

    def peek(self) -> float:
        """The delay the next failure would wait, before jitter."""
        return min(self.cap_s, self.first_s * self.factor**self.failures)

    def next_delay(self) -> float | None:
        """Count one failure; how long to wait before the next try, or None when the
        attempts are used up or the wait would end past the budget."""
        delay = self.peek()
        if self.attempts is not None and self.failures >= self.attempts:
            return None
        if self._deadline is not None and time.monotonic() + delay > self._deadline:
            return None
        self.failures += 1
        return delay * random.uniform(0.5, 1.0) if self.jitter else delay
