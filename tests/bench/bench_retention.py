"""What a conversation's log costs in memory with large events, by broker (issue 15).

Two workloads of 300 events of 256 KiB each (75 MiB of frames) on one conversation, with
the server's default limits (``Settings()``: log_retain 10 000 events, log_retain_bytes
8 MiB, max_run_bytes 32 MiB), each broker built by ``make_broker``:

- runs: 300 runs of one large event each (RUN_STARTED, the event, RUN_FINISHED and a
  snapshot), as an ingest producer posting one large event per run would;
- one run: a single run appending the 300 events one by one; appends refused with
  ``RunTooLarge`` are counted, then the run is ended (RUN_ERROR) as a producer would.

For each: the bytes of the log still retained (``read_log``), and the memory it costs:
this process's Python heap (tracemalloc) for the memory broker, ``used_memory`` of a
private redis-server for Redis.

Run: ``.venv/bin/python tests/bench/bench_retention.py``. For the figures before the
change, run it with ``PYTHONPATH`` pointing at a checkout of the earlier package.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Awaitable, Callable

import benchlib
import redis
from benchlib import table

from costream import protocol
from costream.broker import Broker
from costream.config import Settings
from costream.errors import RunTooLarge
from costream.server.app import make_broker
from costream.store import mint_id

EVENTS = 300
EVENT_BYTES = 256 * 1024
MIB = 1024 * 1024
TTL_MS = 60_000


def body(n: int) -> bytes:
    text = f"{n:08d}" * (EVENT_BYTES // 8)
    return protocol.encode(protocol.TextMessageContent(message_id="m", delta=text))


def started(conversation_id: str, run_id: str) -> bytes:
    input_ = protocol.RunAgentInput(thread_id=conversation_id, run_id=run_id, messages=[])
    return protocol.encode(
        protocol.RunStarted(thread_id=conversation_id, run_id=run_id, input=input_)
    )


def ended(conversation_id: str, run_id: str) -> bytes:
    return protocol.encode(
        protocol.RunFinished(
            thread_id=conversation_id,
            run_id=run_id,
            outcome=protocol.RunOutcome(type="success"),
            usage=[],
            metadata=protocol.RunFinishedMeta(),
        )
    )


def failed() -> bytes:
    return protocol.encode(protocol.RunError(message="run too large", code="too_large"))


def snapshot() -> bytes:
    message = protocol.SnapshotMessage(id="u", role="user", content="hi")
    return protocol.encode(protocol.MessagesSnapshot(messages=[message]))


async def many_runs(broker: Broker, conversation_id: str) -> int:
    for n in range(EVENTS):
        run_id = f"run-{n}"
        lease = await broker.start_run(
            conversation_id, run_id, started(conversation_id, run_id), TTL_MS
        )
        await broker.append(lease, [body(n)])
        await broker.finish_run(lease, [ended(conversation_id, run_id)], snapshot())
    return 0


async def one_run(broker: Broker, conversation_id: str) -> int:
    lease = await broker.start_run(conversation_id, "run", started(conversation_id, "run"), TTL_MS)
    refused = 0
    for n in range(EVENTS):
        try:
            await broker.append(lease, [body(n)])
        except RunTooLarge:
            refused += 1
    await broker.finish_run(lease, [failed()], snapshot())
    return refused


async def measure(
    settings: Settings, workload: Callable[[Broker, str], Awaitable[int]], memory: Callable[[], int]
) -> tuple[float, float, int]:
    """(MiB retained in the log, MiB of memory it costs, appends refused)."""
    broker = make_broker(settings)
    await broker.start(lambda c, f: None, lambda c: None)
    try:
        before = memory()
        conversation_id = mint_id()
        await broker.create_conversation(conversation_id, {"title": b"bench"})
        refused = await workload(broker, conversation_id)
        frames = await broker.read_log(conversation_id, 0, 100_000)
        retained = sum(map(len, frames)) / MIB
        return retained, (memory() - before) / MIB, refused
    finally:
        await broker.close()


def python_heap() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def main() -> None:
    tracemalloc.start()
    work = benchlib.Workdir()
    rows: list[list[object]] = []
    try:
        _, url = benchlib.start_redis(work)
        client = redis.Redis.from_url(url)

        def used_memory() -> int:
            return int(client.info("memory")["used_memory"])

        for name, workload in (("runs", many_runs), ("one run", one_run)):
            for kind, settings, memory in (
                ("memory", Settings(), python_heap),
                ("redis", Settings(redis_url=url), used_memory),
            ):
                retained, cost, refused = await measure(settings, workload, memory)
                rows.append([name, kind, retained, cost, refused])
    finally:
        work.close()
    print(
        table(
            f"{EVENTS} events of {EVENT_BYTES // 1024} KiB on one conversation, default limits",
            ["workload", "broker", "log retained MiB", "memory MiB", "appends refused"],
            rows,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
