"""The durable embedded broker: the memory broker's machinery, written through to SQLite.

One process owns a data directory (``sqlite_database.Database`` locks it). The state of
each conversation in use is the memory broker's, on the event loop, so every method stays
atomic by construction; each change is handed to the database's one writer in the same
step, in order. A call that changes anything returns once its change is committed, and a
logged frame is published only then: no viewer ever sees a frame that a restart, even
after SIGKILL, would not find in the log. Reads of the log stop at the committed head.

What survives a restart: conversations and their records (token digests, totals), the
log with its trimming and snapshot, the epoch, message history and workspace files (the
named maps and lists), the fence and the open run. Presence and the live tail are of this
process only. A run found open in the file belongs to a process that is gone: its lease
reads as expired, so the normal reap path ends it (:meth:`interrupted_runs` lists them).

Conversations are loaded on first use and dropped from memory once idle, so memory follows
the conversations in use, not the number on disk.

Each write stores the time of the last activity (``last_active``; presence is written
back by the sweep and the eviction): :meth:`SqliteBroker.expire_idle` deletes a page of
conversations idle past ``conversation_ttl_s`` with no run, viewer or write in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from costream import protocol
from costream.broker import (
    LOG_RETAIN,
    LOG_RETAIN_BYTES,
    MAX_RUN_BYTES,
    ActiveRun,
    FrameListener,
    LogState,
    ResyncListener,
    RunLease,
)
from costream.broker import sqlite_database as db
from costream.broker.memory import ConversationState, MemoryBroker, RunState
from costream.errors import StorageUnavailable

__all__ = ["SqliteBroker"]

_EVICT_EVERY_S = 30.0


class SqliteBroker(MemoryBroker):
    """Conversations in ``data_dir/costream.db``; they survive the process."""

    def __init__(
        self,
        data_dir: Path,
        log_retain: int = LOG_RETAIN,
        idle_s: float = 300.0,
        *,
        log_retain_bytes: int = LOG_RETAIN_BYTES,
        max_run_bytes: int = MAX_RUN_BYTES,
        conversation_ttl_s: float = 0.0,
    ) -> None:
        super().__init__(
            log_retain,
            log_retain_bytes=log_retain_bytes,
            max_run_bytes=max_run_bytes,
            conversation_ttl_s=conversation_ttl_s,
        )
        self.database = db.Database(data_dir)
        self.idle_s = idle_s  # a conversation unused this long leaves memory
        self._deliver: FrameListener | None = None
        self._outbox: list[tuple[str, bytes]] = []  # frames appended, not yet committed
        self._committed: dict[str, int] = {}  # head the file holds, per loaded conversation
        self._handed: dict[str, int] = {}  # head handed to the writer
        self._last_used: dict[str, float] = {}
        self._loading: dict[str, asyncio.Future[bool]] = {}
        self._interrupted: list[str] = []
        self._evictor: asyncio.Task[None] | None = None

    # ---- lifecycle ----------------------------------------------------------------
    def open(self) -> None:
        """Lock the data directory and open the database (``start`` does it too).
        Raises ``DataDirError`` with a message for the operator."""
        if not self.database.is_open:
            self._interrupted = self.database.open()

    def interrupted_runs(self) -> list[str]:
        """Conversations whose run was open when the previous process stopped."""
        return list(self._interrupted)

    async def start(self, on_frame: FrameListener, on_resync: ResyncListener) -> None:
        self.open()
        self._deliver = on_frame
        await super().start(self._collect, on_resync)
        self.database.start(asyncio.get_running_loop())
        self._evictor = asyncio.create_task(self._evict_idle())

    async def close(self) -> None:
        await super().close()
        if self._evictor is not None:
            self._evictor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._evictor
        await self.database.close()

    async def ping(self) -> bool:
        return await super().ping() and not self.database.failed

    def _collect(self, conversation_id: str, frame: bytes) -> None:
        # The memory broker publishes as it appends; logged frames wait for their commit.
        if protocol.is_logged_frame(frame):
            self._outbox.append((conversation_id, frame))
        elif self._deliver is not None:
            self._deliver(conversation_id, frame)

    # ---- loading and writing ----------------------------------------------------------
    async def _load(self, conversation_id: str) -> bool:
        """Bring a conversation into memory; whether it exists."""
        if self._closed or self.database.failed:
            raise StorageUnavailable("the embedded broker is closed")
        if conversation_id in self._conversations:
            self._last_used[conversation_id] = time.monotonic()
            return True
        loading = self._loading.get(conversation_id)
        if loading is None:
            loading = asyncio.get_running_loop().create_future()
            self.database.submit(
                db.load_conversation(conversation_id),
                lambda stored: self._loaded(conversation_id, stored),
            )
            self._loading[conversation_id] = loading
        return await asyncio.shield(loading)

    def _loaded(self, conversation_id: str, stored: Any) -> None:
        loading = self._loading.pop(conversation_id)
        if isinstance(stored, BaseException):
            loading.set_exception(stored)
            loading.exception()  # retrieved: the callers that still wait get it too
            return
        if stored is not None and conversation_id not in self._conversations:
            self._conversations[conversation_id] = _from_stored(stored)
            self._committed[conversation_id] = self._handed[conversation_id] = stored.head
            self._last_used[conversation_id] = time.monotonic()
        loading.set_result(stored is not None)

    def _write(
        self, statements: Sequence[db.Statement], conversation_id: str
    ) -> asyncio.Future[None]:
        """Hand statements (and the frames appended with them) to the writer; the future
        resolves once they are committed and the frames published."""
        frames, self._outbox = self._outbox, []
        head = self._conversations[conversation_id].head
        self._handed[conversation_id] = head
        committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        active = self._activity.get(conversation_id, time.time())
        statements = [*statements, db.set_last_active([(conversation_id, active)])]

        def done(result: Any) -> None:
            if isinstance(result, BaseException):
                if not committed.done():  # done: its caller was cancelled
                    committed.set_exception(result)
                return
            if conversation_id in self._committed:
                self._committed[conversation_id] = head
            for frame_conversation, frame in frames:
                if self._deliver is not None and frame_conversation in self._subscribed:
                    self._deliver(frame_conversation, frame)
            if not committed.done():
                committed.set_result(None)

        self.database.submit(db.execute(statements), done)
        return committed

    def _write_log(self, conversation_id: str, snapshot: bool = False) -> asyncio.Future[None]:
        """Write what appending, trimming, the run or the fence changed since last time."""
        conversation = self._conversations[conversation_id]
        log, handed = conversation.log, self._handed[conversation_id]
        new = min(conversation.head - handed, len(log))  # trimmed ones need no writing
        frames = [log[i] for i in range(len(log) - new, len(log))]
        run = conversation.run
        statements = [
            db.log_append(conversation_id, frames),
            db.set_state(
                conversation_id,
                conversation.head,
                conversation.fence,
                None if run is None else db.StoredRun(run.run_id, run.fence, run.start_seq),
            ),
        ]
        if log and log[0][0] > 1:
            statements.append(db.log_trim(conversation_id, log[0][0]))
        if snapshot:
            statements.append(
                db.set_snapshot(conversation_id, conversation.snapshot, conversation.snapshot_seq)
            )
        return self._write(statements, conversation_id)

    async def _evict_idle(self) -> None:
        while True:
            await asyncio.sleep(_EVICT_EVERY_S)
            self.evict_idle()

    def evict_idle(self, idle_s: float | None = None) -> int:
        """Drop from memory the conversations unused for ``idle_s`` with nothing live
        (no run, no viewer, nothing uncommitted); returns how many."""
        deadline = time.monotonic() - (self.idle_s if idle_s is None else idle_s)
        idle = [
            conversation_id
            for conversation_id, conversation in self._conversations.items()
            if self._last_used.get(conversation_id, 0.0) <= deadline
            and conversation.run is None
            and not conversation.presence
            and conversation_id not in self._subscribed
            and self._committed.get(conversation_id) == self._handed.get(conversation_id)
        ]
        # Presence is not written as it happens: keep its activity in the file now.
        active = [(c, self._activity[c]) for c in idle if c in self._activity]
        if active:
            self.database.submit(db.execute([db.set_last_active(active)]), _ignore)
        for conversation_id in idle:
            self._forget(conversation_id)
        return len(idle)

    async def expire_idle(self, limit: int) -> int:
        if self.conversation_ttl_s <= 0 or self._closed or self.database.failed:
            return 0
        deadline = time.time() - self.conversation_ttl_s
        found: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.database.submit(
            db.idle_conversations(deadline, limit),
            lambda result: None if found.done() else found.set_result(result),
        )
        if isinstance(candidates := await found, BaseException):
            raise candidates
        # Decided and submitted in one step: a load or a write submitted after the delete
        # finds nothing; one in flight (loading, uncommitted) keeps the conversation.
        expired: list[str] = []
        active: list[tuple[str, float]] = []
        for conversation_id in candidates:
            conversation = self._conversations.get(conversation_id)
            if conversation is None and conversation_id not in self._loading:
                expired.append(conversation_id)
            elif conversation is not None:
                if self._busy(conversation_id, conversation) or (
                    self._committed[conversation_id] != self._handed[conversation_id]
                ):
                    self._touch(conversation_id)
                if self._activity.get(conversation_id, 0.0) > deadline:
                    active.append((conversation_id, self._activity[conversation_id]))
                else:
                    expired.append(conversation_id)
                    self._forget(conversation_id)
        statements = db.delete_conversations(expired) + [db.set_last_active(active)] * bool(active)
        if statements:
            self.database.submit(db.execute(statements), _ignore)
        return len(expired)

    def _forget(self, conversation_id: str) -> None:
        """Drop a conversation from memory (the file keeps it, unless deleted)."""
        self._conversations.pop(conversation_id, None)
        for index in (self._committed, self._handed, self._last_used, self._activity):
            index.pop(conversation_id, None)

    # ---- records ---------------------------------------------------------------------
    async def create_conversation(self, conversation_id: str, record: dict[str, bytes]) -> str:
        if self._closed or self.database.failed:
            raise StorageUnavailable("the embedded broker is closed")
        epoch = await super().create_conversation(conversation_id, record)
        self._committed[conversation_id] = self._handed[conversation_id] = 0
        self._last_used[conversation_id] = time.monotonic()
        stored_record = self._conversations[conversation_id].record
        await self._write(
            [
                db.insert_conversation(conversation_id, epoch),
                db.set_fields(conversation_id, stored_record),
            ],
            conversation_id,
        )
        return epoch

    async def get_record(self, conversation_id: str) -> dict[str, bytes] | None:
        if not await self._load(conversation_id):
            return None
        return await super().get_record(conversation_id)

    async def update_record(self, conversation_id: str, fields: dict[str, bytes]) -> None:
        await self._load(conversation_id)
        await super().update_record(conversation_id, fields)
        await self._write([db.set_fields(conversation_id, fields)], conversation_id)

    async def add_to_record(self, conversation_id: str, field: str, amount: float) -> float:
        await self._load(conversation_id)
        value = await super().add_to_record(conversation_id, field, amount)
        stored = self._conversations[conversation_id].record[field]
        await self._write([db.set_fields(conversation_id, {field: stored})], conversation_id)
        return value

    # ---- maps and lists ----------------------------------------------------------------
    async def map_get(self, conversation_id: str, name: str, key: str) -> bytes | None:
        await self._load(conversation_id)
        return await super().map_get(conversation_id, name, key)

    async def map_set(self, conversation_id: str, name: str, key: str, value: bytes) -> None:
        await self._load(conversation_id)
        await super().map_set(conversation_id, name, key, value)
        await self._write([db.map_set(conversation_id, name, key, value)], conversation_id)

    async def map_delete(self, conversation_id: str, name: str, key: str) -> bool:
        await self._load(conversation_id)
        existed = await super().map_delete(conversation_id, name, key)
        if existed:
            await self._write([db.map_delete(conversation_id, name, key)], conversation_id)
        return existed

    async def map_all(self, conversation_id: str, name: str) -> dict[str, bytes]:
        await self._load(conversation_id)
        return await super().map_all(conversation_id, name)

    async def list_append(self, conversation_id: str, name: str, items: Sequence[bytes]) -> None:
        await self._load(conversation_id)
        await super().list_append(conversation_id, name, items)
        await self._write([db.list_append(conversation_id, name, items)], conversation_id)

    async def list_all(self, conversation_id: str, name: str) -> list[bytes]:
        await self._load(conversation_id)
        return await super().list_all(conversation_id, name)

    # ---- the log: read up to the committed head -----------------------------------------
    async def log_state(self, conversation_id: str) -> LogState | None:
        if not await self._load(conversation_id):
            return None
        state = await super().log_state(conversation_id)
        assert state is not None
        committed = self._committed[conversation_id]
        if state.head == committed:
            return state
        return LogState(
            state.epoch, committed, min(state.first_seq, committed + 1), state.snapshot_seq
        )

    async def read_log(self, conversation_id: str, after_seq: int, limit: int) -> list[bytes]:
        await self._load(conversation_id)
        log = self._get(conversation_id).log
        if log:
            # Frames after the committed head are not published yet: not readable either.
            start = max(after_seq, log[0][0] - 1)
            limit = min(limit, self._committed[conversation_id] - start)
        return await super().read_log(conversation_id, after_seq, max(0, limit))

    async def read_snapshot(self, conversation_id: str) -> bytes | None:
        await self._load(conversation_id)
        return await super().read_snapshot(conversation_id)

    # ---- runs ----------------------------------------------------------------------
    async def start_run(
        self, conversation_id: str, run_id: str, body: bytes, ttl_ms: int
    ) -> RunLease:
        await self._load(conversation_id)
        lease = await super().start_run(conversation_id, run_id, body, ttl_ms)
        await self._write_log(conversation_id)
        return lease

    async def append(
        self, lease: RunLease, bodies: Sequence[bytes], expected_head: int | None = None
    ) -> int:
        await self._load(lease.conversation_id)
        head = await super().append(lease, bodies, expected_head)
        await self._write_log(lease.conversation_id)
        return head

    async def finish_run(
        self, lease: RunLease, bodies: Sequence[bytes], snapshot: bytes | None
    ) -> int:
        await self._load(lease.conversation_id)
        head = await super().finish_run(lease, bodies, snapshot)
        await self._write_log(lease.conversation_id, snapshot=snapshot is not None)
        return head

    async def renew_lease(self, lease: RunLease, ttl_ms: int) -> bool:
        await self._load(lease.conversation_id)
        return await super().renew_lease(lease, ttl_ms)

    async def request_cancel(self, conversation_id: str) -> str | None:
        await self._load(conversation_id)
        return await super().request_cancel(conversation_id)

    async def active_run(self, conversation_id: str) -> ActiveRun | None:
        await self._load(conversation_id)
        return await super().active_run(conversation_id)

    async def take_over_run(self, conversation_id: str, ttl_ms: int) -> RunLease | None:
        await self._load(conversation_id)
        lease = await super().take_over_run(conversation_id, ttl_ms)
        if lease is not None:
            await self._write_log(conversation_id)
        return lease

    # ---- presence (of this process only) ---------------------------------------------
    async def presence_join(
        self, conversation_id: str, viewer_id: str, ttl_ms: int, person: bytes | None = None
    ) -> int:
        await self._load(conversation_id)
        return await super().presence_join(conversation_id, viewer_id, ttl_ms, person)

    async def presence_people(self, conversation_id: str) -> list[bytes]:
        await self._load(conversation_id)
        return await super().presence_people(conversation_id)

    async def presence_leave(self, conversation_id: str, viewer_id: str) -> int:
        await self._load(conversation_id)
        return await super().presence_leave(conversation_id, viewer_id)

    async def presence_refresh(
        self, conversation_id: str, viewer_ids: Sequence[str], ttl_ms: int
    ) -> int:
        await self._load(conversation_id)
        return await super().presence_refresh(conversation_id, viewer_ids, ttl_ms)


def _ignore(result: Any) -> None:
    """A write nobody waits for (a failure is logged by the writer and fails what follows)."""


def _from_stored(stored: db.StoredConversation) -> ConversationState:
    run = None
    if stored.run is not None:
        # Loaded from the file, a run belongs to a process that is gone: its lease is over.
        run = RunState(stored.run.run_id, stored.run.fence, stored.run.start_seq, float("-inf"))
        run.bytes = sum(len(frame) for seq, frame in stored.log if seq >= run.start_seq)
    finished = sum(len(frame) for seq, frame in stored.log if seq <= stored.snapshot_seq)
    tail = sum(len(frame) for seq, frame in stored.log if seq > stored.snapshot_seq)
    return ConversationState(
        finished_bytes=finished,
        tail_bytes=tail,
        record=stored.record,
        epoch=stored.epoch,
        head=stored.head,
        log=deque(stored.log),
        snapshot=stored.snapshot,
        snapshot_seq=stored.snapshot_seq,
        fence=stored.fence,
        run=run,
        maps=stored.maps,
        lists=stored.lists,
    )
