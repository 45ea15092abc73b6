"""What a long run leaves behind: the delta merger forgets its finished timed flushes."""

from __future__ import annotations

import asyncio

from costream.protocol import Event, TextMessageContent
from costream.segments import DeltaMerger


async def test_merger_keeps_no_finished_timed_flush() -> None:
    """Each timed flush is forgotten once done: after 30 of them, at most one is still held."""
    flushed = asyncio.Event()

    async def sink(events: list[Event]) -> None:
        flushed.set()

    merger = DeltaMerger(sink, 1)
    for n in range(30):
        # The first delta of the segment goes out at once, the second waits for the timer.
        await merger.push(
            [
                TextMessageContent(message_id=f"m{n}", delta="a"),
                TextMessageContent(message_id=f"m{n}", delta="b"),
            ]
        )
        flushed.clear()
        await asyncio.wait_for(flushed.wait(), timeout=10)
    assert len(merger._timed_flushes) <= 1
    await merger.aclose()


async def test_failed_timed_flush_is_raised_by_aclose() -> None:
    """A timed flush that failed is not lost: aclose raises its error."""
    failed = asyncio.Event()
    calls = 0

    async def sink(events: list[Event]) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the timed flush
            failed.set()
            raise ConnectionError("storage gone")

    merger = DeltaMerger(sink, 1)
    await merger.push(
        [
            TextMessageContent(message_id="m", delta="a"),
            TextMessageContent(message_id="m", delta="b"),
        ]
    )
    await asyncio.wait_for(failed.wait(), timeout=10)
    try:
        await merger.aclose()
    except ConnectionError as error:
        assert str(error) == "storage gone"
    else:
        raise AssertionError("aclose did not raise the timed flush's error")
