"""Chunk throughput (d): what one costream process does per streamed chunk, next to
LiteLLM alone reading the same streams, and what LiteLLM's own settings change.

All against ``sse_llm.py``, a local OpenAI-compatible server that streams ``--chunks``
content chunks per call at full speed (one write), so the client is what is measured.

1. LiteLLM alone: a separate process runs ``--conversations`` concurrent loops of
   ``litellm.acompletion(stream=True)`` with the same arguments costream's runner uses
   (tools, ``stream_options.include_usage``, ``max_retries=0``), ``--rounds`` streams
   each; CPU seconds per chunk (getrusage, after one warm-up stream).
2. costream: one ``costream serve`` (memory broker, or Redis with ``--redis``) with
   ``LLM_BASE_URL`` at the same server; ``--conversations`` conversations get a message at
   once, ``--rounds`` times; runs end when ``/metrics`` counts them. CPU of the server
   process per chunk; events appended from ``/metrics``. costream's own work per chunk is
   the difference to LiteLLM alone, at flush windows 0 (every chunk appended) and 30 ms.
3. costream's per-chunk path in-process, without LiteLLM: chunks recorded from LiteLLM
   are fed through what the runner does after LiteLLM yields one (``asyncio.timeout``
   around the read, ``StepSegments.feed``, ``DeltaMerger.push``, ``protocol.encode``,
   ``MemoryBroker.append`` to a hub with no viewers, finish reason and usage): a direct
   figure, free of the noise of a difference of two process measurements.
4. LiteLLM settings: LiteLLM alone at 10 conversations with each setting on its own.

Run: ``.venv/bin/python tests/bench/bench_chunks.py`` (about 4 minutes);
``--part costream|settings|inproc`` for one part.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

import benchlib
from benchlib import table

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

# name -> (environment, attribute settings on the litellm module)
VARIANTS: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "default": ({}, {}),
    "disable_streaming_logging": ({}, {"disable_streaming_logging": True}),
    "turn_off_message_logging": ({}, {"turn_off_message_logging": True}),
    "callbacks lists emptied": (
        {},
        {
            "callbacks": [],
            "success_callback": [],
            "failure_callback": [],
            "_async_success_callback": [],
            "_async_failure_callback": [],
            "input_callback": [],
            "service_callback": [],
        },
    ),
    "LITELLM_LOG=ERROR": ({"LITELLM_LOG": "ERROR"}, {}),
    "suppress_debug_info + logging=False": ({}, {"suppress_debug_info": True, "logging": False}),
    "disable_token_counter": ({}, {"disable_token_counter": True}),
    "all logging settings above": (
        {"LITELLM_LOG": "ERROR"},
        {
            "disable_streaming_logging": True,
            "turn_off_message_logging": True,
            "callbacks": [],
            "success_callback": [],
            "failure_callback": [],
            "_async_success_callback": [],
            "_async_failure_callback": [],
            "suppress_debug_info": True,
            "logging": False,
            "disable_token_counter": True,
        },
    ),
    "disable_aiohttp_transport (httpx)": ({}, {"disable_aiohttp_transport": True}),
}


# ---- LiteLLM alone, in its own process ---------------------------------------------------


async def litellm_alone(args: argparse.Namespace) -> dict[str, Any]:
    import litellm

    from costream.agent.tools import TOOL_SPECS

    for name, value in VARIANTS[args.variant][1].items():
        setattr(litellm, name, value)
    options = {
        "model": f"openai/chunks-{args.chunks}",
        "messages": [{"role": "user", "content": "benchmark"}],
        "tools": TOOL_SPECS,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_retries": 0,
        "api_key": "bench",
        "api_base": args.base_url,
    }

    async def one_stream() -> int:
        stream = await litellm.acompletion(**options)
        count = 0
        async for _chunk in stream:
            count += 1
        return count

    async def loop(rounds: int) -> int:
        return sum([await one_stream() for _ in range(rounds)])

    per_stream = await one_stream()  # warm-up: imports, first connection
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    counts = await asyncio.gather(*(loop(args.rounds) for _ in range(args.conversations[0])))
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.sleep(0.2)  # LiteLLM's end-of-stream logging tasks
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    chunks = sum(counts)
    return {"chunks": chunks, "perStream": per_stream, "cpuS": cpu, "wallS": wall}


def run_alone(
    base_url: str, variant: str, conversations: int, chunks: int, rounds: int
) -> dict[str, Any]:
    env = benchlib.base_env(**VARIANTS[variant][0])
    command = [
        benchlib.PYTHON,
        str(benchlib.BENCH_DIR / "bench_chunks.py"),
        "--alone",
        "--variant", variant,
        "--base-url", base_url,
        "--conversations", str(conversations),
        "--chunks", str(chunks),
        "--rounds", str(rounds),
    ]  # fmt: skip
    import subprocess

    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    for line in done.stdout.splitlines():
        if line.startswith("ALONE "):
            result: dict[str, Any] = json.loads(line[len("ALONE ") :])
            return result
    raise RuntimeError(f"LiteLLM-alone process failed:\n{done.stderr[-3000:]}")


# ---- costream serve -------------------------------------------------------------------


def post_json(url: str, body: Any, token: str | None = None) -> Any:
    return benchlib.http_json("POST", url, body, token)


def wait_runs_done(url: str, expected_runs: float, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = benchlib.metric_value(url, "costream_run_duration_seconds_count")
        if done >= expected_runs:
            return
        time.sleep(0.1)
    raise RuntimeError("runs did not finish in time")


def costream_runs(
    url: str, pid: int, conversations: int, rounds: int, chunks_per_stream: int
) -> dict[str, float]:
    """Start ``conversations`` runs at once, ``rounds`` times; server CPU and events."""
    done_before = benchlib.metric_value(url, "costream_run_duration_seconds_count")
    events_before = benchlib.metric_value(url, "costream_events_appended_total")
    errors_before = benchlib.metric_value(url, "costream_run_errors_total")
    created = [post_json(f"{url}/api/conversations", {}) for _ in range(conversations)]
    cpu_before = benchlib.cpu_seconds(pid)
    started = time.monotonic()
    for round_index in range(rounds):
        for conversation in created:
            post_json(
                f"{url}/api/conversations/{conversation['id']}/messages",
                {"content": f"round {round_index}"},
                conversation["writeToken"],
            )
        wait_runs_done(url, done_before + conversations * (round_index + 1), 300)
    wall = time.monotonic() - started
    cpu = benchlib.cpu_seconds(pid) - cpu_before
    runs = conversations * rounds
    return {
        "chunks": runs * chunks_per_stream,
        "cpuS": cpu,
        "wallS": wall,
        "events": benchlib.metric_value(url, "costream_events_appended_total") - events_before,
        "errors": benchlib.metric_value(url, "costream_run_errors_total") - errors_before,
    }


def part_costream(args: argparse.Namespace, work: benchlib.Workdir, base_url: str) -> None:
    redis_url = None
    if args.redis:
        _, redis_url = benchlib.start_redis(work)
    llm_env = {
        "LLM_MODEL": f"openai/chunks-{args.chunks}",
        "LLM_API_KEY": "bench",
        "LLM_BASE_URL": base_url,
        "COSTREAM_LLM_TIMEOUT_S": "120",
    }
    alone: dict[int, list[dict[str, Any]]] = {}
    mine: dict[tuple[int, int], list[dict[str, float]]] = {}
    servers = {}
    for flush in args.flush:
        child, url = benchlib.start_costream(
            work, redis_url, {**llm_env, "COSTREAM_FLUSH_MS": str(flush)}
        )
        servers[flush] = (child, url)
        costream_runs(url, child.pid, 1, 1, 0)  # warm-up: LiteLLM import, first connection
    per_stream = 0
    for repeat in range(args.repeat):
        for conversations in args.conversations:
            rounds = max(1, args.stream_budget // conversations)
            result = run_alone(base_url, "default", conversations, args.chunks, rounds)
            per_stream = result["perStream"]
            alone.setdefault(conversations, []).append(result)
            for flush in args.flush:
                child, url = servers[flush]
                outcome = costream_runs(url, child.pid, conversations, rounds, per_stream)
                mine.setdefault((conversations, flush), []).append(outcome)
                print(
                    f"  repeat {repeat}: {conversations} conv, flush {flush}: "
                    f"{outcome['cpuS'] / outcome['chunks'] * 1e6:.0f} us/chunk costream, "
                    f"{result['cpuS'] / result['chunks'] * 1e6:.0f} us/chunk LiteLLM alone",
                    flush=True,
                )
    rows = []
    for conversations in args.conversations:
        alone_us = statistics.median(r["cpuS"] / r["chunks"] * 1e6 for r in alone[conversations])
        alone_rate = statistics.median(r["chunks"] / r["wallS"] for r in alone[conversations])
        rows.append([conversations, "LiteLLM alone", alone_rate, alone_us, "-", "-", "-", "-"])
        for flush in args.flush:
            outcomes = mine[(conversations, flush)]
            us = statistics.median(o["cpuS"] / o["chunks"] * 1e6 for o in outcomes)
            rate = statistics.median(o["chunks"] / o["wallS"] for o in outcomes)
            events = statistics.median(o["events"] / o["chunks"] for o in outcomes)
            errors = sum(o["errors"] for o in outcomes)
            rows.append(
                [
                    conversations,
                    f"costream, flush {flush} ms",
                    rate,
                    us,
                    us - alone_us,
                    f"{(us - alone_us) / alone_us:.1%}",
                    events,
                    int(errors),
                ]
            )
    broker = "Redis broker" if args.redis else "memory broker"
    print()
    print(
        table(
            f"(d) chunks/s and CPU per chunk, one process, {per_stream} chunks per stream, {broker}"
            f" (median of {args.repeat})",
            ["conversations", "what", "chunks/s", "CPU us/chunk", "costream us/chunk", "costream / LiteLLM", "events/chunk", "run errors"],
            rows,
        )
    )  # fmt: skip


def part_settings(args: argparse.Namespace, base_url: str) -> None:
    rows = []
    figures: dict[str, float] = {}
    rounds = max(1, args.stream_budget // 10)
    for variant in VARIANTS:
        samples = [
            run_alone(base_url, variant, 10, args.chunks, rounds) for _ in range(args.repeat)
        ]
        us = statistics.median(s["cpuS"] / s["chunks"] * 1e6 for s in samples)
        figures[variant] = us
        print(f"  {variant}: {us:.0f} us/chunk", flush=True)
    for variant, us in figures.items():
        rows.append([variant, us, f"{us / figures['default'] - 1:+.1%}"])
    print()
    print(
        table(
            f"(d) LiteLLM alone, CPU per chunk by setting (10 concurrent streams, median of {args.repeat})",
            ["setting", "CPU us/chunk", "vs default"],
            rows,
        )
    )


# ---- costream's per-chunk path, in-process ----------------------------------------------


async def record_chunks(base_url: str, chunks: int) -> list[Any]:
    import litellm

    from costream.agent.tools import TOOL_SPECS

    stream = await litellm.acompletion(
        model=f"openai/chunks-{chunks}",
        messages=[{"role": "user", "content": "benchmark"}],
        tools=TOOL_SPECS,
        stream=True,
        stream_options={"include_usage": True},
        max_retries=0,
        api_key="bench",
        api_base=base_url,
    )
    return [chunk async for chunk in stream]


async def inproc(base_url: str, args: argparse.Namespace) -> list[list[Any]]:
    from costream import protocol
    from costream.agent import step as run_step
    from costream.broker.memory import MemoryBroker
    from costream.chunks import finish_reason_of, usage_of
    from costream.metrics import Metrics
    from costream.segments import DeltaMerger, StepSegments
    from costream.server.hub import Hub

    recorded = await record_chunks(base_url, args.chunks)

    async def replay(items: list[Any]) -> Any:
        for item in items:
            yield item

    rows = []
    for flush in args.flush:
        samples = []
        for _ in range(5):
            broker = MemoryBroker()
            hub = Hub(broker, Metrics())
            await broker.start(hub.on_frame, hub.on_resync)
            await broker.create_conversation("bench", {})
            lease = await broker.start_run("bench", "run", b'{"type":"RUN_STARTED"}', 60_000)

            async def sink(events: list[Any], lease: Any = lease, broker: Any = broker) -> None:
                await broker.append(lease, [protocol.encode(event) for event in events])

            segments = StepSegments()
            merger = DeltaMerger(sink, flush)
            iterator = replay(recorded).__aiter__()
            reason, usage = "stop", protocol.Usage()
            started = time.process_time()
            while True:
                try:
                    chunk = await run_step._within(60.0, iterator.__anext__())
                except StopAsyncIteration:
                    break
                events = segments.feed(chunk)
                if events:
                    await merger.push(events)
                reason = finish_reason_of(chunk) or reason
                usage = usage_of(chunk) or usage
            await merger.push(segments.close())
            await merger.aclose()
            samples.append((time.process_time() - started) / len(recorded) * 1e6)
            await asyncio.sleep(flush / 1000 + 0.01)
        baseline = []
        for _ in range(5):
            iterator = replay(recorded).__aiter__()
            started = time.process_time()
            while True:
                try:
                    await iterator.__anext__()
                except StopAsyncIteration:
                    break
            baseline.append((time.process_time() - started) / len(recorded) * 1e6)
        rows.append([flush, len(recorded), statistics.median(samples), statistics.median(baseline)])
    return rows


def part_inproc(args: argparse.Namespace, base_url: str) -> None:
    rows = asyncio.run(inproc(base_url, args))
    print()
    print(
        table(
            "(d) costream's work per chunk after LiteLLM yields it, in-process (median of 5; "
            "memory broker, no viewers)",
            ["flush ms", "chunks", "us/chunk", "us/chunk of the bare replay loop"],
            rows,
        )
    )


# ---- main -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--part", choices=("costream", "settings", "inproc", "all"), default="all")
    parser.add_argument("--conversations", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--chunks", type=int, default=2000, help="content chunks per stream")
    parser.add_argument("--stream-budget", type=int, default=50, help="streams per measurement")
    parser.add_argument("--flush", type=int, nargs="+", default=[0, 30])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--redis", action="store_true", help="costream on the Redis broker")
    parser.add_argument("--alone", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--base-url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.alone:
        result = asyncio.run(litellm_alone(args))
        print("ALONE " + json.dumps(result), flush=True)
        return

    work = benchlib.Workdir()
    try:
        port = benchlib.free_port()
        llm = work.spawn(
            "sse-llm",
            [benchlib.PYTHON, str(benchlib.BENCH_DIR / "sse_llm.py"), "--port", str(port)],
        )
        base_url = f"http://127.0.0.1:{port}/v1"

        benchlib.wait_until(lambda: "LISTENING" in llm.log_text(), 10, "sse_llm", llm)
        if args.part in ("inproc", "all"):
            part_inproc(args, base_url)
        if args.part in ("costream", "all"):
            part_costream(args, work, base_url)
        if args.part in ("settings", "all"):
            part_settings(args, base_url)
        cpu = benchlib.cpu_seconds(llm.pid)
        print(f"sse_llm server CPU over the whole run: {cpu:.1f} s")
    finally:
        work.close()


if __name__ == "__main__":
    sys.exit(main())
