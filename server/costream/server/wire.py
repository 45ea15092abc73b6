"""Text frames written straight to a WebSocket connection's transport.

A server frame is not masked, so a logged frame's bytes are the same for every viewer:
:class:`Wire` frames them (RFC 6455: a two-to-ten-byte header, then the UTF-8 payload)
and writes them to the connection's asyncio transport in one call, one or several frames
at a time. Through the ASGI ``send`` each frame of each viewer would go through
Starlette's WebSocket, its exception middleware's wrapper, uvicorn's ``send`` and the
websockets protocol (encoding, a ``Frame`` object, a join), the part of the fan-out that
costs more than the socket write itself.

This reaches into uvicorn's WebSocket protocol, which is private: the ``websockets-sansio``
implementation (uvicorn's default since 0.50) keeps ``transport``, ``conn`` (a websockets
``ServerProtocol``), ``writable`` (cleared while the transport is paused), ``close_sent`` and
``disconnected``. Kept to this module, checked when a session starts, and used only for
what uvicorn's own ``websocket.send`` would write at that moment: the connection open, no
close sent, no compression, the transport not paused. Anything else (another server or
implementation, per-message deflate, a paused or closing transport) makes :meth:`write`
answer False and the frame goes through the ASGI ``send``. Why, in figures
(``tests/bench/bench_fanout.py --part a --viewers-a 1000``, beside the bare Starlette
forwarder, which sends through ASGI): server CPU per delivered frame 1.20x the
forwarder's through ASGI, 0.71x written here; with 30 ms merging 1.21x and 0.82x.
"""

from __future__ import annotations

import struct
from typing import Any, Final

from starlette.types import Scope, Send

try:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    from websockets.protocol import State
except ImportError:  # pragma: no cover - another uvicorn or websockets
    WebSocketsSansIOProtocol = None  # type: ignore[assignment,misc]

SERVER_SEND: Final = "costream.server_send"  # the scope key of the server's own ASGI send
_ATTRIBUTES: Final = ("transport", "conn", "writable", "close_sent", "disconnected")
_TEXT: Final = 0x81  # FIN, opcode 1 (text)
_SHORT: Final = [bytes((_TEXT, n)) for n in range(126)]
# At most this much goes in one write (then frames go one by one, each waiting while the
# transport is paused): asyncio's default high-water mark, so a replay page is not copied
# into the transport's buffer whole.
BATCH_BYTES: Final = 64 * 1024


def keep_server_send(scope: Scope, send: Send) -> None:
    """Called by the outermost middleware: remember the server's ``send`` for :meth:`Wire.of`."""
    scope[SERVER_SEND] = send


def frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented text frame of ``payload`` (UTF-8)."""
    size = len(payload)
    if size < 126:
        return _SHORT[size] + payload
    if size < 65536:
        return struct.pack("!BBH", _TEXT, 126, size) + payload
    return struct.pack("!BBQ", _TEXT, 127, size) + payload


class Wire:
    """One connection's transport, for text frames written without the ASGI ``send``."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    @classmethod
    def of(cls, scope: Scope) -> Wire | None:
        """The wire of an accepted WebSocket, or None where frames must go through ASGI."""
        protocol = getattr(scope.get(SERVER_SEND), "__self__", None)
        if WebSocketsSansIOProtocol is None or not isinstance(protocol, WebSocketsSansIOProtocol):
            return None
        if not all(hasattr(protocol, name) for name in _ATTRIBUTES):
            return None
        if protocol.conn.extensions:
            return None  # per-message deflate: each connection compresses on its own
        return cls(protocol)

    def writable(self) -> bool:
        """Whether uvicorn would write a frame now, without waiting."""
        protocol = self._protocol
        return (
            protocol.writable.is_set()
            and not protocol.close_sent
            and not protocol.disconnected
            and protocol.conn.state is State.OPEN
            and not protocol.transport.is_closing()
        )

    def write(self, payload: bytes) -> bool:
        """Write one text frame of ``payload`` if the transport takes it now; else False."""
        protocol = self._protocol  # once per frame and viewer: ``writable`` inlined
        transport = protocol.transport
        if (
            protocol.writable.is_set()
            and not protocol.close_sent
            and not protocol.disconnected
            and protocol.conn.state is State.OPEN
            and not transport.is_closing()
        ):
            transport.write(frame(payload))
            return True
        return False

    def write_texts(self, texts: list[str]) -> int:
        """Write the first text frames, at most about ``BATCH_BYTES``, in one transport
        write if it takes them now; how many were written (0: none). The rest must go
        through the ASGI ``send``, which waits while the transport is paused."""
        if not self.writable():
            return 0
        frames, size = [], 0
        for text in texts:
            frames.append(frame(text.encode()))
            size += len(frames[-1])
            if size >= BATCH_BYTES:
                break
        self._protocol.transport.write(b"".join(frames))
        return len(frames)
