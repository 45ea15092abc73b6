"""Hostile tool arguments and stored values: a tool never raises into the run, and a value
stored before the checks existed never breaks a conversation (findings 5 and 9)."""

from __future__ import annotations

import json

import pytest

from costream.agent.tools import Workspace
from costream.broker.memory import MemoryBroker
from costream.store import Store


async def _workspace() -> tuple[Workspace, Store, str]:
    store = Store(MemoryBroker())
    created = await store.create(title="t", model="m", system="")
    conversation_id = created.conversation.id
    return Workspace(store, conversation_id, 100_000, 50), store, conversation_id


@pytest.mark.parametrize(
    "arguments",
    [
        '{"path":' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"path": "a.txt", "content": "\\ud800"}',
        '{"path": "\\ud800.txt", "content": "x"}',
        '{"path": "a.txt", "content": "\ud800"}',
    ],
    ids=["deep", "escaped-surrogate-content", "escaped-surrogate-name", "raw-surrogate"],
)
async def test_hostile_tool_arguments_come_back_as_tool_errors(arguments: str) -> None:
    """Deep nesting or a lone surrogate in tool arguments is an error result, not a raise."""
    workspace, store, conversation_id = await _workspace()
    outcome = await workspace.call("write_file", arguments)
    assert outcome.is_error
    assert await store.list_files(conversation_id) == {}


@pytest.mark.parametrize(
    "name", ["evil\u202etxt.exe", "a\u2066b.txt", "tab\there.txt", "zero\u200bwidth.txt"]
)
async def test_file_names_with_control_or_bidi_characters_are_refused(name: str) -> None:
    """A file name with a bidi override, isolate, control or format character is refused."""
    workspace, store, conversation_id = await _workspace()
    outcome = await workspace.call("write_file", json.dumps({"path": name, "content": "x"}))
    assert outcome.is_error
    assert "may not contain U+" in outcome.content
    assert await store.list_files(conversation_id) == {}


async def test_file_names_are_stored_in_nfc() -> None:
    """A decomposed name and its precomposed spelling name the same file (NFC)."""
    workspace, store, conversation_id = await _workspace()
    await workspace.call("write_file", json.dumps({"path": "cafe\u0301.txt", "content": "1"}))
    await workspace.call("write_file", json.dumps({"path": "caf\u00e9.txt", "content": "22"}))
    assert await store.list_files(conversation_id) == {"caf\u00e9.txt": 2}


async def test_a_stored_bad_name_does_not_break_listing() -> None:
    """A name stored before the checks (a lone surrogate) is left out of the listing, and
    the tools and JSON of the listing keep working."""
    workspace, store, conversation_id = await _workspace()
    await store.broker.map_set(conversation_id, "files", "\ud800.txt", b"x")
    await workspace.call("write_file", json.dumps({"path": "ok.txt", "content": "fine"}))
    files = await store.list_files(conversation_id)
    assert files == {"ok.txt": 4}
    json.dumps(files, ensure_ascii=False).encode()  # what GET /files sends
    listing = await workspace.call("list_files", "{}")
    assert not listing.is_error
    listing.content.encode()


async def test_non_finite_stored_totals_read_as_unknown_cost() -> None:
    """A total cost stored as infinity (two 1e308 costs added up by an earlier version)
    reads as None, not an error."""
    _, store, conversation_id = await _workspace()
    await store.broker.add_to_record(conversation_id, "cost_usd", 1e308)
    await store.broker.add_to_record(conversation_id, "cost_usd", 1e308)
    await store.broker.add_to_record(conversation_id, "input_tokens", float("inf"))
    usage, cost = await store.totals(conversation_id)
    assert cost is None
    assert usage.input_tokens == 0
