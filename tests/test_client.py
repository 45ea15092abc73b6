"""The Python client against real servers: order, resume, and the errors it stops on."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from costream import protocol
from costream.client import (
    Conversation,
    ConversationNotFound,
    Refused,
    Unauthorized,
    connect,
    parse_link,
)
from tests.support.servers import ServerProcess
from tests.support.ws import ahttp, create_conversation

STORY_PROMPT = (
    "Tell me a long story about LLM streaming, write it to a file, "
    "make sure it has multiple paragraphs."
)
TERMINAL = (protocol.RunFinished, protocol.RunError)


async def until_run_ends(conv: Conversation, seen: list[protocol.Event]) -> None:
    """Collect logged events into ``seen`` until a run ends."""
    async with asyncio.timeout(90):
        async for event in conv:
            if isinstance(event, protocol.Presence):
                continue
            seen.append(event)
            if isinstance(event, TERMINAL):
                return


async def logged_events(base_url: str, created: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation's log, as the HTTP API returns it."""
    status, events = await ahttp(
        "GET", f"{base_url}/api/conversations/{created['id']}/events", token=created["viewToken"]
    )
    assert status == 200, events
    return list(events)


def _plain(event: protocol.Event) -> Any:
    """An event as the JSON object the server sent."""
    return json.loads(protocol.encode(event))


def test_share_links_and_websocket_urls_parse_to_the_same_place() -> None:
    """The token comes from the fragment, the ws URL from the page URL, prefixes kept."""
    link = parse_link("https://example.com/chat/c/abc123#t=tok")
    assert link.ws_url == "wss://example.com/chat/ws/conversations/abc123"
    assert link.http_url == "https://example.com/chat"
    assert (link.conversation_id, link.token) == ("abc123", "tok")
    same = parse_link("ws://127.0.0.1:9/ws/conversations/abc123", "tok")
    assert same.ws_url == "ws://127.0.0.1:9/ws/conversations/abc123"
    assert same.token == "tok"


async def test_client_yields_the_full_run_in_order_with_contiguous_seqs(
    server: ServerProcess,
) -> None:
    """A writer's client sends, gets the run id, and yields exactly the log, in order."""
    created = await create_conversation(server.url)
    seen: list[protocol.Event] = []
    async with connect(created["writeUrl"]) as conv:
        assert (conv.role, conv.conversation_id) == ("writer", created["id"])
        assert conv.model and conv.epoch and conv.viewers == 1
        run_id = await conv.send(STORY_PROMPT)
        await until_run_ends(conv, seen)
        assert conv.last_seq == len(seen)
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    assert isinstance(seen[0], protocol.RunStarted) and seen[0].run_id == run_id
    assert isinstance(seen[-1], protocol.RunFinished) and seen[-1].run_id == run_id
    names = [e.tool_call_name for e in seen if isinstance(e, protocol.ToolCallStart)]
    assert names == ["write_file"]
    assert [_plain(e) for e in seen] == await logged_events(server.url, created)


async def test_client_resumes_across_a_server_restart_without_duplicate_or_gap(
    start_server: Callable[..., ServerProcess], redis_url: str
) -> None:
    """Restarting the only server mid-run: the client reconnects and yields the log once."""
    server = start_server(
        redis_url=redis_url,
        env={"COSTREAM_DEMO_DELAY_MS": "5", "COSTREAM_LEASE_TTL_MS": "2000"},
    )
    created = await create_conversation(server.url)
    seen: list[protocol.Event] = []
    async with connect(created["writeUrl"]) as conv:
        await conv.send(STORY_PROMPT)
        async with asyncio.timeout(60):
            async for event in conv:
                if isinstance(event, protocol.Presence):
                    continue
                seen.append(event)
                if len(seen) == 20:
                    await asyncio.to_thread(server.restart)
                if isinstance(event, TERMINAL):
                    break
        assert conv.reconnects >= 1
        assert conv.close_codes[0] in (1001, 1006, 1012)
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    assert [_plain(e) for e in seen] == await logged_events(server.url, created)


async def test_wrong_token_raises_the_4401_error(server: ServerProcess) -> None:
    """A wrong token stops the client at connect with Unauthorized (4401)."""
    created = await create_conversation(server.url)
    with pytest.raises(Unauthorized) as raised:
        async with connect(server.ws_url(created["id"]), "not-the-token"):
            pass
    assert raised.value.code == 4401


async def test_unknown_conversation_raises_the_4404_error(server: ServerProcess) -> None:
    """An unknown id stops the client with ConversationNotFound (4404), token or not."""
    with pytest.raises(ConversationNotFound) as raised:
        async with connect(f"{server.url}/c/nosuchconversation#t=whatever"):
            pass
    assert raised.value.code == 4404


async def test_send_with_a_view_token_is_refused_as_forbidden(server: ServerProcess) -> None:
    """A viewer's send() raises Refused with code forbidden; the connection stays usable."""
    created = await create_conversation(server.url)
    async with connect(created["viewUrl"]) as conv:
        assert conv.role == "viewer"
        with pytest.raises(Refused) as raised:
            await conv.send("hello")
        assert raised.value.code == "forbidden"
        with pytest.raises(Refused) as cancel_refused:
            await conv.cancel()
        assert cancel_refused.value.code == "forbidden"


async def test_cancel_with_nothing_running_is_refused_as_no_run(server: ServerProcess) -> None:
    """cancel() raises Refused(no_run) when the conversation is idle."""
    created = await create_conversation(server.url)
    async with connect(created["writeUrl"]) as conv:
        with pytest.raises(Refused) as raised:
            await conv.cancel()
        assert raised.value.code == "no_run"


# ---- resuming through a proxy that drops the connection -------------------------------


class TcpProxy:
    """A real TCP forwarder in front of a server that can drop every connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.update((client_w, server_w))

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    def drop_all(self) -> None:
        """Abort every open connection: no close frame, like a network failure."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.drop_all()
        if self._server is not None:
            self._server.close()


@contextlib.asynccontextmanager
async def proxied(server: ServerProcess) -> AsyncIterator[TcpProxy]:
    """A proxy in front of ``server`` for the duration of the block."""
    forwarder = TcpProxy(server.port)
    await forwarder.start()
    try:
        yield forwarder
    finally:
        await forwarder.close()


async def test_client_resumes_after_its_socket_is_dropped(
    start_server: Callable[..., ServerProcess],
) -> None:
    """A connection that vanishes (1006) is resumed from the last seq yielded."""
    server = start_server(env={"COSTREAM_DEMO_DELAY_MS": "5"})
    created = await create_conversation(server.url)
    async with proxied(server) as proxy:
        await drop_twice_during_a_run(server, proxy, created)


async def drop_twice_during_a_run(
    server: ServerProcess, proxy: TcpProxy, created: dict[str, Any]
) -> None:
    seen: list[protocol.Event] = []
    async with connect(
        f"ws://127.0.0.1:{proxy.port}/ws/conversations/{created['id']}", created["writeToken"]
    ) as conv:
        await conv.send(STORY_PROMPT)
        async with asyncio.timeout(60):
            async for event in conv:
                if isinstance(event, protocol.Presence):
                    continue
                seen.append(event)
                if len(seen) in (5, 40):
                    proxy.drop_all()
                if isinstance(event, TERMINAL):
                    break
        assert conv.close_codes[:2] == [1006, 1006]
    assert proxy.connections >= 3
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    assert [_plain(e) for e in seen] == await logged_events(server.url, created)
