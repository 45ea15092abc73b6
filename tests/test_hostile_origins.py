"""Where requests may come from: CSP on every HTML answer, the Host check against DNS
rebinding, and the default WebSocket Origin policy (finding 11, in part)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from costream.protocol import CLOSE_BAD_ORIGIN, SUBPROTOCOL
from tests.support.servers import ServerProcess
from tests.support.ws import create_conversation


def _get(url: str, host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """A raw HTTP/1.1 GET, with the Host header given (default: the URL's)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    request = f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host or parts.netloc}\r\nConnection: close\r\n\r\n"
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(request.encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


@pytest.mark.parametrize("path", ["/", "/c/someid", "/assets/index.html"])
async def test_every_html_answer_carries_a_csp_limited_to_self(
    server: ServerProcess, path: str
) -> None:
    """Every HTML answer, the static copy of the page included, has a CSP whose
    connect-src is the server itself (no ``ws:``/``wss:`` to any host)."""
    status, headers, _ = await asyncio.to_thread(_get, server.url + path)
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    policy = headers["content-security-policy"]
    directives = {d.split()[0]: d.split()[1:] for d in policy.split("; ")}
    assert directives["connect-src"] == ["'self'"]
    assert headers["x-content-type-options"] == "nosniff"


async def test_configured_origins_join_connect_src(
    start_server: Callable[..., ServerProcess],
) -> None:
    """Origins configured with COSTREAM_ALLOWED_ORIGINS are added to connect-src."""
    server = start_server(env={"COSTREAM_ALLOWED_ORIGINS": "https://app.example"})
    _, headers, _ = await asyncio.to_thread(_get, server.url + "/")
    policy = headers["content-security-policy"]
    assert "connect-src 'self' https://app.example wss://app.example;" in policy


async def test_foreign_host_on_loopback_is_refused(server: ServerProcess) -> None:
    """A server on loopback answers only to loopback names: a foreign Host (DNS
    rebinding) gets 421 on HTTP and no WebSocket."""
    status, _, body = await asyncio.to_thread(
        _get, server.url + "/healthz", "rebind.attacker.example"
    )
    assert status == 421
    assert json.loads(body)["error"]["code"] == "bad_host"
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}"):
        status, _, _ = await asyncio.to_thread(_get, server.url + "/healthz", host)
        assert status == 200
    conversation = await create_conversation(server.url)
    status = await asyncio.to_thread(
        _upgrade, server, conversation["id"], "rebind.attacker.example"
    )
    assert status == 403
    own = urlsplit(server.url).netloc
    assert await asyncio.to_thread(_upgrade, server, conversation["id"], own) == 101


def _upgrade(server: ServerProcess, conversation_id: str, host: str) -> int:
    """The status of a WebSocket upgrade sent with this Host (and a matching Origin)."""
    parts = urlsplit(server.url)
    assert parts.hostname is not None and parts.port is not None
    request = (
        f"GET /ws/conversations/{conversation_id} HTTP/1.1\r\nHost: {host}\r\n"
        f"Origin: http://{host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
    )
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(request.encode())
        answer = b""
        while b"\r\n" not in answer:
            answer += sock.recv(4096)
    return int(answer.split(b" ", 2)[1])


async def test_allowed_hosts_checked_when_not_on_loopback(
    start_server: Callable[..., ServerProcess],
) -> None:
    """Listening beyond loopback with COSTREAM_ALLOWED_HOSTS, only those names are served."""
    server = start_server(
        env={"COSTREAM_HOST": "0.0.0.0", "COSTREAM_ALLOWED_HOSTS": "costream.example, 127.0.0.1"}
    )
    status, _, _ = await asyncio.to_thread(_get, server.url + "/healthz", "costream.example")
    assert status == 200
    status, _, _ = await asyncio.to_thread(_get, server.url + "/healthz", "other.example")
    assert status == 421


async def _origin_close(server: ServerProcess, origin: str, host: str | None = None) -> int | None:
    """The close code a WebSocket from ``origin`` gets right after hello (None: welcomed)."""
    conversation = await create_conversation(server.url)
    headers = {"Host": host} if host else {}
    async with connect(
        server.ws_url(conversation["id"]),
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        origin=origin,  # type: ignore[arg-type]
        additional_headers=headers,
    ) as ws:
        hello = {
            "type": "hello",
            "conversationId": conversation["id"],
            "token": conversation["viewToken"],
        }
        try:
            await ws.send(json.dumps(hello))
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None
        assert first["type"] == "welcome", first
        return None


async def test_public_server_refuses_localhost_origins(
    start_server: Callable[..., ServerProcess],
) -> None:
    """Listening beyond loopback, a page on localhost (any port) is not the server's own
    origin: 4403. The server's own origin is still served."""
    server = start_server(env={"COSTREAM_HOST": "0.0.0.0"})
    assert await _origin_close(server, "http://localhost:9999") == CLOSE_BAD_ORIGIN
    assert await _origin_close(server, "http://127.0.0.1:1") == CLOSE_BAD_ORIGIN
    assert await _origin_close(server, server.url) is None


async def test_loopback_server_accepts_localhost_origins(server: ServerProcess) -> None:
    """On loopback (a developer's machine), a page on another localhost port may connect."""
    assert await _origin_close(server, "http://localhost:5173") is None
    assert await _origin_close(server, "https://evil.example") == CLOSE_BAD_ORIGIN
