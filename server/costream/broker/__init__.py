"""The ``Broker`` interface: the conversation log, its live tail, presence and the run lease.

Three implementations keep the same guarantees: :class:`~costream.broker.memory.MemoryBroker`
(one process, nothing kept), :class:`~costream.broker.sqlite.SqliteBroker` (one process, in
a data directory that survives restarts; the default) and
:class:`~costream.broker.redis.RedisBroker` (any number of processes). Frames cross the broker as
``bytes``: a producer hands over an encoded event *without* ``seq`` (a "body"); the broker
assigns the next ``seq``, splices it in (``protocol.with_seq``), stores the frame in the log
and publishes the same bytes, in one atomic step. So:

- ``seq`` starts at 1 and grows by exactly 1 per logged event; the order of the log is the
  order of publication, and every published frame is already readable from the log.
- Appends carry the run lease's fencing token and are refused (``LeaseLost``) once another
  holder took the lease over, so a stalled producer can never write after its successor.
- An append may carry the head it expects (``expected_head``), so a producer that lost
  the answer to an append can send the same batch again and have it stored once: the
  broker stores the batch when the head is ``expected_head``, answers the head without
  storing when the head is ``expected_head + len(bodies)`` (the batch is already there)
  and otherwise raises ``AppendConflict``, all in the same atomic step as the append.
- The live tail is at most once: a frame may be lost on the pub/sub path (a broken
  connection), never reordered. Consumers fill holes from the log; after the subscription
  is re-established the broker calls ``on_resync`` so they check the log at once.
- The log keeps every event after the latest snapshot (``finish_run``), so a late joiner
  can always rebuild: snapshot, then the log. Of the events at or before the snapshot
  (finished runs) it keeps at most ``log_retain`` events *and* at most ``log_retain_bytes``
  bytes of frames, the newest ones: the oldest go first.
- A run's logged frames, from its ``RUN_STARTED`` on, total at most ``max_run_bytes``
  (0: no limit): an ``append`` that would pass it raises ``RunTooLarge`` and stores none
  of its batch, in the same atomic step. ``finish_run`` is always accepted, so a producer
  refused can still end its run (``RUN_ERROR``). So a conversation's log holds at most
  ``log_retain_bytes + max_run_bytes`` bytes, plus one ``finish_run`` batch.
- A conversation idle for ``conversation_ttl_s`` seconds (0: never) is deleted whole
  (record, log, snapshot, maps, lists, presence, run): idle means no append, no write to
  its record, maps or lists, no lease renewal and nobody present (``presence_join`` /
  ``presence_refresh``). Afterwards it reads as unknown (``get_record`` is None). Redis
  gives every key of a conversation a TTL, pushed back by each of these in the same
  script as the write; the embedded brokers keep a last-active time and delete in
  :meth:`Broker.expire_idle`, which the server's maintenance calls; a conversation with a
  run or with viewers in this process is never deleted there.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from costream.errors import AppendConflict

__all__ = [
    "LOG_RETAIN",
    "LOG_RETAIN_BYTES",
    "MAX_RUN_BYTES",
    "ActiveRun",
    "AppendConflict",
    "Broker",
    "FrameListener",
    "LogState",
    "ResyncListener",
    "RunLease",
    "check_expected_head",
]

# The defaults of a broker built directly (the server passes its Settings of these names).
LOG_RETAIN = 10_000
LOG_RETAIN_BYTES = 8 * 1024 * 1024
MAX_RUN_BYTES = 32 * 1024 * 1024

FrameListener = Callable[[str, bytes], None]
"""Called with (conversation id, frame) for each published frame, in publication order.
A frame is a logged event (``protocol.is_logged_frame``) or an encoded ``presence`` frame."""

ResyncListener = Callable[[str], None]
"""Called with a conversation id when its subscription was re-established after a break:
frames may have been missed, read the log."""


def check_expected_head(
    conversation_id: str, head: int, expected_head: int | None, count: int
) -> bool:
    """Whether a batch of ``count`` events is to be stored at ``head`` (False: it already
    is, the head is ``expected_head + count``). Raises ``AppendConflict`` otherwise.
    Shared by the in-process brokers; the Redis script does the same in Lua."""
    if expected_head is None or head == expected_head:
        return True
    if head == expected_head + count:
        return False
    raise AppendConflict(conversation_id, head, expected_head)


@dataclass(frozen=True, slots=True)
class LogState:
    """Where a conversation's log stands."""

    epoch: str
    head: int  # seq of the last event, 0 when empty
    first_seq: int  # lowest seq still retained; head + 1 when nothing is retained
    snapshot_seq: int  # seq of the latest MESSAGES_SNAPSHOT (a run boundary), 0 when none


@dataclass(frozen=True, slots=True)
class RunLease:
    """The right to append to one conversation for one run. ``fence`` only ever grows."""

    conversation_id: str
    run_id: str
    fence: int


@dataclass(frozen=True, slots=True)
class ActiveRun:
    """The run a conversation has, as the storage sees it."""

    run_id: str
    fence: int
    start_seq: int  # seq of its RUN_STARTED
    lease_alive: bool  # False: the producer stopped renewing; the run may be taken over


class Broker(abc.ABC):
    """Storage and fan-out of conversations. The only place that knows Redis."""

    # ---- lifecycle ----------------------------------------------------------------
    @abc.abstractmethod
    async def start(self, on_frame: FrameListener, on_resync: ResyncListener) -> None:
        """Connect, and deliver every frame of subscribed conversations to ``on_frame``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect; pending calls fail with ``StorageUnavailable``."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """Whether the storage answers now (``/readyz``)."""

    async def expire_idle(self, limit: int) -> int:
        """Delete up to ``limit`` conversations idle past ``conversation_ttl_s`` (the
        oldest first) and return how many; bounded work, called again and again. Redis
        expires keys by itself: nothing to do there."""
        return 0

    # ---- conversation records --------------------------------------------------------
    @abc.abstractmethod
    async def create_conversation(self, conversation_id: str, record: dict[str, bytes]) -> str:
        """Create a conversation with its record and an empty log; returns the new epoch."""

    @abc.abstractmethod
    async def get_record(self, conversation_id: str) -> dict[str, bytes] | None:
        """The conversation's record (None: unknown conversation)."""

    @abc.abstractmethod
    async def update_record(self, conversation_id: str, fields: dict[str, bytes]) -> None:
        """Set some fields of the record."""

    @abc.abstractmethod
    async def add_to_record(self, conversation_id: str, field: str, amount: float) -> float:
        """Atomically add ``amount`` to a numeric field (missing: 0); returns the new value."""

    # ---- named maps and lists of a conversation (store.py builds on these) -----------
    @abc.abstractmethod
    async def map_get(self, conversation_id: str, name: str, key: str) -> bytes | None: ...

    @abc.abstractmethod
    async def map_set(self, conversation_id: str, name: str, key: str, value: bytes) -> None: ...

    @abc.abstractmethod
    async def map_delete(self, conversation_id: str, name: str, key: str) -> bool:
        """Remove a key; whether it was there."""

    @abc.abstractmethod
    async def map_all(self, conversation_id: str, name: str) -> dict[str, bytes]: ...

    @abc.abstractmethod
    async def list_append(
        self, conversation_id: str, name: str, items: Sequence[bytes]
    ) -> None: ...

    @abc.abstractmethod
    async def list_all(self, conversation_id: str, name: str) -> list[bytes]: ...

    # ---- the log -------------------------------------------------------------------
    @abc.abstractmethod
    async def log_state(self, conversation_id: str) -> LogState | None:
        """Epoch, head, first retained seq and snapshot seq (None: unknown conversation)."""

    @abc.abstractmethod
    async def read_log(self, conversation_id: str, after_seq: int, limit: int) -> list[bytes]:
        """Up to ``limit`` retained frames with ``seq > after_seq``, in order.
        The first may have a seq above ``after_seq + 1`` when older ones were trimmed."""

    @abc.abstractmethod
    async def read_snapshot(self, conversation_id: str) -> bytes | None:
        """The latest ``MESSAGES_SNAPSHOT`` frame, its seq spliced in (None: no run ended)."""

    # ---- runs ----------------------------------------------------------------------
    @abc.abstractmethod
    async def start_run(
        self, conversation_id: str, run_id: str, body: bytes, ttl_ms: int
    ) -> RunLease:
        """Take the run lease and append ``body`` (RUN_STARTED) in one atomic step.
        Raises ``RunActive`` when the conversation has a run, alive or not yet reaped."""

    @abc.abstractmethod
    async def append(
        self, lease: RunLease, bodies: Sequence[bytes], expected_head: int | None = None
    ) -> int:
        """Append and publish events of a run, in order; returns the seq of the last.
        Raises ``LeaseLost`` (nothing appended) when ``lease`` is no longer current.

        With ``expected_head`` (the seq of the log's last event before this batch), checked
        atomically with the append and after the lease: when the head is ``expected_head``
        the batch is appended; when it is ``expected_head + len(bodies)`` the batch was
        already stored (a retry): the head is returned and nothing appended; otherwise
        ``AppendConflict`` (a ``LeaseLost``; nothing appended)."""

    @abc.abstractmethod
    async def finish_run(
        self, lease: RunLease, bodies: Sequence[bytes], snapshot: bytes | None
    ) -> int:
        """Append the run's last events (ending with RUN_FINISHED or RUN_ERROR), release
        the lease and store ``snapshot`` (a MESSAGES_SNAPSHOT body, which takes the seq of
        the last body), all atomically; returns the seq of the last. ``LeaseLost`` as above."""

    @abc.abstractmethod
    async def renew_lease(self, lease: RunLease, ttl_ms: int) -> bool:
        """Extend the lease; returns whether a cancel was requested. ``LeaseLost`` as above."""

    @abc.abstractmethod
    async def request_cancel(self, conversation_id: str) -> str | None:
        """Flag the active run for cancellation; its run id, or None when nothing runs."""

    @abc.abstractmethod
    async def active_run(self, conversation_id: str) -> ActiveRun | None:
        """The conversation's run, if any."""

    @abc.abstractmethod
    async def take_over_run(self, conversation_id: str, ttl_ms: int) -> RunLease | None:
        """Take the lease of a run whose lease expired (a new fence); None if there is no
        such run. Used to end a run whose producer died."""

    # ---- live tail -------------------------------------------------------------------
    @abc.abstractmethod
    async def subscribe(self, conversation_id: str) -> None:
        """Start delivering this conversation's frames to ``on_frame``."""

    @abc.abstractmethod
    async def unsubscribe(self, conversation_id: str) -> None: ...

    # ---- presence --------------------------------------------------------------------
    # A presence frame (``protocol.presence_frame``) carries the count and the first
    # ``protocol.PRESENCE_MAX_PEOPLE`` listed viewers' entries, in the order they joined.
    @abc.abstractmethod
    async def presence_join(
        self, conversation_id: str, viewer_id: str, ttl_ms: int, person: bytes | None = None
    ) -> int:
        """Count a viewer (until ``ttl_ms`` passes unrefreshed) and list it with ``person``
        (an encoded ``protocol.Person``; None: counted, not listed), publish the new
        ``presence`` frame, return the count."""

    @abc.abstractmethod
    async def presence_people(self, conversation_id: str) -> list[bytes]:
        """The entries a ``presence`` frame would list now, in the order they joined."""

    @abc.abstractmethod
    async def presence_leave(self, conversation_id: str, viewer_id: str) -> int:
        """Stop counting and listing a viewer, publish and return the new count."""

    @abc.abstractmethod
    async def presence_refresh(
        self, conversation_id: str, viewer_ids: Sequence[str], ttl_ms: int
    ) -> int:
        """Keep these viewers counted and drop expired ones (a dead process's) from the
        count and the list; publishes when the count changed; returns it."""
