"""The embedded broker: one process, nothing to run, the same guarantees as Redis.

Everything is plain Python state on the event loop, so each method is atomic by
construction (no await inside a state change). ``on_frame`` is called synchronously
right after a frame is stored, in append order.

Each conversation counts the bytes of its retained frames, those of finished runs
(``finished_bytes``, trimmed to ``log_retain_bytes``) and those after the snapshot
(``tail_bytes``); its run counts its own (``RunState.bytes``, capped by ``max_run_bytes``).
``_activity`` orders conversations by their last activity, oldest first, so
:meth:`MemoryBroker.expire_idle` looks at the idle ones only.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from costream import protocol
from costream.broker import (
    LOG_RETAIN,
    LOG_RETAIN_BYTES,
    MAX_RUN_BYTES,
    ActiveRun,
    Broker,
    FrameListener,
    LogState,
    ResyncListener,
    RunLease,
    check_expected_head,
)
from costream.errors import LeaseLost, RunActive, RunTooLarge, StorageUnavailable
from costream.protocol import PRESENCE_MAX_PEOPLE


def _now_ms() -> float:
    return time.monotonic() * 1000


@dataclass
class RunState:
    """A conversation's active run: its lease, fence and where it started in the log."""

    run_id: str
    fence: int
    start_seq: int
    lease_expires_ms: float
    cancel: bool = False
    bytes: int = 0  # of its logged frames, RUN_STARTED included


@dataclass
class ConversationState:
    """Everything the embedded brokers keep of one conversation (SQLite persists it)."""

    record: dict[str, bytes]
    epoch: str
    head: int = 0
    log: deque[tuple[int, bytes]] = field(default_factory=deque)
    finished_bytes: int = 0  # retained frames at or before snapshot_seq
    tail_bytes: int = 0  # frames after snapshot_seq
    snapshot: bytes | None = None
    snapshot_seq: int = 0
    fence: int = 0
    run: RunState | None = None
    presence: dict[str, float] = field(default_factory=dict)  # viewer id -> expiry (ms)
    # viewer id -> encoded protocol.Person, in the order they joined (a dict keeps it)
    people: dict[str, bytes] = field(default_factory=dict)
    maps: dict[str, dict[str, bytes]] = field(default_factory=dict)
    lists: dict[str, list[bytes]] = field(default_factory=dict)


class MemoryBroker(Broker):
    """All conversations in this process's memory; lost when it exits."""

    def __init__(
        self,
        log_retain: int = LOG_RETAIN,
        *,
        log_retain_bytes: int = LOG_RETAIN_BYTES,
        max_run_bytes: int = MAX_RUN_BYTES,
        conversation_ttl_s: float = 0.0,
    ) -> None:
        self.log_retain = log_retain
        self.log_retain_bytes = log_retain_bytes
        self.max_run_bytes = max_run_bytes
        self.conversation_ttl_s = conversation_ttl_s
        self._conversations: dict[str, ConversationState] = {}
        # conversation id -> last activity (time.time()), least recently active first
        self._activity: OrderedDict[str, float] = OrderedDict()
        self._subscribed: set[str] = set()
        self._on_frame: FrameListener | None = None
        self._closed = False

    async def start(self, on_frame: FrameListener, on_resync: ResyncListener) -> None:
        self._on_frame = on_frame
        self._closed = False

    async def close(self) -> None:
        self._closed = True

    async def ping(self) -> bool:
        return not self._closed

    def _touch(self, conversation_id: str) -> None:
        """Count activity: an idle conversation expires ``conversation_ttl_s`` after it."""
        self._activity[conversation_id] = time.time()
        self._activity.move_to_end(conversation_id)

    def _busy(self, conversation_id: str, conversation: ConversationState) -> bool:
        """Whether the conversation has a run or someone watching in this process."""
        now = _now_ms()
        return (
            conversation.run is not None
            or conversation_id in self._subscribed
            or any(expires >= now for expires in conversation.presence.values())
        )

    async def expire_idle(self, limit: int) -> int:
        if self.conversation_ttl_s <= 0 or self._closed:
            return 0
        deadline = time.time() - self.conversation_ttl_s
        idle = list(
            itertools.islice(
                itertools.takewhile(lambda item: item[1] <= deadline, self._activity.items()),
                limit,
            )
        )
        expired = 0
        for conversation_id, _ in idle:
            conversation = self._conversations.get(conversation_id)
            if conversation is not None and self._busy(conversation_id, conversation):
                self._touch(conversation_id)  # watched or running: that is activity
                continue
            self._conversations.pop(conversation_id, None)
            del self._activity[conversation_id]
            expired += conversation is not None
        return expired

    def _get(self, conversation_id: str) -> ConversationState:
        if self._closed:
            raise StorageUnavailable("broker closed")
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            # Callers check existence first; a missing conversation here is a storage loss.
            raise StorageUnavailable("conversation vanished")
        return conversation

    # ---- records ---------------------------------------------------------------------
    async def create_conversation(self, conversation_id: str, record: dict[str, bytes]) -> str:
        epoch = secrets.token_urlsafe(12)
        self._conversations[conversation_id] = ConversationState(
            record={**record, "epoch": epoch.encode()}, epoch=epoch
        )
        self._touch(conversation_id)
        return epoch

    async def get_record(self, conversation_id: str) -> dict[str, bytes] | None:
        if self._closed:
            raise StorageUnavailable("broker closed")
        conversation = self._conversations.get(conversation_id)
        return None if conversation is None else dict(conversation.record)

    async def update_record(self, conversation_id: str, fields: dict[str, bytes]) -> None:
        self._get(conversation_id).record.update(fields)
        self._touch(conversation_id)

    async def add_to_record(self, conversation_id: str, field: str, amount: float) -> float:
        record = self._get(conversation_id).record
        value = float(record.get(field, b"0")) + amount
        record[field] = repr(value).encode()
        self._touch(conversation_id)
        return value

    # ---- maps and lists ----------------------------------------------------------------
    async def map_get(self, conversation_id: str, name: str, key: str) -> bytes | None:
        return self._get(conversation_id).maps.get(name, {}).get(key)

    async def map_set(self, conversation_id: str, name: str, key: str, value: bytes) -> None:
        self._get(conversation_id).maps.setdefault(name, {})[key] = value
        self._touch(conversation_id)

    async def map_delete(self, conversation_id: str, name: str, key: str) -> bool:
        removed = self._get(conversation_id).maps.get(name, {}).pop(key, None)
        self._touch(conversation_id)
        return removed is not None

    async def map_all(self, conversation_id: str, name: str) -> dict[str, bytes]:
        return dict(self._get(conversation_id).maps.get(name, {}))

    async def list_append(self, conversation_id: str, name: str, items: Sequence[bytes]) -> None:
        self._get(conversation_id).lists.setdefault(name, []).extend(items)
        self._touch(conversation_id)

    async def list_all(self, conversation_id: str, name: str) -> list[bytes]:
        return list(self._get(conversation_id).lists.get(name, []))

    # ---- the log -------------------------------------------------------------------
    async def log_state(self, conversation_id: str) -> LogState | None:
        if self._closed:
            raise StorageUnavailable("broker closed")
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            return None
        first = conversation.log[0][0] if conversation.log else conversation.head + 1
        return LogState(conversation.epoch, conversation.head, first, conversation.snapshot_seq)

    async def read_log(self, conversation_id: str, after_seq: int, limit: int) -> list[bytes]:
        log = self._get(conversation_id).log
        if not log:
            return []
        # seqs in the deque are contiguous, so the position of after_seq + 1 is arithmetic.
        start = max(0, after_seq + 1 - log[0][0])
        return [frame for _, frame in itertools.islice(log, start, start + limit)]

    async def read_snapshot(self, conversation_id: str) -> bytes | None:
        return self._get(conversation_id).snapshot

    def _append(self, conversation_id: str, conversation: ConversationState, frame: bytes) -> int:
        """Store and publish a frame made for seq ``head + 1``."""
        conversation.head += 1
        seq = conversation.head
        conversation.log.append((seq, frame))
        conversation.tail_bytes += len(frame)
        if conversation.run is not None:
            conversation.run.bytes += len(frame)
        if self._on_frame is not None and conversation_id in self._subscribed:
            self._on_frame(conversation_id, frame)
        return seq

    def _trim(self, conversation: ConversationState) -> None:
        # Keep everything after the latest snapshot; of the rest (finished runs), the
        # newest events within log_retain of the head and within log_retain_bytes.
        snapshot_seq = conversation.snapshot_seq
        keep_from = min(conversation.head - self.log_retain + 1, snapshot_seq + 1)
        log = conversation.log
        while (
            log
            and log[0][0] <= snapshot_seq
            and (log[0][0] < keep_from or conversation.finished_bytes > self.log_retain_bytes)
        ):
            conversation.finished_bytes -= len(log.popleft()[1])

    def _check_lease(self, lease: RunLease) -> ConversationState:
        conversation = self._get(lease.conversation_id)
        run = conversation.run
        if run is None or run.fence != lease.fence or run.lease_expires_ms < _now_ms():
            raise LeaseLost(lease.conversation_id)
        return conversation

    # ---- runs ----------------------------------------------------------------------
    async def start_run(
        self, conversation_id: str, run_id: str, body: bytes, ttl_ms: int
    ) -> RunLease:
        conversation = self._get(conversation_id)
        if conversation.run is not None:
            raise RunActive(conversation_id)
        conversation.fence += 1
        seq = conversation.head + 1
        conversation.run = RunState(run_id, conversation.fence, seq, _now_ms() + ttl_ms)
        self._append(conversation_id, conversation, protocol.with_seq(body, seq))
        self._trim(conversation)
        self._touch(conversation_id)
        return RunLease(conversation_id, run_id, conversation.fence)

    async def append(
        self, lease: RunLease, bodies: Sequence[bytes], expected_head: int | None = None
    ) -> int:
        conversation = self._check_lease(lease)
        if not check_expected_head(
            lease.conversation_id, conversation.head, expected_head, len(bodies)
        ):
            return conversation.head
        head = conversation.head
        frames = [protocol.with_seq(body, head + n) for n, body in enumerate(bodies, 1)]
        run = conversation.run
        assert run is not None  # the lease holds
        if self.max_run_bytes > 0 and run.bytes + sum(map(len, frames)) > self.max_run_bytes:
            raise RunTooLarge(lease.conversation_id, self.max_run_bytes)
        for frame in frames:
            self._append(lease.conversation_id, conversation, frame)
        self._trim(conversation)
        self._touch(lease.conversation_id)
        return conversation.head

    async def finish_run(
        self, lease: RunLease, bodies: Sequence[bytes], snapshot: bytes | None
    ) -> int:
        conversation = self._check_lease(lease)
        for body in bodies:
            frame = protocol.with_seq(body, conversation.head + 1)
            self._append(lease.conversation_id, conversation, frame)
        conversation.run = None
        if snapshot is not None:
            conversation.snapshot = protocol.with_seq(snapshot, conversation.head)
            conversation.snapshot_seq = conversation.head
            conversation.finished_bytes += conversation.tail_bytes
            conversation.tail_bytes = 0
        self._trim(conversation)
        self._touch(lease.conversation_id)
        return conversation.head

    async def renew_lease(self, lease: RunLease, ttl_ms: int) -> bool:
        conversation = self._check_lease(lease)
        assert conversation.run is not None
        conversation.run.lease_expires_ms = _now_ms() + ttl_ms
        self._touch(lease.conversation_id)
        return conversation.run.cancel

    async def request_cancel(self, conversation_id: str) -> str | None:
        run = self._get(conversation_id).run
        if run is None:
            return None
        run.cancel = True
        return run.run_id

    async def active_run(self, conversation_id: str) -> ActiveRun | None:
        run = self._get(conversation_id).run
        if run is None:
            return None
        return ActiveRun(run.run_id, run.fence, run.start_seq, run.lease_expires_ms >= _now_ms())

    async def take_over_run(self, conversation_id: str, ttl_ms: int) -> RunLease | None:
        conversation = self._get(conversation_id)
        run = conversation.run
        if run is None or run.lease_expires_ms >= _now_ms():
            return None
        conversation.fence += 1
        run.fence = conversation.fence
        run.lease_expires_ms = _now_ms() + ttl_ms
        self._touch(conversation_id)
        return RunLease(conversation_id, run.run_id, run.fence)

    # ---- live tail -------------------------------------------------------------------
    async def subscribe(self, conversation_id: str) -> None:
        self._subscribed.add(conversation_id)

    async def unsubscribe(self, conversation_id: str) -> None:
        self._subscribed.discard(conversation_id)

    # ---- presence --------------------------------------------------------------------
    def _publish_presence(self, conversation_id: str, conversation: ConversationState) -> int:
        count = len(conversation.presence)
        if self._on_frame is not None and conversation_id in self._subscribed:
            people = list(itertools.islice(conversation.people.values(), PRESENCE_MAX_PEOPLE))
            self._on_frame(conversation_id, protocol.presence_frame(count, people))
        return count

    async def presence_join(
        self, conversation_id: str, viewer_id: str, ttl_ms: int, person: bytes | None = None
    ) -> int:
        conversation = self._get(conversation_id)
        conversation.presence[viewer_id] = _now_ms() + ttl_ms
        if person is not None:
            conversation.people.setdefault(viewer_id, person)
        self._touch(conversation_id)
        return self._publish_presence(conversation_id, conversation)

    async def presence_people(self, conversation_id: str) -> list[bytes]:
        people = self._get(conversation_id).people
        return list(itertools.islice(people.values(), PRESENCE_MAX_PEOPLE))

    async def presence_leave(self, conversation_id: str, viewer_id: str) -> int:
        conversation = self._get(conversation_id)
        conversation.presence.pop(viewer_id, None)
        conversation.people.pop(viewer_id, None)
        self._touch(conversation_id)  # watched until now
        return self._publish_presence(conversation_id, conversation)

    async def presence_refresh(
        self, conversation_id: str, viewer_ids: Sequence[str], ttl_ms: int
    ) -> int:
        conversation = self._get(conversation_id)
        presence = conversation.presence
        now = _now_ms()
        before = len(presence)
        for viewer_id in viewer_ids:
            presence[viewer_id] = now + ttl_ms
        if viewer_ids:
            self._touch(conversation_id)
        for viewer_id in [v for v, expires in presence.items() if expires < now]:
            del presence[viewer_id]
            conversation.people.pop(viewer_id, None)
        if len(presence) != before:
            self._publish_presence(conversation_id, conversation)
        return len(presence)
