"""The page for the people in the room: sharing, the browser's list of conversations,
code blocks, files written by tools, and the page of an unknown conversation.

Headless Chromium against a real ``costream serve``; assertions read the DOM. Crafted
events go through the page's test hook only where a real run cannot produce them on cue
(a tool call cut mid-arguments)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.support.browser import WAIT_MS, create_conversation, page_errors, wait_idle
from tests.support.ws import http

pytestmark = pytest.mark.browser
expect.set_options(timeout=WAIT_MS)
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "screenshot.png"

STORY = (
    "Tell me a long story about LLM streaming, write it to a file, make sure it has "
    "multiple paragraphs."
)


def crafted(*events: dict[str, Any]) -> list[dict[str, Any]]:
    """Number crafted events like a log would."""
    return [
        {"seq": i, "timestamp": 1_700_000_000_000 + i * 100, **e} for i, e in enumerate(events, 1)
    ]


def run_started(text: str) -> dict[str, Any]:
    messages = [{"id": "u1", "role": "user", "content": text}]
    return {
        "type": "RUN_STARTED",
        "threadId": "t",
        "runId": "run-1",
        "input": {"threadId": "t", "runId": "run-1", "messages": messages},
    }


def grant_clipboard(page: Page, url: str) -> None:
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)


def clipboard(page: Page) -> str:
    text: str = page.evaluate("() => navigator.clipboard.readText()")
    return text


def test_writer_shares_the_view_link_from_the_page_and_it_only_views(server, open_page):
    """A writer who opened the write link (not the creator's browser) gets the view link
    from the Share button; copied, it opens the conversation view-only."""
    created = create_conversation(server.url)
    writer = open_page(created["writeUrl"])
    grant_clipboard(writer, server.url)
    writer.get_by_test_id("share").click()
    dialog = writer.get_by_test_id("share-dialog")
    expect(dialog).to_be_visible()
    expect(writer.get_by_test_id("share-view-link")).to_have_value(created["viewUrl"])
    expect(writer.get_by_test_id("share-write-link")).to_have_value(created["writeUrl"])
    expect(dialog).to_contain_text("share with care")
    writer.get_by_test_id("share-copy-view").click()
    expect(writer.get_by_test_id("share-copy-view")).to_have_text("Copied")
    assert clipboard(writer) == created["viewUrl"]

    viewer = open_page(clipboard(writer))
    expect(viewer.get_by_test_id("role")).to_have_text("view only")
    viewer.get_by_test_id("share").click()
    expect(viewer.get_by_test_id("share-view-link")).to_have_value(created["viewUrl"])
    expect(viewer.get_by_test_id("share-write")).to_be_hidden()
    assert page_errors(writer) == [] and page_errors(viewer) == []


def test_links_endpoint_gives_the_view_link_to_writers_and_nothing_more_to_viewers(server):
    """GET .../links: a writer gets both links; a viewer only its own view link; a wrong
    token 401."""
    created = create_conversation(server.url)
    url = f"{server.url}/api/conversations/{created['id']}/links"
    status, links = http("GET", url, token=created["writeToken"])
    assert status == 200
    assert links == {"viewUrl": created["viewUrl"], "writeUrl": created["writeUrl"]}
    status, links = http("GET", url, token=created["viewToken"])
    assert status == 200
    assert links == {"viewUrl": created["viewUrl"], "writeUrl": None}
    status, answer = http("GET", url, token="not-a-token")
    assert status == 401 and answer["error"]["code"] == "unauthorized"


def test_conversations_are_listed_on_the_start_page_after_a_reload(server, open_page):
    """The start page keeps the conversations this browser created or opened, with links
    that open them; Forget removes one."""
    page = open_page(server.url + "/", wait_live=False)
    page.get_by_test_id("create-title").fill("Standup notes")
    page.get_by_test_id("create-button").click()
    expect(page.get_by_test_id("created")).to_be_visible()
    other = create_conversation(server.url, title="Opened from a link")
    page.goto(other["viewUrl"])
    expect(page.get_by_test_id("connection")).to_have_text("live")
    page.goto(server.url + "/")
    page.reload()
    items = page.get_by_test_id("saved-item")
    expect(items).to_have_count(2)
    expect(items.nth(0)).to_contain_text("Opened from a link")
    expect(items.nth(0)).to_contain_text("view only")
    expect(items.nth(1)).to_contain_text("Standup notes")
    expect(items.nth(1)).to_contain_text("can write")

    items.nth(1).get_by_test_id("saved-link").click()
    expect(page.get_by_test_id("composer-input")).to_be_visible()
    expect(page.get_by_test_id("title")).to_have_text("Standup notes")
    page.goto(server.url + "/")
    expect(items.nth(0)).to_contain_text("Standup notes")  # the one seen last comes first
    items.filter(has_text="Opened from a link").get_by_test_id("saved-forget").click()
    expect(page.get_by_test_id("saved-item")).to_have_count(1)
    page.reload()
    expect(page.get_by_test_id("saved-item")).to_have_count(1)
    expect(page.get_by_test_id("saved-item")).to_contain_text("Standup notes")


def test_code_block_is_highlighted_and_copied_as_plain_text(server, open_page):
    """A fenced code block gets syntax colours once complete and a Copy button that copies
    exactly its text; a script inside it stays text."""
    created = create_conversation(server.url)
    page = open_page(created["viewUrl"])
    grant_clipboard(page, server.url)
    code = 'def greet(name):\n    return f"<script>hi {name}</script>"\n'
    text = f"Here:\n\n```python\n{code}```\n\nDone."
    events = crafted(
        run_started("code please"),
        {"type": "STEP_STARTED", "stepName": "llm-1", "metadata": {"attempt": 1}},
        {"type": "TEXT_MESSAGE_START", "messageId": "m1", "role": "assistant"},
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "delta": text},
        {"type": "TEXT_MESSAGE_END", "messageId": "m1"},
    )
    page.evaluate("(events) => window.__costream.apply(events)", events)
    block = page.locator(".code-block")
    expect(block).to_have_count(1)
    expect(block.locator("code.hljs .hljs-keyword").first).to_have_text("def")
    expect(block.locator("script")).to_have_count(0)
    page.get_by_test_id("copy-code").click()
    expect(page.get_by_test_id("copy-code")).to_have_attribute("data-copied", "true")
    assert clipboard(page) == code
    # The button's label is drawn by CSS: the message's text is still only the model's.
    assert "Copy" not in page.get_by_test_id("content").inner_text()
    assert page_errors(page) == []


def test_a_file_being_written_shows_as_the_file_while_it_streams(server, open_page):
    """write_file's arguments show as the file (path, content as Markdown) while they
    stream, with the JSON one click away."""
    created = create_conversation(server.url)
    page = open_page(created["viewUrl"])
    content = '# Notes\n\nFirst line with a "quote".\n\nSecond paragraph: é and 😀.'
    args = json.dumps({"path": "notes.md", "content": content}, ensure_ascii=False)
    cut = args.index("Second")
    head = crafted(
        run_started("write notes"),
        {"type": "STEP_STARTED", "stepName": "llm-1", "metadata": {"attempt": 1}},
        {"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "write_file"},
        {"type": "TOOL_CALL_ARGS", "toolCallId": "c1", "delta": args[:cut]},
    )
    page.evaluate("(events) => window.__costream.apply(events)", head)
    card = page.get_by_test_id("file-card")
    expect(card).to_be_visible()
    expect(page.get_by_test_id("file-card-path")).to_have_text("notes.md")
    expect(page.get_by_test_id("file-card-size")).to_have_text("writing…")
    expect(card.locator("h1")).to_have_text("Notes")
    expect(card).to_contain_text('First line with a "quote".')
    expect(page.get_by_test_id("tool-args")).to_be_hidden()

    rest = [
        {"seq": 5, "type": "TOOL_CALL_ARGS", "toolCallId": "c1", "delta": args[cut:]},
        {"seq": 6, "type": "TOOL_CALL_END", "toolCallId": "c1"},
    ]
    page.evaluate("(events) => window.__costream.apply(events)", rest)
    expect(card).to_contain_text("Second paragraph: é and 😀.")
    size = len(content.encode())
    expect(page.get_by_test_id("file-card-size")).to_have_text(f"{size} B")
    page.get_by_test_id("tool-view-toggle").click()
    expect(page.get_by_test_id("tool-args")).to_be_visible()
    assert json.loads(page.get_by_test_id("tool-args").inner_text()) == json.loads(args)
    expect(card).to_be_hidden()
    assert page_errors(page) == []


def test_the_demo_run_shows_its_story_file_as_a_file_card(start_server, open_page):
    """A real demo run: the write_file card shows the story's path and paragraphs."""
    server = start_server(env={"COSTREAM_DEMO_DELAY_MS": "1"})
    created = create_conversation(server.url)
    page = open_page(created["writeUrl"])
    page.get_by_test_id("composer-input").fill(STORY)
    page.get_by_test_id("composer-input").press("Enter")
    wait_idle(page, runs=1)
    card = page.get_by_test_id("file-card").first
    path = page.get_by_test_id("file-card-path").first.inner_text()
    status, text = http(
        "GET",
        f"{server.url}/api/conversations/{created['id']}/files/{path}",
        token=created["viewToken"],
    )
    assert status == 200
    first_paragraph = str(text).split("\n\n")[0].strip()
    expect(card).to_contain_text(first_paragraph[:60])
    assert page_errors(page) == []


def test_unknown_conversation_shows_a_clean_not_found_page(server, open_page):
    """A link to a conversation that does not exist says so, with no empty badges, no
    composer and no file list."""
    page = open_page(f"{server.url}/c/AAAAAAAAAAAAAAAAAAAAAA#t=whatever", wait_live=False)
    expect(page.get_by_test_id("not-found")).to_be_visible()
    expect(page.get_by_test_id("not-found-title")).to_have_text("This conversation does not exist")
    for hidden in (
        "model",
        "presence",
        "people",
        "name-button",
        "files",
        "composer",
        "share",
        "banner",
    ):
        expect(page.get_by_test_id(hidden)).to_be_hidden()
    assert page.title() == "Not found · costream"
    assert page_errors(page) == []


# ---- who is here ---------------------------------------------------------------------


def set_name(page: Page, name: str) -> None:
    """Set the page's name through its "Your name" dialog, as a person would."""
    page.get_by_test_id("name-button").click()
    page.get_by_test_id("name-input").fill(name)
    page.get_by_test_id("name-save").click()
    expect(page.get_by_test_id("name-dialog")).to_be_hidden()


def avatars(page: Page) -> list[str]:
    """The initials of the avatars in the header, in order."""
    return list(page.get_by_test_id("people").get_by_test_id("avatar").all_inner_texts())


def test_three_pages_on_two_processes_see_who_is_watching_by_name(
    start_server, redis_url, open_page
):
    """With Redis, three pages on two server processes see the same people, with
    initials in join order and each name in a title; a name set once is remembered after
    a reload."""
    one = start_server(redis_url=redis_url)
    two = start_server(redis_url=redis_url)
    created = create_conversation(one.url)
    ann = open_page(created["writeUrl"])
    set_name(ann, "Ann Lee")
    bob = open_page(created["viewUrl"].replace(one.url, two.url))
    set_name(bob, "Bob")
    anonymous = open_page(created["viewUrl"])
    for page in (ann, bob, anonymous):
        expect(page.get_by_test_id("presence")).to_have_text("3 watching")
        expect(page.get_by_test_id("people").get_by_test_id("avatar")).to_have_count(3)
    assert sorted(avatars(anonymous)) == ["?", "AL", "B"]
    titles = anonymous.get_by_test_id("avatar").evaluate_all("els => els.map(e => e.title)")
    assert "Ann Lee (can write)" in titles and "Bob" in titles
    expect(bob.locator(".avatar.you")).to_have_text("B")

    ann.reload()
    expect(ann.get_by_test_id("name-button")).to_have_text("Ann Lee")
    expect(bob.get_by_test_id("presence")).to_have_text("3 watching")
    expect(bob.get_by_test_id("people").get_by_title("Ann Lee (can write)")).to_have_count(1)
    for page in (ann, bob, anonymous):
        assert page_errors(page) == []


def test_a_name_with_html_in_it_is_shown_as_text_everywhere(server, open_page):
    """A name with markup is shown as the characters typed, in the header and on a user
    message, and never runs or becomes elements."""
    created = create_conversation(server.url)
    watcher = open_page(created["viewUrl"])
    mallory = open_page(created["viewUrl"])
    payload = "<img src=x onerror=window.pwned=1>"
    set_name(mallory, payload)
    expect(watcher.get_by_test_id("people").get_by_test_id("avatar")).to_have_count(2)
    expect(watcher.get_by_test_id("people").get_by_title(payload)).to_have_count(1)
    assert watcher.get_by_test_id("people").locator("img").count() == 0

    started = run_started("hello from a name")
    started["input"]["messages"][0]["name"] = payload
    watcher.evaluate("(events) => window.__costream.apply(events)", crafted(started))
    expect(watcher.get_by_test_id("user-name")).to_have_text(payload)
    expect(watcher.get_by_test_id("user-message")).to_have_text("hello from a name")
    assert watcher.locator("[data-testid=log] img").count() == 0
    assert watcher.evaluate("() => window.pwned") is None
    assert page_errors(watcher) == [] and page_errors(mallory) == []


def test_each_user_message_shows_its_sender_in_the_senders_presence_colour(server, open_page):
    """A user message with a sender shows the name and initials in the colour presence
    gives that name; one without a sender shows no name."""
    created = create_conversation(server.url)
    zoe = open_page(created["viewUrl"])
    set_name(zoe, "Zoë")
    expect(zoe.locator(".avatar.you")).to_have_text("Z")
    presence_colour = zoe.locator(".avatar.you").evaluate("e => e.style.backgroundColor")
    named = run_started("first")
    named["input"]["messages"][0]["name"] = "Zoë"
    unnamed = {**run_started("second"), "runId": "run-2"}
    finished = {
        "type": "RUN_FINISHED",
        "threadId": "t",
        "runId": "run-1",
        "outcome": {"type": "success"},
        "usage": [],
        "metadata": {},
    }
    zoe.evaluate("(events) => window.__costream.apply(events)", crafted(named, finished, unnamed))
    runs = zoe.get_by_test_id("run")
    expect(runs).to_have_count(2)
    expect(runs.nth(0).get_by_test_id("user-name")).to_have_text("Zoë")
    avatar_colour = runs.nth(0).get_by_test_id("avatar").evaluate("e => e.style.backgroundColor")
    assert avatar_colour == presence_colour
    expect(runs.nth(1).get_by_test_id("user-name")).to_be_hidden()
    assert page_errors(zoe) == []


def test_screenshot_of_a_story_mid_stream_with_people_and_a_file_card(start_server, open_page):
    """Saves docs/screenshot.png for the README: three named people watching a demo story
    while its file is being written."""
    server = start_server(env={"COSTREAM_DEMO_DELAY_MS": "40"})
    created = create_conversation(server.url, title="A story about streaming")
    writer = open_page(created["writeUrl"], viewport={"width": 1200, "height": 760})
    set_name(writer, "Ada")
    for name in ("Grace", "Linus"):
        set_name(open_page(created["viewUrl"]), name)
    expect(writer.get_by_test_id("presence")).to_have_text("3 watching")
    writer.get_by_test_id("composer-input").fill(STORY)
    writer.get_by_test_id("composer-input").press("Enter")
    card = writer.get_by_test_id("file-card").first
    expect(card).to_be_visible()
    expect(card).to_contain_text("Behind the glass")  # well into the story's text
    expect(writer.get_by_test_id("file-card-size")).to_have_text("writing…")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    writer.screenshot(path=str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000
    assert page_errors(writer) == []
