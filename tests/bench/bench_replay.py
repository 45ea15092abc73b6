"""Late-joiner replay (e): time to replay a 10 000-event log to a viewer that joins late.

One ``costream serve`` (memory broker, then Redis broker) with its LLM at ``sse_llm.py``
and merging off, so one run of ``chunks-9994`` fills the log with exactly 10 000 events
(RUN_STARTED, STEP_STARTED, TEXT_MESSAGE_START, 9 994 deltas, TEXT_MESSAGE_END,
STEP_FINISHED, RUN_FINISHED). Then a late joiner (websockets' asyncio client) connects,
sends ``hello`` with ``lastSeq`` 0 and reads until the frame with ``seq`` 10 000: the time
from opening the connection to that frame, and from ``hello`` to ``welcome``. Repeated
``--repeat`` times, with permessage-deflate offered (as browsers do) and refused.

Run: ``.venv/bin/python tests/bench/bench_replay.py`` (under a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from typing import Any

import benchlib
from benchlib import table
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

EVENTS = 10_000
CHUNKS = EVENTS - 6  # the run's own events around the deltas


async def late_join(
    ws_url: str, conversation_id: str, token: str, compression: bool
) -> dict[str, float]:
    started = time.perf_counter()
    async with connect(
        ws_url,
        subprotocols=[Subprotocol("costream.v1")],
        compression="deflate" if compression else None,
        max_size=2**20,
        max_queue=None,
    ) as ws:
        opened = time.perf_counter()
        hello = {"type": "hello", "conversationId": conversation_id, "token": token, "lastSeq": 0}
        await ws.send(json.dumps(hello))
        welcome = json.loads(await ws.recv())
        welcomed = time.perf_counter()
        assert welcome["type"] == "welcome" and welcome["mode"] == "replay", welcome
        head = int(welcome["head"])
        frames, last = 0, 0
        while last < head:
            text = await asyncio.wait_for(ws.recv(), 30)
            assert isinstance(text, str)
            if text.startswith('{"seq":'):
                seq = int(text[7 : text.index(",", 7)])
                if seq != last + 1:
                    raise AssertionError(f"seq {seq} after {last}")
                last, frames = seq, frames + 1
        done = time.perf_counter()
    return {
        "totalMs": (done - started) * 1e3,
        "openMs": (opened - started) * 1e3,
        "welcomeMs": (welcomed - opened) * 1e3,
        "replayMs": (done - welcomed) * 1e3,
        "frames": frames,
        "head": head,
    }


def fill_log(url: str) -> tuple[str, str]:
    created = benchlib.http_json("POST", f"{url}/api/conversations", {})
    benchlib.http_json(
        "POST",
        f"{url}/api/conversations/{created['id']}/messages",
        {"content": "fill the log"},
        created["writeToken"],
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = benchlib.http_json(
            "GET", f"{url}/api/conversations/{created['id']}", token=created["viewToken"]
        )
        if state["status"] == "idle" and state["head"] > 0:
            if state["head"] != EVENTS:
                raise RuntimeError(f"log head is {state['head']}, expected {EVENTS}")
            return created["id"], created["viewToken"]
        time.sleep(0.2)
    raise RuntimeError("the run did not end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    work = benchlib.Workdir()
    rows: list[list[Any]] = []
    try:
        port = benchlib.free_port()
        llm = work.spawn(
            "sse-llm",
            [benchlib.PYTHON, str(benchlib.BENCH_DIR / "sse_llm.py"), "--port", str(port)],
        )
        benchlib.wait_until(lambda: "LISTENING" in llm.log_text(), 10, "sse_llm", llm)
        _, redis_url = benchlib.start_redis(work)
        env = {
            "LLM_MODEL": f"openai/chunks-{CHUNKS}",
            "LLM_API_KEY": "bench",
            "LLM_BASE_URL": f"http://127.0.0.1:{port}/v1",
            "COSTREAM_FLUSH_MS": "0",
        }
        for broker, url_of_redis in (("memory", None), ("redis", redis_url)):
            server, url = benchlib.start_costream(work, url_of_redis, env)
            conversation_id, token = fill_log(url)
            ws_url = url.replace("http://", "ws://") + f"/ws/conversations/{conversation_id}"
            for compression in (True, False):
                samples = [
                    asyncio.run(late_join(ws_url, conversation_id, token, compression))
                    for _ in range(args.repeat)
                ]
                totals = sorted(s["totalMs"] for s in samples)
                rows.append(
                    [
                        broker,
                        "on" if compression else "off",
                        samples[0]["frames"],
                        statistics.median(totals),
                        totals[0],
                        totals[-1],
                        statistics.median(s["welcomeMs"] for s in samples),
                        statistics.median(s["replayMs"] for s in samples),
                    ]
                )
            server.stop()
    finally:
        work.close()
    print(
        table(
            f"(e) late joiner, replay of a {EVENTS:,}-event log (ms, {args.repeat} joins each)",
            ["broker", "deflate", "frames", "median", "min", "max", "hello->welcome median", "welcome->last median"],
            rows,
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
