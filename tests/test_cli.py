"""The ``costream`` commands and the terminal renderer behind ``watch``."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from costream import protocol
from costream.client.terminal import TerminalRenderer
from costream.protocol import (
    Custom,
    FunctionCall,
    MessagesSnapshot,
    ReasoningMessageContent,
    RunAgentInput,
    RunError,
    RunFinished,
    RunFinishedMeta,
    RunOutcome,
    RunStarted,
    SnapshotMessage,
    StepFinished,
    StepFinishedMeta,
    StepStarted,
    StepStartedMeta,
    TextMessageContent,
    TextMessageEnd,
    TextMessageStart,
    TokenUsage,
    ToolCall,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallResult,
    ToolCallStart,
    ToolResultMeta,
    UserMessage,
)
from tests.support.servers import ServerProcess
from tests.support.ws import http

STORY_PROMPT = (
    "Tell me a long story about LLM streaming, write it to a file, "
    "make sure it has multiple paragraphs."
)


def recorded_run() -> list[protocol.Event]:
    """A run with reasoning, text, a retried step, two tool calls with results, usage."""
    run = RunStarted(
        thread_id="c1",
        run_id="r1",
        input=RunAgentInput(
            thread_id="c1",
            run_id="r1",
            messages=[UserMessage(id="u1", content="Write two\nfiles please")],
        ),
    )
    events: list[protocol.Event] = [
        run,
        StepStarted(step_name="llm-1", metadata=StepStartedMeta(model="demo")),
        protocol.ReasoningStart(message_id="m1"),
        protocol.ReasoningMessageStart(message_id="m1"),
        ReasoningMessageContent(message_id="m1", delta="I should "),
        ReasoningMessageContent(message_id="m1", delta="write files."),
        protocol.ReasoningMessageEnd(message_id="m1"),
        protocol.ReasoningEnd(message_id="m1"),
        TextMessageStart(message_id="m2"),
        TextMessageContent(message_id="m2", delta="Writing th"),
        TextMessageEnd(message_id="m2"),
        StepFinished(step_name="llm-1", metadata=StepFinishedMeta(finish_reason="retry")),
        Custom(name="step_retry", value={"attempt": 2, "reason": "upstream hiccup"}),
        StepStarted(step_name="llm-1", metadata=StepStartedMeta(model="demo", attempt=2)),
        TextMessageStart(message_id="m3"),
        TextMessageContent(message_id="m3", delta="Writing them "),
        TextMessageContent(message_id="m3", delta="now."),
        TextMessageEnd(message_id="m3"),
        ToolCallStart(tool_call_id="t1", tool_call_name="write_file", parent_message_id="a1"),
        ToolCallArgs(tool_call_id="t1", delta='{"path": "a.txt", '),
        ToolCallArgs(tool_call_id="t1", delta='"content": "A"}'),
        ToolCallStart(tool_call_id="t2", tool_call_name="write_file", parent_message_id="a1"),
        ToolCallArgs(tool_call_id="t2", delta='{"path": "b.txt", "content": "B"}'),
        ToolCallEnd(tool_call_id="t1"),
        ToolCallEnd(tool_call_id="t2"),
        StepFinished(step_name="llm-1", metadata=StepFinishedMeta(finish_reason="tool_calls")),
        ToolCallResult(message_id="x1", tool_call_id="t1", content="Wrote a.txt (1 bytes)."),
        ToolCallResult(
            message_id="x2",
            tool_call_id="t2",
            content="disk full",
            metadata=ToolResultMeta(is_error=True),
        ),
        StepStarted(step_name="llm-2", metadata=StepStartedMeta(model="demo")),
        TextMessageStart(message_id="m4"),
        TextMessageContent(message_id="m4", delta="Done."),
        TextMessageEnd(message_id="m4"),
        StepFinished(step_name="llm-2", metadata=StepFinishedMeta(finish_reason="stop")),
        RunFinished(
            thread_id="c1",
            run_id="r1",
            outcome=RunOutcome(type="success"),
            usage=[TokenUsage(model="demo", input_tokens=1234, output_tokens=567)],
            metadata=RunFinishedMeta(cost_usd=0.0012, total_cost_usd=0.0034),
        ),
    ]
    for seq, event in enumerate(events, start=1):
        event.seq = seq
    return events


EXPECTED_RUN = """\
── run started: Write two files please
THINKING: I should write files.
CONTENT: Writing th
── retry, attempt 2: upstream hiccup (the output above is abandoned)
CONTENT: Writing them now.
TOOL NAME: write_file
TOOL ARGS: {"path": "a.txt", "content": "A"}
TOOL NAME: write_file
TOOL ARGS: {"path": "b.txt", "content": "B"}
TOOL RESULT: Wrote a.txt (1 bytes).
TOOL RESULT (error): disk full
CONTENT: Done.
── run finished: 1,234 in / 567 out tokens, $0.0012 (conversation total $0.0034)
"""


def render(events: list[Any], *, color: bool = False) -> str:
    out = io.StringIO()
    renderer = TerminalRenderer(out, color=color)
    for event in events:
        renderer.render(event)
    renderer.finish()
    return out.getvalue()


def test_watch_prints_a_recorded_run_in_the_token_callback_format() -> None:
    """Labels, boundaries, the retry mark and the usage line come out exactly as specified."""
    assert render(recorded_run()) == EXPECTED_RUN


def test_second_run_is_separated_and_failures_show_message_and_code() -> None:
    """A failed run prints its code and message; runs are separated by a blank line."""
    events = recorded_run()
    second = RunStarted(
        thread_id="c1",
        run_id="r2",
        input=RunAgentInput(
            thread_id="c1", run_id="r2", messages=[UserMessage(id="u2", content="again")]
        ),
    )
    failure = RunError(message="the provider said no", code="rate_limited")
    text = render([*events, second, TextMessageContent(message_id="m9", delta="Hal"), failure])
    assert text == (
        EXPECTED_RUN
        + "\n── run started: again\nCONTENT: Hal\n"
        + "── run failed (rate_limited): the provider said no\n"
    )


def test_snapshot_is_rendered_as_the_conversation_so_far() -> None:
    """A MessagesSnapshot prints each message with the same labels, then marks the live edge."""
    snapshot = MessagesSnapshot(
        seq=40,
        messages=[
            SnapshotMessage(id="u1", role="user", content="hi"),
            SnapshotMessage(id="r1", role="reasoning", content="greet"),
            SnapshotMessage(
                id="a1",
                role="assistant",
                content="Hello",
                tool_calls=[
                    ToolCall(id="t1", function=FunctionCall(name="list_files", arguments="{}"))
                ],
            ),
            SnapshotMessage(id="x1", role="tool", content="[]", tool_call_id="t1"),
        ],
    )
    assert render([snapshot]) == (
        "── conversation so far (snapshot)\n"
        "── user: hi\n"
        "THINKING: greet\n"
        "CONTENT: Hello\n"
        "TOOL NAME: list_files\n"
        "TOOL ARGS: {}\n"
        "TOOL RESULT: []\n"
        "── live from here\n"
    )


def test_colour_mode_wraps_labels_in_ansi_and_plain_mode_has_none() -> None:
    """Colours only when asked for; the text between the escapes is the same."""
    coloured = render(recorded_run(), color=True)
    assert "\x1b[" in coloured
    assert "\x1b[" not in render(recorded_run())
    assert "THINKING: " in coloured and "CONTENT: " in coloured


# ---- commands as subprocesses ---------------------------------------------------------


def costream(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``costream`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "costream.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NO_COLOR": "1", **(env or {})},
        check=False,
    )


class Watcher:
    """A ``costream watch`` (or another command's) subprocess whose stdout and stderr are
    collected line by line."""

    def __init__(
        self, *args: str, command: str = "watch", env: dict[str, str] | None = None
    ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "costream.cli", command, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "NO_COLOR": "1", **(env or {})},
        )
        self.lines: list[str] = []
        self.error_lines: list[str] = []
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(
                target=self._read, args=(self.process.stdout, self.lines), daemon=True
            ),
            threading.Thread(
                target=self._read, args=(self.process.stderr, self.error_lines), daemon=True
            ),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, into: list[str]) -> None:
        for line in stream:
            with self._changed:
                into.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _wait(self, lines: list[str], needle: str, timeout: float) -> None:
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(needle in line for line in lines) or self.process.poll() is not None,
                timeout,
            )
        assert found and any(needle in line for line in lines), self.output() + self.errors()

    def wait_for(self, needle: str, timeout: float = 60.0) -> None:
        """Block until a line of stdout contains ``needle`` (or fail with what was printed)."""
        self._wait(self.lines, needle, timeout)

    def wait_for_error(self, needle: str, timeout: float = 60.0) -> None:
        """Block until a line of stderr contains ``needle``."""
        self._wait(self.error_lines, needle, timeout)

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C; the exit code and stderr."""
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(30)
        for reader in self._readers:
            reader.join(10)
        return code, self.errors()

    def output(self) -> str:
        return "".join(self.lines)

    def errors(self) -> str:
        return "".join(self.error_lines)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    """Watchers started by a test, killed at its end."""
    started: list[Watcher] = []
    yield started
    for watcher in started:
        watcher.kill()


def create(server: ServerProcess) -> dict[str, str]:
    """``costream new`` against ``server``; the links it printed."""
    done = costream("new", "--server", server.url, "--title", "cli test")
    assert done.returncode == 0, done.stderr
    links = [line.strip() for line in done.stdout.splitlines() if line.startswith("  http")]
    conversation_id = done.stdout.split()[1]
    assert links[0].startswith(f"{server.url}/c/{conversation_id}#t=")
    status, info = http("GET", f"{server.url}/api/conversations/{conversation_id}")
    assert status == 401, info  # it exists, and wants a token
    return {"id": conversation_id, "view": links[0], "write": links[1]}


def test_new_then_two_watchers_and_say_print_the_same_stream(
    server: ServerProcess, watchers: list[Watcher]
) -> None:
    """Two ``watch`` processes and ``say`` print one identical run with every label and usage."""
    links = create(server)
    watchers.extend([Watcher(links["view"]), Watcher(links["write"])])
    said = costream("say", links["write"], STORY_PROMPT)
    assert said.returncode == 0, said.stderr
    for watcher in watchers:
        watcher.wait_for("── run finished:")
    first, second = (w.output() for w in watchers)
    assert first == second
    assert said.stdout == first
    for label in ("THINKING: ", "CONTENT: ", "TOOL NAME: write_file", "TOOL ARGS: {"):
        assert f"\n{label}" in first, label
    assert "\nTOOL RESULT: " in first
    assert first.startswith(f"── run started: {STORY_PROMPT}\n")
    assert first.rstrip("\n").splitlines()[-1].startswith("── run finished: ")
    assert " in / " in first and "(conversation total $" in first
    for watcher in watchers:
        code, errors = watcher.interrupt()
        assert code == 0, errors


def test_watch_json_prints_one_logged_frame_per_line(
    server: ServerProcess, watchers: list[Watcher]
) -> None:
    """``--json`` prints the server's frames as they are, one per line, contiguous seqs."""
    links = create(server)
    said = costream("say", links["write"], STORY_PROMPT, "--no-follow")
    assert said.returncode == 0, said.stderr
    assert said.stdout.startswith("run ")
    watcher = Watcher(links["view"], "--json")
    watchers.append(watcher)
    watcher.wait_for('"type":"RUN_FINISHED"')
    frames = [json.loads(line) for line in watcher.lines]
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    assert frames[0]["type"] == "RUN_STARTED"
    status, logged = http(
        "GET",
        f"{server.url}/api/conversations/{links['id']}/events",
        token=links["view"].split("#t=")[1],
    )
    assert status == 200
    assert frames == logged
    code, _ = watcher.interrupt()
    assert code == 0


def test_say_with_a_view_link_fails_clearly_without_printing_the_token(
    server: ServerProcess,
) -> None:
    """A view token cannot send: non-zero exit, a message naming the problem, no token."""
    links = create(server)
    token = links["view"].split("#t=")[1]
    said = costream("say", links["view"], "hello")
    assert said.returncode != 0
    assert "view link" in said.stderr and "forbidden" in said.stderr
    assert token not in said.stderr + said.stdout


def test_watch_with_a_wrong_token_or_unknown_conversation_exits_with_the_reason(
    server: ServerProcess,
) -> None:
    """4401 and 4404 end ``watch`` with a short message and a non-zero exit."""
    links = create(server)
    wrong = costream("watch", links["view"].split("#t=")[0] + "#t=not-the-token")
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == "costream watch: the link's token is wrong or missing (4401)"
    unknown = costream("watch", f"{server.url}/c/nosuchconversation#t=x")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "costream watch: no such conversation (4404)"
    no_token = costream("watch", f"{server.url}/c/{links['id']}")
    assert no_token.returncode == 1 and "no token" in no_token.stderr


def test_a_link_without_a_token_points_to_the_link_not_to_an_option_watch_lacks(
    server: ServerProcess,
) -> None:
    """The hint for a link with no token asks for the link that ends in #t=<token>, and
    offers no way of passing a token that the commands do not have."""
    links = create(server)
    for command in ("watch", "say", "cancel"):
        args = [f"{server.url}/c/{links['id']}"] + (["hi"] if command == "say" else [])
        done = costream(command, *args)
        assert done.returncode == 1
        assert "#t=<token>" in done.stderr, done.stderr
        assert "pass the token" not in done.stderr and "--token" not in done.stderr


def test_version_prints_the_package_version() -> None:
    """``costream --version`` prints the installed package's version."""
    from importlib.metadata import version

    done = costream("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"costream {version('costream')}"


def test_watch_says_where_it_is_and_who_comes_and_goes_on_stderr_only(
    server: ServerProcess, watchers: list[Watcher]
) -> None:
    """On connecting, ``watch`` prints its role, how many watch and the model; then who
    joins and leaves (``--no-presence`` hides it), all on stderr, so the stream on stdout
    stays the same for every watcher."""
    links = create(server)
    ann = Watcher(links["view"], "--name", "Ann")
    watchers.append(ann)
    ann.wait_for_error("costream: connected as viewer · 1 watching · model costream/demo")
    bob = Watcher(links["view"], "--name", "Bob")
    watchers.append(bob)
    bob.wait_for_error("connected as viewer · 2 watching (Ann) · model costream/demo")
    ann.wait_for_error("costream: Bob (viewer) joined · 2 watching")
    quiet = Watcher(links["view"], "--no-presence", env={"COSTREAM_NAME": "Dee"})
    watchers.append(quiet)
    quiet.wait_for_error("connected as viewer · 3 watching (Ann, Bob) · model")
    ann.wait_for_error("costream: Dee (viewer) joined · 3 watching")
    said = costream("say", links["write"], "--name", "Cy", STORY_PROMPT)
    assert said.returncode == 0, said.stderr
    ann.wait_for_error("Cy (writer) left")
    for watcher in watchers:
        watcher.wait_for("── run finished:")
    assert ann.output() == bob.output() == quiet.output() == said.stdout
    code, errors = bob.interrupt()
    assert code == 0, errors
    ann.wait_for_error("costream: Bob (viewer) left · 2 watching")
    code, quiet_errors = quiet.interrupt()
    assert code == 0
    assert quiet_errors.splitlines() == [
        "costream: connected as viewer · 3 watching (Ann, Bob) · model costream/demo"
    ]


def test_cancel_stops_the_run_under_way_and_says_when_nothing_runs(
    start_server: Callable[..., ServerProcess], watchers: list[Watcher]
) -> None:
    """``costream cancel <write link>`` cancels the running run (RUN_FINISHED cancelled
    for every viewer); with nothing running, or a view link, it fails and says why."""
    slow = start_server(env={"COSTREAM_DEMO_DELAY_MS": "50"})
    links = create(slow)
    watcher = Watcher(links["view"], "--json")
    watchers.append(watcher)
    started = costream("say", links["write"], STORY_PROMPT, "--no-follow", "--json")
    assert started.returncode == 0, started.stderr
    run_id = json.loads(started.stdout)["runId"]
    cancelled = costream("cancel", links["write"])
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"cancelled run {run_id}"
    watcher.wait_for('"type":"RUN_FINISHED"')
    finished = json.loads(watcher.lines[-1])
    assert finished["runId"] == run_id and finished["outcome"]["type"] == "cancelled"
    again = costream("cancel", links["write"])
    assert again.returncode == 1
    assert again.stderr.strip() == "costream cancel: nothing is running (no_run)"
    viewer = costream("cancel", links["view"])
    assert viewer.returncode == 1 and "view link" in viewer.stderr


@pytest.mark.parametrize("cancel", [False, True], ids=["run-goes-on", "cancel-on-interrupt"])
def test_ctrl_c_on_say_says_the_run_goes_on_and_how_to_stop_it_or_cancels_it(
    start_server: Callable[..., ServerProcess], watchers: list[Watcher], cancel: bool
) -> None:
    """Ctrl-C on ``say`` stops following (exit 130) and says the run goes on, with the
    commands to watch and cancel it; with ``--cancel-on-interrupt`` it cancels the run."""
    slow = start_server(env={"COSTREAM_DEMO_DELAY_MS": "20"})
    links = create(slow)
    watcher = Watcher(links["view"], "--json")
    watchers.append(watcher)
    flags = ["--cancel-on-interrupt"] if cancel else []
    say = Watcher(links["write"], STORY_PROMPT, *flags, command="say")
    watchers.append(say)
    say.wait_for("THINKING: ")
    code, errors = say.interrupt()
    assert code == 130
    watcher.wait_for('"type":"RUN_FINISHED"')
    outcome = json.loads(watcher.lines[-1])["outcome"]["type"]
    run_id = json.loads(watcher.lines[0])["runId"]
    if cancel:
        assert outcome == "cancelled"
        assert errors.strip() == f"costream say: interrupted; cancelled run {run_id}"
    else:
        assert outcome == "success"
        assert f"run {run_id} goes on on the server" in errors
        assert f"costream cancel '{links['write']}'" in errors
        assert f"costream watch '{links['write']}'" in errors


def test_say_while_a_run_is_active_reports_run_active(
    start_server: Callable[..., ServerProcess],
) -> None:
    """A second message during a run is refused with run_active and a non-zero exit."""
    slow = start_server(env={"COSTREAM_DEMO_DELAY_MS": "50"})  # the story takes many seconds
    links = create(slow)
    first = costream("say", links["write"], STORY_PROMPT, "--no-follow")
    assert first.returncode == 0, first.stderr
    second = costream("say", links["write"], "again", "--no-follow")
    assert second.returncode == 1
    assert second.stderr.strip() == (
        "costream say: a run is already active in this conversation; "
        "wait for it to end (run_active)"
    )


def test_client_modules_do_not_import_litellm() -> None:
    """``costream.client``, its terminal viewer, the publisher and ``costream.cli`` stay
    light: no LiteLLM, no server, no Redis until a Redis transport is made."""
    code = (
        "import sys, costream.client, costream.client.terminal, costream.cli;"
        "import costream.publisher;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('litellm', 'starlette', 'uvicorn', 'redis', 'openhands') "
        "or m.startswith(('costream.server', 'costream.agent'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
