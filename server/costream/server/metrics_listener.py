"""``/metrics`` on a listener of its own (``--metrics-listen host:port``), so that the
public port does not show the server's figures and a firewall can keep the scraper's
port private.

A minimal HTTP/1.1 responder: it reads one request head (within the header timeout, at
most :data:`MAX_HEAD_BYTES`), answers ``GET``/``HEAD /metrics`` with the Prometheus text,
any other path 404 and any other method 405, and closes the connection. It runs in the
server's own event loop (one process), or in a thread of the parent process of
``--workers`` (:func:`serve_in_thread`), which adds up what the workers write.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Final

MAX_HEAD_BYTES: Final = 8 * 1024
_WRITE_TIMEOUT_S: Final = 10.0


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9100`` for IPv6) as a pair; ValueError saying what is wrong."""
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--metrics-listen wants host:port (like 127.0.0.1:9100), not {value!r}")
    return host, int(port)


def bind(value: str) -> socket.socket:
    """The listening socket for ``value`` (``host:port``); OSError if it cannot be had."""
    host, port = parse_listen(value)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _response(status: str, body: bytes, content_type: str, extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n"
    )
    return head.encode("ascii") + body


class MetricsListener:
    """Answers ``GET /metrics`` with ``render()`` on a socket of its own."""

    def __init__(self, render: Callable[[], str], header_timeout_s: float) -> None:
        self.render = render
        self.header_timeout_s = header_timeout_s

    async def serve(self, sock: socket.socket) -> None:
        """Serve on ``sock`` until cancelled."""
        server = await asyncio.start_server(self._answer, sock=sock, limit=MAX_HEAD_BYTES)
        async with server:
            await server.serve_forever()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(self.header_timeout_s):
                    head = await reader.readuntil(b"\r\n\r\n")
            except TimeoutError:
                writer.write(_response("408 Request Timeout", b"", "text/plain"))
                return
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return  # the client left, or sent a head too large to be a scrape
            writer.write(self._reply(head))
            async with asyncio.timeout(_WRITE_TIMEOUT_S):
                await writer.drain()
        except (OSError, TimeoutError):
            pass  # the client is gone or does not read: nothing to tell it
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(_WRITE_TIMEOUT_S):
                    await writer.wait_closed()

    def _reply(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _response("400 Bad Request", b"", "text/plain")
        method, target = parts[0], parts[1]
        if target.split(b"?", 1)[0] != b"/metrics":
            return _response("404 Not Found", b"not found\n", "text/plain")
        if method not in (b"GET", b"HEAD"):
            return _response("405 Method Not Allowed", b"", "text/plain", "allow: GET, HEAD\r\n")
        body = self.render().encode()
        answer = _response("200 OK", body, "text/plain; version=0.0.4; charset=utf-8")
        return answer[: len(answer) - len(body)] if method == b"HEAD" else answer


def serve_in_thread(listener: MetricsListener, sock: socket.socket) -> Callable[[], None]:
    """Serve ``listener`` on ``sock`` from a thread with its own event loop (the parent
    of ``--workers``, whose main thread runs uvicorn's supervisor); returns its stop."""
    loop = asyncio.new_event_loop()
    task = loop.create_task(listener.serve(sock))

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)
        loop.close()

    thread = threading.Thread(target=run, name="costream-metrics", daemon=True)
    thread.start()

    def stop() -> None:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(timeout=5)

    return stop
