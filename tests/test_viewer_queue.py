"""A viewer's queue wakes a parked writer (a WebSocket session holds no writer task while
idle): once per park, for a frame, a reply or a heartbeat; live frames go straight out
while it is parked."""

from __future__ import annotations

import asyncio

from costream.metrics import Metrics
from costream.server.viewer_queue import ViewerQueue


class Starts:
    """A parked writer's session that counts how often its writer was started."""

    def __init__(self) -> None:
        self.count = 0
        self.called = asyncio.Event()

    def start_writer(self) -> None:
        self.count += 1
        self.called.set()


async def test_a_parked_writer_is_started_once_when_something_comes() -> None:
    queue, starts = ViewerQueue(10, Metrics()), Starts()
    assert queue.park(starts, timeout=30)
    queue.reply('{"type":"pong"}')
    queue.offer('{"seq":1}', 1)
    assert starts.count == 1  # the writer it started takes both
    assert queue.control == ['{"type":"pong"}'] and queue.frames == ['{"seq":1}']
    queue.close()


async def test_a_queue_with_something_waiting_does_not_park() -> None:
    queue, starts = ViewerQueue(10, Metrics()), Starts()
    queue.offer_presence('{"type":"presence"}')
    assert not queue.park(starts, timeout=30)
    assert starts.count == 0
    queue.close()


async def test_live_frames_go_straight_out_while_parked() -> None:
    queue, starts = ViewerQueue(10, Metrics()), Starts()
    sent: list[bytes] = []

    class Direct:
        def take_at_once(self, text: str, payload: bytes, seq: int) -> bool:
            sent.append(payload)
            return True

    queue.direct = Direct()
    assert not queue.offer('{"seq":1}', 1, payload=b'{"seq":1}')  # no writer, not parked
    assert sent == []
    queue.frames.clear()
    assert queue.park(starts, timeout=30)
    assert queue.offer('{"seq":2}', 2, payload=b'{"seq":2}')
    assert sent == [b'{"seq":2}'] and queue.frames == [] and starts.count == 0
    queue.close()


async def test_a_parked_queue_asks_for_a_heartbeat_when_nothing_was_sent() -> None:
    queue, starts = ViewerQueue(10, Metrics()), Starts()
    assert queue.park(starts, timeout=0.05)
    await asyncio.wait_for(starts.called.wait(), 10)
    assert queue.heartbeat_due and starts.count == 1
    queue.close()


async def test_a_closed_queue_starts_no_writer() -> None:
    queue, starts = ViewerQueue(10, Metrics()), Starts()
    assert queue.park(starts, timeout=0.01)
    queue.close()
    queue.reply('{"type":"pong"}')
    await asyncio.sleep(0.05)  # past the heartbeat timeout: its timer was dropped too
    assert starts.count == 0 and not queue.heartbeat_due
