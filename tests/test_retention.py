"""What a broker keeps of a conversation's log, in bytes as well as in events, and how
large one run may grow: held against memory, SQLite and Redis, each built by the server's
own ``make_broker`` from ``Settings``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from costream import protocol
from costream.broker import Broker
from costream.config import Settings
from costream.errors import RunTooLarge
from costream.server.app import make_broker
from tests.test_broker import (
    Listener,
    new_conversation,
    run_finished,
    seqs,
    snapshot_body,
    start,
)

OpenBroker = Callable[..., Awaitable[tuple[Broker, Listener]]]
KIB = 1024


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def open_broker(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenBroker]:
    """A factory of started brokers of the parametrized kind, made by ``make_broker`` from
    ``Settings`` with the given limits, each with a listener; closed after the test."""
    opened: list[Broker] = []
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None

    async def open_(**limits: Any) -> tuple[Broker, Listener]:
        data_dir = str(tmp_path / f"data-{len(opened)}") if request.param == "sqlite" else None
        settings = replace(Settings(), redis_url=url, data_dir=data_dir, **limits)
        broker = make_broker(settings)
        opened.append(broker)
        listener = Listener()
        await broker.start(listener.on_frame, listener.on_resync)
        return broker, listener

    yield open_
    for broker in opened:
        await broker.close()


def large_delta(n: int, size: int) -> bytes:
    """A text delta whose frame is about ``size`` bytes."""
    return protocol.encode(
        protocol.TextMessageContent(message_id="m", delta=f"{n:06d}" * (size // 6))
    )


def run_error(conversation_id: str) -> bytes:
    return protocol.encode(protocol.RunError(message="the run grew too large", code="too_large"))


async def retained(broker: Broker, conversation_id: str) -> list[bytes]:
    return await broker.read_log(conversation_id, 0, 100_000)


async def test_finished_runs_are_trimmed_by_bytes_and_a_late_joiner_still_rebuilds(
    open_broker: OpenBroker,
) -> None:
    """With log_retain_bytes=64 KiB, a finished run of 20 x 16 KiB events keeps only its
    newest events within 64 KiB; the run in progress is kept whole, so a late joiner
    rebuilds from the snapshot and the log with no gap."""
    broker, _ = await open_broker(log_retain_bytes=64 * KIB, max_run_bytes=0)
    conversation_id = await new_conversation(broker)
    lease = await start(broker, conversation_id)
    await broker.append(lease, [large_delta(n, 16 * KIB) for n in range(20)])  # 2..21
    await broker.finish_run(lease, [run_finished(conversation_id)], snapshot_body())  # 22
    state = await broker.log_state(conversation_id)
    assert state is not None and (state.head, state.snapshot_seq) == (22, 22)
    frames = await retained(broker, conversation_id)
    assert sum(map(len, frames)) <= 64 * KIB
    assert state.first_seq > 1 and seqs(frames) == list(range(state.first_seq, 23))
    # The newest events within the budget: one more would have passed it.
    everything_before = sum(map(len, frames)) + 16 * KIB
    assert everything_before > 64 * KIB

    lease = await start(broker, conversation_id)  # 23
    await broker.append(lease, [large_delta(n, 16 * KIB) for n in range(10)])  # 24..33
    state = await broker.log_state(conversation_id)
    assert state is not None and state.head == 33
    # A late joiner: the snapshot, then every event after it, none missing.
    snapshot = await broker.read_snapshot(conversation_id)
    assert snapshot is not None and protocol.seq_of(snapshot) == state.snapshot_seq == 22
    after = await broker.read_log(conversation_id, state.snapshot_seq, 100_000)
    assert seqs(after) == list(range(23, 34))  # 176 KiB of the run in progress: all kept
    await broker.finish_run(lease, [run_finished(conversation_id)], snapshot_body())  # 34
    frames = await retained(broker, conversation_id)
    assert sum(map(len, frames)) <= 64 * KIB and seqs(frames)[-1] == 34


async def test_an_append_past_max_run_bytes_is_refused_whole_and_the_run_can_still_end(
    open_broker: OpenBroker,
) -> None:
    """A batch that would take the run past max_run_bytes raises RunTooLarge, stores and
    publishes none of its events; smaller appends still fit, finish_run (RUN_ERROR) is
    accepted, and the next run has a budget of its own."""
    broker, listener = await open_broker(max_run_bytes=50 * KIB)
    conversation_id = await new_conversation(broker)
    await broker.subscribe(conversation_id)
    lease = await start(broker, conversation_id)
    assert await broker.append(lease, [large_delta(1, 20 * KIB), large_delta(2, 20 * KIB)]) == 3
    with pytest.raises(RunTooLarge) as refused:
        await broker.append(lease, [large_delta(3, 1 * KIB), large_delta(4, 20 * KIB)])
    assert refused.value.limit == 50 * KIB
    assert (await broker.log_state(conversation_id)).head == 3  # type: ignore[union-attr]
    assert await broker.append(lease, [large_delta(5, 1 * KIB)], expected_head=3) == 4
    last = await broker.finish_run(lease, [run_error(conversation_id)], snapshot_body())
    assert last == 5 and await broker.active_run(conversation_id) is None
    await listener.until(lambda: len(listener.logged(conversation_id)) == 5)
    log = await retained(broker, conversation_id)
    assert listener.logged(conversation_id) == log and seqs(log) == [1, 2, 3, 4, 5]
    assert isinstance(protocol.event_decoder.decode(log[-1]), protocol.RunError)

    second = await start(broker, conversation_id)  # 6
    assert await broker.append(second, [large_delta(6, 40 * KIB)]) == 7
