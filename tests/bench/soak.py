"""Soak: 100 honest viewers of a live demo run, beside one hostile client of each kind.

Two phases on fresh servers with the same settings (memory broker, the demo model at
``--delay-ms`` per token, a steady stream: the writer sends its next message as soon as a
run ends): a baseline with the honest clients only, then the same with the hostile
clients running in a process of their own for ``--duration`` seconds:

- a ping flooder that never reads (WebSocket, view token, reading paused);
- oversized frames (past the 1 MiB frame limit, after hello);
- half-open HTTP requests (100 sockets holding part of a request's headers);
- a creation flood (``POST /api/conversations`` back to back);
- a message flood (``POST .../messages`` back to back, on a conversation of its own);
- bad frames after hello;
- deep JSON before hello (100 000 open brackets);
- SSE openers past the viewer cap (``COSTREAM_MAX_VIEWERS`` streams held, more asked).

Prints the server's RSS (start, max, end; goal: end within 20 % of start), the honest
viewers' loss, gaps, duplicates and p99 latency (an event's ``timestamp``, stamped as the
server appends it, to its arrival; same clock), and the ratio of the hostile phase's p99
to the baseline's (goal <= 1.5), and what each hostile client got.

Run: ``.venv/bin/python tests/bench/soak.py [--duration 300] [--viewers 100]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import benchlib
import httpx
from benchlib import percentile, table
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from costream.protocol import SUBPROTOCOL

MAX_VIEWERS = 200  # per conversation: the SSE opener fills its own conversation to it
HALF_OPEN = 100
STORY = "Tell me a long story about a lighthouse keeper, in many short sentences."


def hello(conversation_id: str, token: str, last_seq: int = 0, epoch: str | None = None) -> str:
    frame = {"type": "hello", "conversationId": conversation_id, "token": token}
    return json.dumps(frame | {"lastSeq": last_seq, "epoch": epoch})


# ---- honest clients ------------------------------------------------------------------------


@dataclass
class Viewer:
    last_seq: int = 0
    epoch: str | None = None
    gaps: int = 0
    duplicates: int = 0
    resumes: int = 0
    closes: Counter[int | None] = field(default_factory=Counter)


@dataclass
class Honest:
    ws_url: str
    conversation_id: str
    view_token: str
    write_token: str
    latencies: list[float] = field(default_factory=list)
    measuring: bool = False
    runs: int = 0

    async def view(self, viewer: Viewer, ready: asyncio.Event) -> None:
        """Follow the conversation, resuming after any close, as PROTOCOL.md's clients do."""
        while True:
            try:
                async with connect(
                    self.ws_url, subprotocols=[SUBPROTOCOL], max_size=None, open_timeout=30
                ) as ws:
                    await ws.send(
                        hello(self.conversation_id, self.view_token, viewer.last_seq, viewer.epoch)
                    )
                    async for text in ws:
                        assert isinstance(text, str)
                        if text.startswith('{"seq":'):
                            self._logged(viewer, json.loads(text))
                        elif '"type":"welcome"' in text:
                            viewer.epoch = json.loads(text)["epoch"]
                            ready.set()
            except (ConnectionClosed, OSError, InvalidStatus, TimeoutError) as error:
                code = getattr(getattr(error, "rcvd", None), "code", None)
                viewer.closes[code] += 1
                viewer.resumes += 1
                await asyncio.sleep(0.1)

    def _logged(self, viewer: Viewer, frame: dict[str, Any]) -> None:
        seq = frame["seq"]
        if seq <= viewer.last_seq:
            viewer.duplicates += 1
            return
        if seq != viewer.last_seq + 1:
            viewer.gaps += 1
        viewer.last_seq = seq
        if self.measuring:
            self.latencies.append(time.time() * 1000 - frame["timestamp"])

    async def write(self) -> None:
        """Send a message whenever no run is under way: a steady stream."""
        async with connect(self.ws_url, subprotocols=[SUBPROTOCOL], max_size=None) as ws:
            await ws.send(hello(self.conversation_id, self.write_token))
            await ws.send(json.dumps({"type": "message", "content": STORY}))
            async for text in ws:
                assert isinstance(text, str)
                if '"type":"RUN_FINISHED"' in text or '"type":"RUN_ERROR"' in text:
                    self.runs += 1
                    await ws.send(json.dumps({"type": "message", "content": STORY}))
                elif '"type":"error"' in text:  # rate_limited or run_active: try again soon
                    await asyncio.sleep(0.5)
                    await ws.send(json.dumps({"type": "message", "content": STORY}))


# ---- hostile clients (their own process: --hostile) --------------------------------------


class Tally:
    def __init__(self) -> None:
        self.by_kind: dict[str, Counter[str]] = {}

    def add(self, kind: str, what: object) -> None:
        self.by_kind.setdefault(kind, Counter())[str(what)] += 1


async def _closed_with(ws: ClientConnection, timeout: float = 30) -> int | None:
    try:
        async with asyncio.timeout(timeout):
            async for _ in ws:
                pass
    except ConnectionClosed:
        pass
    except TimeoutError:
        return -1
    return ws.close_code


async def ws_kind(url: str, tally: Tally, kind: str, first: list[str | bytes]) -> None:
    """Connect, send ``first``, and count the close code; again and again."""
    while True:
        try:
            async with connect(url, subprotocols=[SUBPROTOCOL], max_size=None) as ws:
                for frame in first:
                    await ws.send(frame)
                tally.add(kind, await _closed_with(ws))
        except (ConnectionClosed, OSError, InvalidStatus) as error:
            tally.add(kind, type(error).__name__)
            await asyncio.sleep(0.05)


async def ping_flooder(url: str, conversation_id: str, token: str, tally: Tally) -> None:
    """Pings without reading a byte of the answers, until the server lets go."""
    while True:
        try:
            async with connect(url, subprotocols=[SUBPROTOCOL]) as ws:
                await ws.send(hello(conversation_id, token))
                ws.transport.pause_reading()
                async with asyncio.timeout(60):
                    while True:
                        await ws.send('{"type":"ping"}')
                        await asyncio.sleep(0)  # send returns at once until buffers fill
            tally.add("ping flooder", "ended")
        except TimeoutError:
            tally.add("ping flooder", "still open after 60 s")
        except (ConnectionClosed, OSError, InvalidStatus) as error:
            tally.add("ping flooder", type(error).__name__)
        await asyncio.sleep(0.05)


async def half_open(host: str, port: int, tally: Tally) -> None:
    async def one() -> None:
        while True:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            answer = await reader.read(64)
            tally.add("half-open HTTP", answer.split(b"\r\n", 1)[0].decode() or "closed")
            writer.close()

    await asyncio.gather(*(one() for _ in range(HALF_OPEN)))


async def http_flood(
    client: httpx.AsyncClient, kind: str, path: str, tally: Tally, **kw: Any
) -> None:
    while True:
        try:
            answer = await client.post(path, **kw)
            tally.add(kind, answer.status_code)
        except httpx.HTTPError as error:
            tally.add(kind, type(error).__name__)
            await asyncio.sleep(0.05)


async def sse_opener(base: str, conversation_id: str, token: str, tally: Tally) -> None:
    """Holds MAX_VIEWERS event streams of one conversation and keeps asking for more."""
    host, port = base.removeprefix("http://").split(":")
    request = (
        f"GET /api/conversations/{conversation_id}/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Accept: text/event-stream\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()

    async def one() -> None:
        while True:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(request)
            status = (await reader.readline()).decode().strip()
            tally.add("SSE past the cap", status or "closed")
            if " 200 " in status:
                await reader.read()  # held open (read, so it is no slow consumer) until closed
            writer.close()
            await asyncio.sleep(0.2)

    await asyncio.gather(*(one() for _ in range(MAX_VIEWERS + 20)))


KINDS = (
    "ping flooder",
    "oversized frames",
    "half-open HTTP",
    "creation flood",
    "message flood",
    "bad frame after hello",
    "deep JSON before hello",
    "SSE past the cap",
)


async def hostile(
    base: str, conversation_id: str, view_token: str, duration: float, kinds: list[str]
) -> None:
    ws_base = base.replace("http://", "ws://")
    url = f"{ws_base}/ws/conversations/{conversation_id}"
    host, port = base.removeprefix("http://").split(":")
    tally = Tally()
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        own = (await client.post("/api/conversations", json={})).json()
        sse = (await client.post("/api/conversations", json={})).json()
        auth = {"Authorization": f"Bearer {own['writeToken']}"}
        greeting = hello(conversation_id, view_token)
        clients = {
            "ping flooder": lambda: ping_flooder(url, conversation_id, view_token, tally),
            "oversized frames": lambda: ws_kind(
                url, tally, "oversized frames", [greeting, "x" * (1024 * 1024 + 1024)]
            ),
            "half-open HTTP": lambda: half_open(host, int(port), tally),
            "creation flood": lambda: http_flood(
                client, "creation flood", "/api/conversations", tally, json={}
            ),
            "message flood": lambda: http_flood(
                client,
                "message flood",
                f"/api/conversations/{own['id']}/messages",
                tally,
                json={"content": "flood"},
                headers=auth,
            ),
            "bad frame after hello": lambda: ws_kind(
                url, tally, "bad frame after hello", [greeting, "{not json"]
            ),
            "deep JSON before hello": lambda: ws_kind(
                url, tally, "deep JSON before hello", ["[" * 100_000]
            ),
            "SSE past the cap": lambda: sse_opener(base, sse["id"], sse["viewToken"], tally),
        }
        assert set(clients) == set(KINDS)
        tasks = [clients[kind]() for kind in kinds]
        running = [asyncio.ensure_future(task) for task in tasks]
        await asyncio.sleep(duration)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    print("RESULT " + json.dumps({kind: dict(c) for kind, c in tally.by_kind.items()}), flush=True)


# ---- one phase -------------------------------------------------------------------------------


async def phase(args: argparse.Namespace, kinds: list[str]) -> dict[str, Any]:
    work = benchlib.Workdir()
    env = {
        "COSTREAM_DEMO_DELAY_MS": str(args.delay_ms),
        "COSTREAM_MAX_VIEWERS": str(MAX_VIEWERS),
        # A public deployment's limits (start_costream lifts them for the benchmarks).
        "COSTREAM_MAX_RUNS": "20",
        "COSTREAM_CREATE_RATE": "60",
        "COSTREAM_MESSAGE_RATE": "120",
    }
    try:
        server, base = benchlib.start_costream(work, None, env)
        created = benchlib.http_json("POST", f"{base}/api/conversations", {})
        ws_url = base.replace("http://", "ws://") + f"/ws/conversations/{created['id']}"
        honest = Honest(ws_url, created["id"], created["viewToken"], created["writeToken"])
        viewers = [Viewer() for _ in range(args.viewers)]
        ready = [asyncio.Event() for _ in viewers]
        tasks = [
            asyncio.ensure_future(honest.view(v, r)) for v, r in zip(viewers, ready, strict=True)
        ]
        await asyncio.gather(*(r.wait() for r in ready))
        tasks.append(asyncio.ensure_future(honest.write()))
        async with asyncio.timeout(60):
            while honest.runs < 1:  # warm: LiteLLM loaded, one whole run streamed
                await asyncio.sleep(0.1)
        rss = [benchlib.rss_bytes(server.pid)]
        child = None
        if kinds:
            # On a small box the hostile clients' own CPU competes with the honest viewers'
            # process (not the server's doing): --hostile-nice lowers their priority.
            nice = ["nice", "-n", str(args.hostile_nice)] if args.hostile_nice else []
            child = work.spawn(
                "hostile",
                [
                    *nice,
                    benchlib.PYTHON,
                    __file__,
                    "--hostile",
                    base,
                    created["id"],
                    created["viewToken"],
                    str(args.duration),
                    ",".join(kinds),
                ],
            )
        pids = {"server": server.pid, "honest clients": os.getpid()}
        if child is not None:
            pids["hostile clients"] = child.pid
        cpu = benchlib.CpuMeter(pids)
        cpu.start()
        honest.measuring = True
        started = time.monotonic()
        while time.monotonic() - started < args.duration:
            await asyncio.sleep(1.0)
            rss.append(benchlib.rss_bytes(server.pid))
        honest.measuring = False
        cpu.stop()
        tasks[-1].cancel()  # the writer: the run under way ends by itself
        head = await _settled_head(base, created["id"], created["viewToken"], viewers)
        hostile_result: dict[str, Any] = {}
        if child is not None:
            benchlib.wait_until(lambda: "RESULT " in child.log_text(), 60, "hostile results")
            line = child.log_text().split("RESULT ", 1)[1].splitlines()[0]
            hostile_result = json.loads(line)
        await asyncio.sleep(2.0)  # hostile connections closing: the memory they leave
        rss.append(benchlib.rss_bytes(server.pid))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        log = server.log_text()
        return {
            "rss": rss,
            "latencies": sorted(honest.latencies),
            "runs": honest.runs,
            "loss": sum(head - v.last_seq for v in viewers),
            "gaps": sum(v.gaps for v in viewers),
            "duplicates": sum(v.duplicates for v in viewers),
            "resumes": sum(v.resumes for v in viewers),
            "closes": sum((v.closes for v in viewers), Counter()),
            "hostile": hostile_result,
            "tracebacks": log.count("Traceback"),
            "tracebacks seen": _tracebacks(log),
            "cpu": {name: round(cpu.share(name), 2) for name in pids},
        }
    finally:
        work.close()


async def _settled_head(base: str, conversation_id: str, token: str, viewers: list[Viewer]) -> int:
    """The log's head once no run is under way and every viewer reached it (or 30 s)."""
    deadline = time.monotonic() + 30
    head = 0
    while time.monotonic() < deadline:
        got = await asyncio.to_thread(
            benchlib.http_json, "GET", f"{base}/api/conversations/{conversation_id}", None, token
        )
        head = int(got["head"])
        if got["status"] == "idle" and all(v.last_seq >= head for v in viewers):
            break
        await asyncio.sleep(0.2)
    return head


def _tracebacks(log: str) -> Counter[str]:
    """Each distinct traceback of ``log``: its last three frames and its exception line."""
    seen: Counter[str] = Counter()
    for block in log.split("Traceback (most recent call last):\n")[1:]:
        lines = block.splitlines()
        end = next((i for i, line in enumerate(lines) if not line.startswith(" ")), len(lines))
        frames = [line for line in lines[:end] if line.startswith("  File")]
        seen["\n".join([*frames[-3:], *lines[end : end + 1]])] += 1
    return seen


def report(args: argparse.Namespace, baseline: dict[str, Any], hostile: dict[str, Any]) -> None:
    mib = 1024 * 1024
    rows = []
    for name, result in (("baseline", baseline), ("hostile", hostile)):
        lat = result["latencies"]
        rss = result["rss"]
        rows.append(
            [
                name,
                result["runs"],
                len(lat),
                result["loss"],
                result["gaps"],
                result["duplicates"],
                result["resumes"],
                round(percentile(lat, 0.5), 1),
                round(percentile(lat, 0.99), 1),
                round(rss[0] / mib, 1),
                round(max(rss) / mib, 1),
                round(rss[-1] / mib, 1),
                result["tracebacks"],
            ]
        )
    print(
        table(
            f"Soak: {args.viewers} honest viewers, {args.duration:g} s per phase, "
            f"demo at {args.delay_ms:g} ms per token",
            [
                "phase",
                "runs",
                "events seen",
                "loss",
                "gaps",
                "dups",
                "resumes",
                "p50 ms",
                "p99 ms",
                "RSS start MiB",
                "max",
                "end",
                "tracebacks",
            ],
            rows,
        )
    )
    base_p99 = percentile(baseline["latencies"], 0.99)
    hostile_p99 = percentile(hostile["latencies"], 0.99)
    rss = hostile["rss"]
    print(f"p99 hostile / baseline: {hostile_p99 / base_p99:.2f} (goal <= 1.5)")
    print(
        f"RSS end / start (hostile phase): {rss[-1] / rss[0]:.2f} (goal <= 1.2), "
        f"max / start: {max(rss) / rss[0]:.2f}"
    )
    print(f"honest viewers' close codes (hostile phase): {dict(hostile['closes'])}")
    for name, result in (("baseline", baseline), ("hostile", hostile)):
        print(f"CPU, cores used ({name} phase): {result['cpu']}")
        for text, count in result["tracebacks seen"].items():
            print(f"traceback in the server's log ({name} phase), {count} times:\n{text}")
    print("\nwhat the hostile clients got:")
    for kind, counts in hostile["hostile"].items():
        print(f"  {kind}: {counts}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds per phase")
    parser.add_argument("--viewers", type=int, default=100)
    parser.add_argument("--delay-ms", type=float, default=5.0, help="demo model per token")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help="the hostile clients, comma-separated"
    )
    parser.add_argument(
        "--each", action="store_true", help="one hostile phase per kind, to find the costly one"
    )
    parser.add_argument(
        "--hostile-nice", type=int, default=0, help="run the hostile clients at this niceness"
    )
    parser.add_argument("--hostile", nargs=5, help=argparse.SUPPRESS)  # the hostile process
    args = parser.parse_args()
    if args.hostile:
        base, conversation_id, token, seconds, kinds = args.hostile
        await hostile(base, conversation_id, token, float(seconds), kinds.split(","))
        return
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; the kinds: {', '.join(KINDS)}")
    baseline = await phase(args, [])
    if not args.each:
        report(args, baseline, await phase(args, kinds))
        return
    base_p99 = percentile(baseline["latencies"], 0.99)
    rows = []
    for kind in kinds:
        result = await phase(args, [kind])
        p99 = percentile(result["latencies"], 0.99)
        rss = result["rss"]
        rows.append(
            [
                kind,
                round(p99, 1),
                round(p99 / base_p99, 2),
                result["loss"] + result["gaps"],
                round(rss[-1] / rss[0], 2),
                result["cpu"].get("server", 0.0),
                result["tracebacks"],
            ]
        )
    print(
        table(
            f"One hostile kind at a time (baseline p99 {base_p99:.1f} ms)",
            ["kind", "p99 ms", "ratio", "loss+gaps", "RSS end/start", "server cores", "tracebacks"],
            rows,
        )
    )


if __name__ == "__main__":
    sys.setrecursionlimit(10_000)
    asyncio.run(main())
