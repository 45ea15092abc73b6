"""``--metrics-listen host:port`` (``COSTREAM_METRICS_LISTEN``): ``/metrics`` answers
there, for every worker of ``--workers``, and the main port answers 404 for it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.support.processes import free_port
from tests.support.servers import ServerProcess
from tests.support.ws import Session, ahttp, create_conversation, http, open_session


async def _metric(url: str, name: str) -> float:
    status, text = await ahttp("GET", url)
    assert status == 200, text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


async def _until_metric(url: str, name: str, value: float, in_a_row: int = 1) -> None:
    """Wait until ``in_a_row`` answers in a row say ``name`` is ``value``."""
    seen = 0
    async with asyncio.timeout(30):
        while seen < in_a_row:
            seen = seen + 1 if await _metric(url, name) == value else 0
            if not seen:
                await asyncio.sleep(0.1)


async def test_metrics_move_to_their_own_listener(
    start_server: Callable[..., ServerProcess],
) -> None:
    """With --metrics-listen, the listener answers /metrics with the process's figures
    (its viewers counted live), other paths 404, and the main port 404 for /metrics."""
    port = free_port()
    server = start_server(args=["--metrics-listen", f"127.0.0.1:{port}"])
    metrics = f"http://127.0.0.1:{port}/metrics"
    assert http("GET", f"{server.url}/metrics")[0] == 404
    assert http("GET", f"http://127.0.0.1:{port}/healthz")[0] == 404
    assert http("POST", metrics, body={})[0] == 405
    assert await _metric(metrics, "costream_viewers") == 0

    conv = await create_conversation(server.url)
    viewer = await open_session(server.ws_url(conv["id"]), conv["id"], conv["viewToken"])
    assert await _metric(metrics, "costream_viewers") == 1
    await viewer.close()
    await _until_metric(metrics, "costream_viewers", 0)


def _workers(server: ServerProcess) -> list[int]:
    """The pids of the server's worker processes (uvicorn spawns them)."""
    assert server.process is not None
    parent = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    pids = [int(pid) for pid in parent.read_text().split()]
    return [pid for pid in pids if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


async def test_the_listener_counts_every_worker(
    start_server: Callable[..., ServerProcess], redis_url: str
) -> None:
    """With --workers 2 and COSTREAM_METRICS_LISTEN, one listener answers for both
    workers: viewers on each are added up; neither worker's port serves /metrics."""
    port = free_port()
    server = start_server(
        redis_url=redis_url,
        args=["--workers", "2"],
        env={"COSTREAM_METRICS_LISTEN": f"127.0.0.1:{port}"},
    )
    metrics = f"http://127.0.0.1:{port}/metrics"
    conv = await create_conversation(server.url)
    url = server.ws_url(conv["id"])
    workers = _workers(server)
    assert len(workers) == 2
    viewers: list[Session] = []
    for paused in workers:
        # Two viewers on each worker: the other one is paused while they connect.
        os.kill(paused, signal.SIGSTOP)
        try:
            for _ in range(2):
                viewers.append(await open_session(url, conv["id"], conv["viewToken"]))
        finally:
            os.kill(paused, signal.SIGCONT)
    for _ in range(4):  # one connection each: they spread over the workers
        assert http("GET", f"{server.url}/metrics")[0] == 404
    await _until_metric(metrics, "costream_viewers", 4)
    for viewer in viewers:
        await viewer.close()
    await _until_metric(metrics, "costream_viewers", 0)


def test_a_bad_metrics_address_stops_the_start_with_a_clear_message(tmp_path: Path) -> None:
    """A value that is not host:port, or a port already taken, ends `costream serve` with
    exit status 1 and a message naming the option, before anything listens."""
    taken = free_port()
    with socket.create_server(("127.0.0.1", taken)):
        for value, says in (("nonsense", "host:port"), (f"127.0.0.1:{taken}", "cannot listen")):
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "costream.cli",
                    "serve",
                    "--port",
                    str(free_port()),
                    "--memory",
                    "--metrics-listen",
                    value,
                ],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=tmp_path,
            )
            assert done.returncode == 1, done.stderr
            assert says in done.stderr and "metrics" in done.stderr, done.stderr
