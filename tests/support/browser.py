"""Headless Chromium (Debian's, driven by Playwright) for the browser tests.

    def test_something(server, open_page):
        created = create_conversation(server.url)
        page = open_page(created["writeUrl"])        # a Page, connected and caught up
        transcript(page)                              # what the person sees, as data

Each page gets a browser context of its own (as a separate window would be), so the
browser never throttles one as a background tab. Errors thrown in a page are collected in
``page_errors(page)``; tests assert that list is empty.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Playwright, sync_playwright

from tests.support.ws import http

CHROMIUM = os.environ.get("COSTREAM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Generous: the machines that run the tests may be slow. Nothing asserts on time.
WAIT_MS = 60_000

_ERRORS: dict[int, list[str]] = {}


@pytest.fixture(scope="module")
def playwright_driver() -> Iterator[Playwright]:
    """One Playwright driver per test module (its event loop must not outlive the module)."""
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def chromium(playwright_driver: Playwright) -> Iterator[Browser]:
    """Headless Chromium, or a skip where the system has none."""
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (set COSTREAM_CHROMIUM)")
    browser = playwright_driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture
def open_page(chromium: Browser) -> Iterator[Callable[..., Page]]:
    """Open a URL in a fresh window; with ``wait_live`` (default), until it is caught up."""
    contexts = []

    def open_(
        url: str,
        *,
        wait_live: bool = True,
        viewport: dict[str, int] | None = None,
        color_scheme: Any = None,
    ) -> Page:
        context = chromium.new_context(
            viewport=viewport or {"width": 1280, "height": 800},
            color_scheme=color_scheme,
        )
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        errors = _ERRORS.setdefault(id(page), [])
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        if wait_live:
            wait_caught_up(page)
        return page

    yield open_
    for context in contexts:
        context.close()
    _ERRORS.clear()


def page_errors(page: Page) -> list[str]:
    """Uncaught errors thrown in the page so far."""
    return list(_ERRORS.get(id(page), []))


def create_conversation(base_url: str, **body: Any) -> dict[str, Any]:
    """POST /api/conversations; the answer's id, tokens and links."""
    status, created = http("POST", f"{base_url}/api/conversations", body=body)
    assert status == 201, created
    return dict(created)


def wait_caught_up(page: Page) -> None:
    """Until the page is connected and has drawn everything the server had."""
    page.wait_for_function(
        "() => window.__costream && window.__costream.state().caughtUp"
        " && window.__costream.state().connection === 'live'"
    )


def wait_idle(page: Page, runs: int, head: int | None = None) -> None:
    """Until the page shows ``runs`` runs, none running (and has seen seq ``head``)."""
    page.wait_for_function(
        """([runs, head]) => {
            const hook = window.__costream;
            const done = hook.model.runs.length === runs && !hook.model.running;
            const seen = head === null || hook.state().lastSeq >= head;
            return done && seen && document.querySelectorAll('[data-testid=run]').length === runs
                && !document.querySelector('.run[data-status=running]');
        }""",
        arg=[runs, head],
    )


# What a person sees, read from the DOM (not from the model): per run, the user's message,
# each step's thinking, content, tool cards and the footer.
_TRANSCRIPT_JS = """() => {
  const text = (el) => (el ? el.textContent : null);
  return [...document.querySelectorAll('[data-testid=run]')].map((run) => ({
    user: text(run.querySelector('[data-testid=user-message]')),
    status: run.dataset.status,
    error: run.querySelector('[data-testid=run-error]').hidden
      ? null : text(run.querySelector('[data-testid=run-error]')),
    footer: run.querySelector('[data-testid=run-footer]').hidden
      ? null : text(run.querySelector('[data-testid=run-footer]')),
    steps: [...run.querySelectorAll('[data-testid=step]')].map((step) => ({
      abandoned: step.dataset.abandoned === 'true',
      segments: [...step.querySelectorAll(
        '[data-testid=thinking], [data-testid=content], [data-testid=tool-card]')].map((seg) => {
        const kind = seg.dataset.testid;
        if (kind === 'thinking') return {
          kind, summary: text(seg.querySelector('summary')), open: seg.open,
          text: text(seg.querySelector('[data-testid=thinking-text]')) };
        if (kind === 'content') return { kind, text: seg.innerText, html: seg.innerHTML };
        return {
          kind, name: text(seg.querySelector('[data-testid=tool-name]')),
          status: text(seg.querySelector('[data-testid=tool-status]')),
          args: text(seg.querySelector('[data-testid=tool-args]')),
          result: seg.querySelector('[data-testid=tool-result]').hidden
            ? null : text(seg.querySelector('[data-testid=tool-result-text]')) };
      }),
    })),
  }));
}"""


def transcript(page: Page) -> list[dict[str, Any]]:
    """The runs as the page shows them (see _TRANSCRIPT_JS)."""
    result: list[dict[str, Any]] = page.evaluate(_TRANSCRIPT_JS)
    return result


def head_of(base_url: str, created: dict[str, Any]) -> int:
    """The conversation's log head, from the HTTP API."""
    status, info = http(
        "GET", f"{base_url}/api/conversations/{created['id']}", token=created["viewToken"]
    )
    assert status == 200, info
    return int(info["head"])
