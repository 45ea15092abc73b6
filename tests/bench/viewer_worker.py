"""A viewer process for the fan-out benchmarks: many WebSocket viewers on one event loop.

Started by ``bench_fanout.py`` (and ``bench_memory.py``), not by hand. Reads a JSON plan
from argv[1]: ``{"targets": [{"wsUrl", "conversationId", "token", "count"}], "deadlineS",
"compression", "latencies", "resume"}``. It connects every viewer (``hello`` with
``lastSeq`` 0, waits for ``welcome``), prints ``READY <n>``, then receives until each viewer
saw the ``END`` token or the deadline passed, prints ``WATCHED`` (the end of delivery, where
the benchmark stops its CPU meters), closes its viewers and prints one ``RESULT {json}`` line.

With ``resume`` (the default) a viewer does what PROTOCOL.md asks of a client when the
server closes it with 1001, 1011, 1012, 4000 or 4008, or the connection drops: it
reconnects at once with ``hello`` carrying its ``lastSeq`` and ``epoch``, as the project's
own clients do, so a server that sheds a slow viewer loses it no token. The result counts
those resumes and the close codes that caused them; gaps and duplicates are counted across
them. Without ``resume`` such a viewer ends there, and its missing tokens count as loss.

Token frames carry their publish time: a ``TEXT_MESSAGE_CONTENT`` whose ``delta`` is one
or more ``<time_ns> `` words (several when deltas were merged). Each word gives one
token-to-viewer latency (receive time minus publish time, same machine clock). Latencies
go to the binary file ``latencies`` (int64 nanoseconds). The worker counts per viewer:
tokens, logged frames, seq gaps and duplicates, first and last token receive times.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

SEQ_PREFIX = '{"seq":'
DELTA_KEY = '"delta":"'
CONNECT_CONCURRENCY = 25
RESUME_CODES = frozenset({1001, 1006, 1011, 1012, 4000, 4008})  # reconnect and resume
MAX_RESUMES = 20  # per viewer: a server that keeps closing it is a finding, not a loop


@dataclass
class ViewerStats:
    tokens: int = 0
    frames: int = 0
    gaps: int = 0
    duplicates: int = 0
    first_ns: int = 0
    last_ns: int = 0
    ended: bool = False
    close_code: int | None = None
    last_seq: int = 0
    epoch: str | None = None
    resumes: int = 0
    closes: list[int] = field(default_factory=list)  # every close code received, in order


async def open_viewer(
    target: dict[str, Any], compression: bool, stats: ViewerStats | None = None
) -> ClientConnection:
    ws = await connect(
        target["wsUrl"],
        subprotocols=[Subprotocol("costream.v1")],
        compression="deflate" if compression else None,
        max_size=2**20,
        open_timeout=60,
        ping_interval=None,
        max_queue=None,
    )
    hello = {
        "type": "hello",
        "conversationId": target["conversationId"],
        "token": target["token"],
        "lastSeq": stats.last_seq if stats else 0,
        "epoch": stats.epoch if stats else None,
    }
    await ws.send(json.dumps(hello))
    welcome = json.loads(await asyncio.wait_for(ws.recv(), 60))
    if welcome.get("type") != "welcome":
        raise RuntimeError(f"expected welcome, got {welcome}")
    if welcome.get("mode") == "snapshot":
        raise RuntimeError("the server answered a resume with a snapshot: the log was trimmed")
    if stats is not None:
        stats.epoch = welcome.get("epoch")
    return ws


async def watch(
    ws: ClientConnection, stats: ViewerStats, latencies: array[int] | None
) -> int | None:
    """Receive until the END token (returns None) or the connection closes (returns the
    close code the server sent, 1006 when it sent none)."""
    try:
        async for message in ws:
            now = time.time_ns()
            assert isinstance(message, str)
            if not message.startswith(SEQ_PREFIX):
                continue  # presence, heartbeat
            stats.frames += 1
            seq = int(message[7 : message.index(",", 7)])
            last_seq = stats.last_seq
            if last_seq and seq != last_seq + 1:
                if seq <= last_seq:
                    stats.duplicates += 1
                else:
                    stats.gaps += seq - last_seq - 1
            stats.last_seq = max(last_seq, seq)
            at = message.rfind(DELTA_KEY)
            if at < 0 or "TEXT_MESSAGE_CONTENT" not in message:
                continue
            words = message[at + len(DELTA_KEY) : message.index('"', at + len(DELTA_KEY))]
            for word in words.split():
                if word == "END":
                    stats.ended = True
                    return None
                stats.tokens += 1
                if latencies is not None:
                    latencies.append(now - int(word))
            if not stats.first_ns:
                stats.first_ns = now
            stats.last_ns = now
    except ConnectionClosed:
        pass
    return ws.close_code if ws.close_code is not None else 1006


async def follow(
    ws: ClientConnection,
    target: dict[str, Any],
    stats: ViewerStats,
    latencies: array[int] | None,
    *,
    compression: bool,
    resume: bool,
    sockets: list[ClientConnection],
    index: int,
) -> None:
    """One viewer until the END token: resumes after a close that asks for it."""
    while True:
        code = await watch(ws, stats, latencies)
        if code is None:
            return
        stats.close_code = code
        stats.closes.append(code)
        if not resume or code not in RESUME_CODES or stats.resumes >= MAX_RESUMES:
            return
        stats.resumes += 1
        try:
            ws = sockets[index] = await open_viewer(target, compression, stats)
        except (OSError, ConnectionClosed, TimeoutError):
            await asyncio.sleep(0.5)  # the server may be saturated: try again shortly
            ws = sockets[index] = await open_viewer(target, compression, stats)


async def run(plan: dict[str, Any]) -> tuple[dict[str, Any], array[int] | None]:
    compression = bool(plan.get("compression", True))
    resume = bool(plan.get("resume", True))
    wanted = [t for t in plan["targets"] for _ in range(t["count"])]
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def open_one(target: dict[str, Any]) -> ClientConnection:
        async with gate:
            return await open_viewer(target, compression)

    started = time.monotonic()
    sockets = list(await asyncio.gather(*(open_one(t) for t in wanted)))
    connect_s = time.monotonic() - started
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    print(f"READY {len(sockets)} {connect_s:.3f}", flush=True)

    latencies: array[int] | None = array("q") if plan.get("latencies", True) else None
    stats = [ViewerStats() for _ in sockets]
    tasks = [
        asyncio.create_task(
            follow(
                ws,
                target,
                s,
                latencies,
                compression=compression,
                resume=resume,
                sockets=sockets,
                index=index,
            )
        )
        for index, (ws, target, s) in enumerate(zip(sockets, wanted, stats, strict=True))
    ]
    watch_started = time.monotonic()
    _, pending = await asyncio.wait(tasks, timeout=plan["deadlineS"])
    watch_s = time.monotonic() - watch_started
    for task in pending:
        task.cancel()
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    # Delivery is over: the benchmark stops its CPU meters here, before the closes (as it
    # starts them after the joins), so "CPU per delivered frame" counts delivery only.
    print("WATCHED", flush=True)
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    result = {
        "viewers": len(sockets),
        "connectS": connect_s,
        "watchS": watch_s,
        "cpuS": cpu,
        "timedOut": len(pending),
        "tokens": [s.tokens for s in stats],
        "frames": sum(s.frames for s in stats),
        "gaps": sum(s.gaps for s in stats),
        "duplicates": sum(s.duplicates for s in stats),
        "ended": sum(s.ended for s in stats),
        "closeCodes": sorted({s.close_code for s in stats if s.close_code is not None}),
        "closes": dict(Counter(code for s in stats for code in s.closes)),
        "resumes": sum(s.resumes for s in stats),
        "firstNs": min((s.first_ns for s in stats if s.first_ns), default=0),
        "lastNs": max((s.last_ns for s in stats), default=0),
    }
    return result, latencies


def main() -> None:
    plan = json.loads(sys.argv[1])
    result, latencies = asyncio.run(run(plan))
    if latencies is not None:
        Path(plan["latenciesPath"]).write_bytes(latencies.tobytes())
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
