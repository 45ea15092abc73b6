"""Pacing one WebSocket session: a rate limit for what the client sends, a send timeout
for what the server sends, sending at once from the fan-out loop, and stopping the reader
when the writer ends. No I/O of their own."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine, MutableMapping
from dataclasses import dataclass
from typing import Any, Final

from costream.metrics import Counter

ASGISend = Callable[[MutableMapping[str, Any]], Coroutine[Any, Any, None]]


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
    """A done callback for the writer's task: cancels the reader's ``task`` when the writer
    ends, and again every ``AGAIN_S`` until the reader ends (a cancel can be lost in a
    Redis command). Its cancels are undone with ``uncancel`` once the reader has ended,
    as ``asyncio.timeout`` does, so a cancellation from outside is told apart."""

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


class SendAtOnce:
    """Sends a frame from outside the writer task (the hub's fan-out loop), for a send
    that completes without waiting, as a bare forwarder's loop does: no queue, no task
    woken per frame and viewer.

    ``send`` is the ASGI send of the connection (Starlette's ``WebSocket.send``). Its
    coroutine is stepped once, the way a task's first step runs it; uvicorn writes the
    frame to the transport in that step unless the transport is paused. A send that has
    to wait, or that fails, is kept, and ``on_stuck`` (which stops further frames coming
    this way and wakes the writer) is called: the writer then ``finish``es it under its
    send timeout before anything else is sent, so frames never interleave.
    """

    __slots__ = ("_counter", "_error", "_on_stuck", "_pending", "_send", "_yielded")

    def __init__(self, send: ASGISend, counter: Counter, on_stuck: Callable[[], None]) -> None:
        self._send = send
        self._counter = counter  # frames sent
        self._on_stuck = on_stuck
        self._pending: Coroutine[Any, Any, None] | None = None
        self._yielded: Any = None  # what the pending send waits for
        self._error: Exception | None = None

    def __call__(self, frame: str) -> None:
        send = self._send({"type": "websocket.send", "text": frame})
        try:
            yielded = send.send(None)
        except StopIteration:
            self._counter.inc()
            return
        except Exception as error:
            self._error = error
        else:
            self._pending, self._yielded = send, yielded
        self._on_stuck()

    def close(self) -> None:
        """Drop a send left unfinished (the writer ended)."""
        if self._pending is not None:
            self._pending.close()
            self._pending = self._yielded = None

    async def finish(self) -> None:
        """Complete the send that could not complete at once; raise what a send raised."""
        error, self._error = self._error, None
        if error is not None:
            raise error
        send, yielded = self._pending, self._yielded
        self._pending = self._yielded = None
        if send is None:
            return
        loop = asyncio.get_running_loop()
        try:
            while True:
                # Wait for what the send waits for, as a task would, then resume it. Not
                # ``await yielded``: a future already yielded once refuses a second await.
                if yielded is None:
                    waiter: asyncio.Future[None] = asyncio.ensure_future(asyncio.sleep(0))
                else:
                    waiter = loop.create_future()
                    yielded.add_done_callback(functools.partial(_resolve, waiter))
                try:
                    await waiter
                except asyncio.CancelledError:
                    if yielded is None or not yielded.cancel():
                        yielded = send.throw(asyncio.CancelledError())
                        continue
                    # Cancelled: the send reads that from the future when resumed.
                yielded = send.send(None)
        except StopIteration:
            self._counter.inc()
        finally:
            send.close()


def _resolve(waiter: asyncio.Future[None], _: object) -> None:
    if not waiter.done():
        waiter.set_result(None)
