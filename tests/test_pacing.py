"""Stopping a session's reader when its writer ends, told apart from a cancel from outside."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from costream.server.pacing import SendWatchdog, StopReader


async def _reader(swallow_first_cancel: bool = False) -> None:
    """A reader that waits forever; ``swallow_first_cancel`` loses one cancel, as a
    Redis command can."""
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        if not swallow_first_cancel:
            raise
    await asyncio.Event().wait()


async def _run_reader(swallow_first_cancel: bool = False) -> bool:
    """Run a reader while a writer ends at once; whether the reader's task stayed cancelled
    from outside (``reader_ended``)."""
    this = cast("asyncio.Task[None]", asyncio.current_task())
    stop = StopReader(this)
    writer = asyncio.create_task(asyncio.sleep(0.01))
    writer.add_done_callback(stop)
    try:
        await _reader(swallow_first_cancel)
    except asyncio.CancelledError:
        if stop.reader_ended():
            raise
    finally:
        stop.reader_ended()
    return False


async def test_the_writer_ending_stops_the_reader_and_leaves_its_task_uncancelled() -> None:
    """The writer's end cancels the reader; the cancel is undone, the task goes on."""
    task = asyncio.create_task(_run_reader())
    assert await asyncio.wait_for(task, 2) is False
    assert task.cancelling() == 0


async def test_a_lost_cancel_is_repeated_until_the_reader_ends() -> None:
    """A reader that swallows the first cancel is cancelled again."""
    task = asyncio.create_task(_run_reader(swallow_first_cancel=True))
    assert await asyncio.wait_for(task, 2) is False
    assert task.cancelling() == 0


async def test_a_cancel_from_outside_still_cancels_the_session() -> None:
    """A cancel from outside the session (a server shutdown) is not mistaken for the
    writer's end."""
    task = asyncio.create_task(_run_reader())
    await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)


async def test_the_send_watchdog_holds_no_timer_while_idle() -> None:
    """Only a batch being sent arms the watchdog's timer; an overdue batch ends the block."""
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(None) as deadline:
            watchdog = SendWatchdog(deadline, 0.02)
            assert watchdog._timer is None
            watchdog.begin()
            watchdog.end()
            await asyncio.sleep(0.05)
            assert watchdog._timer is None  # fired while idle, not armed again
            watchdog.begin()
            await asyncio.sleep(1)
