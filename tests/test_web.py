"""The web page in headless Chromium against real ``costream serve`` processes.

Every assertion reads what a person sees (the DOM); the page's test hook
(``window.__costream``) is used only to know when the page has caught up, to drop its
socket as a network would, and to feed crafted events to the renderer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.support.browser import (
    WAIT_MS,
    create_conversation,
    head_of,
    page_errors,
    transcript,
    wait_caught_up,
    wait_idle,
)
from tests.support.ws import http

pytestmark = pytest.mark.browser
expect.set_options(timeout=WAIT_MS)

STORY = (
    "Tell me a long story about LLM streaming, write it to a file, make sure it has "
    "multiple paragraphs."
)
THANKS = (
    "Thank you. Please delete the streaming story file now that I've read it, then "
    "confirm the deletion."
)
SLOW = {"COSTREAM_DEMO_DELAY_MS": "5"}
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def events_of(base_url: str, created: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation's whole log, from the HTTP API."""
    status, events = http(
        "GET",
        f"{base_url}/api/conversations/{created['id']}/events?limit=10000",
        token=created["viewToken"],
    )
    assert status == 200, events
    return list(events)


def send(page: Page, text: str) -> None:
    """Type a message in the composer and press Enter, as a person would."""
    composer = page.get_by_test_id("composer-input")
    expect(composer).to_be_enabled()
    composer.fill(text)
    composer.press("Enter")


def segment_texts(events: list[dict[str, Any]], kind: str) -> list[str]:
    """Concatenated deltas per segment of one kind, in log order."""
    content_type = {"reasoning": "REASONING_MESSAGE_CONTENT", "text": "TEXT_MESSAGE_CONTENT"}
    texts: dict[str, str] = {}
    for event in events:
        if event["type"] == content_type[kind]:
            texts[event["messageId"]] = texts.get(event["messageId"], "") + event["delta"]
    return list(texts.values())


def shown(runs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [
        seg
        for run in runs
        for step in run["steps"]
        for seg in step["segments"]
        if seg["kind"] == kind
    ]


def test_start_page_gives_view_and_write_links_and_names_the_demo_model(server, open_page):
    """The start page creates a conversation, shows both links with copy buttons and the model."""
    page = open_page(server.url + "/", wait_live=False)
    page.get_by_test_id("create-button").click()
    expect(page.get_by_test_id("created")).to_be_visible()
    view_link = page.get_by_test_id("view-link").input_value()
    write_link = page.get_by_test_id("write-link").input_value()
    assert "/c/" in view_link and "#t=" in view_link
    assert "/c/" in write_link and "#t=" in write_link and write_link != view_link
    expect(page.get_by_test_id("copy-view-link")).to_be_visible()
    expect(page.get_by_test_id("copy-write-link")).to_be_visible()
    expect(page.get_by_test_id("created-model")).to_contain_text("costream/demo")
    expect(page.get_by_test_id("created-model")).to_contain_text("demo model")

    page.get_by_test_id("open-conversation").click()
    wait_caught_up(page)
    assert page.url == write_link
    expect(page.get_by_test_id("composer-input")).to_be_visible()
    expect(page.get_by_test_id("connection")).to_have_text("live")
    expect(page.get_by_test_id("model")).to_contain_text("demo model")
    assert page_errors(page) == []


def test_writer_and_two_viewers_see_the_same_story_tools_and_cost(start_server, open_page):
    """Three pages, one of which loses its socket mid-run, end with the same two runs."""
    server = start_server(env=SLOW)
    created = create_conversation(server.url)
    writer = open_page(created["writeUrl"])
    viewers = [open_page(created["viewUrl"]) for _ in range(2)]
    pages = [writer, *viewers]
    for page in pages:
        expect(page.get_by_test_id("presence")).to_have_text("3 watching")
    for viewer in viewers:
        expect(viewer.get_by_test_id("composer")).to_be_hidden()
        expect(viewer.get_by_test_id("role")).to_have_text("view only")

    send(writer, STORY)
    expect(writer.get_by_test_id("composer-input")).to_be_disabled()
    expect(writer.get_by_test_id("stop")).to_be_visible()
    dropped = viewers[1]
    dropped.wait_for_function("() => window.__costream.state().lastSeq > 20")
    was_running = dropped.evaluate(
        "() => { const r = window.__costream.model.running;"
        " window.__costream.dropConnection(); return r; }"
    )
    assert was_running, "the socket should drop while the run streams"

    for page in pages:
        wait_idle(page, runs=1, head=head_of(server.url, created))
    expect(writer.get_by_test_id("stop")).to_be_hidden()
    for page in pages:
        expect(page.get_by_test_id("file")).to_have_count(1)
        expect(page.get_by_test_id("file")).to_contain_text("story.txt")

    writer.get_by_test_id("file").click()
    expect(writer.get_by_test_id("file-viewer")).to_be_visible()
    status, story_text = http(
        "GET",
        f"{server.url}/api/conversations/{created['id']}/files/story.txt",
        token=created["viewToken"],
    )
    assert status == 200
    expect(writer.get_by_test_id("file-text")).to_have_text(story_text)
    assert story_text.count("\n\n") >= 2
    writer.keyboard.press("Escape")
    expect(writer.get_by_test_id("file-viewer")).to_be_hidden()

    send(writer, THANKS)
    for page in pages:
        wait_idle(page, runs=2, head=head_of(server.url, created))
        expect(page.get_by_test_id("files-empty")).to_be_visible()

    events = events_of(server.url, created)
    runs = transcript(writer)
    assert [run["user"] for run in runs] == [STORY, THANKS]
    assert [run["status"] for run in runs] == ["success", "success"]
    assert [t["text"] for t in shown(runs, "thinking")] == segment_texts(events, "reasoning")
    assert all(
        t["summary"].startswith("Thought for ") and not t["open"] for t in shown(runs, "thinking")
    )
    contents = [c["text"] for c in shown(runs, "content")]
    for expected, seen in zip(segment_texts(events, "text"), contents, strict=True):
        assert " ".join(expected.split()) == " ".join(seen.split())
    tools = shown(runs, "tool-card")
    assert [(t["name"], t["status"]) for t in tools] == [
        ("write_file", "done"),
        ("delete_file", "done"),
    ]
    write_args = json.loads(tools[0]["args"])
    assert write_args == {"path": "story.txt", "content": story_text}
    assert tools[0]["args"] == json.dumps(write_args, indent=2, ensure_ascii=False)
    assert tools[0]["result"].startswith("Wrote story.txt")
    assert "story.txt" in tools[1]["result"]
    finished = [e for e in events if e["type"] == "RUN_FINISHED"]
    for run, event in zip(runs, finished, strict=True):
        tokens = sum(part["totalTokens"] for part in event["usage"])
        assert f"{tokens:,} tokens" in run["footer"]
        assert "this run" in run["footer"] and "in total" in run["footer"]

    for viewer in viewers:
        assert transcript(viewer) == runs
    assert dropped.evaluate("() => window.__costream.state().welcomes") == 2
    for page in pages:
        assert page_errors(page) == []
    dropped.context.close()
    expect(writer.get_by_test_id("presence")).to_have_text("2 watching")

    ARTIFACTS.mkdir(exist_ok=True)
    writer.screenshot(path=ARTIFACTS / "web-writer.png", full_page=True)
    viewers[0].screenshot(path=ARTIFACTS / "web-viewer.png")


def test_page_resumes_without_gap_or_duplicate_after_its_server_restarts(
    start_server, redis_url, open_page
):
    """A viewer whose server process restarts mid-run resumes and ends like the writer."""
    viewer_server = start_server(redis_url=redis_url)
    writer_server = start_server(redis_url=redis_url, env={"COSTREAM_DEMO_DELAY_MS": "10"})
    created = create_conversation(writer_server.url)
    writer = open_page(writer_server.url + f"/c/{created['id']}#t={created['writeToken']}")
    viewer = open_page(viewer_server.url + f"/c/{created['id']}#t={created['viewToken']}")

    send(writer, STORY)
    viewer.wait_for_function("() => window.__costream.state().lastSeq > 10")
    viewer_server.restart()
    for page in (writer, viewer):
        wait_idle(page, runs=1, head=head_of(writer_server.url, created))
    assert viewer.evaluate("() => window.__costream.state().welcomes") >= 2
    assert transcript(viewer) == transcript(writer)
    assert shown(transcript(viewer), "tool-card")[0]["status"] == "done"
    expect(viewer.get_by_test_id("connection")).to_have_text("live")
    assert page_errors(viewer) == []


def test_stop_cancels_the_running_run(start_server, open_page):
    """Stop cancels the run; every page shows it stopped and the composer comes back."""
    server = start_server(env={"COSTREAM_DEMO_DELAY_MS": "30"})
    created = create_conversation(server.url)
    writer = open_page(created["writeUrl"])
    viewer = open_page(created["viewUrl"])
    send(writer, STORY)
    expect(writer.get_by_test_id("thinking")).to_be_visible()
    writer.get_by_test_id("stop").click()
    for page in (writer, viewer):
        wait_idle(page, runs=1)
        expect(page.get_by_test_id("run-cancelled")).to_have_text("Stopped")
    expect(writer.get_by_test_id("composer-input")).to_be_enabled()
    assert transcript(viewer) == transcript(writer)


def test_composer_sends_on_enter_and_shift_enter_adds_a_line(server, open_page):
    """Shift+Enter starts a new line in the message; Enter sends it and empties the composer."""
    created = create_conversation(server.url)
    writer = open_page(created["writeUrl"])
    composer = writer.get_by_test_id("composer-input")
    composer.focus()
    writer.keyboard.type("line one")
    writer.keyboard.press("Shift+Enter")
    writer.keyboard.type("line two")
    expect(composer).to_have_value("line one\nline two")
    writer.keyboard.press("Enter")
    wait_idle(writer, runs=1)
    expect(writer.get_by_test_id("user-message")).to_have_text("line one\nline two")
    expect(composer).to_have_value("")
    expect(composer).to_be_focused()


def test_connection_badge_says_reconnecting_then_offline_when_the_conversation_is_gone(
    start_server, open_page
):
    """Server down: 'reconnecting…'; back up without the conversation (memory broker):
    'offline', and the page says the conversation does not exist."""
    server = start_server(args=["--memory"])
    created = create_conversation(server.url)
    page = open_page(created["viewUrl"])
    badge = page.get_by_test_id("connection")
    expect(badge).to_have_text("live")
    server.stop()
    expect(badge).to_have_text("reconnecting…")
    server.start()
    expect(badge).to_have_text("offline")
    expect(page.get_by_test_id("not-found")).to_be_visible()
    expect(page.get_by_test_id("not-found-title")).to_have_text("This conversation does not exist")


def test_viewer_has_no_composer_and_its_token_cannot_send(server, open_page):
    """A view link shows 'view only', no composer, and the server refuses its messages."""
    created = create_conversation(server.url)
    viewer = open_page(created["viewUrl"])
    expect(viewer.get_by_test_id("view-only")).to_be_visible()
    expect(viewer.get_by_test_id("composer")).to_be_hidden()
    expect(viewer.get_by_test_id("composer-input")).to_be_hidden()

    assert viewer.evaluate("() => window.__costream.client.send('let me in')")
    viewer.wait_for_function("() => window.__costream.state().lastError !== null")
    assert viewer.evaluate("() => window.__costream.state().lastError.code") == "forbidden"
    status = viewer.evaluate(
        """async ([id, token]) => (await fetch(`/api/conversations/${id}/messages`, {
            method: 'POST', headers: {Authorization: `Bearer ${token}`,
            'Content-Type': 'application/json'}, body: JSON.stringify({content: 'hi'})})).status""",
        [created["id"], created["viewToken"]],
    )
    assert status == 403
    assert head_of(server.url, created) == 0
    expect(viewer.get_by_test_id("run")).to_have_count(0)


def test_late_joiner_page_fills_with_the_replayed_history_and_follows_live(start_server, open_page):
    """A page opened after several runs shows them all at once, at the bottom, then goes on live."""
    server = start_server(env={"COSTREAM_FLUSH_MS": "0"})  # every piece an event: a long log
    created = create_conversation(server.url)
    writer_token = created["writeToken"]
    for text in (STORY, THANKS, STORY):
        status, _ = http(
            "POST",
            f"{server.url}/api/conversations/{created['id']}/messages",
            body={"content": text},
            token=writer_token,
        )
        assert status == 202
        _wait_for_idle_conversation(server.url, created)
    head = head_of(server.url, created)
    assert head > 500

    late = open_page(created["viewUrl"])
    wait_idle(late, runs=3, head=head)
    events = events_of(server.url, created)
    runs = transcript(late)
    assert [run["user"] for run in runs] == [STORY, THANKS, STORY]
    assert [t["text"] for t in shown(runs, "thinking")] == segment_texts(events, "reasoning")
    assert len(shown(runs, "tool-card")) == 3
    assert late.evaluate("() => window.__costream.state().renders") <= 2
    scroll = late.get_by_test_id("log-scroll")
    assert scroll.evaluate("(el) => el.scrollHeight > el.clientHeight")
    assert scroll.evaluate("(el) => el.scrollHeight - el.scrollTop - el.clientHeight < 2")
    expect(late.get_by_test_id("jump-to-latest")).to_be_hidden()
    expect(late.get_by_test_id("file")).to_have_count(1)

    writer = open_page(created["writeUrl"])
    send(writer, THANKS)
    wait_idle(late, runs=4, head=None)
    assert transcript(late) == transcript(writer)


def _wait_for_idle_conversation(base_url: str, created: dict[str, Any]) -> None:
    deadline = time.monotonic() + WAIT_MS / 1000
    while time.monotonic() < deadline:
        status, info = http(
            "GET", f"{base_url}/api/conversations/{created['id']}", token=created["viewToken"]
        )
        if status == 200 and info["status"] == "idle":
            return
        time.sleep(0.05)
    raise AssertionError("the run did not end")


def test_late_joiner_after_the_log_was_trimmed_rebuilds_from_the_snapshot(start_server, open_page):
    """With the early log trimmed, a late joiner's page is rebuilt from MESSAGES_SNAPSHOT."""
    server = start_server(env={"COSTREAM_LOG_RETAIN": "40"})
    created = create_conversation(server.url)
    for text in (STORY, THANKS):
        status, _ = http(
            "POST",
            f"{server.url}/api/conversations/{created['id']}/messages",
            body={"content": text},
            token=created["writeToken"],
        )
        assert status == 202
        _wait_for_idle_conversation(server.url, created)

    late = open_page(created["viewUrl"])
    wait_idle(late, runs=2, head=head_of(server.url, created))
    assert late.evaluate("() => window.__costream.state().mode") == "snapshot"
    runs = transcript(late)
    assert [run["user"] for run in runs] == [STORY, THANKS]
    assert [t["name"] for t in shown(runs, "tool-card")] == ["write_file", "delete_file"]
    assert all(t["result"] for t in shown(runs, "tool-card"))
    assert any("story.txt" in c["text"] for c in shown(runs, "content"))
    assert page_errors(late) == []


# ---- the renderer, fed crafted events through the test hook ---------------------------

RUN = "run-1"


def crafted(*events: dict[str, Any]) -> list[dict[str, Any]]:
    """Number crafted events like a log would."""
    return [
        {"seq": i, "timestamp": 1_700_000_000_000 + i * 100, **e} for i, e in enumerate(events, 1)
    ]


def run_started(text: str = "hello") -> dict[str, Any]:
    return {
        "type": "RUN_STARTED",
        "threadId": "t",
        "runId": RUN,
        "input": {
            "threadId": "t",
            "runId": RUN,
            "messages": [{"id": "u1", "role": "user", "content": text}],
        },
    }


def text_message(message_id: str, text: str) -> list[dict[str, Any]]:
    return [
        {"type": "TEXT_MESSAGE_START", "messageId": message_id, "role": "assistant"},
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": message_id, "delta": text},
        {"type": "TEXT_MESSAGE_END", "messageId": message_id},
    ]


PAYLOAD = (
    "Hello <script>window.__pwned = 'script'</script>\n\n"
    '<img src="x" onerror="window.__pwned = \'img\'">\n\n'
    "[click me](javascript:window.__pwned='link') and [safe](https://example.com/)\n\n"
    '<a href="javascript:window.__pwned=1">raw link</a> **bold**'
)


@pytest.fixture
def blank_page(server, open_page) -> Page:
    """A connected conversation page with nothing in it yet."""
    created = create_conversation(server.url)
    return open_page(created["viewUrl"])


def test_model_output_with_script_img_and_javascript_link_renders_inert(blank_page):
    """Markdown from the model shows HTML as text; no script, handler or javascript: URL survives."""
    page = blank_page
    events = crafted(
        run_started(),
        {"type": "STEP_STARTED", "stepName": "llm-1", "metadata": {"attempt": 1}},
        {"type": "REASONING_START", "messageId": "r1"},
        {"type": "REASONING_MESSAGE_START", "messageId": "r1", "role": "reasoning"},
        {"type": "REASONING_MESSAGE_CONTENT", "messageId": "r1", "delta": PAYLOAD},
        {"type": "REASONING_MESSAGE_END", "messageId": "r1"},
        {"type": "REASONING_END", "messageId": "r1"},
        *text_message("m1", PAYLOAD),
        {
            "type": "TOOL_CALL_START",
            "toolCallId": "c1",
            "toolCallName": "<img src=x onerror=alert(1)>",
            "parentMessageId": "m1",
        },
        {"type": "TOOL_CALL_ARGS", "toolCallId": "c1", "delta": json.dumps({"content": PAYLOAD})},
        {"type": "TOOL_CALL_END", "toolCallId": "c1"},
        {"type": "STEP_FINISHED", "stepName": "llm-1", "metadata": {"finishReason": "tool_calls"}},
        {
            "type": "TOOL_CALL_RESULT",
            "messageId": "t1",
            "toolCallId": "c1",
            "content": PAYLOAD,
            "role": "tool",
            "metadata": {"isError": False},
        },
        {"type": "RUN_ERROR", "message": PAYLOAD, "code": "internal"},
    )
    page.evaluate("(events) => window.__costream.apply(events)", events)
    log = page.get_by_test_id("log")
    content = page.get_by_test_id("content")
    expect(content).to_contain_text("<script>window.__pwned = 'script'</script>")
    expect(content).to_contain_text('<img src="x" onerror=')
    expect(content.locator("strong")).to_have_text("bold")
    expect(log.locator("script")).to_have_count(0)
    expect(log.locator("img")).to_have_count(0)
    expect(log.locator("[onerror]")).to_have_count(0)
    links = content.locator("a[href]")
    expect(links).to_have_count(1)
    expect(links).to_have_attribute("href", "https://example.com/")
    expect(links).to_have_attribute("rel", "noopener noreferrer nofollow")
    expect(content).to_contain_text("click me")
    expect(page.get_by_test_id("tool-name")).to_have_text("<img src=x onerror=alert(1)>")
    expect(page.get_by_test_id("run-error-message")).to_have_text(PAYLOAD)
    for link in page.locator("a").all():
        assert not (link.get_attribute("href") or "").lower().startswith("javascript:")
    expect(page.locator("a[href]", has_text="click me")).to_have_count(0)
    assert page.evaluate("() => window.__pwned") is None
    assert page_errors(page) == []


def test_user_message_with_html_is_shown_as_typed(server, open_page):
    """A user's message containing HTML appears verbatim on every page and runs nothing."""
    created = create_conversation(server.url)
    writer = open_page(created["writeUrl"])
    viewer = open_page(created["viewUrl"])
    send(writer, PAYLOAD)
    for page in (writer, viewer):
        wait_idle(page, runs=1)
        expect(page.get_by_test_id("user-message")).to_have_text(PAYLOAD)
        expect(page.get_by_test_id("log").locator("img, script")).to_have_count(0)
        assert page.evaluate("() => window.__pwned") is None


def test_thinking_collapses_when_it_ends_unless_the_person_toggled_it(blank_page):
    """Thinking is open while it streams, then collapses to 'Thought for N s'; a toggle wins."""
    page = blank_page
    opening = crafted(
        run_started(),
        {"type": "STEP_STARTED", "stepName": "llm-1", "metadata": {"attempt": 1}},
        {"type": "REASONING_START", "messageId": "r1"},
        {"type": "REASONING_MESSAGE_CONTENT", "messageId": "r1", "delta": "Let me think. "},
        {"type": "REASONING_START", "messageId": "r2"},
        {"type": "REASONING_MESSAGE_CONTENT", "messageId": "r2", "delta": "Second thoughts."},
    )
    page.evaluate("(events) => window.__costream.apply(events)", opening)
    thinking = page.get_by_test_id("thinking")
    expect(thinking.nth(0)).to_have_attribute("open", "")
    expect(thinking.nth(0).get_by_test_id("thinking-summary")).to_have_text("Thinking…")
    thinking.nth(1).get_by_test_id("thinking-summary").click()  # the person closes it
    expect(thinking.nth(1)).not_to_have_attribute("open", "")

    ending = [
        {
            "seq": 7,
            "timestamp": opening[2]["timestamp"] + 3000,
            "type": "REASONING_END",
            "messageId": "r1",
        },
        {
            "seq": 8,
            "timestamp": opening[2]["timestamp"] + 3000,
            "type": "REASONING_END",
            "messageId": "r2",
        },
    ]
    page.evaluate("(events) => window.__costream.apply(events)", ending)
    expect(thinking.nth(0)).not_to_have_attribute("open", "")
    expect(thinking.nth(0).get_by_test_id("thinking-summary")).to_have_text("Thought for 3 s")
    thinking.nth(1).get_by_test_id("thinking-summary").click()  # and opens it again
    page.evaluate(
        "(events) => window.__costream.apply(events)",
        [
            {
                "seq": 9,
                "timestamp": opening[2]["timestamp"] + 4000,
                "type": "REASONING_END",
                "messageId": "r2",
            }
        ],
    )
    expect(thinking.nth(1)).to_have_attribute("open", "")
    expect(thinking.nth(1).get_by_test_id("thinking-text")).to_have_text("Second thoughts.")


def test_a_publishers_stream_gap_is_shown_on_its_run(blank_page):
    """CUSTOM stream_gap (a publisher that lost its server or events) says on the run what
    is missing; a run without one shows no note."""
    page = blank_page
    events = crafted(
        run_started(),
        {
            "type": "CUSTOM",
            "name": "stream_gap",
            "value": {"lost": 3, "unconfirmed": 0, "resumes": "run-1"},
        },
        {"type": "STEP_STARTED", "stepName": "llm-1", "metadata": {"attempt": 1}},
        *text_message("m1", "the rest"),
    )
    page.evaluate("(events) => window.__costream.apply(events)", events)
    gap = page.get_by_test_id("stream-gap")
    expect(gap).to_have_text(
        "The producer lost its server; this run continues the interrupted one: 3 events missing."
    )
    expect(page.get_by_test_id("content")).to_have_text("the rest")


def test_retried_step_is_marked_abandoned_and_a_run_error_is_shown_in_place(blank_page):
    """The earlier attempt's output is marked abandoned; RUN_ERROR shows its message."""
    page = blank_page
    events = crafted(
        run_started(),
        {"type": "STEP_STARTED", "stepName": "llm-1", "metadata": {"attempt": 1}},
        *text_message("m1", "Half an ans"),
        {"type": "STEP_FINISHED", "stepName": "llm-1", "metadata": {"finishReason": "retry"}},
        {
            "type": "CUSTOM",
            "name": "step_retry",
            "value": {"attempt": 2, "reason": "upstream hiccup"},
        },
        {"type": "STEP_STARTED", "stepName": "llm-1", "metadata": {"attempt": 2}},
        {
            "type": "TOOL_CALL_START",
            "toolCallId": "c1",
            "toolCallName": "list_files",
            "parentMessageId": "m2",
        },
        {"type": "TOOL_CALL_ARGS", "toolCallId": "c1", "delta": "{"},
    )
    page.evaluate("(events) => window.__costream.apply(events)", events)
    steps = page.get_by_test_id("step")
    expect(steps).to_have_count(2)
    expect(steps.nth(0)).to_have_attribute("data-abandoned", "true")
    expect(steps.nth(0).get_by_test_id("step-retry")).to_contain_text("abandoned")
    expect(steps.nth(1)).to_have_attribute("data-abandoned", "false")
    expect(steps.nth(1).get_by_test_id("step-retry")).to_contain_text("attempt 2")
    expect(page.get_by_test_id("tool-status")).to_have_text("streaming arguments")
    expect(page.get_by_test_id("tool-args")).to_have_text("{")

    page.evaluate(
        "(events) => window.__costream.apply(events)",
        [
            {
                "seq": 12,
                "timestamp": 1_700_000_002_000,
                "type": "TOOL_CALL_ARGS",
                "toolCallId": "c1",
                "delta": "}",
            },
            {
                "seq": 13,
                "timestamp": 1_700_000_002_000,
                "type": "TOOL_CALL_END",
                "toolCallId": "c1",
            },
            {
                "seq": 14,
                "timestamp": 1_700_000_002_000,
                "type": "STEP_FINISHED",
                "stepName": "llm-1",
                "metadata": {"finishReason": "error"},
            },
            {
                "seq": 15,
                "timestamp": 1_700_000_002_000,
                "type": "RUN_ERROR",
                "message": "The model provider is rate limiting us.",
                "code": "rate_limited",
            },
        ],
    )
    expect(page.get_by_test_id("run-error")).to_contain_text(
        "The model provider is rate limiting us."
    )
    expect(page.get_by_test_id("run-error")).to_contain_text("rate_limited")
    expect(page.get_by_test_id("tool-status")).to_have_text("not run")
    expect(page.get_by_test_id("tool-args")).to_have_text("{}")


def test_long_tool_result_is_collapsed_and_short_one_is_shown(blank_page):
    """A long tool result sits in a closed disclosure; a short one is shown as is."""
    page = blank_page
    long_result = "\n".join(f"line {i}" for i in range(40))
    events = crafted(
        run_started(),
        {"type": "STEP_STARTED", "stepName": "llm-1", "metadata": {"attempt": 1}},
        {
            "type": "TOOL_CALL_START",
            "toolCallId": "c1",
            "toolCallName": "read_file",
            "parentMessageId": "m",
        },
        {"type": "TOOL_CALL_ARGS", "toolCallId": "c1", "delta": '{"path": "a.txt"}'},
        {
            "type": "TOOL_CALL_START",
            "toolCallId": "c2",
            "toolCallName": "read_file",
            "parentMessageId": "m",
        },
        {"type": "TOOL_CALL_ARGS", "toolCallId": "c2", "delta": '{"path": "b.txt"}'},
        {"type": "TOOL_CALL_END", "toolCallId": "c1"},
        {"type": "TOOL_CALL_END", "toolCallId": "c2"},
        {"type": "STEP_FINISHED", "stepName": "llm-1", "metadata": {"finishReason": "tool_calls"}},
        {
            "type": "TOOL_CALL_RESULT",
            "messageId": "t1",
            "toolCallId": "c1",
            "content": long_result,
            "role": "tool",
            "metadata": {"isError": False},
        },
        {
            "type": "TOOL_CALL_RESULT",
            "messageId": "t2",
            "toolCallId": "c2",
            "content": "Error: no such file",
            "role": "tool",
            "metadata": {"isError": True},
        },
    )
    page.evaluate("(events) => window.__costream.apply(events)", events)
    cards = page.get_by_test_id("tool-card")
    expect(cards.nth(0).get_by_test_id("tool-status")).to_have_text("done")
    expect(cards.nth(0).get_by_test_id("tool-args")).to_have_text('{\n  "path": "a.txt"\n}')
    expect(cards.nth(0).get_by_test_id("tool-result-text")).to_be_hidden()
    cards.nth(0).locator("summary").click()
    expect(cards.nth(0).get_by_test_id("tool-result-text")).to_have_text(long_result)
    expect(cards.nth(1).get_by_test_id("tool-status")).to_have_text("error")
    expect(cards.nth(1).get_by_test_id("tool-result-text")).to_have_text("Error: no such file")


def test_auto_scroll_stops_when_the_reader_scrolls_up_and_jump_brings_them_back(blank_page):
    """Reading above the bottom shows 'jump to latest' instead of scrolling; the button returns."""
    page = blank_page
    paragraphs = "\n\n".join(f"Paragraph {i} of a long answer." for i in range(120))
    page.evaluate(
        "(events) => window.__costream.apply(events)",
        crafted(
            run_started(),
            {"type": "STEP_STARTED", "stepName": "llm-1", "metadata": {"attempt": 1}},
            {"type": "TEXT_MESSAGE_START", "messageId": "m1", "role": "assistant"},
            {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "delta": paragraphs},
        ),
    )
    scroll = page.get_by_test_id("log-scroll")
    at_bottom = "(el) => el.scrollHeight - el.scrollTop - el.clientHeight < 2"
    assert scroll.evaluate(at_bottom)
    jump = page.get_by_test_id("jump-to-latest")
    expect(jump).to_be_hidden()

    scroll.hover()
    page.mouse.wheel(0, -2000)
    page.wait_for_function("() => !window.__costream.page.stick")
    more = {
        "seq": 5,
        "timestamp": 1_700_000_001_000,
        "type": "TEXT_MESSAGE_CONTENT",
        "messageId": "m1",
        "delta": "\n\nOne more paragraph.",
    }
    page.evaluate("(event) => window.__costream.apply([event])", more)
    expect(jump).to_be_visible()
    assert not scroll.evaluate(at_bottom)

    jump.click()
    expect(jump).to_be_hidden()
    assert scroll.evaluate(at_bottom)


def test_page_is_usable_at_phone_width_in_the_dark_scheme(server, open_page):
    """At 390 px in dark mode the page keeps its composer on screen and has no sideways scroll."""
    created = create_conversation(server.url)
    page = open_page(
        created["writeUrl"], viewport={"width": 390, "height": 800}, color_scheme="dark"
    )
    send(page, STORY)
    wait_idle(page, runs=1)
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    expect(page.get_by_test_id("composer-input")).to_be_in_viewport()
    background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(20, 20, 22)"
    page.locator("#files-heading").click()  # closed by default at phone width
    expect(page.get_by_test_id("file")).to_have_count(1)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "web-phone-dark.png")
