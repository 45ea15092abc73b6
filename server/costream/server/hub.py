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

Two things keep the per-viewer cost flat as viewers pile in. Presence is not a log: the
hub forwards at most one count per conversation per ``PRESENCE_INTERVAL_S`` and a queue
keeps only the latest, so a thousand joins are not a million frames. And the hub keeps
the last ``RECENT_FRAMES`` frames of each conversation it follows, so a viewer catching up
after an overflow or a lost frame reads them from memory, not from the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

from costream.broker import Broker
from costream.metrics import Metrics
from costream.protocol import seq_of, seq_of_text

_LOG_PAGE: Final = 1000
PRESENCE_INTERVAL_S: Final = 0.25
RECENT_FRAMES: Final = 2048


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


class ViewerQueue:
    """Live frames waiting for one follower, at most ``maxsize``.

    ``offer`` never blocks: on overflow the queue empties itself and marks the follower as
    lagging, and drops live frames until the follower has caught up from the log.
    """

    def __init__(self, maxsize: int, metrics: Metrics) -> None:
        self.maxsize = maxsize
        self.frames: deque[str] = deque()
        self.control: deque[str] = deque()  # replies to this client: pong, accepted, error
        self.presence: str | None = None  # the latest presence frame not yet sent
        self.lagging = False
        self.resync = False
        self._metrics = metrics
        self._waiter: asyncio.Future[bool] | None = None  # the follower waiting in ``wait``
        self._idle_deadline = 0.0  # when the current ``wait`` times out
        self._idle_timer: asyncio.TimerHandle | None = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(True)

    def offer(self, frame: str) -> None:
        if self.lagging:
            return
        if len(self.frames) >= self.maxsize:
            # Never block the fan-out on one viewer: switch it to the log instead.
            self.frames.clear()
            self.lagging = True
            self._metrics.catch_ups.inc()
        else:
            self.frames.append(frame)
        if self._waiter is not None:
            self._wake()

    def offer_presence(self, frame: str) -> None:
        """Replace any presence frame still waiting: only the latest count matters."""
        self.presence = frame
        self._wake()

    def reply(self, frame: str) -> None:
        self.control.append(frame)
        self._wake()

    def mark_resync(self) -> None:
        """Frames may have been lost upstream: check the log."""
        self.resync = True
        self._wake()

    async def wait(self, timeout: float) -> bool:
        """Wait until something is queued; False on timeout."""
        if self.frames or self.control or self.presence or self.lagging or self.resync:
            return True
        # Called once per frame per viewer: no asyncio.timeout (a timer scheduled and
        # cancelled each time) but one idle timer per queue, moved on only when it fires.
        loop = asyncio.get_running_loop()
        deadline = self._idle_deadline = loop.time() + timeout
        timer = self._idle_timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._idle_timer = loop.call_at(deadline, self._on_idle_timer)
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        try:
            return await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None

    def _on_idle_timer(self) -> None:
        self._idle_timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # not waiting: the next ``wait`` arms the timer again
        loop = waiter.get_loop()
        if loop.time() >= self._idle_deadline:
            self._waiter = None
            waiter.set_result(False)
        else:
            self._idle_timer = loop.call_at(self._idle_deadline, self._on_idle_timer)

    def close(self) -> None:
        """Drop the idle timer (the follower is gone)."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None


class _ConversationLock:
    """A conversation's subscription lock and how many hold or wait for it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class Hub:
    """One process's subscriptions, shared by all its followers of each conversation."""

    def __init__(self, broker: Broker, metrics: Metrics) -> None:
        self.broker = broker
        self.metrics = metrics
        self._queues: dict[str, set[ViewerQueue]] = {}
        self._locks: dict[str, _ConversationLock] = {}  # only while held or awaited
        self._recent: dict[str, deque[tuple[int, str]]] = {}
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
        recent = self._recent[conversation_id]
        if recent and recent[-1][0] + 1 != seq:
            recent.clear()  # a hole: the ring only ever holds contiguous frames
        recent.append((seq, text))
        for queue in queues:
            queue.offer(text)

    def _send_presence(self) -> None:
        self._presence_timer = None
        pending, self._presence = self._presence, {}
        for conversation_id, text in pending.items():
            for queue in self._queues.get(conversation_id, ()):
                queue.offer_presence(text)

    def recent_after(self, conversation_id: str, after_seq: int, limit: int) -> list[str] | None:
        """Frames with seq > ``after_seq`` from memory, or None when the ring does not
        hold ``after_seq + 1`` (then the broker's log must answer)."""
        recent = self._recent.get(conversation_id)
        if not recent or not recent[0][0] <= after_seq + 1 <= recent[-1][0] + 1:
            return None
        start = after_seq + 1 - recent[0][0]
        return [text for _, text in itertools.islice(recent, start, start + limit)]

    def on_resync(self, conversation_id: str) -> None:
        """Broker listener: the subscription broke and was re-established."""
        if conversation_id in self._recent:
            self._recent[conversation_id].clear()  # frames may be missing after its end
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
                self._recent[conversation_id] = deque(maxlen=RECENT_FRAMES)
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
                self._presence.pop(conversation_id, None)
                await self.broker.unsubscribe(conversation_id)


class Follower:
    """The frames of one conversation after ``last_sent``, in seq order, then live.

    Use as ``async with Follower(...) as follower`` and call :meth:`next_batch` in a loop.
    Presence frames are passed through (``logged_only=False``) and control replies come
    first.
    """

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

    async def __aenter__(self) -> Follower:
        await self.hub.attach(self.conversation_id, self.queue)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.queue.close()
        await self.hub.detach(self.conversation_id, self.queue)

    async def next_batch(self, timeout: float) -> list[str]:
        """The next frames to send, in order; [] when nothing came within ``timeout``."""
        queue = self.queue
        while True:
            batch = list(queue.control)
            queue.control.clear()
            if queue.presence is not None:
                if not self.logged_only:
                    batch.append(queue.presence)
                queue.presence = None
            if queue.lagging or queue.resync:
                queue.lagging = queue.resync = False
                queue.frames.clear()
                self._needs_log = True
            if self._needs_log:
                batch += await self._read_log_page()
                if batch:
                    return batch
                continue
            while queue.frames:
                frame = queue.frames.popleft()
                seq = seq_of_text(frame)
                if seq == self.last_sent + 1:
                    self.last_sent = seq
                    batch.append(frame)
                elif seq > self.last_sent + 1:
                    # A hole (a frame lost on the pub/sub path): the log has it.
                    queue.frames.clear()
                    self._needs_log = True
                    break
            if batch:
                return batch
            if self._needs_log:
                continue
            if not await queue.wait(timeout):
                return []

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
