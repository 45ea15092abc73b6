"""The OpenHands SDK's streaming example, run with the real SDK, published with TokenPublisher.

``tests/support/openhands_story.py`` is the example of ``../shared/seed`` (both prompts)
with the publisher in ``token_callbacks`` and ``callbacks``. It runs with the python of
``.venv-openhands`` (openhands-sdk and openhands-tools at the versions
``scripts/openhands-venv`` pins; every openhands-sdk release needs Python >= 3.12), in a
workspace directory, against a real ``costream serve`` and the tests' OpenAI-compatible
server, scripted so that OpenHands creates the story file with its file editor and
deletes it with its terminal. Three ``costream watch`` processes and one
``watch --json`` watch the conversation.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.llm_server import (
    LLMServer,
    Reply,
    content,
    error,
    finish,
    reasoning,
    stream,
    tool_call,
    usage,
)
from tests.support.redis import RedisServer
from tests.support.servers import ServerProcess
from tests.support.ws import ahttp, create_conversation

ROOT = Path(__file__).resolve().parent.parent
MODEL = "openai/gpt-4o-mini"
API_KEY = "sk-test-0a1b2c3d4e5f60718293a4b5c6d7e8f9"
STORY_PROMPT = (
    "Tell me a long story about LLM streaming, write it a file, "
    "make sure it has multiple paragraphs. "
)
CLEANUP_PROMPT = (
    "Thank you. Please delete the streaming story file now that I've read it, "
    "then confirm the deletion."
)
STORY = (
    "Mira watched the first token arrive — a single «Once» — and smiled.\n\n"
    "Behind it came the rest, word by word, naïve spinners forgotten, 流 after 流.\n\n"
    "By the third paragraph every viewer saw the same sentence at the same moment."
)
STREAMED = ("THINKING", "CONTENT", "TOOL NAME", "TOOL ARGS")
_LABEL = re.compile(
    r"^(THINKING|CONTENT|TOOL NAME|TOOL ARGS|TOOL RESULT(?: \(error\))?): |^── ", re.M
)

StartServer = Callable[..., ServerProcess]


@pytest.fixture(scope="session")
def openhands_python() -> str:
    """The python of ``.venv-openhands``, built by ``scripts/openhands-venv`` if needed;
    the test is skipped only where no Python >= 3.12 exists."""
    built = subprocess.run(
        [str(ROOT / "scripts" / "openhands-venv")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if built.returncode == 3:
        pytest.skip(f"the OpenHands SDK needs Python >= 3.12: {built.stderr.strip()}")
    if built.returncode != 0:
        said = [line for line in built.stderr.splitlines() if "is ignored" not in line]
        pytest.fail(
            f"scripts/openhands-venv failed ({built.returncode}):\n" + "\n".join(said[-40:])
        )
    return str(ROOT / built.stdout.strip().splitlines()[-1])


class Watch:
    """A ``costream watch`` subprocess whose stdout is collected."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "costream.cli", "watch", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            env={**os.environ, "NO_COLOR": "1"},
        )
        self.text = ""
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.text += line
                self._changed.notify_all()

    def wait_until(self, done: Callable[[str], bool], timeout: float = 60.0) -> str:
        """What it printed, once ``done`` holds for it (fails with the output otherwise)."""
        with self._changed:
            ok = self._changed.wait_for(lambda: done(self.text), timeout)
        assert ok, f"watch printed:\n{self.text}"
        return self.text

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def watches() -> Iterator[list[Watch]]:
    started: list[Watch] = []
    yield started
    for watch in started:
        watch.stop()


def segments(text: str) -> list[tuple[str, str]]:
    """(label, text) of a token callback's or a watcher's output, in order; a run
    boundary (``──`` line) is a segment of its own."""
    marks = list(_LABEL.finditer(text))
    out = []
    for mark, following in zip(marks, [*marks[1:], None], strict=True):
        body = text[mark.end() : following.start() if following else len(text)]
        label = mark.group(1) or "──"
        out.append((label, body.split("\n", 1)[0] if label == "──" else body.rstrip("\n")))
    return out


def tool_args(arguments: dict[str, Any], pieces: int = 3) -> list[dict[str, Any]]:
    """A tool call's arguments as fragments, as a model streams them."""
    text = json.dumps(arguments, ensure_ascii=False)
    size = len(text) // pieces + 1
    return [tool_call(0, arguments=text[i : i + size]) for i in range(0, len(text), size)]


def scripted_story(workspace: Path) -> list[Reply]:
    """Both prompts: think, say, create the story with the file editor, confirm; then
    view a file that is not there (a tool error), delete the story with the terminal,
    confirm."""
    create = {
        "command": "create",
        "path": str(workspace / "story.md"),
        "file_text": STORY,
        "summary": "write the story",
        "security_risk": "LOW",
    }
    look = {"command": "view", "path": str(workspace / "stories.md"), "security_risk": "LOW"}
    delete = {"command": "rm story.md", "summary": "delete the story", "security_risk": "LOW"}
    return [
        stream(
            reasoning("The user wants a long story "),
            reasoning("in a file, in several paragraphs."),
            content("I'll write the story to "),
            content("story.md — three paragraphs."),
            tool_call(0, id="call_create", name="file_editor"),
            *tool_args(create),
            finish("tool_calls"),
            usage(1500, 220),
        ),
        stream(
            content("The story is in story.md:\n\n"),
            content("three paragraphs about streaming, «token» by token."),
            finish("stop"),
            usage(1800, 30),
        ),
        stream(
            reasoning("Which file was it? "),
            tool_call(0, id="call_view", name="file_editor"),
            *tool_args(look, 2),
            finish("tool_calls"),
            usage(1850, 30),
        ),
        stream(
            reasoning("Not that one: delete story.md with rm, then confirm."),
            tool_call(0, id="call_delete", name="terminal"),
            *tool_args(delete, 2),
            finish("tool_calls"),
            usage(1900, 40),
        ),
        stream(content("Deleted story.md; it is gone."), finish("stop"), usage(2000, 12)),
    ]


def run_example(
    python: str, workspace: Path, llm_server: LLMServer, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run the example to its end; (the process, what on_token printed)."""
    on_token = workspace.parent / "on_token.txt"
    done = subprocess.run(
        # -P: the script's folder holds a redis.py of its own, which must not shadow redis.
        [python, "-P", str(ROOT / "tests" / "support" / "openhands_story.py")],
        cwd=workspace,
        env={
            "PATH": os.environ["PATH"],
            "HOME": str(workspace.parent),
            "LLM_API_KEY": API_KEY,
            "LLM_MODEL": MODEL,
            "LLM_BASE_URL": llm_server.base_url,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "OPENHANDS_SUPPRESS_BANNER": "1",
            "ON_TOKEN_FILE": str(on_token),
            **env,
        },
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done, on_token.read_text(encoding="utf-8")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("transport", ["http", "redis"])
async def test_the_openhands_example_reaches_every_watcher_with_tool_results_usage_and_cost(
    transport: str,
    openhands_python: str,
    llm_server: LLMServer,
    start_server: StartServer,
    tmp_path: Path,
    watches: list[Watch],
    request: pytest.FixtureRequest,
) -> None:
    """With the publisher in OpenHands' two callback lists, every watcher sees both runs
    as on_token printed them, a TOOL RESULT for each tool OpenHands ran (a failed one
    marked an error), and each run's
    usage and cost as OpenHands' metrics counted them; the file is created, then deleted;
    the conversation shows the published model and starts no run of its own."""
    redis: RedisServer | None = (
        request.getfixturevalue("redis_server") if transport == "redis" else None
    )
    server = start_server(redis_url=redis.url if redis else None)
    conversation = await create_conversation(server.url)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    llm_server.enqueue(*scripted_story(workspace))
    watches += [Watch(conversation["viewUrl"]) for _ in range(3)]
    json_watch = Watch("--json", conversation["viewUrl"])
    watches.append(json_watch)
    env = (
        {"COSTREAM_REDIS_URL": redis.url, "COSTREAM_CONVERSATION_ID": conversation["id"]}
        if redis
        else {"COSTREAM_WRITE_LINK": conversation["writeUrl"]}
    )

    done, printed = await asyncio.to_thread(
        run_example, openhands_python, workspace, llm_server, env
    )

    metrics = [
        json.loads(line.split(" ", 1)[1])
        for line in done.stdout.splitlines()
        if line.startswith("COSTREAM_METRICS ")
    ]
    assert "COSTREAM_PUBLISHER errors=0 dropped=0" in done.stdout, done.stderr[-3000:]
    assert not (workspace / "story.md").exists() and llm_server.pending() == 0
    frames = [
        json.loads(line)
        for line in json_watch.wait_until(lambda t: t.count('"RUN_FINISHED"') == 2).splitlines()
    ]
    ends = [f for f in frames if f["type"] in ("RUN_FINISHED", "RUN_ERROR")]
    assert [f["type"] for f in ends] == ["RUN_FINISHED", "RUN_FINISHED"]
    assert [f["input"]["messages"][0]["content"] for f in frames if f["type"] == "RUN_STARTED"] == [
        STORY_PROMPT,
        CLEANUP_PROMPT,
    ]
    for end, counted in zip(ends, metrics, strict=True):
        assert (end["usage"][0]["inputTokens"], end["usage"][0]["outputTokens"]) == (
            counted["input"],
            counted["output"],
        )
        assert end["metadata"]["costUsd"] == pytest.approx(counted["cost"], rel=1e-9)
        assert counted["cost"] > 0
    results = {f["toolCallId"]: f for f in frames if f["type"] == "TOOL_CALL_RESULT"}
    assert list(results) == ["call_create", "call_view", "call_delete"]
    assert "created" in results["call_create"]["content"].lower()
    assert [r["metadata"]["isError"] for r in results.values()] == [False, True, False]

    expected = [s for s in segments(printed) if s[0] in STREAMED]
    assert ("TOOL NAME", "file_editor") in expected and ("TOOL NAME", "terminal") in expected
    for watch in watches[:3]:
        shown = segments(watch.wait_until(lambda t: t.count("── run finished") == 2))
        assert [s for s in shown if s[0] in STREAMED] == expected
        assert [label for label, _ in shown if label.startswith("TOOL RESULT")] == [
            "TOOL RESULT",
            "TOOL RESULT (error)",
            "TOOL RESULT",
        ]

    status, state = await ahttp(
        "GET",
        f"{server.url}/api/conversations/{conversation['id']}",
        token=conversation["viewToken"],
    )
    assert status == 200 and state["model"] == ends[-1]["usage"][0]["model"] != "costream/demo"
    status, refused = await ahttp(
        "POST",
        f"{server.url}/api/conversations/{conversation['id']}/messages",
        body={"content": "start a demo run"},
        token=conversation["writeToken"],
    )
    assert (status, refused["error"]["code"]) == (409, "external_producer")


@pytest.mark.timeout(900)
async def test_an_llm_failure_that_stops_openhands_ends_the_run_in_run_error(
    openhands_python: str,
    llm_server: LLMServer,
    start_server: StartServer,
    tmp_path: Path,
    watches: list[Watch],
) -> None:
    """When the LLM refuses the key, OpenHands' run() raises; the published run ends in
    RUN_ERROR naming the error's kind, never its text or the key."""
    server = start_server()
    conversation = await create_conversation(server.url)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    llm_server.enqueue(error(401))
    json_watch = Watch("--json", conversation["viewUrl"])
    watches.append(json_watch)

    with pytest.raises(AssertionError, match="LLMAuthenticationError"):
        await asyncio.to_thread(
            run_example,
            openhands_python,
            workspace,
            llm_server,
            {"COSTREAM_WRITE_LINK": conversation["writeUrl"]},
        )

    frames = [
        json.loads(line)
        for line in json_watch.wait_until(lambda t: '"RUN_ERROR"' in t).splitlines()
    ]
    assert [f["type"] for f in frames] == ["RUN_STARTED", "RUN_ERROR"]
    assert frames[0]["input"]["messages"][0]["content"] == STORY_PROMPT
    assert frames[1]["message"] == "the agent failed (LLMAuthenticationError)"
