"""TCP relays for the tests: a base ``Relay``, a proxy that can stop reading from the
server behind it (a viewer that stalls), and a relay that holds back or drops one answer
of the server (a client whose request succeeded but whose answer was lost).

A client library buffers what the kernel hands it, so "not calling recv" does not stall a
connection at once. The proxy does: paused, it reads nothing from the server, and with a
small receive buffer the server's sends back up within a few tens of kilobytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Self


class Relay:
    """A TCP listener on ``127.0.0.1:port`` whose connections a subclass relays somewhere
    (``_accept``); used as ``async with``, it closes every relayed connection on exit."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        raise NotImplementedError

    def _relay(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        *,
        gate: asyncio.Event | None = None,
        chunk: int = 65536,
    ) -> None:
        """Copy ``source`` to ``sink`` in the background (reading only while ``gate`` is
        set), then close ``sink``."""

        async def pump() -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while True:
                    if gate is not None:
                        await gate.wait()
                    data = await source.read(chunk)
                    if not data:
                        break
                    sink.write(data)
                    await sink.drain()
            sink.close()

        task = asyncio.create_task(pump())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class StallingProxy(Relay):
    """Forwards ``127.0.0.1:port`` to the server's port; ``pause()`` stops the server side."""

    def __init__(self, upstream_port: int, receive_buffer: int = 4096) -> None:
        super().__init__()
        self.upstream_port = upstream_port
        self.receive_buffer = receive_buffer
        self.flowing = asyncio.Event()
        self.flowing.set()

    def pause(self) -> None:
        """Stop reading from the server."""
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    async def _accept(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.upstream_port))
        # A small read limit too, so asyncio's own buffer holds little.
        server_in, server_out = await asyncio.open_connection(sock=sock, limit=4096)
        self._relay(client_in, server_out, chunk=4096)
        self._relay(server_in, client_out, gate=self.flowing, chunk=4096)


class LosingRelay(Relay):
    """Forwards ``127.0.0.1:port`` to the server's port, and spoils the server's first
    answer to a request carrying ``trigger`` (the first whose bytes start with
    ``answer_prefix``): held ``delay_s`` seconds before it is forwarded, or, with
    ``drop``, never forwarded and the connection closed. The server has done the work by
    then: the client sees a lost answer to a request that succeeded. ``spoiled`` is set
    once it happened."""

    def __init__(
        self,
        upstream_port: int,
        trigger: bytes,
        *,
        delay_s: float = 0.0,
        drop: bool = False,
        answer_prefix: bytes = b"",
    ) -> None:
        super().__init__()
        self.upstream_port, self.trigger = upstream_port, trigger
        self.delay_s, self.drop, self.answer_prefix = delay_s, drop, answer_prefix
        self.spoiled = asyncio.Event()

    async def _accept(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        server_in, server_out = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        armed = asyncio.Event()  # this connection's next answer is the one to spoil

        async def requests() -> None:
            with contextlib.suppress(OSError):
                while data := await client_in.read(65536):
                    if self.trigger in data and not self.spoiled.is_set():
                        armed.set()
                    server_out.write(data)
                    await server_out.drain()
            server_out.close()

        async def answers() -> None:
            with contextlib.suppress(OSError):
                while data := await server_in.read(65536):
                    if armed.is_set() and data.startswith(self.answer_prefix):
                        armed.clear()
                        self.spoiled.set()
                        if self.drop:
                            break
                        await asyncio.sleep(self.delay_s)
                    client_out.write(data)
                    await client_out.drain()
            client_out.close()
            server_out.close()

        for pump in (requests(), answers()):
            task = asyncio.create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
