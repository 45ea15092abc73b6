"""Named presence: who is watching (name, role, since, colour), across processes, bounded,
with names cut and cleaned; clients that send no name keep working.

Brokers are held to it directly (memory, SQLite, Redis on a real redis-server); the rest
goes through real ``costream serve`` processes over WebSocket.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from costream import names as display_names
from costream import protocol
from costream.broker import Broker
from costream.broker.memory import MemoryBroker
from costream.broker.redis import RedisBroker
from costream.broker.sqlite import SqliteBroker
from costream.store import mint_id
from tests.support.servers import ServerProcess
from tests.support.ws import Session, close_code, create_conversation, open_session

WAIT_S = 20.0  # a bound against hanging, never a measure of speed
LONG_TTL_MS = 60_000


async def join(url: str, conversation_id: str, token: str, name: str | None) -> Session:
    """A WebSocket session past ``welcome`` whose hello carries ``name``."""
    ws = await connect(url, subprotocols=[protocol.SUBPROTOCOL])  # type: ignore[list-item]
    hello = {"type": "hello", "conversationId": conversation_id, "token": token, "name": name}
    await ws.send(json.dumps(hello))
    welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert welcome["type"] == "welcome", welcome
    return Session(ws, welcome)


async def presence_with(session: Session, viewers: int) -> dict[str, Any]:
    """The first presence frame that counts ``viewers``."""
    while (frame := await session.until("presence", timeout=WAIT_S))["viewers"] != viewers:
        pass
    return frame


def names(people: list[dict[str, Any]]) -> list[str | None]:
    return [person.get("name") for person in people]


# ---- names ------------------------------------------------------------------------------


def test_names_lose_control_and_bidi_characters_and_are_cut_in_chars_and_bytes() -> None:
    """Control, bidi and zero-width characters go, whitespace runs become one space,
    and a name is cut to 40 characters and 120 UTF-8 bytes; nothing left is no name."""
    assert display_names.clean_name("  Ann\tLee \n") == "Ann Lee"
    assert display_names.clean_name("Eve\u202egnirts\u2066x\u200b\x1b[31m") == "Evegnirtsx[31m"
    assert display_names.clean_name("a" * 100) == "a" * display_names.NAME_MAX_CHARS
    emoji = display_names.clean_name("😀" * 40)
    assert emoji == "😀" * 30 and len(emoji.encode()) == display_names.NAME_MAX_BYTES
    assert display_names.clean_name("\u202e\u200b \x07") is None
    assert display_names.clean_name(None) is None
    assert display_names.clean_name("<b>Zoë</b> & co") == "<b>Zoë</b> & co"  # text, kept as typed


# ---- brokers ----------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def broker_and_frames(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Broker, list[bytes]]]:
    """A started broker of each kind and the presence frames it publishes."""
    broker: Broker
    if request.param == "redis":
        broker = RedisBroker(request.getfixturevalue("redis_url"))
    elif request.param == "sqlite":
        broker = SqliteBroker(tmp_path / "data")
    else:
        broker = MemoryBroker()
    frames: list[bytes] = []
    await broker.start(lambda _, frame: frames.append(frame), lambda _: None)
    yield broker, frames
    await broker.close()


def person(viewer_id: str, name: str | None = None, since: int = 0) -> bytes:
    entry = protocol.Person(id=viewer_id, role="viewer", since=since, color="#175cd3", name=name)
    return protocol.encoder.encode(entry)


async def wait_for(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not condition():
            await asyncio.sleep(0.01)


async def test_presence_lists_the_first_fifty_in_join_order_and_counts_all(
    broker_and_frames: tuple[Broker, list[bytes]],
) -> None:
    """55 viewers: the count says 55, the list holds the first 50 who joined, in order;
    when one of them leaves, the 51st moves up."""
    broker, frames = broker_and_frames
    conversation_id = mint_id()
    await broker.create_conversation(conversation_id, {"title": b"t"})
    await broker.subscribe(conversation_id)
    for n in range(55):
        assert (
            await broker.presence_join(
                conversation_id, f"v{n:02}", LONG_TTL_MS, person(f"v{n:02}", f"P{n}")
            )
            == n + 1
        )
    listed = [json.loads(entry)["id"] for entry in await broker.presence_people(conversation_id)]
    assert listed == [f"v{n:02}" for n in range(protocol.PRESENCE_MAX_PEOPLE)]
    await wait_for(lambda: b'"viewers":55,' in b"".join(frames))
    last = protocol.server_frame_decoder.decode(frames[-1])
    assert isinstance(last, protocol.Presence)
    assert last.viewers == 55
    assert [p.name for p in last.people] == [f"P{n}" for n in range(50)]

    await broker.presence_leave(conversation_id, "v03")
    listed = [json.loads(entry)["id"] for entry in await broker.presence_people(conversation_id)]
    assert listed == [f"v{n:02}" for n in range(51) if n != 3]


async def test_an_expired_viewer_leaves_the_list_with_the_count(
    broker_and_frames: tuple[Broker, list[bytes]],
) -> None:
    """A viewer whose process stopped refreshing drops out of the count and the list;
    a viewer joined without an entry is counted and not listed."""
    broker, frames = broker_and_frames
    conversation_id = mint_id()
    await broker.create_conversation(conversation_id, {"title": b"t"})
    await broker.subscribe(conversation_id)
    await broker.presence_join(conversation_id, "alive", LONG_TTL_MS, person("alive", "Ann"))
    await broker.presence_join(conversation_id, "dead", 300, person("dead", "Ghost"))
    assert await broker.presence_join(conversation_id, "plain", LONG_TTL_MS) == 3
    assert [json.loads(e)["name"] for e in await broker.presence_people(conversation_id)] == [
        "Ann",
        "Ghost",
    ]
    async with asyncio.timeout(WAIT_S):
        while await broker.presence_refresh(conversation_id, ["alive", "plain"], LONG_TTL_MS) != 2:
            await asyncio.sleep(0.05)
    assert [json.loads(e)["name"] for e in await broker.presence_people(conversation_id)] == ["Ann"]
    await wait_for(lambda: frames[-1].startswith(b'{"type":"presence","viewers":2,'))
    assert json.loads(frames[-1])["people"] == [json.loads(person("alive", "Ann"))]


# ---- over WebSocket ---------------------------------------------------------------------


async def test_viewers_see_who_is_here_with_name_role_since_and_colour(
    server: ServerProcess,
) -> None:
    """welcome and presence list the people watching in join order, with their role,
    when they joined and a colour that stays with the name; an unnamed client is listed
    without a name and still counted."""
    conv = await create_conversation(server.url)
    url, cid = server.ws_url(conv["id"]), conv["id"]
    ann = await join(url, cid, conv["viewToken"], "Ann")
    assert ann.welcome["viewers"] == 1
    [me] = ann.welcome["people"]
    assert me["id"] == ann.welcome["viewerId"]
    assert (me["name"], me["role"]) == ("Ann", "viewer")
    assert re.fullmatch(r"#[0-9a-f]{6}", me["color"])

    bob = await join(url, cid, conv["writeToken"], "Bob")
    frame = await presence_with(ann, 2)
    assert [(p["name"], p["role"]) for p in frame["people"]] == [
        ("Ann", "viewer"),
        ("Bob", "writer"),
    ]
    assert frame["people"] == bob.welcome["people"]
    assert frame["people"][0]["since"] <= frame["people"][1]["since"]

    old_client = await open_session(url, cid, conv["viewToken"])  # a hello with no name
    frame = await presence_with(ann, 3)
    assert names(frame["people"]) == ["Ann", "Bob", None]
    again = await join(url, cid, conv["viewToken"], "ann")
    frame = await presence_with(ann, 4)
    assert frame["people"][3]["color"] == me["color"]  # the name's colour, in any session

    await bob.close()
    frame = await presence_with(ann, 3)
    assert names(frame["people"]) == ["Ann", None, "ann"]
    for session in (ann, old_client, again):
        await session.close()


async def test_a_name_is_cleaned_before_others_see_it_and_an_absurd_one_is_refused(
    server: ServerProcess,
) -> None:
    """A name with bidi and control characters reaches others cleaned and cut; a hello
    whose name is over 1000 characters is a bad frame (4400)."""
    conv = await create_conversation(server.url)
    url, cid = server.ws_url(conv["id"]), conv["id"]
    watcher = await join(url, cid, conv["viewToken"], None)
    tricky = await join(url, cid, conv["viewToken"], "\u202eMallory\x1b[2J\n" + "x" * 60)
    frame = await presence_with(watcher, 2)
    assert frame["people"][1]["name"] == ("Mallory[2J " + "x" * 60)[: display_names.NAME_MAX_CHARS]
    await tricky.close()

    ws = await connect(url, subprotocols=[protocol.SUBPROTOCOL])  # type: ignore[list-item]
    hello = {"type": "hello", "conversationId": cid, "token": conv["viewToken"], "name": "y" * 1001}
    await ws.send(json.dumps(hello))
    assert await close_code(ws) == protocol.CLOSE_BAD_FRAME
    await watcher.close()


async def test_people_on_two_processes_see_each_other_through_redis(
    start_server: Callable[..., ServerProcess], redis_url: str
) -> None:
    """With Redis, a viewer on one process is listed, by name, to a viewer on another,
    and its leaving is seen there too."""
    one = start_server(redis_url=redis_url)
    two = start_server(redis_url=redis_url)
    conv = await create_conversation(one.url)
    cid = conv["id"]
    ann = await join(one.ws_url(cid), cid, conv["viewToken"], "Ann")
    bob = await join(two.ws_url(cid), cid, conv["writeToken"], "Bob")
    assert names(bob.welcome["people"]) == ["Ann", "Bob"]
    frame = await presence_with(ann, 2)
    assert [(p["name"], p["role"]) for p in frame["people"]] == [
        ("Ann", "viewer"),
        ("Bob", "writer"),
    ]
    await bob.close()
    frame = await presence_with(ann, 1)
    assert names(frame["people"]) == ["Ann"]
    await ann.close()


async def test_a_message_carries_the_name_of_the_session_that_sent_it(
    server: ServerProcess,
) -> None:
    """RUN_STARTED's user message carries its sender's cleaned name (AG-UI ``name``), and
    so does the snapshot's; a sender with no name sends a message with none."""
    conv = await create_conversation(server.url)
    url, cid = server.ws_url(conv["id"]), conv["id"]
    writer = await join(url, cid, conv["writeToken"], " Ada\u202e ")
    await writer.send({"type": "message", "content": "hello"})
    started = await writer.until("RUN_STARTED")
    assert started["input"]["messages"][0]["name"] == "Ada"
    await writer.until_run_ends()
    await writer.close()
    stale = await open_session(url, cid, conv["viewToken"], epoch="another-epoch")
    snapshot = await stale.until("MESSAGES_SNAPSHOT")
    assert snapshot["messages"][0]["name"] == "Ada"
    await stale.close()
    anonymous = await join(url, cid, conv["writeToken"], None)
    await anonymous.send({"type": "message", "content": "again"})
    while (started := await anonymous.until("RUN_STARTED"))["input"]["messages"][0][
        "content"
    ] != "again":
        pass  # the replay of the first run
    assert "name" not in started["input"]["messages"][0]
    await anonymous.until_run_ends()
    await anonymous.close()
