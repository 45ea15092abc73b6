"""Producers and viewer processes for the fan-out benchmarks (shared by bench_fanout.py
and bench_memory.py). Not a benchmark itself.

A producer drives the production path directly: ``RedisBroker.start_run`` then
``append`` (costream), or ``PUBLISH`` of the same bytes (the reference forwarder). Each
token is a ``TEXT_MESSAGE_CONTENT`` whose delta is ``"<time.time_ns()> "``, taken just
before the token is handed over, so viewers measure token-to-viewer latency.
"""

from __future__ import annotations

import asyncio
import json
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import benchlib
from redis.asyncio import Redis

from costream import protocol
from costream.broker import Broker, RunLease
from costream.protocol import (
    Event,
    RunAgentInput,
    RunFinished,
    RunFinishedMeta,
    RunOutcome,
    RunStarted,
    TextMessageContent,
    TextMessageEnd,
    TextMessageStart,
    UserMessage,
)
from costream.segments import DeltaMerger, new_id

LEASE_TTL_MS = 30_000
RENEW_EVERY_S = 2.0


class Producer(Protocol):
    """Appends a run's events for one conversation, one way or another."""

    conversation_id: str

    async def begin(self) -> None: ...
    async def send(self, events: list[Event]) -> None: ...
    async def end(self) -> None: ...


class CostreamProducer:
    """The production path: the run lease, then ``append`` through the Redis broker."""

    def __init__(self, broker: Broker, conversation_id: str) -> None:
        self.broker = broker
        self.conversation_id = conversation_id
        self.run_id = new_id()
        self.lease: RunLease | None = None
        self._renewed = 0.0

    async def begin(self) -> None:
        started = RunStarted(
            thread_id=self.conversation_id,
            run_id=self.run_id,
            input=RunAgentInput(
                thread_id=self.conversation_id,
                run_id=self.run_id,
                messages=[UserMessage(id=new_id(), content="benchmark")],
            ),
        )
        self.lease = await self.broker.start_run(
            self.conversation_id, self.run_id, protocol.encode(started), LEASE_TTL_MS
        )
        self._renewed = time.monotonic()

    async def send(self, events: list[Event]) -> None:
        assert self.lease is not None
        await self.broker.append(self.lease, [protocol.encode(e) for e in events])
        if time.monotonic() - self._renewed > RENEW_EVERY_S:
            self._renewed = time.monotonic()
            await self.broker.renew_lease(self.lease, LEASE_TTL_MS)

    async def end(self) -> None:
        assert self.lease is not None
        finished = RunFinished(
            thread_id=self.conversation_id,
            run_id=self.run_id,
            outcome=RunOutcome(type="success"),
            usage=[],
            metadata=RunFinishedMeta(),
        )
        await self.broker.finish_run(self.lease, [protocol.encode(finished)], None)


class ReferenceProducer:
    """The same bytes, ``seq`` spliced in by the producer, ``PUBLISH``ed: no log, no Lua."""

    def __init__(self, client: Redis, conversation_id: str) -> None:
        self.client = client
        self.conversation_id = conversation_id
        self.channel = f"ref:{conversation_id}"
        self.seq = 0

    async def begin(self) -> None:
        pass

    async def send(self, events: list[Event]) -> None:
        if len(events) == 1:
            self.seq += 1
            await self.client.publish(
                self.channel, protocol.with_seq(protocol.encode(events[0]), self.seq)
            )
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for event in events:
                self.seq += 1
                pipe.publish(self.channel, protocol.with_seq(protocol.encode(event), self.seq))
            await pipe.execute()

    async def end(self) -> None:
        pass


def token(message_id: str) -> TextMessageContent:
    return TextMessageContent(message_id=message_id, delta=f"{time.time_ns()} ")


async def produce_paced(
    producer: Producer,
    tokens: int,
    rate: float,
    merge_ms: int,
    lags: list[float] | None = None,
) -> float:
    """``tokens`` tokens at ``rate`` per second (through a ``DeltaMerger`` when
    ``merge_ms``), then the END token; returns the seconds it took. With ``lags``, the
    seconds each token was handed over after its scheduled time are appended to it (the
    producer's own lateness, which the token's publish time does not include)."""
    message_id = new_id()
    await producer.begin()
    await producer.send([TextMessageStart(message_id=message_id)])
    merger = DeltaMerger(producer.send, merge_ms)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for index in range(tokens):
        delay = started + index / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if lags is not None:
            lags.append(loop.time() - started - index / rate)
        await merger.push([token(message_id)])
    await merger.aclose()
    took = loop.time() - started
    await producer.send([TextMessageContent(message_id=message_id, delta="END")])
    await producer.send([TextMessageEnd(message_id=message_id)])
    await producer.end()
    return took


async def produce_fast(producer: Producer, tokens: int, batch: int) -> float:
    """``tokens`` tokens as fast as the producer goes, ``batch`` events (one frame each)
    per call, then the END token; returns the seconds it took."""
    message_id = new_id()
    await producer.begin()
    await producer.send([TextMessageStart(message_id=message_id)])
    started = time.monotonic()
    sent = 0
    while sent < tokens:
        count = min(batch, tokens - sent)
        await producer.send([token(message_id) for _ in range(count)])
        sent += count
    took = time.monotonic() - started
    await producer.send([TextMessageContent(message_id=message_id, delta="END")])
    await producer.send([TextMessageEnd(message_id=message_id)])
    await producer.end()
    return took


@dataclass
class Target:
    ws_url: str
    conversation_id: str
    token: str
    count: int

    def plan(self) -> dict[str, Any]:
        return {
            "wsUrl": self.ws_url,
            "conversationId": self.conversation_id,
            "token": self.token,
            "count": self.count,
        }


@dataclass
class ViewerProcess:
    """One ``viewer_worker.py`` subprocess."""

    process: asyncio.subprocess.Process
    latencies_path: Path
    connect_s: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)

    async def wait_ready(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while True:
                line = await self._line()
                if line.startswith("READY"):
                    self.connect_s = float(line.split()[2])
                    return

    async def wait_watched(self, timeout: float) -> None:
        """Until its viewers saw the END token (or the deadline passed), before they close."""
        async with asyncio.timeout(timeout):
            while not (await self._line()).startswith("WATCHED"):
                pass

    async def wait_result(self, timeout: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                line = await self._line()
                if line.startswith("RESULT "):
                    self.result = json.loads(line[len("RESULT ") :])
                    await self.process.wait()
                    return self.result

    async def _line(self) -> str:
        assert self.process.stdout is not None
        raw = await self.process.stdout.readline()
        if not raw:
            assert self.process.stderr is not None
            error = (await self.process.stderr.read()).decode(errors="replace")
            raise RuntimeError(f"viewer process exited:\n{error[-3000:]}")
        return raw.decode().strip()

    def latencies(self) -> array[int]:
        values: array[int] = array("q")
        if self.latencies_path.exists():
            values.frombytes(self.latencies_path.read_bytes())
        return values

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


def split_targets(targets: Sequence[Target], processes: int) -> list[list[Target]]:
    """Spread the viewers of ``targets`` evenly over ``processes`` plans."""
    plans: list[list[Target]] = [[] for _ in range(processes)]
    for target in targets:
        base, extra = divmod(target.count, processes)
        for index in range(processes):
            count = base + (1 if index < extra else 0)
            if count:
                plans[index].append(
                    Target(target.ws_url, target.conversation_id, target.token, count)
                )
    return [plan for plan in plans if plan]


async def start_viewers(
    work: benchlib.Workdir,
    targets: Sequence[Target],
    processes: int,
    *,
    deadline_s: float,
    compression: bool,
    latencies: bool = True,
    resume: bool = True,
) -> list[ViewerProcess]:
    """Viewer processes with every viewer past ``welcome``."""
    started: list[ViewerProcess] = []
    for index, plan_targets in enumerate(split_targets(targets, processes)):
        path = work.path / f"latencies-{time.monotonic_ns()}-{index}.bin"
        plan = {
            "targets": [t.plan() for t in plan_targets],
            "deadlineS": deadline_s,
            "compression": compression,
            "latencies": latencies,
            "latenciesPath": str(path),
            "resume": resume,
        }
        process = await asyncio.create_subprocess_exec(
            benchlib.PYTHON,
            str(benchlib.BENCH_DIR / "viewer_worker.py"),
            json.dumps(plan),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=benchlib.base_env(),
        )
        started.append(ViewerProcess(process, path))
    try:
        await asyncio.gather(*(v.wait_ready(180) for v in started))
    except BaseException:
        for viewer in started:
            viewer.kill()
        raise
    return started


Runner = Callable[[], Awaitable[float]]
