"""Read timeouts for HTTP requests: a request's headers, then its body, must arrive in time.

uvicorn bounds only the idle time between two requests of a keep-alive connection
(``timeout_keep_alive``, armed once a response is complete). A connection that opens and
sends nothing, or a few bytes of a request line, or headers and then a trickle of body,
is held for as long as the client likes: a thousand of them hold a thousand sockets and
tasks. :class:`TimedH11Protocol` is uvicorn's own h11 protocol with two timers:

- the header timer, armed when the connection opens or when the first bytes of a
  request arrive on a kept-alive connection, disarmed when the request's headers are
  complete; when it fires, a client that sent part of a request gets ``408`` (and the
  connection is closed), one that sent nothing is just closed;
- the body timer, armed when the headers are complete and the request has a body,
  disarmed when the body is complete. The app answers ``408`` first where it reads the
  body (:func:`deps.read_json_body`, after ``body_timeout_s``); the timer closes the
  connection a moment later, or at once when the app had already answered without
  reading the body (a client trickling a body nobody reads).

A WebSocket upgrade hands the connection to the WebSocket protocol with its headers
complete, so both timers are off by then (the WebSocket's own ``hello_timeout_s``
follows). h11 is uvicorn's pure-Python HTTP implementation and one of its required
dependencies, so this class exists wherever uvicorn is installed.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

APP_ANSWER_GRACE_S: Final = 1.0  # after the body timeout, for the app's own 408 to go out

_BODY_408: Final = (
    b'{"error":{"code":"request_timeout","message":"the request did not arrive in time"}}'
)
RESPONSE_408: Final = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: application/json\r\n"
    b"connection: close\r\n"
    b"content-length: " + str(len(_BODY_408)).encode() + b"\r\n\r\n" + _BODY_408
)


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and body read timeouts (see the module)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    @classmethod
    def configure(cls, header_timeout_s: float, body_timeout_s: float) -> None:
        """Set this process's timeouts. uvicorn makes one protocol per connection from the
        class it is given (by name, in a worker of ``--workers``), with no room for
        arguments of ours; a process serves one app, so its class holds them."""
        cls.header_timeout_s = header_timeout_s
        cls.body_timeout_s = body_timeout_s

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_request_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start the next pipelined request
        self._follow_request_state()

    def _follow_request_state(self) -> None:
        if self.transport.get_protocol() is not self or self.transport.is_closing():
            self._disarm()  # upgraded to a WebSocket, or closed
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            self._cancel_body_timer()
            if self.conn.trailing_data[0]:  # part of the next request is here
                self._arm_header_timer()
        elif state is h11.SEND_BODY:
            self._cancel_header_timer()
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_late)
        else:
            self._disarm()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:
            self.transport.write(RESPONSE_408)  # h11 has no request to answer: written raw
        self._unset_keepalive_if_required()
        self.transport.close()

    def _body_late(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            # The app is still at work, maybe about to answer 408 itself: give it a moment.
            self._body_timer = self.loop.call_later(APP_ANSWER_GRACE_S, self._close)
            return
        self._close()

    def _close(self) -> None:
        self._body_timer = None
        if not self.transport.is_closing() and self.transport.get_protocol() is self:
            self.transport.close()

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _disarm(self) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()
