"""Load benchmark: many concurrent runs, many viewers, two server processes, Redis or a
three-master Redis Cluster, all on this machine.

What it measures

(main) ``--conversations`` conversations (default 100) running at once, each at ``--rate``
    tokens/s (default 50) for ``--duration`` s, each watched by ``--viewers-per`` viewers
    (default 20: 2000 viewers), split evenly over two ``costream serve --redis-url``
    processes; once with one ``redis-server`` and once with a three-master Redis Cluster
    (``redis+cluster://``, sharded pub/sub). Per run: delivered tokens/s (the goal is
    conversations x rate x viewers = 100 000/s), token-to-viewer latency p50/p99/max, loss,
    seq gaps and duplicates, viewers' resumes and close codes, viewers that timed out, the
    CPU of each server process, of Redis (each master), of the producer and of the viewer
    processes (from ``/proc`` and ``getrusage``; % of one core), the producer's own lateness
    against its schedule, and Redis ``used_memory`` (``INFO memory``, summed over the masters
    on the cluster) after minus before, divided by the conversations (and by the events
    logged). Modes: ``off`` (one append and one frame per token, as the broker path does) and
    ``merge30`` (the producer feeds each run through ``segments.DeltaMerger`` with 30 ms, as
    the servers' default ``--flush-ms`` does). ``--repeat`` runs of each; a table of
    medians.
(ramp) one server process, one ``redis-server``: viewers ``--ramp-viewers`` (default 250,
    500, 1000, 1500, 2000) on ``--ramp-conversations`` (10) conversations at ``--rate``, then
    concurrent runs ``--ramp-runs`` (10, 25, 50, 100) with ``--viewers-per`` viewers each;
    the first step whose p99 passes ``--p99-limit-ms`` (250) is reported (and, unless
    ``--full-ramp``, the ramp stops there).

The producer (this process) drives the production path, ``RedisBroker.start_run``,
``append`` (and ``renew_lease``), ``finish_run``, one producer task per conversation,
started a little apart; each token carries its publish time (``fanout.produce_paced``).
Viewers are ``viewer_worker.py`` processes (websockets' client) that resume like real
clients. Everything (servers, Redis, producer, viewers) shares this machine's cores, so the
viewer processes' CPU is reported: on a small machine the load generator competes with
the system under test, and latency then includes the viewers' own queueing.

Run: ``.venv/bin/python tests/bench/bench_load.py`` (about 25-35 minutes on 2 cores);
``--part main`` or ``--part ramp``; ``--topologies redis cluster``; ``--modes off merge30``;
``--duration 10 --repeat 2``; ``--keep`` keeps the logs.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import benchlib
import fanout
import redis
from benchlib import CpuMeter, table

sys.path.insert(0, str(benchlib.ROOT))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from costream.broker.redis import RedisBroker
from tests.support.redis_cluster import RedisCluster

MODES = {"off": 0, "merge30": 30}
SERVER_ENV = {"COSTREAM_MAX_VIEWERS": "5000"}
SETTLE_S = 1.5  # after the joins, let presence frames drain
DRAIN_S = 60.0  # how long viewers may take, after the planned run time, to see the END


@dataclass
class Rig:
    topology: str
    work: benchlib.Workdir
    redis_url: str
    redis_nodes: dict[str, tuple[int, int]]  # name -> (pid, port)
    servers: list[tuple[int, str]]  # (pid, base url)
    broker: RedisBroker
    cluster: RedisCluster | None = None

    def used_memory(self) -> int:
        """``used_memory`` summed over the Redis (or every cluster master)."""
        total = 0
        for _, port in self.redis_nodes.values():
            with redis.Redis(host="127.0.0.1", port=port, socket_timeout=10) as client:
                total += int(client.info("memory")["used_memory"])
        return total

    def keys(self) -> int:
        total = 0
        for _, port in self.redis_nodes.values():
            with redis.Redis(host="127.0.0.1", port=port, socket_timeout=10) as client:
                total += int(client.dbsize())
        return total


async def make_rig(topology: str, servers: int) -> Rig:
    work = benchlib.Workdir()
    cluster = None
    if topology == "cluster":
        cluster = RedisCluster(work.path / "cluster")
        cluster.start()
        nodes = {
            f"redis:{port}": (process.pid, port)
            for process, port in zip(cluster.processes, cluster.ports, strict=True)
        }
        redis_url = cluster.url
    else:
        child, redis_url = benchlib.start_redis(work)
        port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        nodes = {"redis": (child.pid, port)}
    started = [benchlib.start_costream(work, redis_url, SERVER_ENV) for _ in range(servers)]
    broker = RedisBroker(redis_url)
    await broker.start(lambda conversation_id, frame: None, lambda conversation_id: None)
    # Warm the client before 100 producers start at once: on a cluster, concurrent first
    # commands of a fresh redis-py RedisCluster race its lazy initialization and fail
    # with ConnectionError (see the report of this benchmark).
    if not await broker.ping():
        raise RuntimeError("the producer's broker cannot reach Redis")
    return Rig(
        topology, work, redis_url, nodes, [(c.pid, url) for c, url in started], broker, cluster
    )


async def close_rig(rig: Rig, keep: bool) -> None:
    await rig.broker.close()
    rig.work.close(keep=keep)
    if rig.cluster is not None:
        rig.cluster.stop()
    if keep:
        print(f"logs kept in {rig.work.path}")


@dataclass
class Outcome:
    label: str
    topology: str
    mode: str
    conversations: int
    viewers: int
    viewer_processes: int
    rate: float
    duration: float
    latencies_ms: array[float]
    received: int
    expected: int
    frames: int
    gaps: int
    duplicates: int
    timed_out: int
    closes: dict[int, int]
    resumes: int
    delivered_per_s: float
    frames_per_s: float
    connect_s: float
    cpu: dict[str, float]  # name -> share of one core
    producer_lag_p99_ms: float
    producer_lag_max_ms: float
    produce_s: float
    memory_delta: int
    keys_delta: int
    events_logged: int
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def p(self, fraction: float) -> float:
        return benchlib.percentile(self.latencies_ms, fraction)

    @property
    def loss(self) -> int:
        return self.expected - self.received

    @property
    def memory_per_conversation(self) -> float:
        return self.memory_delta / self.conversations

    @property
    def memory_per_event(self) -> float:
        return self.memory_delta / max(1, self.events_logged)

    def closed(self) -> str:
        parts = [f"{code}x{count}" for code, count in sorted(self.closes.items())]
        return " ".join(parts) if parts else "-"


def default_viewer_processes(viewers: int) -> int:
    return max(1, min(4, math.ceil(viewers / 500)))


async def produce_one(
    rig: Rig, conversation_id: str, delay: float, tokens: int, rate: float, merge_ms: int,
    lags: list[float],
) -> float:  # fmt: skip
    await asyncio.sleep(delay)
    producer = fanout.CostreamProducer(rig.broker, conversation_id)
    return await fanout.produce_paced(producer, tokens, rate, merge_ms, lags)


async def run_load(
    rig: Rig,
    *,
    label: str,
    mode: str,
    conversations: int,
    viewers_per: int,
    rate: float,
    duration: float,
    servers: list[tuple[int, str]],
    viewer_processes: int | None,
    compression: bool,
) -> Outcome:
    """``conversations`` concurrent runs, ``viewers_per`` viewers each over ``servers``."""
    merge_ms = MODES[mode]
    tokens = int(rate * duration)
    await asyncio.sleep(1.0)
    memory_before, keys_before = rig.used_memory(), rig.keys()
    created = [
        await asyncio.to_thread(
            benchlib.http_json,
            "POST",
            f"{servers[index % len(servers)][1]}/api/conversations",
            {},
        )
        for index in range(conversations)
    ]
    targets: list[fanout.Target] = []
    for conversation in created:
        conversation_id, token = conversation["id"], conversation["viewToken"]
        base, extra = divmod(viewers_per, len(servers))
        for index, (_, url) in enumerate(servers):
            count = base + (1 if index < extra else 0)
            if count:
                ws_url = url.replace("http://", "ws://") + f"/ws/conversations/{conversation_id}"
                targets.append(fanout.Target(ws_url, conversation_id, token, count))
    viewers = conversations * viewers_per
    processes = viewer_processes or default_viewer_processes(viewers)
    deadline = duration + DRAIN_S
    started_viewers = await fanout.start_viewers(
        rig.work, targets, processes, deadline_s=deadline, compression=compression, resume=True
    )
    connect_s = max(v.connect_s for v in started_viewers)
    await asyncio.sleep(SETTLE_S)
    pids = {f"server{index}": pid for index, (pid, _) in enumerate(servers)}
    pids |= {name: pid for name, (pid, _) in rig.redis_nodes.items()}
    pids["producer"] = os.getpid()
    meter = CpuMeter(pids)
    meter.start()
    lags: list[float] = []
    spacing = 1.0 / rate / conversations  # the runs' tokens spread over one token interval
    try:
        took = await asyncio.gather(
            *(
                produce_one(rig, c["id"], i * spacing, tokens, rate, merge_ms, lags)
                for i, c in enumerate(created)
            )
        )
        results = await asyncio.gather(*(v.wait_result(deadline + 60) for v in started_viewers))
    except BaseException:
        for viewer in started_viewers:
            viewer.kill()
        raise
    meter.stop()
    latencies: array[float] = array("d")
    for viewer in started_viewers:
        latencies.extend(value / 1e6 for value in viewer.latencies())
        viewer.latencies_path.unlink(missing_ok=True)
    latencies = array("d", sorted(latencies))
    received = sum(sum(r["tokens"]) for r in results)
    frames = sum(r["frames"] for r in results)
    first = min((r["firstNs"] for r in results if r["firstNs"]), default=0)
    last = max(r["lastNs"] for r in results)
    window = (last - first) / 1e9 if last > first else float("nan")
    closes: dict[int, int] = {}
    for result in results:
        for code, count in result["closes"].items():
            closes[int(code)] = closes.get(int(code), 0) + count
    heads = []
    key_bytes = 0
    client = rig.broker._redis  # the bench reads key sizes with the broker's own routing
    for conversation in created:
        state = await rig.broker.log_state(conversation["id"])
        heads.append(state.head if state else 0)
        for part in ("meta", "log"):
            key = f"costream:{{{conversation['id']}}}:{part}"
            key_bytes += int(await client.memory_usage(key, samples=0) or 0)
    await asyncio.sleep(1.0)  # the viewers' leaves reach Redis
    memory_delta = rig.used_memory() - memory_before
    keys_delta = rig.keys() - keys_before
    cpu = {name: meter.share(name) for name in pids}
    cpu["viewers"] = sum(r["cpuS"] for r in results) / meter.wall
    lags.sort()
    return Outcome(
        label=label,
        topology=rig.topology,
        mode=mode,
        conversations=conversations,
        viewers=viewers,
        viewer_processes=len(started_viewers),
        rate=rate,
        duration=duration,
        latencies_ms=latencies,
        received=received,
        expected=tokens * viewers,
        frames=frames,
        gaps=sum(r["gaps"] for r in results),
        duplicates=sum(r["duplicates"] for r in results),
        timed_out=sum(r["timedOut"] for r in results),
        closes=closes,
        resumes=sum(r["resumes"] for r in results),
        delivered_per_s=received / window,
        frames_per_s=frames / window,
        connect_s=connect_s,
        cpu=cpu,
        producer_lag_p99_ms=benchlib.percentile(lags, 0.99) * 1000,
        producer_lag_max_ms=(lags[-1] * 1000) if lags else float("nan"),
        produce_s=max(took),
        memory_delta=memory_delta,
        keys_delta=keys_delta,
        events_logged=sum(heads),
        wall_s=meter.wall,
        extra={"key_bytes": key_bytes},
    )


def pct(value: float) -> str:
    return f"{value * 100:.0f}%"


def cpu_cells(outcome: Outcome) -> list[str]:
    servers = " ".join(
        pct(share) for name, share in outcome.cpu.items() if name.startswith("server")
    )
    redis_nodes = " ".join(
        pct(share) for name, share in outcome.cpu.items() if name.startswith("redis")
    )
    return [servers, redis_nodes, pct(outcome.cpu["producer"]), pct(outcome.cpu["viewers"])]


def summary_line(outcome: Outcome) -> str:
    return (
        f"  done: {outcome.label}: {outcome.delivered_per_s:,.0f} tokens/s,"
        f" p50 {outcome.p(0.5):.0f} ms, p99 {outcome.p(0.99):.0f} ms, max {outcome.p(1.0):.0f} ms,"
        f" loss {outcome.loss}, gaps {outcome.gaps}, dups {outcome.duplicates},"
        f" timed out {outcome.timed_out}, closes {outcome.closed()},"
        f" producer took {outcome.produce_s:.1f} s for {outcome.duration:g} s"
        f" (late p99 {outcome.producer_lag_p99_ms:.0f} ms, max {outcome.producer_lag_max_ms:.0f} ms),"
        f" CPU servers/redis/producer/viewers {' | '.join(cpu_cells(outcome))}"
    )


HEADER = [
    "topology",
    "mode",
    "runs",
    "viewers",
    "tokens/s delivered",
    "frames/s",
    "p50 ms",
    "p99 ms",
    "max ms",
    "loss",
    "gaps",
    "dups",
    "timed out",
    "resumes",
    "closes",
    "CPU server procs",
    "CPU redis",
    "CPU producer",
    "CPU viewer procs",
    "producer late p99/max ms",
    "connect s",
]


def row(outcome: Outcome) -> list[Any]:
    loss = outcome.loss
    return [
        outcome.topology,
        outcome.mode,
        outcome.conversations,
        outcome.viewers,
        outcome.delivered_per_s,
        outcome.frames_per_s,
        outcome.p(0.5),
        outcome.p(0.99),
        outcome.p(1.0),
        f"{loss} ({loss / max(1, outcome.expected):.2%})",
        outcome.gaps,
        outcome.duplicates,
        outcome.timed_out,
        outcome.resumes,
        outcome.closed(),
        *cpu_cells(outcome),
        f"{outcome.producer_lag_p99_ms:.0f}/{outcome.producer_lag_max_ms:.0f}",
        f"{outcome.connect_s:.1f}",
    ]


def memory_row(outcome: Outcome) -> list[Any]:
    return [
        outcome.topology,
        outcome.mode,
        outcome.conversations,
        outcome.events_logged,
        outcome.memory_delta / 2**20,
        outcome.memory_per_conversation / 1024,
        outcome.memory_per_event,
        outcome.keys_delta / outcome.conversations,
        outcome.extra["key_bytes"] / outcome.conversations / 1024,
        outcome.extra["key_bytes"] / max(1, outcome.events_logged),
    ]


async def part_main(args: argparse.Namespace) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for topology in args.topologies:
        rig = await make_rig(topology, 2)
        try:
            for repetition in range(args.repeat):
                for mode in args.modes:
                    outcome = await run_load(
                        rig,
                        label=f"{topology} {mode} #{repetition + 1}",
                        mode=mode,
                        conversations=args.conversations,
                        viewers_per=args.viewers_per,
                        rate=args.rate,
                        duration=args.duration,
                        servers=rig.servers,
                        viewer_processes=args.viewer_processes,
                        compression=args.compression,
                    )
                    outcomes.append(outcome)
                    print(summary_line(outcome), flush=True)
                    await asyncio.sleep(2)
        finally:
            await close_rig(rig, args.keep)
    goal = args.conversations * args.rate * args.viewers_per
    print()
    print(
        table(
            f"(main) {args.conversations} runs at once x {args.rate:g} tokens/s x {args.viewers_per}"
            f" viewers each, {args.duration:g} s, two server processes (goal {goal:,.0f} tokens/s"
            "; latency = token publish -> viewer receive; CPU in % of one core, one figure per process)",
            HEADER,
            [row(o) for o in outcomes],
        )
    )
    medians = []
    for topology in args.topologies:
        for mode in args.modes:
            runs = [o for o in outcomes if o.topology == topology and o.mode == mode]
            if not runs:
                continue
            servers = sorted({n for o in runs for n in o.cpu if n.startswith("server")})
            redis_nodes = sorted({n for o in runs for n in o.cpu if n.startswith("redis")})
            medians.append(
                [
                    topology,
                    mode,
                    len(runs),
                    statistics.median(o.delivered_per_s for o in runs),
                    statistics.median(o.p(0.5) for o in runs),
                    statistics.median(o.p(0.99) for o in runs),
                    statistics.median(o.p(1.0) for o in runs),
                    statistics.median(o.loss for o in runs),
                    statistics.median(o.gaps + o.duplicates for o in runs),
                    " ".join(pct(statistics.median(o.cpu[n] for o in runs)) for n in servers),
                    " ".join(pct(statistics.median(o.cpu[n] for o in runs)) for n in redis_nodes),
                    pct(statistics.median(o.cpu["producer"] for o in runs)),
                    pct(statistics.median(o.cpu["viewers"] for o in runs)),
                    statistics.median(o.memory_per_conversation for o in runs) / 1024,
                ]
            )
    print(
        table(
            "(main) medians over the repetitions",
            [
                "topology",
                "mode",
                "runs",
                "tokens/s delivered",
                "p50 ms",
                "p99 ms",
                "max ms",
                "loss",
                "gaps+dups",
                "CPU server procs",
                "CPU redis",
                "CPU producer",
                "CPU viewer procs",
                "Redis KiB/conversation",
            ],
            medians,
        )
    )
    print(
        table(
            "(main) Redis used_memory after - before (INFO memory; summed over the masters on"
            " the cluster), after the runs finished and the viewers left",
            [
                "topology",
                "mode",
                "conversations",
                "events logged",
                "delta MiB",
                "KiB per conversation",
                "bytes per logged event",
                "keys per conversation",
                "MEMORY USAGE meta+log KiB/conv",
                "MEMORY USAGE bytes/event",
            ],
            [memory_row(o) for o in outcomes],
        )
    )
    return outcomes


async def part_ramp(args: argparse.Namespace) -> None:
    rig = await make_rig("redis", 1)
    steps: list[tuple[str, int, int]] = [
        ("viewers", args.ramp_conversations, viewers // args.ramp_conversations)
        for viewers in args.ramp_viewers
    ] + [("runs", runs, args.viewers_per) for runs in args.ramp_runs]
    rows: list[list[Any]] = []
    first_over: dict[str, str] = {}
    try:
        for kind, conversations, viewers_per in steps:
            if kind in first_over and not args.full_ramp:
                continue
            outcome = await run_load(
                rig,
                label=f"ramp {kind}: {conversations} runs x {viewers_per} viewers",
                mode=args.ramp_mode,
                conversations=conversations,
                viewers_per=viewers_per,
                rate=args.rate,
                duration=args.ramp_duration,
                servers=rig.servers,
                viewer_processes=args.viewer_processes,
                compression=args.compression,
            )
            print(summary_line(outcome), flush=True)
            over = outcome.p(0.99) > args.p99_limit_ms or outcome.loss > 0
            if over and kind not in first_over:
                first_over[kind] = (
                    f"{conversations} runs x {viewers_per} viewers ="
                    f" {outcome.viewers} viewers, p99 {outcome.p(0.99):.0f} ms, loss {outcome.loss}"
                )
            rows.append([kind, *row(outcome)[1:], "OVER" if over else "ok"])
            await asyncio.sleep(2)
    finally:
        await close_rig(rig, args.keep)
    print()
    print(
        table(
            f"(ramp) ONE server process, one redis-server, {args.rate:g} tokens/s per run,"
            f" {args.ramp_duration:g} s per step, mode {args.ramp_mode}"
            f" (OVER: p99 > {args.p99_limit_ms:g} ms or loss)",
            ["ramp", *HEADER[1:], f"p99 <= {args.p99_limit_ms:g}"],
            rows,
        )
    )
    for kind in ("viewers", "runs"):
        print(f"first step over the limit ({kind}): {first_over.get(kind, 'none of the steps')}")


async def main(args: argparse.Namespace) -> None:
    started = time.monotonic()
    if args.part in ("main", "all"):
        await part_main(args)
    if args.part in ("ramp", "all"):
        await part_ramp(args)
    print(f"total {time.monotonic() - started:.0f} s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--part", choices=("main", "ramp", "all"), default="all")
    parser.add_argument(
        "--topologies", nargs="+", choices=("redis", "cluster"), default=["redis", "cluster"]
    )
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=["off", "merge30"])
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--viewers-per", type=int, default=20)
    parser.add_argument("--rate", type=float, default=50.0, help="tokens/s per run")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (main)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--ramp-conversations", type=int, default=10)
    parser.add_argument("--ramp-viewers", type=int, nargs="+", default=[250, 500, 1000, 1500, 2000])
    parser.add_argument("--ramp-runs", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--ramp-duration", type=float, default=8.0)
    parser.add_argument("--ramp-mode", choices=tuple(MODES), default="off")
    parser.add_argument("--p99-limit-ms", type=float, default=250.0)
    parser.add_argument(
        "--full-ramp", action="store_true", help="go on past the first step over the limit"
    )
    parser.add_argument("--viewer-processes", type=int, default=None)
    parser.add_argument("--no-deflate", dest="compression", action="store_false")
    parser.add_argument("--keep", action="store_true", help="keep the logs")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
