"""Nothing lost, nothing doubled: a publisher rides out its server's outages.

Real parts: ``costream serve`` processes that the tests kill (SIGKILL), hang (SIGSTOP,
SIGCONT) and start again on the same port and data directory; a ``costream.client``
viewer that reconnects through it all; the events API for the log. Each test checks what
viewers got (every seq once, in order; the text; the runs and their ends) and that the
publisher's counters say the same.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from costream import protocol
from costream.client import Conversation, parse_link
from costream.client.terminal import TerminalRenderer
from costream.publisher import TokenPublisher
from tests.support.proxy import Relay
from tests.support.redis import RedisServer
from tests.support.servers import ServerProcess
from tests.support.ws import ahttp, assert_well_formed, create_conversation

StartServer = Callable[..., ServerProcess]
WAIT_S = 60.0  # a bound against hanging, never a measure of speed
BOUNDARIES = ("RUN_STARTED", "RUN_FINISHED", "RUN_ERROR")
# Tries the outage lasts at least (about 1.5 s), past the 3 retries publishers gave up after.
OUTLASTING = 5


# ---- what viewers get ------------------------------------------------------------------


class Viewer:
    """A ``costream.client`` subscription keeping every logged frame, in the background;
    it reconnects by itself when its server goes away."""

    def __init__(self, ws_url: str, token: str) -> None:
        self.conversation = Conversation(parse_link(ws_url, token), backoff_cap=0.5)
        self.frames: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Viewer:
        await self.conversation.open()
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.conversation.aclose()

    async def _collect(self) -> None:
        while True:
            _, text = await self.conversation.next_with_text()
            if text.startswith('{"seq":'):
                self.frames.append(json.loads(text))

    async def until_seq(self, seq: int) -> list[dict[str, Any]]:
        """The frames once the viewer has seq ``seq``."""
        await until(lambda: bool(self.frames) and self.frames[-1]["seq"] >= seq)
        return self.frames


async def until(condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
    """Wait until ``condition()`` holds (checked every 20 ms)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def log_of(base_url: str, conversation: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation's log, from the events API."""
    status, log = await ahttp(
        "GET",
        f"{base_url}/api/conversations/{conversation['id']}/events?limit=10000",
        token=conversation["viewToken"],
    )
    assert status == 200, log
    return list(log)


def runs_of(log: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The log cut into runs, each from its RUN_STARTED."""
    runs: list[list[dict[str, Any]]] = []
    for event in log:
        if event["type"] == "RUN_STARTED":
            runs.append([])
        runs[-1].append(event)
    return runs


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT")


def gaps_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The values of the CUSTOM stream_gap events."""
    return [e["value"] for e in events if e["type"] == "CUSTOM" and e["name"] == "stream_gap"]


def published_by_producer(log: list[dict[str, Any]]) -> int:
    """The events of the log the publisher stored: all but the runs' boundaries (the
    server makes them) and what the server's reaper added to a run it ended
    ``producer_lost`` (appended with that RUN_ERROR, so stamped within a few milliseconds
    of it; the producer's last event came at least a process restart or a lease expiry
    before, which a 300 ms margin did not always cover: a restarted embedded server ends
    the run it left open as it starts)."""
    count = 0
    for run in runs_of(log):
        end = run[-1]
        body = run[1:-1] if end["type"] in BOUNDARIES[1:] else run[1:]
        if end["type"] == "RUN_ERROR" and end["code"] == "producer_lost":
            body = [e for e in body if e["timestamp"] < end["timestamp"] - 50]
        count += len(body)
    return count


def assert_counters_match(publisher: TokenPublisher, log: list[dict[str, Any]]) -> None:
    """What the publisher says it stored is what the log holds (an unconfirmed batch is
    stored whole or not at all)."""
    made = published_by_producer(log)
    assert made in (publisher.delivered, publisher.delivered + publisher.unconfirmed), (
        made,
        publisher.delivered,
        publisher.unconfirmed,
    )


def pieces(first: int, count: int) -> list[str]:
    return [f"p{i:03d} " for i in range(first, first + count)]


def publish(publisher: TokenPublisher, texts: list[str]) -> None:
    for piece in texts:
        publisher(piece)


def http_publisher(
    server: ServerProcess, conversation: dict[str, Any], **options: Any
) -> TokenPublisher:
    return TokenPublisher(
        url=f"{server.url}/c/{conversation['id']}", token=conversation["writeToken"], **options
    )


# ---- the outages of issue 10 -----------------------------------------------------------


async def test_a_run_started_while_the_server_is_down_is_published_once_it_is_back(
    start_server: StartServer,
) -> None:
    """The server is down when the run starts and back mid-run: viewers get the whole
    run, late, once, with nothing missing (no stream_gap); the counters say so."""
    server = start_server()
    conversation = await create_conversation(server.url)
    server.kill()
    publisher = http_publisher(server, conversation)
    publisher.start_run("hello")
    publish(publisher, pieces(0, 30))
    await until(lambda: publisher.retried >= OUTLASTING)
    await asyncio.to_thread(server.start)
    async with Viewer(server.ws_url(conversation["id"]), conversation["viewToken"]) as viewer:
        publish(publisher, pieces(30, 30))
        publisher.finish_run()
        await publisher.aclose(timeout=WAIT_S)
        log = await log_of(server.url, conversation)
        seen = await viewer.until_seq(log[-1]["seq"])

    assert seen == log
    assert_well_formed(log)
    assert [e["type"] for e in log if e["type"] in BOUNDARIES] == ["RUN_STARTED", "RUN_FINISHED"]
    assert log[0]["input"]["messages"][-1]["content"] == "hello"
    assert text_of(log) == "".join(pieces(0, 60)) and gaps_of(log) == []
    assert (publisher.errors, publisher.dropped, publisher.unconfirmed) == (0, 0, 0)
    assert_counters_match(publisher, log)


async def test_a_run_cut_by_a_server_kill_goes_on_in_a_new_run_and_the_next_run_is_not_lost(
    start_server: StartServer,
) -> None:
    """SIGKILL mid-run, the server back on the same port and data: the cut run ends
    producer_lost, the rest of it goes on in a new run for the same message that starts
    with stream_gap (nothing lost, resuming the cut run), and the next run is published."""
    server = start_server()
    conversation = await create_conversation(server.url)
    publisher = http_publisher(server, conversation)
    async with Viewer(server.ws_url(conversation["id"]), conversation["viewToken"]) as viewer:
        publisher.start_run("first")
        publish(publisher, pieces(0, 20))
        assert await publisher.aflush(WAIT_S)
        cut_run = publisher.run_id
        server.kill()
        publish(publisher, pieces(20, 20))
        await until(lambda: publisher.retried >= OUTLASTING)
        await asyncio.to_thread(server.start)
        publish(publisher, pieces(40, 20))
        publisher.finish_run()
        publisher.start_run("second")
        publish(publisher, pieces(100, 10))
        publisher.finish_run()
        await publisher.aclose(timeout=WAIT_S)
        log = await log_of(server.url, conversation)
        seen = await viewer.until_seq(log[-1]["seq"])

    assert seen == log
    assert_well_formed(log)
    cut, resumed, second = runs_of(log)
    assert (cut[-1]["type"], cut[-1]["code"]) == ("RUN_ERROR", "producer_lost")
    assert [m["content"] for m in resumed[0]["input"]["messages"]] == ["first"]
    assert gaps_of(resumed) == [{"lost": 0, "unconfirmed": 0, "resumes": cut_run}]
    assert resumed[1]["type"] == "CUSTOM"  # first thing after RUN_STARTED
    assert resumed[-1]["type"] == second[-1]["type"] == "RUN_FINISHED"
    assert text_of(cut + resumed) == "".join(pieces(0, 60))
    assert text_of(second) == "".join(pieces(100, 10))
    assert (publisher.errors, publisher.dropped, publisher.unconfirmed) == (0, 0, 0)
    assert_counters_match(publisher, log)


async def test_close_against_a_hung_server_returns_in_time_and_counts_what_it_gave_up(
    start_server: StartServer,
) -> None:
    """SIGSTOP mid-run: close(timeout=1) returns within that bound and counts what never
    arrived; once the server goes on it reaps the run, and the log holds exactly what
    the counters say."""
    server = start_server(env={"COSTREAM_LEASE_TTL_MS": "1500"})
    conversation = await create_conversation(server.url)
    publisher = http_publisher(server, conversation)
    # The viewer also makes the server follow the conversation, which its reaper sweeps.
    async with Viewer(server.ws_url(conversation["id"]), conversation["viewToken"]) as viewer:
        publisher.start_run("hello")
        publish(publisher, pieces(0, 20))
        assert await publisher.aflush(WAIT_S)
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            publish(publisher, pieces(20, 20))
            publisher.finish_run()
            began = time.monotonic()
            await publisher.aclose(timeout=1.0)
            took = time.monotonic() - began
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert took < 1.5
        assert publisher.errors >= 1 and publisher.dropped + publisher.unconfirmed > 0
        await until(lambda: bool(viewer.frames) and viewer.frames[-1]["type"] == "RUN_ERROR")
        log = await log_of(server.url, conversation)
        seen = await viewer.until_seq(log[-1]["seq"])

    assert seen == log
    assert log[-1]["code"] == "producer_lost"
    assert_well_formed(log)
    assert text_of(log) in ("".join(pieces(0, 20)), "".join(pieces(0, 40)))
    assert_counters_match(publisher, log)


async def test_an_exception_in_the_with_block_ends_the_open_run_with_run_error(
    start_server: StartServer,
) -> None:
    """``with TokenPublisher(...) as publisher:`` around an agent that raises: the open
    run ends RUN_ERROR naming the exception's type, before the with block is left."""
    server = start_server()
    conversation = await create_conversation(server.url)
    try:
        with http_publisher(server, conversation) as publisher:
            publisher.start_run("hello")
            publisher("partial answer")
            raise RuntimeError("the agent broke")
    except RuntimeError:
        pass
    log = await log_of(server.url, conversation)

    assert_well_formed(log)
    assert (log[-1]["type"], log[-1]["code"]) == ("RUN_ERROR", "internal")
    assert log[-1]["message"] == "the agent failed (RuntimeError)"
    assert text_of(log) == "partial answer"


async def test_a_program_that_dies_of_an_exception_ends_its_run_with_run_error(
    start_server: StartServer,
) -> None:
    """Without close(), a program killed by an uncaught exception still gets its open
    run ended, RUN_ERROR, by the publisher's exit hook (no race with the exit)."""
    server = start_server()
    conversation = await create_conversation(server.url)
    program = (
        "import sys; from costream.publisher import TokenPublisher; "
        "p = TokenPublisher(url=sys.argv[1]); p.start_run('hi'); "
        "[p(f'word {i} ') for i in range(50)]; raise SystemError('boom')"
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", program, conversation["writeUrl"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "SystemError" in done.stderr
    log = await log_of(server.url, conversation)

    assert_well_formed(log)
    assert (log[-1]["type"], log[-1]["message"]) == ("RUN_ERROR", "the agent failed (SystemError)")
    assert text_of(log) == "".join(f"word {i} " for i in range(50))


async def test_a_late_run_whose_buffer_overflowed_says_how_many_events_it_lost(
    start_server: StartServer,
) -> None:
    """The server is down at the start and the buffer (8 events) overflows: once the
    server is back the run starts with stream_gap counting exactly the events shed, the
    rest is published well formed, and nothing is doubled."""
    server = start_server()
    conversation = await create_conversation(server.url)
    server.kill()
    publisher = http_publisher(server, conversation, max_pending_events=8)
    publisher.start_run("hello")
    await until(lambda: publisher.retried >= 1)
    for piece in pieces(0, 12):
        publisher(piece)
        publisher.step()  # a step per piece: five events each
    await asyncio.to_thread(server.start)
    publish(publisher, pieces(12, 3))
    publisher.finish_run()
    await publisher.aclose(timeout=WAIT_S)
    log = await log_of(server.url, conversation)

    assert_well_formed(log)
    gaps = gaps_of(log)
    assert publisher.dropped > 0 and sum(gap["lost"] for gap in gaps) == publisher.dropped
    assert log[1]["type"] == "CUSTOM" and log[-1]["type"] == "RUN_FINISHED"
    seen = text_of(log).split()
    assert seen == sorted(set(seen)) and seen[-3:] == ["p012", "p013", "p014"]
    assert (publisher.errors, publisher.unconfirmed) == (0, 0)
    assert_counters_match(publisher, log)


async def test_a_publisher_whose_head_went_stale_reads_it_again_instead_of_failing(
    start_server: StartServer,
) -> None:
    """Something else appended to the run (four notes: the head moved, and not by the
    length of the publisher's next batch, which the server would take for a retry of
    it): the next batch gets 409
    head_mismatch, and the publisher reads the head again and stores it there, once,
    instead of failing for the rest of the run."""
    server = start_server()
    conversation = await create_conversation(server.url)
    publisher = http_publisher(server, conversation)
    publisher.start_run("hello")
    publish(publisher, pieces(0, 5))
    assert await publisher.aflush(WAIT_S)
    status, _ = await ahttp(
        "POST",
        f"{server.url}/api/conversations/{conversation['id']}/runs/{publisher.run_id}/events",
        body=[{"type": "CUSTOM", "name": "note", "value": {"n": n}} for n in range(4)],
        token=conversation["writeToken"],
    )
    assert status == 202
    publish(publisher, pieces(5, 5))
    publisher.finish_run()
    await publisher.aclose(timeout=WAIT_S)
    log = await log_of(server.url, conversation)

    assert_well_formed(log)
    assert [e["type"] for e in log if e["type"] in BOUNDARIES] == ["RUN_STARTED", "RUN_FINISHED"]
    assert text_of(log) == "".join(pieces(0, 10))
    assert (publisher.errors, publisher.dropped, publisher.unconfirmed) == (0, 0, 0)
    assert published_by_producer(log) == publisher.delivered + 4  # the notes are not its own


async def test_a_redis_publisher_whose_head_went_stale_reads_it_again_instead_of_failing(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """The same through Redis: four events appended under the run's own lease move the
    head; the publisher's next batch meets the broker's conflict, reads the head again
    and is stored there, once."""
    from costream.broker import RunLease
    from costream.broker.redis.broker import RedisBroker

    server = start_server(redis_url=redis_server.url)
    conversation = await create_conversation(server.url)
    publisher = TokenPublisher(redis_url=redis_server.url, conversation_id=conversation["id"])
    publisher.start_run("hello")
    publish(publisher, pieces(0, 5))
    assert await publisher.aflush(WAIT_S)
    broker = RedisBroker(redis_server.url)
    try:
        active = await broker.active_run(conversation["id"])
        assert active is not None
        lease = RunLease(conversation["id"], active.run_id, active.fence)
        notes = [protocol.encode(protocol.Custom(name="note", value={"n": n})) for n in range(4)]
        await broker.append(lease, notes)
    finally:
        await broker.close()
    publish(publisher, pieces(5, 5))
    publisher.finish_run()
    await publisher.aclose(timeout=WAIT_S)
    log = await log_of(server.url, conversation)

    assert_well_formed(log)
    assert [e["type"] for e in log if e["type"] in BOUNDARIES] == ["RUN_STARTED", "RUN_FINISHED"]
    assert text_of(log) == "".join(pieces(0, 10))
    assert (publisher.errors, publisher.dropped, publisher.unconfirmed) == (0, 0, 0)
    assert published_by_producer(log) == publisher.delivered + 4  # the notes are not its own


def test_the_terminal_viewer_prints_a_stream_gap_as_a_rule_line() -> None:
    """``costream watch`` shows where a published run is missing events, and that a run
    continues an interrupted one."""
    out = io.StringIO()
    renderer = TerminalRenderer(out)
    gap = {"lost": 3, "unconfirmed": 2, "resumes": "r1"}
    renderer.render(protocol.Custom(name="stream_gap", value=gap))
    renderer.render(protocol.Custom(name="stream_gap", value={"lost": 0, "resumes": "r2"}))

    assert out.getvalue().splitlines() == [
        "── stream gap: continues the interrupted run, 3 events missing here, 2 more may be missing",
        "── stream gap: continues the interrupted run",
    ]


async def test_a_redis_publisher_whose_lease_ran_out_in_a_redis_hang_goes_on_in_a_new_run(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """Redis hung (SIGSTOP) past the run's lease: when it answers again the run is over
    (producer_lost); the batch under way is looked for in the log, and the rest of the
    run goes on in a new run that starts with stream_gap, each event once."""
    server = start_server(redis_url=redis_server.url)
    conversation = await create_conversation(server.url)
    publisher = TokenPublisher(
        redis_url=redis_server.url, conversation_id=conversation["id"], lease_ttl_ms=1000
    )
    async with Viewer(server.ws_url(conversation["id"]), conversation["viewToken"]) as viewer:
        publisher.start_run("hello")
        publish(publisher, pieces(0, 20))
        assert await publisher.aflush(WAIT_S)
        cut_run = publisher.run_id
        assert redis_server.process is not None
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        try:
            publish(publisher, pieces(20, 20))
            await until(lambda: publisher.retried >= 1)  # a command timed out (5 s > 1 s)
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
        publish(publisher, pieces(40, 20))
        publisher.finish_run()
        await publisher.aclose(timeout=WAIT_S)
        log = await log_of(server.url, conversation)
        seen = await viewer.until_seq(log[-1]["seq"])

    assert seen == log
    assert_well_formed(log)
    cut, resumed = runs_of(log)
    assert (cut[-1]["type"], cut[-1]["code"]) == ("RUN_ERROR", "producer_lost")
    assert gaps_of(resumed) == [{"lost": 0, "unconfirmed": 0, "resumes": cut_run}]
    assert resumed[-1]["type"] == "RUN_FINISHED"
    assert text_of(log) == "".join(pieces(0, 60))
    assert (publisher.errors, publisher.dropped, publisher.unconfirmed) == (0, 0, 0)
    assert_counters_match(publisher, log)


def test_after_a_gap_only_what_fits_the_run_is_sent_and_a_step_left_open_is_ended() -> None:
    """The events after a gap are checked with the segment grammar: those whose segment
    start was lost are not sent (and counted), a step whose STEP_FINISHED was lost ends
    with finishReason error before the next starts, and a run that resumes an interrupted
    one opens again, under the same ids, what was open."""
    from costream.client.publisher.continuity import Continuity
    from costream.protocol import (
        StepFinished,
        StepFinishedMeta,
        StepStarted,
        StepStartedMeta,
        TextMessageContent,
        TextMessageEnd,
        TextMessageStart,
    )

    def step(name: str) -> StepStarted:
        return StepStarted(step_name=name, metadata=StepStartedMeta(model="m"))

    def kinds(events: list[protocol.Event]) -> list[tuple[str, str]]:
        return [
            (type(e).__name__, str(getattr(e, "step_name", None) or getattr(e, "message_id", "")))
            for e in events
        ]

    continuity = Continuity()
    before: list[protocol.Event] = [
        step("s1"),
        TextMessageStart(message_id="a"),
        TextMessageContent(message_id="a", delta="x"),
    ]
    assert continuity.admit(list(before)) == before
    # Lost: a's end, s1's STEP_FINISHED, STEP_STARTED s2, b's start.
    after: list[protocol.Event] = [
        TextMessageContent(message_id="b", delta="y"),
        TextMessageEnd(message_id="b"),
        StepFinished(step_name="s2", metadata=StepFinishedMeta(finish_reason="stop")),
        step("s3"),
        TextMessageStart(message_id="c"),
    ]
    sent = continuity.admit(after)

    assert kinds(sent) == [("StepFinished", "s1"), ("StepStarted", "s3"), ("TextMessageStart", "c")]
    assert isinstance(sent[0], StepFinished) and sent[0].metadata.finish_reason == "error"
    assert continuity.dropped == 3
    assert kinds(continuity.reopen()) == [
        ("StepStarted", "s3"),
        ("TextMessageStart", "a"),
        ("TextMessageStart", "c"),
    ]


class Partition(Relay):
    """Forwards to the server until ``cut()``: then every connection through it is
    closed and new ones are closed at once, until ``heal()``; the server sees nothing."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__()
        self.upstream_port = upstream_port
        self.is_cut = False
        self._writers: list[asyncio.StreamWriter] = []

    def cut(self) -> None:
        self.is_cut = True
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    def heal(self) -> None:
        self.is_cut = False

    async def _accept(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        if self.is_cut:
            client_out.close()
            return
        server_in, server_out = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [client_out, server_out]
        self._relay(client_in, server_out)
        self._relay(server_in, client_out)


async def test_a_run_reaped_before_its_finish_got_through_is_ended_in_a_new_run(
    start_server: StartServer,
) -> None:
    """The network between publisher and server is cut just as the run ends, for longer
    than the lease: the server reaps the run (producer_lost); once the finish gets
    through (409) the publisher ends the run in a new one for the same message (its
    RUN_FINISHED, usage and history recorded), which starts with stream_gap."""
    server = start_server(env={"COSTREAM_LEASE_TTL_MS": "1500"})
    conversation = await create_conversation(server.url)
    async with (
        Partition(server.port) as partition,
        Viewer(server.ws_url(conversation["id"]), conversation["viewToken"]) as viewer,
    ):
        publisher = TokenPublisher(
            url=f"http://127.0.0.1:{partition.port}/c/{conversation['id']}",
            token=conversation["writeToken"],
            timeout_s=0.5,
            retry_cap_s=0.3,
        )
        publisher.start_run("hello")
        publish(publisher, pieces(0, 20))
        publisher.step()
        assert await publisher.aflush(WAIT_S)
        cut_run = publisher.run_id
        partition.cut()
        publisher.finish_run()
        await until(lambda: any(f["type"] == "RUN_ERROR" for f in viewer.frames))
        assert publisher.retried >= 1
        partition.heal()
        await publisher.aclose(timeout=WAIT_S)
        log = await log_of(server.url, conversation)
        seen = await viewer.until_seq(log[-1]["seq"])

    assert seen == log
    assert_well_formed(log)
    cut, resumed = runs_of(log)
    assert (cut[-1]["type"], cut[-1]["code"]) == ("RUN_ERROR", "producer_lost")
    assert [e["type"] for e in resumed] == ["RUN_STARTED", "CUSTOM", "RUN_FINISHED"]
    assert gaps_of(resumed) == [{"lost": 0, "unconfirmed": 0, "resumes": cut_run}]
    assert text_of(cut) == "".join(pieces(0, 20))
    assert (publisher.errors, publisher.dropped, publisher.unconfirmed) == (0, 0, 0)
    assert_counters_match(publisher, log)


async def test_a_redis_publisher_splits_a_delta_longer_than_one_event(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """The Redis transport appends without the server's ingest, so it splits a merged
    delta too long for one event itself: every frame within 256 KiB, the text whole."""
    server = start_server(redis_url=redis_server.url)
    conversation = await create_conversation(server.url)
    publisher = TokenPublisher(redis_url=redis_server.url, conversation_id=conversation["id"])
    publisher.start_run("hello")
    big = "0123456789abcdef\n" * 40_000  # 680 000 characters, more as JSON
    publish(publisher, [big])
    publisher.finish_run()
    await publisher.aclose(timeout=WAIT_S)
    log = await log_of(server.url, conversation)

    assert_well_formed(log)
    assert text_of(log) == big
    contents = [e for e in log if e["type"] == "TEXT_MESSAGE_CONTENT"]
    assert len(contents) >= 3
    assert all(len(json.dumps(e, separators=(",", ":"))) <= 256 * 1024 for e in log)
