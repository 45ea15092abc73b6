"""Writing a run to storage through outages (Redis restarting, failing over, paused).

A run's storage calls are retried with backoff (:func:`_storage_backoff`) for up to
``STORAGE_RETRY_S``; after that ``StorageUnavailable`` reaches the run, which stops and
lets its lease expire, so the reaper ends it.

- Log writes (:class:`LogWriter`) happen exactly once: Redis may die after it ran an
  append's script and before it answered, so before trying again the log's head (and the
  seq of the run's last event) tells whether the write went through.
- Other calls (:func:`durably`: the history, totals, files) are retried whole: one that
  failed after it ran (Redis died mid-command, rare) runs twice, so each is idempotent
  (:mod:`costream.store`: a history entry stored twice is read once, a run's totals are
  kept under its run id, a file is put whole).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from costream.backoff import Backoff
from costream.broker import Broker, RunLease
from costream.errors import LeaseLost, StorageUnavailable
from costream.lifecycle import closing_events
from costream.protocol import Event

log = logging.getLogger(__name__)

T = TypeVar("T")

STORAGE_RETRY_S: Final = 30.0  # how long a run waits for storage before it gives up


def _storage_backoff() -> Backoff:
    """Pauses of 0.05 s doubling up to 1 s, while the next try starts within ``STORAGE_RETRY_S``."""
    return Backoff(first_s=0.05, cap_s=1.0, budget_s=STORAGE_RETRY_S)


class LogWriter:
    """Appends one run's events to its log exactly once, retrying while storage is away."""

    def __init__(self, broker: Broker, lease: RunLease) -> None:
        self.broker = broker
        self.lease = lease
        self.conversation_id = lease.conversation_id
        self.run_id = lease.run_id
        self.head: int | None = None  # seq of this run's last logged event, once known

    async def append(self, bodies: list[bytes]) -> int:
        """Append ``bodies`` exactly once, retrying while storage is away; the seq of the
        last. Raises ``LeaseLost``, or ``StorageUnavailable`` once storage stayed away for
        ``STORAGE_RETRY_S``."""
        return await self._write(bodies, finish=False, snapshot=None)

    async def finish(self, bodies: list[bytes], snapshot: bytes) -> int:
        """Append the run's last ``bodies``, store ``snapshot`` and release the lease,
        exactly once, as :meth:`append` does; the seq of the last."""
        return await self._write(bodies, finish=True, snapshot=snapshot)

    async def _write(self, bodies: list[bytes], *, finish: bool, snapshot: bytes | None) -> int:
        # Redis may die after it ran an append's script and before it answered: before
        # trying again, the log's head (and the seq of our last event) tells whether it ran.
        broker = self.broker
        backoff = _storage_backoff()
        while True:
            try:
                if backoff.failures and await self._already_written(len(bodies), finish):
                    assert self.head is not None
                    return self.head
                if finish:
                    self.head = await broker.finish_run(self.lease, bodies, snapshot)
                else:
                    self.head = await broker.append(self.lease, bodies)
                return self.head
            except StorageUnavailable:
                delay = backoff.next_delay()
                if delay is None:
                    raise
                if backoff.failures == 1:
                    log.warning("storage unavailable: run %s waits and retries", self.run_id)
                await asyncio.sleep(delay)

    async def logged_closing(self) -> list[Event]:
        """The events that close what the run's log shows open (none once it lost its
        lease: ending it then fails with ``LeaseLost``)."""
        active = await self.broker.active_run(self.conversation_id)
        if active is None or active.run_id != self.run_id:
            return []
        return await closing_events(self.broker, self.conversation_id, active.start_seq)

    async def _already_written(self, count: int, finish: bool) -> bool:
        """After a failed write of ``count`` events: whether it ran anyway.
        ``LeaseLost`` when the log moved on without this run."""
        broker = self.broker
        before = self.head
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
            self.head = head
            log.info("run %s: the write that failed had gone through", self.run_id)
            return True
        if head != before or not mine:
            raise LeaseLost(self.conversation_id)
        return False


async def durably(make: Callable[[], Awaitable[T]]) -> T:
    """A storage call other than a log write (the history, totals, files), retried while
    storage is away. Not checked like appends: one that failed after it ran (Redis died
    mid-command, rare) runs again, which the store's idempotent writes make harmless."""
    backoff = _storage_backoff()
    while True:
        try:
            return await make()
        except StorageUnavailable:
            delay = backoff.next_delay()
            if delay is None:
                raise
            await asyncio.sleep(delay)
