"""Fan-out benchmarks (a), (b), (c): costream beside a bare Starlette forwarder, same run.

Setup, all on this machine: one private ``redis-server``; two ``costream serve
--redis-url`` processes; two reference forwarders (``ref_forwarder.py``: one Redis
subscription per process, the same bytes to every local socket, one frame per token);
viewer processes (``viewer_worker.py``, websockets' asyncio client) with the viewers split
evenly across the two server processes of the system under test; and this process as the
producer. The producer drives costream's production path (``RedisBroker.start_run`` and
``append``: Lua append, Redis pub/sub, each server's hub, each viewer's WebSocket) and the
reference with ``PUBLISH`` of the same bytes. Each token frame carries its publish time.

(a) one conversation at ``--rate`` tokens/s (default 100) for ``--duration`` s to 1, 100
    and 1000 viewers: p50/p99/max token-to-viewer latency and loss; costream one frame per
    token (as the broker path does), costream through ``segments.DeltaMerger`` (30 ms
    window), and the reference.
(b) the producer as fast as it goes (``--batch`` events per append call, one frame each)
    to 10 and 100 viewers, merging off: delivered frames/s.

Viewers resume like real clients: closed with 1001, 1011, 1012, 4000 or 4008 (or dropped),
a viewer reconnects with its ``lastSeq``; the tables count those resumes and every close
code, and gaps and duplicates are counted across resumes. ``--no-resume`` ends a closed
viewer there instead (its missing tokens count as loss).

Run: ``.venv/bin/python tests/bench/bench_fanout.py`` (about 5 minutes);
``--part a`` or ``--part b`` for one part; ``--no-deflate`` to have viewers not offer
permessage-deflate (browsers offer it, so it is offered by default; ``costream serve``
refuses it); ``--systems`` to pick the systems of (a) (``reference+merge30`` feeds the
reference through the same 30 ms merging, the fair comparison for ``costream+merge30``);
``--repeat-a N`` to repeat (a) and report medians, with each ratio taken within one
repetition. ``BENCH_PROFILE_DIR=/some/dir`` runs the costream servers under cProfile
(``profiled_serve.py``).
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
from benchlib import CpuMeter, table
from redis.asyncio import Redis

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from costream.broker.redis import RedisBroker

SYSTEMS_A = (
    ("reference", 0),
    ("costream", 0),
    ("reference+merge30", 30),
    ("costream+merge30", 30),
)
DEFAULT_SYSTEMS_A = ["reference", "costream", "costream+merge30"]


@dataclass
class Rig:
    work: benchlib.Workdir
    redis_pid: int
    redis_url: str
    costream: list[tuple[int, str]]  # (pid, base url)
    reference: list[tuple[int, str]]
    broker: RedisBroker
    client: Redis


@dataclass
class Outcome:
    system: str
    viewers: int
    viewer_processes: int
    tokens_sent: int
    produce_s: float
    latencies_ms: list[float]
    received: int
    expected: int
    gaps: int
    duplicates: int
    ended: int
    connect_s: float
    closed: str
    resumed: int
    delivered_per_s: float
    cpu: dict[str, float]
    wall_s: float
    frames: int  # logged frames the viewers received (resumes included)
    server_cpu_s: float  # CPU seconds of the system's two server processes

    def p(self, fraction: float) -> float:
        return benchlib.percentile(self.latencies_ms, fraction)

    def cpu_us_per_frame(self) -> float:
        """Server CPU per frame delivered to a viewer, in microseconds."""
        return self.server_cpu_s / self.frames * 1e6 if self.frames else float("nan")


async def setup(compression: bool) -> Rig:
    work = benchlib.Workdir()
    redis_child, redis_url = benchlib.start_redis(work)
    env = {"COSTREAM_MAX_VIEWERS": "5000"}
    costream = [benchlib.start_costream(work, redis_url, env) for _ in range(2)]
    reference = [benchlib.start_reference(work, redis_url) for _ in range(2)]
    broker = RedisBroker(redis_url)
    await broker.start(lambda conversation_id, frame: None, lambda conversation_id: None)
    return Rig(
        work,
        redis_child.pid,
        redis_url,
        [(c.pid, url) for c, url in costream],
        [(c.pid, url) for c, url in reference],
        broker,
        Redis.from_url(redis_url),
    )


def targets_for(rig: Rig, system: str, viewers: int) -> tuple[fanout.Producer, list[fanout.Target]]:
    """A fresh conversation, the producer for it, and its viewers split over two servers."""
    first, second = viewers - viewers // 2, viewers // 2
    if system.startswith("costream"):
        created = benchlib.http_json("POST", f"{rig.costream[0][1]}/api/conversations", {})
        conversation_id, token = created["id"], created["viewToken"]
        urls = [url for _, url in rig.costream]
        producer: fanout.Producer = fanout.CostreamProducer(rig.broker, conversation_id)
    else:
        conversation_id, token = fanout.new_id(), "none"
        urls = [url for _, url in rig.reference]
        producer = fanout.ReferenceProducer(rig.client, conversation_id)
    targets = [
        fanout.Target(
            url.replace("http://", "ws://") + f"/ws/conversations/{conversation_id}",
            conversation_id,
            token,
            count,
        )
        for url, count in zip(urls, (first, second), strict=True)
        if count
    ]
    return producer, targets


async def measure(
    rig: Rig,
    system: str,
    viewers: int,
    processes: int,
    *,
    compression: bool,
    tokens: int,
    rate: float | None,
    merge_ms: int = 0,
    batch: int = 1,
    resume: bool = True,
) -> Outcome:
    producer, targets = targets_for(rig, system, viewers)
    expected_s = tokens / rate if rate else 30.0
    deadline = expected_s + 120
    viewer_processes = await fanout.start_viewers(
        rig.work,
        targets,
        processes,
        deadline_s=deadline,
        compression=compression,
        resume=resume,
    )
    connect_s = max(v.connect_s for v in viewer_processes)
    await asyncio.sleep(1.0)  # let presence frames of the joins drain
    servers = rig.costream if system.startswith("costream") else rig.reference
    pids = {f"server{i}": pid for i, (pid, _) in enumerate(servers)}
    pids |= {"redis": rig.redis_pid, "producer": os.getpid()}
    meter = CpuMeter(pids)
    meter.start()
    if rate:
        took = await fanout.produce_paced(producer, tokens, rate, merge_ms)
    else:
        took = await fanout.produce_fast(producer, tokens, batch)
    # The meter covers delivery: from the first token to the last viewer's END, not the
    # joins before it nor the closes after it.
    await asyncio.gather(*(v.wait_watched(deadline + 60) for v in viewer_processes))
    meter.stop()
    results = await asyncio.gather(*(v.wait_result(60) for v in viewer_processes))
    latencies: list[float] = []
    for viewer in viewer_processes:
        latencies += (value / 1e6 for value in viewer.latencies())
    latencies.sort()
    received = sum(sum(r["tokens"]) for r in results)
    first = min(r["firstNs"] for r in results if r["firstNs"]) if received else 0
    last = max(r["lastNs"] for r in results)
    delivered = received / ((last - first) / 1e9) if last > first else float("nan")
    cpu = {
        "servers": sum(meter.share(n) for n in pids if n.startswith("server")),
        # Viewer processes report their own CPU (they have exited by now).
        "viewers": sum(r["cpuS"] for r in results) / meter.wall,
        "viewer_max": max(r["cpuS"] for r in results) / meter.wall,
        "redis": meter.share("redis"),
        "producer": meter.share("producer"),
    }
    return Outcome(
        system=system,
        viewers=viewers,
        viewer_processes=len(viewer_processes),
        tokens_sent=tokens,
        produce_s=took,
        latencies_ms=latencies,
        received=received,
        expected=tokens * viewers,
        gaps=sum(r["gaps"] for r in results),
        duplicates=sum(r["duplicates"] for r in results),
        ended=sum(r["ended"] for r in results),
        connect_s=connect_s,
        closed=" ".join(
            [f"{sum(r['timedOut'] for r in results)} timed out"]
            + [f"close {code} x{count}" for code, count in sorted(closes(results).items())]
        ),
        resumed=sum(r["resumes"] for r in results),
        delivered_per_s=delivered,
        cpu=cpu,
        wall_s=meter.wall,
        frames=sum(r["frames"] for r in results),
        server_cpu_s=sum(meter.used[n] for n in pids if n.startswith("server")),
    )


def closes(results: list[dict[str, Any]]) -> dict[int, int]:
    """How many times the viewers were closed, by close code (1006: no close frame)."""
    counts: dict[int, int] = {}
    for result in results:
        for code, count in result["closes"].items():
            counts[int(code)] = counts.get(int(code), 0) + count
    return counts


def viewer_processes_for(viewers: int, override: int | None) -> int:
    if override:
        return override
    return 1 if viewers <= 100 else 2


def pct(value: float) -> str:
    return f"{value * 100:.0f}%"


async def part_a(rig: Rig, args: argparse.Namespace) -> None:
    rows: list[list[Any]] = []
    outcomes: dict[tuple[str, int], list[Outcome]] = {}
    tokens = int(args.rate * args.duration)
    for _ in range(args.repeat_a):
        for viewers in args.viewers_a:
            for system, merge in SYSTEMS_A:
                if system not in args.systems:
                    continue
                outcome = await measure(
                    rig,
                    system,
                    viewers,
                    viewer_processes_for(viewers, args.viewer_processes),
                    compression=args.compression,
                    tokens=tokens,
                    rate=args.rate,
                    merge_ms=merge,
                    resume=args.resume,
                )
                outcomes.setdefault((system, viewers), []).append(outcome)
                rows.append(row_a(outcome))
                print(
                    f"  done: {system} x {viewers}: p50 {outcome.p(0.5):.1f} ms,"
                    f" p99 {outcome.p(0.99):.1f} ms, {outcome.closed}",
                    flush=True,
                )
                await asyncio.sleep(2)
    print()
    print(
        table(
            f"(a) one conversation at {args.rate:g} tokens/s for {args.duration:g} s, viewers split over two processes"
            f" (latency in ms, token publish -> viewer receive; viewers offer deflate: {'yes' if args.compression else 'no'})",
            [
                "system",
                "viewers",
                "viewer procs",
                "p50",
                "p99",
                "max",
                "loss",
                "seq gaps",
                "dups",
                "viewers ended by",
                "resumed",
                "connect s",
                "CPU servers",
                "server CPU us/frame",
                "CPU redis",
                "CPU viewer procs",
                "CPU producer",
            ],
            rows,
        )
    )
    ratio_rows = []
    for viewers in args.viewers_a:
        for system in ("costream", "costream+merge30"):
            mine = outcomes.get((system, viewers))
            # The merged reference when it was measured, else the unmerged one.
            name = system.replace("costream", "reference")
            if (name, viewers) not in outcomes:
                name = "reference"
            reference = outcomes.get((name, viewers))
            if reference is None or mine is None:
                continue
            # Each repetition's ratio is taken within that repetition (the same machine load).
            p99 = [m.p(0.99) / r.p(0.99) for m, r in zip(mine, reference, strict=True)]
            p50 = [m.p(0.5) / r.p(0.5) for m, r in zip(mine, reference, strict=True)]
            cpu = [
                m.cpu_us_per_frame() / r.cpu_us_per_frame()
                for m, r in zip(mine, reference, strict=True)
            ]
            ratio_rows.append(
                [
                    system,
                    name,
                    viewers,
                    len(mine),
                    statistics.median(m.p(0.99) for m in mine),
                    statistics.median(r.p(0.99) for r in reference),
                    statistics.median(p99),
                    statistics.median(m.p(0.5) for m in mine),
                    statistics.median(r.p(0.5) for r in reference),
                    statistics.median(p50),
                    statistics.median(m.cpu_us_per_frame() for m in mine),
                    statistics.median(r.cpu_us_per_frame() for r in reference),
                    statistics.median(cpu),
                ]
            )
    print(
        table(
            "(a) medians over the repetitions; ratios to the reference taken within each repetition",
            ["system", "reference", "viewers", "runs", "p99", "ref p99", "p99 ratio", "p50", "ref p50", "p50 ratio",
             "CPU us/frame", "ref CPU us/frame", "CPU/frame ratio"],
            ratio_rows,
        )
    )  # fmt: skip


def row_a(outcome: Outcome) -> list[Any]:
    loss = outcome.expected - outcome.received
    return [
        outcome.system,
        outcome.viewers,
        outcome.viewer_processes,
        outcome.p(0.5),
        outcome.p(0.99),
        outcome.p(1.0),
        f"{loss} ({loss / max(1, outcome.expected):.2%})",
        outcome.gaps,
        outcome.duplicates,
        outcome.closed,
        outcome.resumed,
        f"{outcome.connect_s:.1f}",
        pct(outcome.cpu["servers"]),
        outcome.cpu_us_per_frame(),
        pct(outcome.cpu["redis"]),
        f"{pct(outcome.cpu['viewers'])} (max {pct(outcome.cpu['viewer_max'])})",
        pct(outcome.cpu["producer"]),
    ]


async def part_b(rig: Rig, args: argparse.Namespace) -> None:
    rows: list[list[Any]] = []
    # Per (viewers, tokens): one (costream, reference) pair of each figure per repetition.
    rates: dict[tuple[int, int], list[tuple[float, float]]] = {}
    per_frame: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for viewers, tokens in zip(args.viewers_b, args.fast_tokens, strict=True):
        for _ in range(args.repeat_b):
            figures: dict[str, tuple[float, float]] = {}
            for system in ("reference", "costream"):
                outcome = await measure(
                    rig,
                    system,
                    viewers,
                    viewer_processes_for(viewers, args.viewer_processes),
                    compression=args.compression,
                    tokens=tokens,
                    rate=None,
                    batch=args.batch,
                    resume=args.resume,
                )
                figures[system] = (outcome.delivered_per_s, outcome.cpu_us_per_frame())
                loss = outcome.expected - outcome.received
                rows.append(
                    [
                        system,
                        viewers,
                        tokens,
                        tokens / outcome.produce_s,
                        outcome.delivered_per_s,
                        f"{loss} ({loss / max(1, outcome.expected):.2%})",
                        outcome.gaps,
                        outcome.p(0.5),
                        outcome.p(0.99),
                        pct(outcome.cpu["servers"]),
                        outcome.cpu_us_per_frame(),
                        pct(outcome.cpu["redis"]),
                        f"{pct(outcome.cpu['viewers'])} (max {pct(outcome.cpu['viewer_max'])})",
                        pct(outcome.cpu["producer"]),
                    ]
                )
                print(
                    f"  done: {system} x {viewers}: {outcome.delivered_per_s:,.0f} frames/s",
                    flush=True,
                )
                await asyncio.sleep(2)
            mine, reference = figures["costream"], figures["reference"]
            rates.setdefault((viewers, tokens), []).append((mine[0], reference[0]))
            per_frame.setdefault((viewers, tokens), []).append((mine[1], reference[1]))
    print()
    print(
        table(
            f"(b) producer as fast as it goes ({args.batch} events per append call, one frame each), merging off"
            f" (deflate {'on' if args.compression else 'off'})",
            [
                "system",
                "viewers",
                "tokens",
                "produced/s",
                "delivered frames/s",
                "loss",
                "seq gaps",
                "p50 ms",
                "p99 ms",
                "CPU servers",
                "server CPU us/frame",
                "CPU redis",
                "CPU viewer procs",
                "CPU producer",
            ],
            rows,
        )
    )
    ratio_rows = []
    for (viewers, tokens), pairs in rates.items():
        cpu_pairs = per_frame[(viewers, tokens)]
        ratio_rows.append(
            [
                viewers,
                tokens,
                len(pairs),
                statistics.median(mine for mine, _ in pairs),
                statistics.median(reference for _, reference in pairs),
                statistics.median(mine / reference for mine, reference in pairs),
                statistics.median(mine for mine, _ in cpu_pairs),
                statistics.median(reference for _, reference in cpu_pairs),
                statistics.median(mine / reference for mine, reference in cpu_pairs),
            ]
        )
    print(
        table(
            "(b) medians over the repetitions of delivered frames/s and server CPU per delivered"
            " frame; ratios costream / reference taken within each repetition",
            [
                "viewers",
                "tokens",
                "runs",
                "costream",
                "reference",
                "ratio",
                "CPU us/frame",
                "ref CPU us/frame",
                "CPU/frame ratio",
            ],
            ratio_rows,
        )
    )


async def main(args: argparse.Namespace) -> None:
    rig = await setup(args.compression)
    started = time.monotonic()
    try:
        if args.part in ("a", "all"):
            await part_a(rig, args)
        if args.part in ("b", "all"):
            await part_b(rig, args)
    finally:
        await rig.broker.close()
        await rig.client.aclose()
        rig.work.close(keep=args.keep)
        if args.keep:
            print(f"logs kept in {rig.work.path}")
    print(f"total {time.monotonic() - started:.0f} s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--part", choices=("a", "b", "all"), default="all")
    parser.add_argument("--rate", type=float, default=100.0, help="tokens/s in (a)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run in (a)")
    parser.add_argument("--viewers-a", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--repeat-a", type=int, default=1)
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=[system for system, _ in SYSTEMS_A],
        default=DEFAULT_SYSTEMS_A,
        help="the systems measured in (a); reference+merge30 is the reference fed through"
        " the same 30 ms merging, to compare with costream+merge30",
    )
    parser.add_argument("--viewers-b", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--fast-tokens", type=int, nargs="+", default=[20_000, 4_000])
    parser.add_argument("--batch", type=int, default=10, help="events per append call in (b)")
    parser.add_argument("--repeat-b", type=int, default=2)
    parser.add_argument("--viewer-processes", type=int, default=None)
    parser.add_argument("--no-deflate", dest="compression", action="store_false")
    parser.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="viewers closed by the server end there (their missing tokens count as loss)"
        " instead of resuming with their lastSeq as real clients do",
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
