"""The Python client of PROTOCOL.md, on the ``websockets`` library.

    async with connect("http://127.0.0.1:8000/c/<id>#t=<token>") as conv:
        print(conv.role, conv.model, conv.viewers)
        run_id = await conv.send("Tell me a story")
        async for event in conv:
            ...

Iterating yields the conversation's logged events (the msgspec Structs of
:mod:`costream.protocol`) in ``seq`` order, with no gap and no duplicate across
reconnects, and also the ``Presence`` frames (each also updates ``conv.viewers``). When a
reconnect lands in ``snapshot`` mode (the events it missed were trimmed, or the log was
recreated) it yields a ``MessagesSnapshot`` first: drop what you had and rebuild from it.
If no run had ended yet, that snapshot is empty and has ``seq`` 0.

Errors, all under costream's root ``CostreamError``::

    ClientError
    ├── BadLink           the URL is no conversation link, or carries no token
    ├── Unreachable       no connection (refused at first, or max_retries used up)
    ├── Closed            the server closed for good: ``code``, ``reason``
    │   ├── Unauthorized          4401 missing or wrong token
    │   ├── OriginRefused         4403
    │   └── ConversationNotFound  4404
    ├── ConnectionLost    the connection dropped while send() or cancel() awaited a reply
    └── Refused           an ``error`` frame answered send() or cancel(): ``code``, ``message``

This module imports neither the server nor LiteLLM, so it loads fast.
"""

from __future__ import annotations

import asyncio
import random
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Final, Literal, NoReturn

import msgspec
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from costream import protocol
from costream.errors import CostreamError
from costream.protocol import (
    CLOSE_BAD_FRAME,
    CLOSE_BAD_ORIGIN,
    CLOSE_BAD_TOKEN,
    CLOSE_GOING_AWAY,
    CLOSE_LOST_TAIL,
    CLOSE_OVERLOADED,
    CLOSE_SERVER_ERROR,
    CLOSE_SLOW_CONSUMER,
    CLOSE_UNKNOWN_CONVERSATION,
    SUBPROTOCOL,
    Event,
    MessagesSnapshot,
    Presence,
)

CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_ABNORMAL: Final = 1006  # no close frame: the socket just went away
CLOSE_SERVICE_RESTART: Final = 1012  # uvicorn's code for the connections it drops on exit
CLOSE_CLIENT_GAP: Final = 4001  # what this client sends when it saw a seq jump

# Close codes after which the client reconnects and resumes (PROTOCOL.md, "Close codes").
RECONNECT_CODES: Final = frozenset(
    {
        CLOSE_GOING_AWAY,
        CLOSE_ABNORMAL,
        CLOSE_SERVER_ERROR,
        CLOSE_SERVICE_RESTART,
        CLOSE_OVERLOADED,
        CLOSE_LOST_TAIL,
        CLOSE_SLOW_CONSUMER,
        CLOSE_CLIENT_GAP,
    }
)

OPEN_TIMEOUT_S: Final = 10.0
WELCOME_TIMEOUT_S: Final = 10.0
SEND_TIMEOUT_S: Final = 10.0
REPLY_TIMEOUT_S: Final = 60.0
# The server sends a heartbeat at least every 20 s when idle; silence this long means the
# connection is dead even if TCP has not noticed.
IDLE_TIMEOUT_S: Final = 45.0
MAX_FRAME_BYTES: Final = 1024 * 1024

Item = tuple[Event | Presence, str]  # a frame and its text as the server sent it


class ClientError(CostreamError):
    """Root of the errors this client raises."""


class BadLink(ClientError):
    """The URL is not a conversation link, or no token came with it."""


class Unreachable(ClientError):
    """The server could not be reached."""


class Closed(ClientError):
    """The server closed the connection with a code that says: do not come back."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"connection closed {code}: {reason or 'no reason given'}")
        self.code = code
        self.reason = reason


class Unauthorized(Closed):
    """4401: the token is missing or wrong."""


class OriginRefused(Closed):
    """4403: the server does not accept this origin."""


class ConversationNotFound(Closed):
    """4404: there is no such conversation."""


class ConnectionLost(ClientError):
    """The connection dropped while a request waited for its reply; its outcome is unknown."""


class Refused(ClientError):
    """The server answered a request with an ``error`` frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


_CLOSED_BY_CODE: Final[dict[int, type[Closed]]] = {
    CLOSE_BAD_TOKEN: Unauthorized,
    CLOSE_BAD_ORIGIN: OriginRefused,
    CLOSE_UNKNOWN_CONVERSATION: ConversationNotFound,
}


def closed_error(code: int, reason: str) -> Closed:
    """The ``Closed`` subclass for a close code."""
    return _CLOSED_BY_CODE.get(code, Closed)(code, reason)


class Link(msgspec.Struct, frozen=True):
    """Where a conversation lives: its WebSocket URL, its HTTP base URL, id and token."""

    ws_url: str
    http_url: str
    conversation_id: str
    token: str


def parse_link(url: str, token: str | None = None) -> Link:
    """Parse a share link ``http(s)://host/c/<id>#t=<token>`` or a WebSocket URL
    ``ws(s)://host/ws/conversations/<id>``; ``token`` wins over the fragment's."""
    parts = urllib.parse.urlsplit(url.strip())
    fragment = urllib.parse.parse_qs(parts.fragment)
    token = token or (fragment.get("t") or [""])[0]
    path = parts.path.rstrip("/")
    if parts.scheme in ("http", "https") and "/c/" in path:
        prefix, _, conversation_id = path.rpartition("/c/")
        ws_scheme = "wss" if parts.scheme == "https" else "ws"
        http_scheme = parts.scheme
    elif parts.scheme in ("ws", "wss") and "/ws/conversations/" in path:
        prefix, _, conversation_id = path.rpartition("/ws/conversations/")
        ws_scheme = parts.scheme
        http_scheme = "https" if parts.scheme == "wss" else "http"
    else:
        raise BadLink(
            "not a conversation link: expected http(s)://host/c/<id>#t=<token> "
            "or ws(s)://host/ws/conversations/<id>"
        )
    if not conversation_id or "/" in conversation_id or not parts.netloc:
        raise BadLink("not a conversation link: no conversation id in the path")
    if not token:
        raise BadLink("no token: use a link that ends in #t=<token>, or pass the token")
    ws_url = urllib.parse.urlunsplit(
        (ws_scheme, parts.netloc, f"{prefix}/ws/conversations/{conversation_id}", "", "")
    )
    http_url = urllib.parse.urlunsplit((http_scheme, parts.netloc, prefix, "", ""))
    return Link(ws_url=ws_url, http_url=http_url, conversation_id=conversation_id, token=token)


class _Reconnect(Exception):
    """End this connection and open a new one (carries the close code to report)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


_PendingKind = Literal["send", "cancel"]


class Conversation:
    """One subscription to a conversation that survives reconnects. Make it with :func:`connect`."""

    def __init__(
        self,
        link: Link,
        *,
        last_seq: int = 0,
        epoch: str | None = None,
        from_start: bool = True,
        max_buffered: int = 10_000,
        max_retries: int | None = None,
        backoff_base: float = 0.25,
        backoff_cap: float = 15.0,
        on_status: Callable[[str], None] | None = None,
    ) -> None:
        self.link = link
        self.conversation_id = link.conversation_id
        self.last_seq = last_seq
        self.epoch = epoch
        self.role: Literal["viewer", "writer"] = "viewer"
        self.model = ""
        self.viewers = 0
        self.head = 0
        self.reconnects = 0
        self.close_codes: list[int] = []  # every close that led to a reconnect, in order
        self._from_start = from_start or last_seq > 0
        self._max_retries = max_retries
        self._backoff = (backoff_base, backoff_cap)
        self._on_status = on_status
        self._skip_through = 0
        self._expect_snapshot = False
        self._progressed = False  # this connection delivered something: reset the backoff
        self._queue: asyncio.Queue[Item | ClientError] = asyncio.Queue(max_buffered)
        self._failure: ClientError | None = None
        self._ws: ClientConnection | None = None
        self._connected = asyncio.Event()
        self._ready: asyncio.Future[None] | None = None
        self._pending: deque[tuple[_PendingKind, asyncio.Future[protocol.Frame]]] = deque()
        self._request_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Conversation:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Connect and wait for the first ``welcome``; raises ``ClientError`` if refused."""
        self._ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name=f"costream-client-{self.link.ws_url}")
        try:
            await self._ready
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Close the connection and stop reconnecting."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._fail_pending(ConnectionLost("the client was closed"))

    # ---- reading --------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Event | Presence]:
        return self

    async def __anext__(self) -> Event | Presence:
        frame, _ = await self.next_with_text()
        return frame

    async def next_with_text(self) -> Item:
        """The next frame with its exact text from the server (a synthesized empty
        snapshot is encoded here). Raises the ``ClientError`` that ended the subscription."""
        if self._failure is not None and self._queue.empty():
            raise self._failure
        item = await self._queue.get()
        if isinstance(item, ClientError):
            self._failure = item
            raise item
        return item

    # ---- requests -------------------------------------------------------------------

    async def send(self, text: str) -> str:
        """Start a run with a user message; returns its ``runId`` once it is in the log.
        Raises ``Refused`` (``run_active``, ``forbidden``, ``too_large``, ...)."""
        reply = await self._request("send", protocol.SendMessage(content=text))
        if isinstance(reply, protocol.Accepted):
            return reply.run_id
        raise ClientError(f"unexpected reply to a message: {type(reply).__name__}")

    async def cancel(self) -> None:
        """Cancel the running run. Raises ``Refused`` (``no_run``, ``forbidden``)."""
        # A cancel that works has no reply of its own (its outcome is RUN_FINISHED
        # cancelled in the log); the ping behind it tells us the server got past it.
        await self._request("cancel", protocol.Cancel(), protocol.Ping())

    async def _request(self, kind: _PendingKind, *frames: protocol.Frame) -> protocol.Frame:
        try:
            async with asyncio.timeout(REPLY_TIMEOUT_S):
                async with self._request_lock:
                    if self._failure is not None:
                        raise self._failure
                    await self._connected.wait()
                    ws = self._ws
                    assert ws is not None
                    reply: asyncio.Future[protocol.Frame] = (
                        asyncio.get_running_loop().create_future()
                    )
                    self._pending.append((kind, reply))
                    try:
                        for frame in frames:
                            await ws.send(protocol.encode(frame).decode())
                    except ConnectionClosed:
                        raise ConnectionLost(
                            "the connection dropped before the request went out"
                        ) from None
                answer = await reply
        except TimeoutError:
            raise ConnectionLost(f"no reply within {REPLY_TIMEOUT_S:.0f} s") from None
        if isinstance(answer, protocol.Error):
            raise Refused(answer.code, answer.message)
        return answer

    def _resolve(self, frame: protocol.Accepted | protocol.Error | protocol.Pong) -> None:
        # The server answers frames in the order it got them, one reader per session.
        if self._pending:
            _, future = self._pending.popleft()
            if not future.done():
                future.set_result(frame)

    def _fail_pending(self, error: ClientError) -> None:
        while self._pending:
            _, future = self._pending.popleft()
            if not future.done():
                future.set_exception(error)
                future.exception()  # a waiter that already gave up must not warn

    # ---- the connection loop --------------------------------------------------------

    def _status(self, message: str) -> None:
        if self._on_status is not None:
            self._on_status(message)

    async def _run(self) -> None:
        attempt = 0
        try:
            while True:
                try:
                    await self._session()
                except _Reconnect as end:
                    code, reason = end.code, end.reason
                self._fail_pending(ConnectionLost(f"connection closed {code}: {reason}"))
                attempt = 1 if self._progressed else attempt + 1
                if self._max_retries is not None and attempt > self._max_retries:
                    raise Unreachable(
                        f"gave up after {self._max_retries} reconnects (last: {code} {reason})"
                    )
                base, cap = self._backoff
                delay = 0.0 if code == CLOSE_CLIENT_GAP else min(cap, base * 2 ** (attempt - 1))
                delay *= random.uniform(0.5, 1.0)
                self.close_codes.append(code)
                self._status(
                    f"connection closed ({code}{': ' + reason if reason else ''}); "
                    f"reconnecting in {delay:.1f} s"
                )
                await asyncio.sleep(delay)
                self.reconnects += 1
        except ClientError as error:
            await self._stop(error)
        except Exception as error:  # a bug here must not leave the consumer waiting
            await self._stop(ClientError(f"client failed: {error!r}"))

    async def _stop(self, error: ClientError) -> None:
        self._connected.clear()
        self._fail_pending(error)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
            self._failure = error
            return
        await self._queue.put(error)

    async def _session(self) -> NoReturn:
        """One connection: hello, welcome, frames until it ends. Raises ``_Reconnect`` to
        come back, ``ClientError`` to stop."""
        self._progressed = False
        try:
            ws = await ws_connect(
                self.link.ws_url,
                subprotocols=[protocol.SUBPROTOCOL],  # type: ignore[list-item]
                open_timeout=OPEN_TIMEOUT_S,
                close_timeout=5,
                max_size=MAX_FRAME_BYTES,
            )
        except InvalidURI as error:
            raise BadLink(f"not a WebSocket URL: {error}") from None
        except InvalidHandshake as error:
            # The path is no costream WebSocket (a 404 page, a proxy refusing upgrades).
            raise Unreachable(f"{self.link.ws_url}: {error}") from None
        except (OSError, TimeoutError) as error:
            if self._ready is not None and not self._ready.done():
                raise Unreachable(f"cannot connect to {self.link.ws_url}: {error}") from None
            raise _Reconnect(CLOSE_ABNORMAL, f"cannot connect: {error}") from None
        self._ws = ws
        try:
            if ws.subprotocol != SUBPROTOCOL:
                raise Closed(CLOSE_BAD_FRAME, f"the server does not speak {SUBPROTOCOL}")
            hello = protocol.Hello(
                conversation_id=self.conversation_id,
                token=self.link.token,
                last_seq=self.last_seq,
                epoch=self.epoch,
            )
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await ws.send(protocol.encode(hello).decode())
            welcome = protocol.server_frame_decoder.decode(
                await self._receive(ws, WELCOME_TIMEOUT_S)
            )
            if not isinstance(welcome, protocol.Welcome):
                raise Closed(CLOSE_BAD_FRAME, f"expected welcome, got {type(welcome).__name__}")
            self._welcome(welcome)
            self._connected.set()
            while True:
                text = await self._receive(ws, IDLE_TIMEOUT_S)
                await self._dispatch(protocol.server_frame_decoder.decode(text), text)
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd is not None else CLOSE_ABNORMAL
            reason = closed.rcvd.reason if closed.rcvd is not None else "connection lost"
            if code not in RECONNECT_CODES:
                raise closed_error(code, reason) from None
            raise _Reconnect(code, reason) from None
        except TimeoutError:
            await ws.close(CLOSE_GOING_AWAY, "no frame in time")
            raise _Reconnect(CLOSE_ABNORMAL, "the server went silent") from None
        except _SeqJump as jump:
            await ws.close(CLOSE_CLIENT_GAP, "seq jump, resuming")
            raise _Reconnect(CLOSE_CLIENT_GAP, str(jump)) from None
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            await ws.close(CLOSE_PROTOCOL_ERROR, "unreadable frame")
            raise Closed(
                CLOSE_PROTOCOL_ERROR, f"the server sent an unreadable frame: {error}"
            ) from None
        finally:
            self._connected.clear()
            self._ws = None
            await ws.close()

    @staticmethod
    async def _receive(ws: ClientConnection, timeout: float) -> str:
        async with asyncio.timeout(timeout):
            text = await ws.recv()
        if not isinstance(text, str):
            raise msgspec.DecodeError("binary frame")
        return text

    def _welcome(self, welcome: protocol.Welcome) -> None:
        first = self._ready is not None and not self._ready.done()
        self.role, self.model, self.viewers = welcome.role, welcome.model, welcome.viewers
        self.head = welcome.head
        self.epoch = welcome.epoch
        if first and not self._from_start:
            self._skip_through = welcome.head  # --live: only what comes after this point
        self._expect_snapshot = welcome.mode == "snapshot"
        if first:
            assert self._ready is not None
            self._ready.set_result(None)
        else:
            how = "from a snapshot" if welcome.mode == "snapshot" else f"after #{self.last_seq}"
            self._status(f"reconnected; resuming {how}")

    async def _dispatch(self, frame: protocol.ServerFrame, text: str) -> None:
        """Handle one frame after welcome."""
        if isinstance(frame, protocol.Presence):
            self.viewers = frame.viewers
            await self._queue.put((frame, text))
            return
        if isinstance(frame, protocol.Heartbeat):
            self.head = max(self.head, frame.head)
            self._progressed = True
            return
        if isinstance(frame, protocol.Accepted | protocol.Error | protocol.Pong):
            self._resolve(frame)
            return
        if isinstance(frame, protocol.Welcome):
            raise msgspec.ValidationError("a second welcome")
        seq = frame.seq if isinstance(frame.seq, int) else 0
        if self._expect_snapshot:
            self._expect_snapshot = False
            if isinstance(frame, MessagesSnapshot):
                self.last_seq = seq
                self._progressed = True
                await self._deliver(frame, text)
                return
            # No run had ended: there is no snapshot and the log starts over at 1.
            self.last_seq = 0
            empty = MessagesSnapshot(messages=[], seq=0, timestamp=frame.timestamp)
            await self._deliver(empty, protocol.encode(empty).decode())
        if seq <= self.last_seq:
            return  # already yielded (never expected; harmless to drop)
        if seq != self.last_seq + 1:
            raise _SeqJump(f"expected #{self.last_seq + 1}, got #{seq}")
        self.last_seq = seq
        self.head = max(self.head, seq)
        self._progressed = True
        await self._deliver(frame, text)

    async def _deliver(self, frame: Event, text: str) -> None:
        seq = frame.seq if isinstance(frame.seq, int) else 0
        if self._skip_through and seq <= self._skip_through:
            return  # from_start=False: history before connecting is not yielded
        await self._queue.put((frame, text))


class _SeqJump(Exception):
    """A logged event's seq was not the previous one plus 1."""


def connect(
    url: str,
    token: str | None = None,
    *,
    last_seq: int = 0,
    epoch: str | None = None,
    from_start: bool = True,
    max_buffered: int = 10_000,
    max_retries: int | None = None,
    on_status: Callable[[str], None] | None = None,
) -> Conversation:
    """A subscription to use as ``async with connect(url, token) as conv``.

    ``url`` is a share link (the token in its ``#t=`` fragment) or a WebSocket URL.
    ``from_start=False`` yields only the events logged after connecting. ``max_buffered``
    bounds the frames waiting for the consumer; ``max_retries`` bounds consecutive failed
    reconnects (None: forever); ``on_status`` gets a line on every reconnect.
    """
    return Conversation(
        parse_link(url, token),
        last_seq=last_seq,
        epoch=epoch,
        from_start=from_start,
        max_buffered=max_buffered,
        max_retries=max_retries,
        on_status=on_status,
    )
