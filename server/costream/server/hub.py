"""Fan-out inside one server process, and the no-gap/no-duplicate handoff from log to live.

The hub holds one broker subscription per conversation with local followers and copies
each frame, decoded to text once, into every follower's bounded :class:`ViewerQueue`
without ever waiting on one. A :class:`Follower` turns "the log after seq N, then the
live tail" into one ordered stream:

- it subscribes before it reads the log, then drops every live frame it already sent and
  fills any hole from the log (the broker stores a frame before it publishes it);
- a follower whose queue overflows stops receiving live frames and is fed from the log at
  its own pace, then rejoins the live tail; only when what it needs was trimmed from the
  log does it fail with :class:`FellBehind` (close 4008).

Per-viewer cost stays flat as viewers pile in. Presence is not a log: at most one count
per conversation per ``PRESENCE_INTERVAL_S``, and a queue keeps only the latest. The last
frames of a conversation, ``recent_frames_bytes`` of memory, stay in memory for catch-ups:
a follower that fell behind in a burst is fed from there, not from the broker. A follower
whose writer waits or is parked, caught up, takes live frames at once
(:meth:`Follower.send_at_once`): the fan-out loop hands each frame's bytes to its sender,
as a bare forwarder's loop does, with no task woken per frame and viewer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final, Protocol

from costream.broker import Broker
from costream.metrics import Metrics
from costream.protocol import seq_of, seq_of_text
from costream.server.viewer_queue import ViewerQueue


class Sender(Protocol):
    def write(self, payload: bytes) -> bool:
        """Send a frame's bytes without waiting, or answer False."""
        ...


_LOG_PAGE: Final = 1000
PRESENCE_INTERVAL_S: Final = 0.25
RECENT_FRAMES: Final = 65536  # at most; the bound in bytes is the one that counts
# What a frame in the ring costs besides its text: the tuple, the str header, the ints.
_ENTRY_BYTES: Final = 160
RECENT_FRAMES_BYTES: Final = 4 * 1024 * 1024  # Settings.recent_frames_bytes


class FellBehind(Exception):
    """The events a follower needs were trimmed from the log."""


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a client that holds the log up to ``last_seq`` resumes (PROTOCOL.md,
    Subscribe and resume): a replay after ``last_seq``, or a snapshot then the log."""

    epoch: str
    head: int
    replay: bool  # the events after last_seq are all retained
    start: int  # follow the log after this seq
    snapshot: bytes | None  # MESSAGES_SNAPSHOT to send first (not a replay, a run ended)


async def resume_point(
    broker: Broker, conversation_id: str, last_seq: int, epoch: str | None = None
) -> Resume | None:
    """The same answer for the WebSocket, SSE and the JSON events endpoint: a replay when
    ``epoch`` is None or current, ``last_seq`` <= head and the events after it are retained;
    otherwise the latest snapshot and the events after it (from seq 1 when no run has
    ended). None: unknown conversation."""
    state = await broker.log_state(conversation_id)
    if state is None:
        return None
    replay = (
        (epoch is None or epoch == state.epoch)
        and last_seq <= state.head
        and (last_seq + 1 >= state.first_seq or last_seq == state.head)
    )
    if replay:
        return Resume(state.epoch, state.head, True, last_seq, None)
    snapshot = await broker.read_snapshot(conversation_id)
    start = seq_of(snapshot) if snapshot is not None else 0
    return Resume(state.epoch, state.head, False, start, snapshot)


class _ConversationLock:
    """A conversation's subscription lock and how many hold or wait for it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class Hub:
    """One process's subscriptions, shared by all its followers of each conversation."""

    def __init__(
        self, broker: Broker, metrics: Metrics, *, recent_frames_bytes: int = RECENT_FRAMES_BYTES
    ) -> None:
        self.broker = broker
        self.metrics = metrics
        self.recent_frames_bytes = recent_frames_bytes
        self._queues: dict[str, set[ViewerQueue]] = {}
        self._locks: dict[str, _ConversationLock] = {}  # only while held or awaited
        # Per conversation: (seq, text, bytes) of the latest contiguous frames; their size.
        self._recent: dict[str, deque[tuple[int, str, int]]] = {}
        self._recent_size: dict[str, int] = {}
        self._presence: dict[str, str] = {}  # latest count not yet forwarded
        self._presence_timer: asyncio.TimerHandle | None = None

    def conversations(self) -> list[str]:
        """Conversations that have local followers."""
        return list(self._queues)

    def on_frame(self, conversation_id: str, frame: bytes) -> None:
        """Broker listener: copy one frame into every local follower's queue."""
        queues = self._queues.get(conversation_id)
        if not queues:
            return
        text = frame.decode()
        seq = seq_of_text(text)
        if seq == 0:
            self._presence[conversation_id] = text
            if self._presence_timer is None:
                loop = asyncio.get_running_loop()
                self._presence_timer = loop.call_later(PRESENCE_INTERVAL_S, self._send_presence)
            return
        self._remember(conversation_id, seq, text, len(frame) + _ENTRY_BYTES)
        now = asyncio.get_running_loop().time()
        sent = 0
        for queue in queues:
            sent += queue.offer(text, seq, now, frame)
        if sent:
            self.metrics.frames_sent.inc(sent)

    def _remember(self, conversation_id: str, seq: int, text: str, size: int) -> None:
        """Keep a frame in the conversation's ring, within both bounds (frames, bytes)."""
        recent = self._recent[conversation_id]
        total = self._recent_size[conversation_id]
        if recent and recent[-1][0] + 1 != seq:
            recent.clear()  # a hole: the ring only ever holds contiguous frames
            total = 0
        limit = self.recent_frames_bytes
        while recent and (len(recent) >= RECENT_FRAMES or total + size > limit):
            total -= recent.popleft()[2]
        if size <= limit:
            recent.append((seq, text, size))
            total += size
        self._recent_size[conversation_id] = total

    def _send_presence(self) -> None:
        self._presence_timer = None
        pending, self._presence = self._presence, {}
        for conversation_id, text in pending.items():
            payload = text.encode()
            for queue in self._queues.get(conversation_id, ()):
                queue.offer_presence(text, payload)

    def recent_after(self, conversation_id: str, after_seq: int, limit: int) -> list[str] | None:
        """Frames with seq > ``after_seq`` from memory, or None when the ring does not
        hold ``after_seq + 1`` (then the broker's log must answer)."""
        recent = self._recent.get(conversation_id)
        if not recent or not recent[0][0] <= after_seq + 1 <= recent[-1][0] + 1:
            return None
        start = after_seq + 1 - recent[0][0]
        return [text for _, text, _ in itertools.islice(recent, start, start + limit)]

    def recent_bytes(self, conversation_id: str) -> int:  # the size of the frames in the ring
        return self._recent_size.get(conversation_id, 0)

    def on_resync(self, conversation_id: str) -> None:
        """Broker listener: the subscription broke and was re-established."""
        if conversation_id in self._recent:
            self._recent[conversation_id].clear()  # frames may be missing after its end
            self._recent_size[conversation_id] = 0
        for queue in self._queues.get(conversation_id, ()):
            queue.mark_resync()

    @contextlib.asynccontextmanager
    async def _changing(self, conversation_id: str) -> AsyncIterator[None]:
        """Hold the conversation's lock. One lock per conversation for as long as anyone
        holds or waits for it: dropped only by the last user, so a viewer arriving while
        the last one leaves waits for the unsubscribe and then subscribes again, never
        beside it (two locks would let the broker end unsubscribed under a follower)."""
        entry = self._locks.get(conversation_id)
        if entry is None:
            entry = self._locks[conversation_id] = _ConversationLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[conversation_id]

    async def attach(self, conversation_id: str, queue: ViewerQueue) -> None:
        """Start copying live frames into ``queue``; subscribed when this returns."""
        async with self._changing(conversation_id):
            queues = self._queues.get(conversation_id)
            if queues is None:
                await self.broker.subscribe(conversation_id)
                queues = self._queues[conversation_id] = set()
                self._recent[conversation_id] = deque()
                self._recent_size[conversation_id] = 0
            queues.add(queue)

    async def detach(self, conversation_id: str, queue: ViewerQueue) -> None:
        """Stop copying into ``queue``; the last follower leaving unsubscribes."""
        async with self._changing(conversation_id):
            queues = self._queues.get(conversation_id)
            if queues is None:
                return
            queues.discard(queue)
            if not queues:
                del self._queues[conversation_id]
                del self._recent[conversation_id]
                del self._recent_size[conversation_id]
                self._presence.pop(conversation_id, None)
                await self.broker.unsubscribe(conversation_id)


class Follower:
    """The frames of one conversation after ``last_sent``, in seq order, then live: use as
    ``async with Follower(...)``, call :meth:`next_batch` in a loop. Presence frames pass
    through (``logged_only=False``); control replies come first."""

    def __init__(
        self,
        hub: Hub,
        conversation_id: str,
        last_sent: int,
        queue_size: int,
        *,
        logged_only: bool = False,
    ) -> None:
        self.hub = hub
        self.conversation_id = conversation_id
        self.last_sent = last_sent
        self.queue = ViewerQueue(queue_size, hub.metrics)
        self.logged_only = logged_only
        self._needs_log = True
        self._sender: Sender | None = None
        self.presence_told = ""  # the presence frame this follower's client was told last

    async def __aenter__(self) -> Follower:
        await self.hub.attach(self.conversation_id, self.queue)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.queue.close()
        await self.hub.detach(self.conversation_id, self.queue)

    def send_at_once(self, sender: Sender | None) -> None:
        """While the writer waits or is parked with nothing queued, hand each live frame's
        bytes straight to ``sender``, called from the fan-out loop: it sends without
        waiting and answers True, or answers False (then the frame is queued for the
        writer, which sends it in order). None: stop."""
        self._sender = sender
        self.queue.direct = None if sender is None else self

    def take_at_once(self, text: str, payload: bytes, seq: int) -> bool:
        """Called by the queue: send a live frame (seq 0: presence) through the sender."""
        sender = self._sender
        if sender is None:
            return False
        if seq == 0:  # presence: a change only, and none to a logged-only follower
            if self.logged_only or text == self.presence_told:
                return True
            if not sender.write(payload):
                return False
            self.presence_told = text
            return True
        if seq != self.last_sent + 1 or self._needs_log:
            return False  # a hole, or the log is due: the writer sorts it out
        if not sender.write(payload):
            return False
        self.last_sent = seq
        return True

    async def next_batch(self, timeout: float) -> list[str]:
        """The next frames to send, in order; [] when nothing came within ``timeout``."""
        while True:
            batch = await self.take()
            if batch or not await self.queue.wait(timeout):
                return batch

    async def take(self) -> list[str]:
        """The frames to send now, in order, from the queue or the log; [] when none."""
        queue = self.queue
        while True:
            if queue.control:
                batch, queue.control = queue.control, []
            else:
                batch = []
            presence, queue.presence = queue.presence, None
            if presence is not None and not self.logged_only and presence != self.presence_told:
                self.presence_told = presence  # its own join is already in the welcome
                batch.append(presence)
            if queue.lagging or queue.resync:
                queue.lagging = queue.resync = False
                queue.frames.clear()
                self._needs_log = True
            if self._needs_log:
                batch += await self._read_log_page()
                if batch:
                    return batch
                continue
            frames = queue.frames
            if frames:
                queue.frames = []
                last_sent = self.last_sent
                for frame in frames:
                    seq = seq_of_text(frame)
                    if seq == last_sent + 1:
                        last_sent = seq
                        batch.append(frame)
                    elif seq > last_sent + 1:
                        # A hole (a frame lost on the pub/sub path): the log has it.
                        self._needs_log = True
                        break
                self.last_sent = last_sent
            if batch or not self._needs_log:
                return batch

    async def check_head(self) -> int:
        """The log's head; if it is past what was sent, the next batch reads the log.
        Called when idle, so a lost last frame is never waited for forever."""
        state = await self.hub.broker.log_state(self.conversation_id)
        head = state.head if state else self.last_sent
        if head > self.last_sent:
            self._needs_log = True
            self.queue.mark_resync()
        return head

    async def _read_log_page(self) -> list[str]:
        # Live frames queued from here on are deduplicated against what the log gives.
        self._needs_log = False
        texts = self.hub.recent_after(self.conversation_id, self.last_sent, _LOG_PAGE)
        if texts is None:
            frames = await self.hub.broker.read_log(self.conversation_id, self.last_sent, _LOG_PAGE)
            texts = [frame.decode() for frame in frames]
        if not texts:
            return []
        if seq_of_text(texts[0]) > self.last_sent + 1:
            raise FellBehind(self.conversation_id)
        self.last_sent = seq_of_text(texts[-1])
        if len(texts) == _LOG_PAGE:
            self._needs_log = True
        return texts
