"""The SQLite broker (the embedded default): appends, replay, memory.

(f) appends, in this process, to one conversation with 100 viewers (each frame copied into
    100 bounded queues, as the hub does): merging off (one chunk per append, each awaited,
    as fast as it goes, then paced at ``--rate`` chunks/s) and the 30 ms flush window (the
    chunks of each window in one append). Latency is from the producer's ``append`` call to
    the frame in the viewers' queues, which SQLite reaches only after its commit. The memory
    broker runs the same, for comparison.
(g) replay: a 10 000-event log read back from the file by a broker that has just opened
    it (the conversation loaded cold, then read), and the same through ``costream serve``
    restarted on the data directory: a late joiner's ``hello`` to its 10 000th frame.
(h) memory: RSS of a process after 1 000 idle conversations (each a finished run of 200
    events, a message history and a file): kept in memory, after ``evict_idle``, and a
    fresh process that opened the directory (nothing loaded) then touched them all.

Run: ``.venv/bin/python tests/bench/bench_sqlite.py`` (about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import benchlib
from benchlib import percentile, table
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from costream import protocol
from costream.broker import Broker, RunLease
from costream.broker.memory import MemoryBroker
from costream.broker.sqlite import SqliteBroker

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

VIEWERS = 100
QUEUE_FRAMES = 1024


def chunk(n: int) -> bytes:
    return protocol.encode(protocol.TextMessageContent(message_id="m", delta=f"token{n} "))


def started(conversation_id: str, run_id: str) -> bytes:
    return protocol.encode(
        protocol.RunStarted(
            thread_id=conversation_id,
            run_id=run_id,
            input=protocol.RunAgentInput(thread_id=conversation_id, run_id=run_id, messages=[]),
        )
    )


def finished(conversation_id: str, run_id: str) -> bytes:
    return protocol.encode(
        protocol.RunFinished(
            thread_id=conversation_id,
            run_id=run_id,
            outcome=protocol.RunOutcome(type="success"),
            usage=[],
            metadata=protocol.RunFinishedMeta(),
        )
    )


class FanOut:
    """100 viewers' bounded queues; records when each logged frame reached them."""

    def __init__(self) -> None:
        self.queues: list[deque[bytes]] = [deque(maxlen=QUEUE_FRAMES) for _ in range(VIEWERS)]
        self.arrived: dict[int, float] = {}

    def on_frame(self, conversation_id: str, frame: bytes) -> None:
        for queue in self.queues:
            queue.append(frame)
        if protocol.is_logged_frame(frame):
            self.arrived[protocol.seq_of(frame)] = time.perf_counter()

    def on_resync(self, conversation_id: str) -> None:
        pass


async def produce(
    broker: Broker,
    fan_out: FanOut,
    lease: RunLease,
    chunks: int,
    rate: float | None,
    window_ms: int,
) -> dict[str, float]:
    """Append ``chunks`` chunks (at ``rate``/s, or flat out); chunks/s and latency (ms)."""
    sent: dict[int, float] = {}  # seq -> when its chunk was handed to append
    pending: list[tuple[float, bytes]] = []
    begin = time.perf_counter()
    window_start = begin
    for n in range(chunks):
        if rate is not None:
            delay = begin + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        pending.append((time.perf_counter(), chunk(n)))
        now = time.perf_counter()
        if window_ms and now - window_start < window_ms / 1000 and n < chunks - 1:
            continue
        window_start = now
        # With the window, the chunks of one window go in one append call; its latency is
        # counted from the flush (the window's own wait is the merging's, not the broker's).
        head = await broker.append(lease, [body for _, body in pending])
        for i in range(len(pending)):
            sent[head - len(pending) + 1 + i] = now
        pending.clear()
    elapsed = time.perf_counter() - begin
    await asyncio.sleep(0.05)
    latencies = sorted((fan_out.arrived[seq] - at) * 1e3 for seq, at in sent.items())
    return {
        "chunks_per_s": chunks / elapsed,
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "max": latencies[-1],
    }


async def bench_appends(kind: str, data_dir: Path, chunks: int, rate: float) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for label, pace, window in (
        ("merging off, flat out", None, 0),
        (f"merging off, {rate:g}/s", rate, 0),
        (f"30 ms window, {rate:g}/s", rate, 30),
    ):
        fan_out = FanOut()
        broker: Broker = (
            SqliteBroker(data_dir / f"appends-{len(rows)}") if kind == "sqlite" else MemoryBroker()
        )
        await broker.start(fan_out.on_frame, fan_out.on_resync)
        conversation_id = f"bench-{len(rows)}"
        await broker.create_conversation(conversation_id, {"title": b"bench"})
        await broker.subscribe(conversation_id)
        for viewer in range(VIEWERS):
            await broker.presence_join(conversation_id, f"v{viewer}", 60_000)
        lease = await broker.start_run(conversation_id, "r", started(conversation_id, "r"), 60_000)
        result = await produce(broker, fan_out, lease, chunks, pace, window)
        await broker.finish_run(lease, [finished(conversation_id, "r")], None)
        await broker.close()
        rows.append(
            [kind, label, result["chunks_per_s"], result["p50"], result["p99"], result["max"]]
        )
    return rows


async def fill(broker: Broker, conversation_id: str, events: int, history: bool) -> None:
    await broker.create_conversation(conversation_id, {"title": b"bench", "model": b"m"})
    lease = await broker.start_run(conversation_id, "r", started(conversation_id, "r"), 60_000)
    for first in range(0, events - 2, 500):
        await broker.append(lease, [chunk(n) for n in range(first, min(first + 500, events - 2))])
    await broker.finish_run(lease, [finished(conversation_id, "r")], None)
    if history:
        await broker.list_append(conversation_id, "history", [b'{"role":"user"}'] * 4)
        await broker.map_set(conversation_id, "files", "story.txt", b"x" * 2000)


async def bench_replay_in_process(data_dir: Path, repeat: int) -> list[list[Any]]:
    directory = data_dir / "replay"
    broker = SqliteBroker(directory)
    await broker.start(FanOut().on_frame, FanOut().on_resync)
    await fill(broker, "long", 10_000, history=False)
    await broker.close()
    cold, warm = [], []
    for _ in range(repeat):
        broker = SqliteBroker(directory)
        await broker.start(FanOut().on_frame, FanOut().on_resync)
        begin = time.perf_counter()
        frames = await broker.read_log("long", 0, 10_000)
        cold.append((time.perf_counter() - begin) * 1e3)
        begin = time.perf_counter()
        await broker.read_log("long", 0, 10_000)
        warm.append((time.perf_counter() - begin) * 1e3)
        assert len(frames) == 10_000
        await broker.close()
    return [
        ["read_log, cold (load from the file)", min(cold), sorted(cold)[len(cold) // 2]],
        ["read_log, loaded", min(warm), sorted(warm)[len(warm) // 2]],
    ]


async def late_join(ws_url: str, conversation_id: str, token: str) -> float:
    async with connect(ws_url, subprotocols=[Subprotocol("costream.v1")], max_size=2**20) as ws:
        begin = time.perf_counter()
        hello = {"type": "hello", "conversationId": conversation_id, "token": token, "lastSeq": 0}
        await ws.send(json.dumps(hello))
        welcome = json.loads(await ws.recv())
        assert welcome["mode"] == "replay", welcome
        last = 0
        while last < welcome["head"]:
            text = await asyncio.wait_for(ws.recv(), 30)
            assert isinstance(text, str)
            if text.startswith('{"seq":'):
                last = int(text[7 : text.index(",", 7)])
        return (time.perf_counter() - begin) * 1e3


def _serve(work: benchlib.Workdir, env: dict[str, str], memory: bool) -> tuple[Any, str]:
    if not memory:
        return benchlib.start_costream(work, None, env)
    port = benchlib.free_port()
    args = [benchlib.PYTHON, "-m", "costream.cli", "serve", "--port", str(port), "--memory"]
    child = work.spawn(f"costream-{port}", args, benchlib.base_env(**env))
    url = f"http://127.0.0.1:{port}"
    benchlib.wait_until(lambda: benchlib.http_ok(f"{url}/healthz"), 60, "costream serve", child)
    return child, url


def _fill_through(url: str) -> tuple[str, str]:
    created = benchlib.http_json("POST", f"{url}/api/conversations", {})
    conversation_id, token = created["id"], created["viewToken"]
    base = f"{url}/api/conversations/{conversation_id}"
    benchlib.http_json("POST", f"{base}/messages", {"content": "fill"}, created["writeToken"])
    benchlib.wait_until(
        lambda: benchlib.http_json("GET", base, token=token)["head"] == 10_000, 120, "run"
    )
    return conversation_id, token


def bench_replay_through_serve(data_dir: Path, repeat: int) -> list[list[Any]]:
    """A 10 000-event run through ``costream serve`` (sse_llm, merging off); with SQLite
    the server is restarted, so the first late joiner loads the conversation from the
    file; ``--memory`` for comparison (no restart: it would lose the log)."""
    work = benchlib.Workdir()
    rows: list[list[Any]] = []
    try:
        port = benchlib.free_port()
        work.spawn(
            "sse-llm",
            [benchlib.PYTHON, str(benchlib.BENCH_DIR / "sse_llm.py"), "--port", str(port)],
        )
        time.sleep(1.0)
        env = {
            "LLM_MODEL": "openai/chunks-9994",
            "LLM_API_KEY": "bench",
            "LLM_BASE_URL": f"http://127.0.0.1:{port}/v1",
            "COSTREAM_FLUSH_MS": "0",
            "COSTREAM_DATA_DIR": str(data_dir / "serve"),
        }
        for memory in (False, True):
            server, url = _serve(work, env, memory)
            conversation_id, token = _fill_through(url)
            if not memory:
                server.stop()
                server, url = _serve(work, env, memory)
                time.sleep(5.0)  # let the restarted server finish loading LiteLLM first
            ws_url = url.replace("http://", "ws://") + f"/ws/conversations/{conversation_id}"
            joins = [asyncio.run(late_join(ws_url, conversation_id, token)) for _ in range(repeat)]
            kind = "memory, serve" if memory else "sqlite, serve restarted"
            rest = sorted(joins[1:])
            rows.append([f"{kind}: first late joiner", joins[0], joins[0]])
            rows.append([f"{kind}: next late joiners", rest[0], rest[len(rest) // 2]])
            server.stop()
    finally:
        work.close()
    return rows


def rss_mib() -> float:
    gc.collect()
    return benchlib.rss_bytes(os.getpid()) / 2**20


async def memory_child(data_dir: str, conversations: int) -> dict[str, float]:
    """In a fresh process: RSS opened, then after loading every conversation."""
    figures = {"started": rss_mib()}
    broker = SqliteBroker(Path(data_dir))
    await broker.start(FanOut().on_frame, FanOut().on_resync)
    figures["opened"] = rss_mib()
    for n in range(conversations):
        await broker.get_record(f"idle-{n}")
    figures["all loaded"] = rss_mib()
    await broker.close()
    return figures


async def bench_memory(data_dir: Path, conversations: int) -> list[list[Any]]:
    directory = data_dir / "idle"
    before = rss_mib()
    broker = SqliteBroker(directory)
    await broker.start(FanOut().on_frame, FanOut().on_resync)
    for n in range(conversations):
        await fill(broker, f"idle-{n}", 200, history=True)
    held = rss_mib()
    dropped = broker.evict_idle(idle_s=0)
    evicted = rss_mib()
    await broker.close()
    child = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, __file__, "--memory-child", str(directory), str(conversations)],
        capture_output=True,
        text=True,
        check=True,
    )
    fresh = json.loads(child.stdout)
    size = sum(f.stat().st_size for f in directory.iterdir()) / 2**20
    return [
        ["this process before", before],
        [f"{conversations} conversations written and held", held],
        [f"after evict_idle ({dropped} dropped)", evicted],
        ["fresh process: interpreter + imports", fresh["started"]],
        ["fresh process: directory opened, nothing loaded", fresh["opened"]],
        [f"fresh process: all {conversations} loaded", fresh["all loaded"]],
        ["database files on disk (MiB)", size],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=1800.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--memory-child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        figures = asyncio.run(memory_child(args.memory_child[0], int(args.memory_child[1])))
        print(json.dumps(figures))
        return
    with tempfile.TemporaryDirectory(prefix="bench-sqlite-") as temporary:
        data_dir = Path(temporary)
        rows: list[list[Any]] = []
        for kind in ("sqlite", "memory"):
            rows += asyncio.run(bench_appends(kind, data_dir, args.chunks, args.rate))
        print(
            table(
                f"(f) appends to 1 conversation, {VIEWERS} viewers, {args.chunks:,} chunks (latency ms)",
                ["broker", "producer", "chunks/s", "p50", "p99", "max"],
                rows,
            )
        )  # fmt: skip
        replay = asyncio.run(bench_replay_in_process(data_dir, args.repeat))
        replay += bench_replay_through_serve(data_dir, args.repeat)
        print(
            table(
                "(g) replay of a 10,000-event log from SQLite (ms)", ["", "min", "median"], replay
            )
        )
        memory = asyncio.run(bench_memory(data_dir, args.conversations))
        print(table(f"(h) RSS with {args.conversations:,} idle conversations (MiB)", ["", "RSS"], memory))  # fmt: skip


if __name__ == "__main__":
    main()
