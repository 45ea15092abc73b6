"""What waits to be sent to one viewer, and how its writer learns of it.

The hub's fan-out loop puts live frames in a viewer's :class:`ViewerQueue` and never
waits on it. Whoever sends to the viewer either waits in :meth:`ViewerQueue.wait` (SSE,
AG-UI), or, for a WebSocket session, parks: :meth:`ViewerQueue.park` leaves a callback
that starts a writer when something is queued or a heartbeat is due, so an idle viewer
holds no task of its own. While its writer waits or is parked with nothing queued, a
live frame may go straight to ``direct`` (its bytes written at once) instead.

Objects, not bound methods, are kept for ``direct`` and the parked writer: one viewer
each, idle ones too, and a bound method is an object of its own.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from costream.metrics import Metrics


class AtOnce(Protocol):
    def take_at_once(self, text: str, payload: bytes, seq: int) -> bool:
        """Send a frame (seq 0: presence) now, or answer False to have it queued."""
        ...


class Parked(Protocol):
    def start_writer(self) -> None:
        """Something is queued, or a heartbeat is due: start a writer."""
        ...


class ViewerQueue:
    """Live frames waiting for one follower, at most ``maxsize``.

    ``offer`` never blocks: on overflow the queue empties itself and marks the follower as
    lagging, and drops live frames until the follower has caught up from the log.
    """

    # One per viewer, idle ones too: slots, and lists (an empty deque is 760 bytes).
    __slots__ = (
        "_active_at", "_idle_deadline", "_idle_timer", "_metrics", "_on_ready", "_timeout",
        "_waiter", "control", "direct", "frames", "heartbeat_due", "lagging", "maxsize",
        "presence", "resync",
    )  # fmt: skip

    def __init__(self, maxsize: int, metrics: Metrics) -> None:
        self.maxsize = maxsize
        self.frames: list[str] = []  # taken whole by the follower
        self.control: list[str] = []  # replies to this client: pong, accepted, error
        self.presence: str | None = None  # the latest presence frame not yet sent
        self.lagging = False
        self.resync = False
        self.heartbeat_due = False  # parked for the heartbeat interval with nothing sent
        self.direct: AtOnce | None = None
        self._metrics = metrics
        self._waiter: asyncio.Future[bool] | None = None  # the follower waiting in ``wait``
        self._on_ready: Parked | None = None
        self._timeout = 0.0  # of the current ``wait`` or ``park``
        self._idle_deadline = 0.0  # when the current ``wait`` or ``park`` times out
        self._active_at = 0.0  # loop time of the last frame taken by ``direct``
        self._idle_timer: asyncio.TimerHandle | None = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(True)
            return
        on_ready = self._on_ready
        if on_ready is not None:
            self._on_ready = None
            on_ready.start_writer()

    def offer(self, frame: str, seq: int = -1, now: float = 0.0, payload: bytes = b"") -> bool:
        """Queue a live frame (``seq`` its seq, ``now`` the loop time, ``payload`` its
        bytes), or hand it to ``direct`` when the writer waits or is parked with nothing
        queued: True when ``direct`` sent it."""
        if self.lagging:
            return False
        direct = self.direct
        if direct is not None and self._idle() and direct.take_at_once(frame, payload, seq):
            self._active_at = now
            return True
        if len(self.frames) >= self.maxsize:
            # Never block the fan-out on one viewer: switch it to the log instead.
            self.frames.clear()
            self.lagging = True
            self._metrics.catch_ups.inc()
        else:
            self.frames.append(frame)
        self._wake()
        return False

    def offer_presence(self, frame: str, payload: bytes = b"") -> None:
        """Hand a presence frame to ``direct`` as a live frame, or keep it in place of any
        presence frame still waiting: only the latest count matters."""
        direct = self.direct
        if direct is not None and self._idle() and direct.take_at_once(frame, payload, 0):
            return
        self.presence = frame
        self._wake()

    def _idle(self) -> bool:
        """Whether the writer waits or is parked with nothing queued."""
        return (
            (self._waiter is not None or self._on_ready is not None)
            and not self.frames
            and self.presence is None
        )

    def reply(self, frame: str) -> None:
        self.control.append(frame)
        self._wake()

    def mark_resync(self) -> None:
        """Frames may have been lost upstream: check the log."""
        self.resync = True
        self._wake()

    def _pending(self) -> bool:
        return bool(self.frames or self.control or self.presence or self.lagging or self.resync)

    def _arm(self, timeout: float) -> None:
        """Time out ``timeout`` from now: one idle timer per queue, moved on only when it
        fires (no timer scheduled and cancelled per frame)."""
        loop = asyncio.get_running_loop()
        self._timeout = timeout
        deadline = self._idle_deadline = loop.time() + timeout
        timer = self._idle_timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._idle_timer = loop.call_at(deadline, self._on_idle_timer)

    async def wait(self, timeout: float) -> bool:
        """Wait until something is queued; False on timeout."""
        if self._pending():
            return True
        self._arm(timeout)
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            return await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None

    def park(self, on_ready: Parked, timeout: float) -> bool:
        """The writer ends with nothing to send: start ``on_ready``'s writer (once) when something is
        queued, or with ``heartbeat_due`` set when nothing was sent for ``timeout``. False
        (not parked) when something is queued already."""
        if self._pending():
            return False
        self._on_ready = on_ready
        self._arm(timeout)
        return True

    def _on_idle_timer(self) -> None:
        self._idle_timer = None
        waiter = self._waiter
        if (waiter is None or waiter.done()) and self._on_ready is None:
            return  # not waiting: the next ``wait`` or ``park`` arms the timer again
        loop = asyncio.get_running_loop()
        # Frames sent at once count as activity: idle means nothing sent for ``timeout``.
        deadline = max(self._idle_deadline, self._active_at + self._timeout)
        if loop.time() < deadline:
            self._idle_timer = loop.call_at(deadline, self._on_idle_timer)
        elif waiter is not None:
            self._waiter = None
            waiter.set_result(False)
        else:
            self.heartbeat_due = True
            self._wake()

    def close(self) -> None:
        """Drop the idle timer and the parked writer's callback (the follower is gone)."""
        self.direct = None
        self._on_ready = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
