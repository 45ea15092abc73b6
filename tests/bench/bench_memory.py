"""Memory per idle viewer (f): RSS of a server process before and after 1000 viewers join.

For costream (Redis broker), costream (memory broker) and the reference forwarder: one
server process, a conversation with no run, 20 viewers joined and left first (so lazy
imports and pools are warm), then ``--viewers`` viewers in two viewer processes join and
stay idle. RSS (``/proc/PID/statm``) is read before, and 3 s after the last ``welcome``;
the difference divided by the viewers is the memory per idle viewer. Also: how long the
joins took and the server CPU they cost (each costream join publishes a presence frame
that goes to every viewer already there). With permessage-deflate offered (as browsers
do) and refused.

Run: ``.venv/bin/python tests/bench/bench_memory.py`` (about 2 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

import benchlib
import fanout
from benchlib import table

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

SETTLE_S = 3.0


async def measure(
    work: benchlib.Workdir, pid: int, url: str, system: str, viewers: int, compression: bool
) -> list[Any]:
    if system == "reference":
        conversation_id, token = fanout.new_id(), "none"
    else:
        created = benchlib.http_json("POST", f"{url}/api/conversations", {})
        conversation_id, token = created["id"], created["viewToken"]
    ws_url = url.replace("http://", "ws://") + f"/ws/conversations/{conversation_id}"
    warm = await fanout.start_viewers(
        work, [fanout.Target(ws_url, conversation_id, token, 20)], 1,
        deadline_s=0.5, compression=compression, latencies=False,
    )  # fmt: skip
    await asyncio.gather(*(v.wait_result(60) for v in warm))
    await asyncio.sleep(SETTLE_S)
    before = benchlib.rss_bytes(pid)
    cpu_before = benchlib.cpu_seconds(pid)
    hold = await fanout.start_viewers(
        work, [fanout.Target(ws_url, conversation_id, token, viewers)], 2,
        deadline_s=SETTLE_S + 60, compression=compression, latencies=False,
    )  # fmt: skip
    connect_s = max(v.connect_s for v in hold)
    await asyncio.sleep(SETTLE_S)
    after = benchlib.rss_bytes(pid)
    cpu = benchlib.cpu_seconds(pid) - cpu_before
    for viewer in hold:
        viewer.kill()
    await asyncio.sleep(2)
    return [
        system,
        "on" if compression else "off",
        viewers,
        before / 2**20,
        after / 2**20,
        (after - before) / viewers / 1024,
        connect_s,
        cpu,
    ]


async def main(args: argparse.Namespace) -> None:
    work = benchlib.Workdir()
    rows: list[list[Any]] = []
    try:
        _, redis_url = benchlib.start_redis(work)
        env = {"COSTREAM_MAX_VIEWERS": "5000"}
        starters = {
            "costream-redis": lambda: ("costream (redis)", *benchlib.start_costream(work, redis_url, env)),
            "costream-memory": lambda: ("costream (memory)", *benchlib.start_costream(work, None, env)),
            "reference": lambda: ("reference", *benchlib.start_reference(work, redis_url)),
        }  # fmt: skip
        for compression in [
            c for c in (True, False) if args.deflate in ("both", "on" if c else "off")
        ]:
            # Fresh processes for each setting: freed memory stays in a process's RSS.
            systems = [starters[name]() for name in args.systems]
            for system, child, url in systems:
                rows.append(await measure(work, child.pid, url, system, args.viewers, compression))
                print(f"  done: {system}, deflate {compression}", flush=True)
                child.stop()
    finally:
        work.close()
    print()
    print(
        table(
            "(f) RSS of one server process before and after idle viewers join",
            ["system", "deflate", "viewers", "RSS before MiB", "RSS after MiB", "KiB per viewer", "joins took s", "server CPU s for the joins"],
            rows,
        )
    )  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--viewers", type=int, default=1000)
    parser.add_argument("--deflate", choices=("both", "on", "off"), default="both")
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=("costream-redis", "costream-memory", "reference"),
        default=["costream-redis", "costream-memory", "reference"],
    )
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
