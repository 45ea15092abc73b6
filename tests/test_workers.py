"""``costream serve --workers 2`` is the same server in every worker: logging, redaction,
1001 on SIGTERM, and one ``/metrics`` for all the workers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path
from typing import Any

from tests.support.servers import ServerProcess
from tests.support.ws import Session, ahttp, close_code, open_session

SECRET = "operator-secret-4c1d9e"
VIEWERS = 6


async def _until_log_says(server: ServerProcess, text: str, count: int) -> None:
    """Wait until the server's log holds ``text`` ``count`` times (its workers said it)."""
    async with asyncio.timeout(60):
        while server.log_text().count(text) < count:
            await asyncio.sleep(0.1)


def _workers(server: ServerProcess) -> list[int]:
    """The pids of the server's worker processes (uvicorn spawns them)."""
    assert server.process is not None
    parent = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    pids = [int(pid) for pid in parent.read_text().split()]
    return [pid for pid in pids if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


async def _metric(server: ServerProcess, name: str) -> float:
    status, text = await ahttp("GET", f"{server.url}/metrics")
    assert status == 200
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


async def test_every_worker_logs_redacts_counts_for_all_and_closes_viewers_with_1001(
    start_server: Any, redis_url: str
) -> None:
    """Each worker logs costream's INFO lines with the create key scrubbed, /metrics on
    any worker counts the viewers of all workers, and SIGTERM closes every viewer 1001."""
    server = start_server(
        redis_url=redis_url, args=["--workers", "2"], env={"COSTREAM_CREATE_KEY": SECRET}
    )
    await _until_log_says(server, "Application startup complete.", 2)
    assert server.log_text().count("using the built-in demo model") == 2

    for _ in range(6):  # one connection each: they spread over the workers
        assert (await ahttp("GET", f"{server.url}/{SECRET}"))[0] == 404
    await _until_log_says(server, '"GET /*** HTTP/1.1" 404', 6)
    assert SECRET not in server.log_text()

    status, conv = await ahttp("POST", f"{server.url}/api/conversations", body={}, token=SECRET)
    assert status == 201
    url = server.ws_url(conv["id"])
    viewers: list[Session] = []
    workers = _workers(server)
    assert len(workers) == 2
    for paused in workers:
        # Half the viewers on each worker: the other one is paused while they connect.
        os.kill(paused, signal.SIGSTOP)
        try:
            for _ in range(VIEWERS // 2):
                viewers.append(await open_session(url, conv["id"], conv["viewToken"]))
        finally:
            os.kill(paused, signal.SIGCONT)
    # Every answer, whichever worker gives it, counts all the viewers once the workers
    # have written their values (every 0.5 s): wait for six answers in a row saying so.
    in_a_row = 0
    async with asyncio.timeout(30):
        while in_a_row < 6:
            counted = await _metric(server, "costream_viewers")
            in_a_row = in_a_row + 1 if counted == VIEWERS else 0
            if not in_a_row:
                await asyncio.sleep(0.1)

    codes = asyncio.gather(*(close_code(viewer.ws, timeout=30) for viewer in viewers))
    await asyncio.to_thread(server.stop)
    assert await codes == [1001] * VIEWERS
