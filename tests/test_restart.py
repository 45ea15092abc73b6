"""The embedded default keeps every conversation across a restart of ``costream serve``.

A real server with default settings but a temporary data directory, the README's two
demo prompts, three raw WebSocket viewers; the server is stopped (SIGTERM, or SIGKILL)
while the second run streams, then started again on the same directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from tests.support.servers import ServerProcess
from tests.support.ws import Session, ahttp, create_conversation, open_session

STORY_PROMPT = (
    "Tell me a long story about LLM streaming, write it to a file, "
    "make sure it has multiple paragraphs."
)
DELETE_PROMPT = (
    "Thank you. Please delete the streaming story file now that I've read it, "
    "then confirm the deletion."
)
WAIT_S = 90.0  # a bound against hanging, never a measure of speed


@dataclass
class Viewer:
    """A raw viewer that keeps every logged frame it was sent, across its connections."""

    token: str
    frames: list[str] = field(default_factory=list)
    epoch: str | None = None
    welcomes: list[dict[str, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    @property
    def last_seq(self) -> int:
        return int(json.loads(self.frames[-1])["seq"]) if self.frames else 0

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(frame) for frame in self.frames]

    async def connect(self, server: ServerProcess, conversation_id: str) -> None:
        session = await open_session(
            server.ws_url(conversation_id),
            conversation_id,
            self.token,
            last_seq=self.last_seq,
            epoch=self.epoch,
        )
        self.welcomes.append(session.welcome)
        self.epoch = session.welcome["epoch"]
        self.task = asyncio.create_task(self._read(session))

    async def _read(self, session: Session) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                frame = await session.next(timeout=WAIT_S)
                if frame.get("seq") is not None:
                    self.frames.append(session.frames[-1])

    async def disconnected(self) -> None:
        assert self.task is not None
        async with asyncio.timeout(WAIT_S):
            await self.task

    async def until(self, condition: Callable[[list[dict[str, Any]]], bool]) -> None:
        async with asyncio.timeout(WAIT_S):
            while not condition(self.events()):
                await asyncio.sleep(0.01)


def run_events(events: list[dict[str, Any]], run_id: str) -> list[dict[str, Any]]:
    """A run's events, from its RUN_STARTED to its end (or to what came so far)."""
    starts = [
        i for i, e in enumerate(events) if e["type"] == "RUN_STARTED" and e["runId"] == run_id
    ]
    if not starts:
        return []
    run: list[dict[str, Any]] = []
    for event in events[starts[0] :]:
        run.append(event)
        if event["type"] in ("RUN_FINISHED", "RUN_ERROR"):
            break
    return run


def run_ended(run_id: str) -> Callable[[list[dict[str, Any]]], bool]:
    def condition(events: list[dict[str, Any]]) -> bool:
        run = run_events(events, run_id)
        return bool(run) and run[-1]["type"] in ("RUN_FINISHED", "RUN_ERROR")

    return condition


def streaming(run_id: str) -> Callable[[list[dict[str, Any]]], bool]:
    """The run has started and streamed some content."""
    return lambda events: any(e["type"].endswith("_CONTENT") for e in run_events(events, run_id))


async def state_of(server: ServerProcess, conversation_id: str, token: str) -> dict[str, Any]:
    base = f"{server.url}/api/conversations/{conversation_id}"
    status, info = await ahttp("GET", base, token=token)
    assert status == 200, info
    status, files = await ahttp("GET", f"{base}/files", token=token)
    assert status == 200, files
    return {"info": info, "files": files}


async def send(server: ServerProcess, conversation_id: str, token: str, text: str) -> str:
    url = f"{server.url}/api/conversations/{conversation_id}/messages"
    status, answer = await ahttp("POST", url, body={"content": text}, token=token)
    assert status == 202, answer
    return str(answer["runId"])


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
async def test_viewers_resume_after_a_restart_with_files_totals_and_the_interrupted_run_ended(
    start_server: Callable[..., ServerProcess], tmp_path: Path, signal_name: str
) -> None:
    """Stopped mid-run and started again, the server has the conversation, its files and
    totals; each viewer resumes from its lastSeq with no gap, no duplicate and no
    snapshot; the run that was streaming ends with RUN_ERROR producer_lost."""
    env = {
        "COSTREAM_DATA_DIR": str(tmp_path / "data"),
        "COSTREAM_DEMO_DELAY_MS": "10",  # slow enough to stop the second run mid-stream
        "COSTREAM_SHUTDOWN_GRACE_S": "0",
    }
    server = start_server(env=env)
    created = await create_conversation(server.url, title="survives restarts")
    conversation_id, write_token = created["id"], created["writeToken"]
    viewers = [Viewer(created["viewToken"]), Viewer(created["viewToken"]), Viewer(write_token)]
    for viewer in viewers[:2]:
        await viewer.connect(server, conversation_id)

    story_run = await send(server, conversation_id, write_token, STORY_PROMPT)
    await viewers[0].until(run_ended(story_run))
    await viewers[2].connect(server, conversation_id)  # a late joiner
    before = await state_of(server, conversation_id, write_token)
    assert [f["path"] for f in before["files"]] == ["story.txt"]
    assert before["info"]["usage"]["outputTokens"] > 0

    delete_run = await send(server, conversation_id, write_token, DELETE_PROMPT)
    for viewer in viewers:
        await viewer.until(streaming(delete_run))
    if signal_name == "SIGKILL":
        server.kill()
    else:
        server.stop()
    for viewer in viewers:
        await viewer.disconnected()
    seen_before_restart = [viewer.last_seq for viewer in viewers]

    server.start()
    for viewer in viewers:
        await viewer.connect(server, conversation_id)
    for viewer in viewers:
        await viewer.until(run_ended(delete_run))

    log = Viewer(created["viewToken"])  # the whole log, read from the start after restart
    await log.connect(server, conversation_id)
    await log.until(run_ended(delete_run))
    for viewer, seen in zip(viewers, seen_before_restart, strict=True):
        assert [w["mode"] for w in viewer.welcomes] == ["replay", "replay"]
        assert viewer.welcomes[1]["epoch"] == viewer.welcomes[0]["epoch"]
        # No gap, no duplicate: the frames received over both connections are the log.
        assert viewer.frames == log.frames[: len(viewer.frames)]
        assert [e["seq"] for e in viewer.events()] == list(range(1, len(viewer.frames) + 1))
        assert viewer.last_seq > seen
    ending = run_events(log.events(), delete_run)[-1]
    assert (ending["type"], ending["code"]) == ("RUN_ERROR", "producer_lost")

    after = await state_of(server, conversation_id, write_token)
    assert after["files"] == before["files"]  # the delete never ran
    # The totals are the story's plus what the interrupted run's steps counted (a run ended
    # by the shutting-down server counts its cut step; a reaped one counts nothing).
    steps = [
        e["metadata"] for e in run_events(log.events(), delete_run) if e["type"] == "STEP_FINISHED"
    ]
    for kind in ("inputTokens", "outputTokens", "reasoningTokens"):
        counted = sum(step.get("usage", {}).get(kind, 0) for step in steps)
        assert after["info"]["usage"][kind] == before["info"]["usage"][kind] + counted
    cost = sum(step.get("costUsd", 0.0) for step in steps)
    assert after["info"]["totalCostUsd"] == pytest.approx(before["info"]["totalCostUsd"] + cost)
    assert (after["info"]["status"], after["info"]["epoch"]) == ("idle", before["info"]["epoch"])
    # The conversation goes on: a new run streams on the same log.
    next_run = await send(server, conversation_id, write_token, STORY_PROMPT)
    await viewers[0].until(run_ended(next_run))
    assert viewers[0].events()[-1]["type"] == "RUN_FINISHED"
