"""What a TokenPublisher adds to an agent's process per chunk, beside LiteLLM's own cost.

    .venv/bin/python tests/bench/bench_publisher.py [--chunks 3000] [--rate 1000]

Starts a ``redis-server``, ``costream serve`` (embedded SQLite, and one on that Redis)
and ``sse_llm.py`` on free ports, streams ``--chunks`` LiteLLM ``ModelResponseStream``
chunks from ``sse_llm.py`` through LiteLLM, then hands them to a publisher at ``--rate``
chunks/s for each transport, with the 30 ms flush window. Prints, per chunk: LiteLLM's CPU to
make the chunk; the time a call to the publisher takes in the agent's thread; and the
CPU the publisher adds to the agent's process (the call and its publishing thread),
over a paced loop that calls a no-op callback instead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from costream.publisher import TokenPublisher
from tests.support.processes import answers_ok, free_port, stop_process, wait_ready
from tests.support.ws import http


def litellm_chunks(base_url: str, count: int) -> tuple[list[Any], float]:
    """``count`` content chunks streamed by LiteLLM from ``sse_llm.py`` (its other chunks
    too), and LiteLLM's CPU per chunk (s), the best of three reads."""
    import litellm

    best, chunks = float("inf"), []
    for _ in range(3):
        started = time.process_time()
        chunks = list(
            litellm.completion(
                model=f"openai/chunks-{count}",
                api_base=base_url,
                api_key="sk-bench",
                messages=[{"role": "user", "content": "go"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        best = min(best, (time.process_time() - started) / len(chunks))
    return chunks, best


def paced(chunks: list[Any], rate: float, callback: Callable[[Any], None]) -> tuple[float, float]:
    """Feed ``chunks`` at ``rate``/s; (process CPU s, mean time per call s)."""
    interval = 1 / rate
    in_calls = 0.0
    cpu = time.process_time()
    start = time.perf_counter()
    for position, chunk in enumerate(chunks):
        due = start + position * interval
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        before = time.perf_counter()
        callback(chunk)
        in_calls += time.perf_counter() - before
    return time.process_time() - cpu, in_calls / len(chunks)


def start_serve(workdir: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    """A ``costream serve`` with ``args``, ready; (its process, its URL)."""
    port = free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "costream.cli", "serve", "--port", str(port), *args],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(serve, lambda: answers_ok(f"{url}/healthz"), "costream serve", lambda: "", 30)
    return serve, url


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=1000.0)
    options = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    workdir = Path(tempfile.mkdtemp(prefix="bench-publisher-"))
    redis_port, llm_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    started: list[subprocess.Popen[Any]] = [
        subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
    ]
    llm = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("sse_llm.py")), "--port", str(llm_port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    started.append(llm)
    try:
        assert llm.stdout is not None and llm.stdout.readline().startswith("LISTENING")
        embedded, embedded_url = start_serve(workdir, "--data-dir", str(workdir / "data"))
        on_redis, on_redis_url = start_serve(workdir, "--redis-url", redis_url)
        started += [embedded, on_redis]
        chunks, litellm_cpu = litellm_chunks(f"http://127.0.0.1:{llm_port}/v1", options.chunks)
        print(f"{len(chunks)} chunks at {options.rate:.0f}/s")
        print(f"LiteLLM's own CPU per chunk: {litellm_cpu * 1e6:.1f} us")
        baseline = statistics.median(
            paced(chunks, options.rate, lambda _: None)[0] for _ in range(3)
        )
        for transport in ("http", "redis"):
            server_url = embedded_url if transport == "http" else on_redis_url
            _, created = http("POST", f"{server_url}/api/conversations", body={})
            publisher = (
                TokenPublisher(url=created["writeUrl"])
                if transport == "http"
                else TokenPublisher(redis_url=redis_url, conversation_id=created["id"])
            )
            with publisher.run("benchmark"):
                cpu, per_call = paced(chunks, options.rate, publisher)
                cpu_end = time.process_time()
            publisher.flush(60)
            cpu += time.process_time() - cpu_end  # the thread's work still queued
            publisher.close()
            added = (cpu - baseline) / len(chunks)
            print(
                f"{transport:5}: per call in the agent's thread {per_call * 1e6:.1f} us; "
                f"CPU added to the process {added * 1e6:.1f} us/chunk "
                f"(errors {publisher.errors}, dropped {publisher.dropped})"
            )
    finally:
        for process in reversed(started):
            stop_process(process)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
