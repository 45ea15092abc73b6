"""Fan-out through the embedded brokers: the durable SQLite broker beside the in-memory one.

Setup, all on this machine: two ``costream serve`` processes, no Redis: one with
``--data-dir`` (a temporary directory: the SQLite broker, the default embedded mode) and one
with ``--memory`` (the in-memory broker); two viewer processes (``viewer_worker.py``,
websockets' asyncio client) sharing the viewers of the server measured; and this process as
the producer. In embedded mode the broker lives inside the server, so the producer drives
the server's HTTP ingest endpoints, as another program publishing its stream does:
``POST /api/conversations/{id}/runs`` (the write token as Bearer), ``POST
.../runs/{runId}/events`` with a JSON array of events without ``seq`` for every append, then
``.../finish``, all on one persistent HTTP connection (httpx). Each token frame carries its
publish time (``fanout.token``: taken when the token is handed over, before the merging and
the HTTP request), so the latencies include the ingest request, the broker's append (for
SQLite, its commit), the hub and the viewer's WebSocket.

For each viewer count (``--viewers``, default 100 and 1000): one conversation at ``--rate``
tokens/s (default 100) for ``--duration`` s (default 10), merging off (one append per
token) and through ``segments.DeltaMerger`` with the 30 ms window, each on the memory server
then the SQLite server, back to back (SQLite first in odd repetitions), after one unreported
warm-up run on each server. Reported: token-to-viewer latency p50/p99/max, loss, seq gaps,
duplicates, how viewers were closed and resumed, the producer's ingest request round trip,
and CPU (server, viewer processes, producer). Requests go one at a time, so a slow server
holds the producer back: the table gives the rate it achieved and how late its tokens were
handed over (lateness the tokens' publish times do not include). The second table gives the
SQLite/memory ratios, each taken within one repetition (the same machine load), medians over
``--repeat`` repetitions, flagged when a producer fell below 90% of ``--rate`` (the two
brokers then carried different loads); the target is a SQLite p99 within 1.2x of memory's.

Viewers resume like real clients (see ``viewer_worker.py``): a viewer closed with 1001,
1011, 1012, 4000 or 4008 (or dropped) reconnects with its ``lastSeq``.

Run: ``.venv/bin/python tests/bench/bench_embedded.py`` (about 4 minutes); ``--viewers
100`` for one count, ``--repeat N`` to repeat and report medians, ``--keep`` to keep the
logs and the data directory. ``BENCH_PROFILE_DIR=/some/dir`` runs the servers under
cProfile (``profiled_serve.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import benchlib
import fanout
import httpx
from benchlib import CpuMeter, table

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from costream import protocol
from costream.protocol import Event

MODES = ("memory", "sqlite")
MERGES = (0, 30)
VIEWER_PROCESSES = 2
TARGET_RATIO = 1.2
WARMUP_VIEWERS = 10
HELD_BACK = 0.9  # a producer below this share of --rate was held back by the server


class IngestProducer:
    """A run through the server's HTTP ingest endpoints, on one keep-alive connection."""

    def __init__(self, client: httpx.AsyncClient, conversation_id: str, write_token: str) -> None:
        self.client = client
        self.conversation_id = conversation_id
        self.headers = {
            "Authorization": f"Bearer {write_token}",
            "Content-Type": "application/json",
        }
        self.run_id = ""
        self.round_trips: list[float] = []  # seconds per events request

    @property
    def runs_path(self) -> str:
        return f"/api/conversations/{self.conversation_id}/runs"

    async def _post(self, path: str, content: bytes, expected: int) -> Any:
        answer = await self.client.post(path, content=content, headers=self.headers)
        if answer.status_code != expected:
            raise RuntimeError(f"POST {path}: {answer.status_code} {answer.text[:500]}")
        return answer.json()

    async def begin(self) -> None:
        started = await self._post(self.runs_path, b'{"input": "benchmark"}', 201)
        self.run_id = started["runId"]

    async def send(self, events: list[Event]) -> None:
        # Events without seq, encoded as the protocol does; the server decodes each one.
        body = b"[" + b",".join(protocol.encode(event) for event in events) + b"]"
        sent = time.perf_counter()
        await self._post(f"{self.runs_path}/{self.run_id}/events", body, 202)
        self.round_trips.append(time.perf_counter() - sent)

    async def end(self) -> None:
        await self._post(f"{self.runs_path}/{self.run_id}/finish", b'{"outcome": "success"}', 200)


@dataclass
class Server:
    mode: str
    pid: int
    url: str


@dataclass
class Outcome:
    mode: str
    merge_ms: int
    viewers: int
    viewer_processes: int
    tokens: int
    produce_s: float
    lags_ms: list[float]
    latencies_ms: list[float]
    round_trips_ms: list[float]
    requests: int
    received: int
    expected: int
    gaps: int
    duplicates: int
    connect_s: float
    closed: str
    resumed: int
    cpu: dict[str, float]

    def p(self, fraction: float) -> float:
        return benchlib.percentile(self.latencies_ms, fraction)


def start_server(work: benchlib.Workdir, mode: str, env: dict[str, str]) -> Server:
    """``costream serve`` with the memory broker, or the SQLite broker in a directory of
    ``work`` (``benchlib.start_costream`` with ``--data-dir`` in place of ``--memory``)."""
    port = benchlib.free_port()
    args = [benchlib.PYTHON, "-m", "costream.cli", "serve", "--port", str(port)]
    if os.environ.get("BENCH_PROFILE_DIR"):
        args[1:3] = [str(benchlib.BENCH_DIR / "profiled_serve.py")]
    if mode == "memory":
        args.append("--memory")
    else:
        data_dir = work.path / f"data-{port}"
        data_dir.mkdir()
        args += ["--data-dir", str(data_dir)]
    child = work.spawn(f"costream-{mode}-{port}", args, benchlib.base_env(**env))
    url = f"http://127.0.0.1:{port}"
    benchlib.wait_until(lambda: benchlib.http_ok(f"{url}/healthz"), 60, "costream serve", child)
    return Server(mode, child.pid, url)


def closes(results: list[dict[str, Any]]) -> dict[int, int]:
    """How many times the viewers were closed, by close code (1006: no close frame)."""
    counts: dict[int, int] = {}
    for result in results:
        for code, count in result["closes"].items():
            counts[int(code)] = counts.get(int(code), 0) + count
    return counts


async def measure(
    work: benchlib.Workdir,
    server: Server,
    viewers: int,
    *,
    tokens: int,
    rate: float,
    merge_ms: int,
    compression: bool,
) -> Outcome:
    created = benchlib.http_json("POST", f"{server.url}/api/conversations", {})
    conversation_id = created["id"]
    target = fanout.Target(
        server.url.replace("http://", "ws://") + f"/ws/conversations/{conversation_id}",
        conversation_id,
        created["viewToken"],
        viewers,
    )
    deadline = tokens / rate + 120
    viewer_processes = await fanout.start_viewers(
        work, [target], VIEWER_PROCESSES, deadline_s=deadline, compression=compression
    )
    connect_s = max(v.connect_s for v in viewer_processes)
    await asyncio.sleep(1.0)  # let presence frames of the joins drain
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as client:
        producer = IngestProducer(client, conversation_id, created["writeToken"])
        meter = CpuMeter({"server": server.pid, "producer": os.getpid()})
        lags: list[float] = []
        meter.start()
        try:
            took = await fanout.produce_paced(producer, tokens, rate, merge_ms, lags)
        except BaseException:
            for viewer in viewer_processes:
                viewer.kill()
            raise
        results = await asyncio.gather(*(v.wait_result(deadline + 60) for v in viewer_processes))
        meter.stop()
    latencies: list[float] = []
    for viewer in viewer_processes:
        latencies += (value / 1e6 for value in viewer.latencies())
    latencies.sort()
    return Outcome(
        mode=server.mode,
        merge_ms=merge_ms,
        viewers=viewers,
        viewer_processes=len(viewer_processes),
        tokens=tokens,
        produce_s=took,
        lags_ms=sorted(value * 1e3 for value in lags),
        latencies_ms=latencies,
        round_trips_ms=sorted(value * 1e3 for value in producer.round_trips),
        requests=len(producer.round_trips),
        received=sum(sum(r["tokens"]) for r in results),
        expected=tokens * viewers,
        gaps=sum(r["gaps"] for r in results),
        duplicates=sum(r["duplicates"] for r in results),
        connect_s=connect_s,
        closed=" ".join(
            [f"{sum(r['timedOut'] for r in results)} timed out"]
            + [f"close {code} x{count}" for code, count in sorted(closes(results).items())]
        ),
        resumed=sum(r["resumes"] for r in results),
        cpu={
            "server": meter.share("server"),
            # Viewer processes report their own CPU (they have exited by now).
            "viewers": sum(r["cpuS"] for r in results) / meter.wall,
            "viewer_max": max(r["cpuS"] for r in results) / meter.wall,
            "producer": meter.share("producer"),
        },
    )


def pct(value: float) -> str:
    return f"{value * 100:.0f}%"


def merge_name(merge_ms: int) -> str:
    return f"{merge_ms} ms" if merge_ms else "off"


def verdict(p99_ratio: float, outcomes: list[Outcome], rate: float) -> str:
    """Whether the p99 ratio meets the target; flagged when a producer fell short of
    ``rate`` (the two brokers then saw different loads, so the ratio compares unlike runs)."""
    answer = "yes" if p99_ratio <= TARGET_RATIO else "NO"
    if any(o.tokens / o.produce_s < HELD_BACK * rate for o in outcomes):
        answer += " (producer held back)"
    return answer


def row(outcome: Outcome) -> list[Any]:
    loss = outcome.expected - outcome.received
    return [
        outcome.mode,
        merge_name(outcome.merge_ms),
        outcome.viewers,
        outcome.p(0.5),
        outcome.p(0.99),
        outcome.p(1.0),
        f"{loss} ({loss / max(1, outcome.expected):.2%})",
        outcome.gaps,
        outcome.duplicates,
        outcome.closed,
        outcome.resumed,
        f"{outcome.connect_s:.1f}",
        outcome.tokens / outcome.produce_s,
        benchlib.percentile(outcome.lags_ms, 0.99),
        outcome.requests,
        benchlib.percentile(outcome.round_trips_ms, 0.5),
        benchlib.percentile(outcome.round_trips_ms, 0.99),
        pct(outcome.cpu["server"]),
        f"{pct(outcome.cpu['viewers'])} (max {pct(outcome.cpu['viewer_max'])})",
        pct(outcome.cpu["producer"]),
    ]


async def main(args: argparse.Namespace) -> None:
    started = time.monotonic()
    work = benchlib.Workdir()
    env = {"COSTREAM_MAX_VIEWERS": "5000"}
    tokens = int(args.rate * args.duration)
    rows: list[list[Any]] = []
    outcomes: dict[tuple[str, int, int], list[Outcome]] = {}
    try:
        servers = [start_server(work, mode, env) for mode in MODES]
        for server in servers:
            # Warm-up, not reported: the first run through a fresh process pays for its
            # first imports and code paths, which would count against whichever goes first.
            await measure(
                work,
                server,
                WARMUP_VIEWERS,
                tokens=int(args.rate),
                rate=args.rate,
                merge_ms=0,
                compression=args.compression,
            )
        for repetition in range(args.repeat):
            for viewers in args.viewers:
                for merge_ms in MERGES:
                    # Odd repetitions measure SQLite first, so the order evens out.
                    for server in servers if repetition % 2 == 0 else servers[::-1]:
                        outcome = await measure(
                            work,
                            server,
                            viewers,
                            tokens=tokens,
                            rate=args.rate,
                            merge_ms=merge_ms,
                            compression=args.compression,
                        )
                        outcomes.setdefault((server.mode, merge_ms, viewers), []).append(outcome)
                        rows.append(row(outcome))
                        print(
                            f"  done: {server.mode} merge {merge_name(merge_ms)} x {viewers}:"
                            f" p50 {outcome.p(0.5):.1f} ms, p99 {outcome.p(0.99):.1f} ms,"
                            f" {outcome.closed}",
                            flush=True,
                        )
                        await asyncio.sleep(2)
    finally:
        work.close(keep=args.keep)
        if args.keep:
            print(f"logs and data kept in {work.path}")
    print()
    print(
        table(
            f"one conversation at {args.rate:g} tokens/s for {args.duration:g} s through HTTP ingest,"
            f" viewers split over {VIEWER_PROCESSES} processes (latency in ms, token publish -> viewer"
            f" receive; late p99: ms a token was handed over after its scheduled time, not in its"
            f" latency; ingest: ms per events request, one at a time; viewers offer deflate:"
            f" {'yes' if args.compression else 'no'})",
            [
                "broker",
                "merge",
                "viewers",
                "p50",
                "p99",
                "max",
                "loss",
                "seq gaps",
                "dups",
                "viewers ended by",
                "resumed",
                "connect s",
                "produced/s",
                "late p99",
                "requests",
                "ingest p50",
                "ingest p99",
                "CPU server",
                "CPU viewer procs",
                "CPU producer",
            ],
            rows,
        )
    )
    ratio_rows = []
    for viewers in args.viewers:
        for merge_ms in MERGES:
            memory = outcomes[("memory", merge_ms, viewers)]
            sqlite = outcomes[("sqlite", merge_ms, viewers)]
            # Each repetition's ratio is taken within that repetition (the same machine load).
            p99 = statistics.median(
                s.p(0.99) / m.p(0.99) for s, m in zip(sqlite, memory, strict=True)
            )
            p50 = statistics.median(
                s.p(0.5) / m.p(0.5) for s, m in zip(sqlite, memory, strict=True)
            )
            ratio_rows.append(
                [
                    merge_name(merge_ms),
                    viewers,
                    len(sqlite),
                    statistics.median(m.p(0.99) for m in memory),
                    statistics.median(s.p(0.99) for s in sqlite),
                    p99,
                    verdict(p99, memory + sqlite, args.rate),
                    statistics.median(m.p(0.5) for m in memory),
                    statistics.median(s.p(0.5) for s in sqlite),
                    p50,
                    statistics.median(m.tokens / m.produce_s for m in memory),
                    statistics.median(s.tokens / s.produce_s for s in sqlite),
                ]
            )
    print(
        table(
            f"medians over the repetitions; SQLite/memory ratios taken within each repetition"
            f" (target: SQLite p99 within {TARGET_RATIO:g}x of memory)",
            ["merge", "viewers", "runs", "memory p99", "sqlite p99", "p99 ratio",
             f"within {TARGET_RATIO:g}x", "memory p50", "sqlite p50", "p50 ratio",
             "memory tok/s", "sqlite tok/s"],
            ratio_rows,
        )
    )  # fmt: skip
    print(f"total {time.monotonic() - started:.0f} s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--viewers", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--rate", type=float, default=100.0, help="tokens/s")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--no-deflate", dest="compression", action="store_false")
    parser.add_argument("--keep", action="store_true", help="keep the logs and the data")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
