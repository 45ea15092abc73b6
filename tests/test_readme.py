"""The README's client examples run as written, against a real ``costream serve``: the
Python client's, and the plain WebSocket one in Node."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.support.servers import ServerProcess
from tests.support.ws import ahttp, create_conversation, open_session

README = Path(__file__).resolve().parents[1] / "README.md"
WAIT_S = 60.0


def code_block(after: str, language: str) -> str:
    """The first ``language`` code block of the README after the text ``after``."""
    text = README.read_text()
    start = text.index(after)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    assert match is not None, f"no {language} block after {after!r}"
    return match.group(1)


async def story_text(base: str, conv: dict[str, Any]) -> str:
    """The text deltas of the conversation's log, joined."""
    status, events = await ahttp(
        "GET", f"{base}/api/conversations/{conv['id']}/events", token=conv["viewToken"]
    )
    assert status == 200
    return "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT")


async def test_the_python_client_example_sends_and_prints_the_answer(server: ServerProcess) -> None:
    """The README's Python example, with a real write link, sends a message and prints
    the viewers and the answer's text as it streams, then stops at the run's end."""
    conv = await create_conversation(server.url)
    example = code_block("In Python, `costream.client`", "python").replace(
        "http://127.0.0.1:8000/c/<id>#t=<token>", conv["writeUrl"]
    )
    namespace: dict[str, Any] = {}
    exec("async def example():\n" + textwrap.indent(example, "    "), namespace)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        async with asyncio.timeout(WAIT_S):
            await namespace["example"]()
    lines = printed.getvalue().splitlines()
    assert lines[0] == "writer costream/demo 1 ['Ada']"
    assert printed.getvalue().endswith(await story_text(server.url, conv))


def node_major() -> int:
    version = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True)
    return int(version.stdout[1:].split(".")[0])


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
async def test_the_websocket_example_runs_in_node(server: ServerProcess) -> None:
    """The README's plain WebSocket example, with a real view link, prints each text
    delta of a run in Node (its built-in WebSocket)."""
    conv = await create_conversation(server.url)
    writer = await open_session(server.ws_url(conv["id"]), conv["id"], conv["writeToken"])
    await writer.send({"type": "message", "content": "hello"})
    await writer.until_run_ends()
    await writer.close()
    expected = await story_text(server.url, conv)
    example = code_block("Any language that speaks WebSocket", "js").replace(
        "http://127.0.0.1:8000/c/<id>#t=<token>", conv["viewUrl"]
    )
    flags = ["--experimental-websocket"] if node_major() < 22 else []
    node = await asyncio.create_subprocess_exec(
        "node", *flags, "--input-type=module", "-e", example, stdout=asyncio.subprocess.PIPE
    )
    assert node.stdout is not None
    printed = ""
    try:
        async with asyncio.timeout(WAIT_S):
            while printed.replace("\n", "") != expected.replace("\n", ""):
                line = await node.stdout.readline()
                assert line, "node ended early"
                printed += line.decode()
    finally:
        node.kill()
        await node.wait()
