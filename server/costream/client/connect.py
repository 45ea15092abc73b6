"""The Python client of PROTOCOL.md, on the ``websockets`` library.

    async with connect("http://127.0.0.1:8000/c/<id>#t=<token>") as conv:
        print(conv.role, conv.model, conv.viewers, [p.name for p in conv.people])
        run_id = await conv.send("Tell me a story")
        async for event in conv:
            ...

Iterating yields the conversation's logged events (the msgspec Structs of
:mod:`costream.protocol`) in ``seq`` order, with no gap and no duplicate across
reconnects, and also the ``Presence`` frames (each also updates ``conv.viewers`` and
``conv.people``, the first 50 viewers with their names, roles and colours). When a
reconnect lands in ``snapshot`` mode (the events it missed were trimmed, or the log was
recreated) it yields a ``MessagesSnapshot`` first: drop what you had and rebuild from it.
If no run had ended yet, that snapshot is empty and has ``seq`` 0.

Errors (``ClientError`` and its subclasses) and close codes are in
:mod:`costream.client.errors`, link parsing in :mod:`costream.client.link`.

This module imports neither the server nor LiteLLM, so it loads fast.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Final, Literal, NoReturn

import msgspec
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from costream import protocol
from costream.backoff import Backoff
from costream.client.errors import (
    CLOSE_ABNORMAL,
    CLOSE_CLIENT_GAP,
    CLOSE_PROTOCOL_ERROR,
    RECONNECT_CODES,
    BadLink,
    ConnectionLost,
    Unreachable,
    closed_error,
)

# Also importable from here (cli.py does); costream.client exports every public name.
from costream.client.errors import ClientError as ClientError
from costream.client.errors import Closed as Closed
from costream.client.errors import ConversationNotFound as ConversationNotFound
from costream.client.errors import Refused as Refused
from costream.client.errors import Unauthorized as Unauthorized
from costream.client.link import Link, parse_link
from costream.client.replies import PendingReplies
from costream.protocol import (
    CLOSE_BAD_FRAME,
    CLOSE_GOING_AWAY,
    SUBPROTOCOL,
    Event,
    MessagesSnapshot,
    Presence,
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


class _Reconnect(Exception):
    """End this connection and open a new one (carries the close code to report)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


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
        name: str | None = None,
    ) -> None:
        self.link = link
        self.name = name  # the display name sent in hello (the server cleans and cuts it)
        self.conversation_id = link.conversation_id
        self.last_seq = last_seq
        self.epoch = epoch
        self.role: Literal["viewer", "writer"] = "viewer"
        self.model = ""
        self.viewers = 0
        self.people: list[protocol.Person] = []  # the first 50 viewers, in join order
        self.viewer_id = ""  # this connection's own id in ``people``
        self.head = 0
        self.reconnects = 0
        self.close_codes: list[int] = []  # every close that led to a reconnect, in order
        self._from_start = from_start or last_seq > 0
        # Jittered, so that many clients cut off at once do not come back at once.
        self._backoff = Backoff(backoff_base, backoff_cap, jitter=True, attempts=max_retries)
        self._on_status = on_status
        self._skip_through = 0
        self._expect_snapshot = False
        self._progressed = False  # this connection delivered something: reset the backoff
        self._queue: asyncio.Queue[Item | ClientError] = asyncio.Queue(max_buffered)
        self._failure: ClientError | None = None
        self._ws: ClientConnection | None = None
        self._connected = asyncio.Event()
        self._ready: asyncio.Future[None] | None = None
        self._replies = PendingReplies()
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
        self._replies.fail_all(ConnectionLost("the client was closed"))

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
        reply = await self._request(protocol.SendMessage(content=text))
        if isinstance(reply, protocol.Accepted):
            return reply.run_id
        raise ClientError(f"unexpected reply to a message: {type(reply).__name__}")

    async def cancel(self) -> None:
        """Cancel the running run. Raises ``Refused`` (``no_run``, ``forbidden``)."""
        # A cancel that works has no reply of its own (its outcome is RUN_FINISHED
        # cancelled in the log); the ping behind it tells us the server got past it.
        await self._request(protocol.Cancel(), protocol.Ping())

    async def _request(self, *frames: protocol.Frame) -> protocol.Frame:
        return await self._replies.request(self._connection, frames, REPLY_TIMEOUT_S)

    async def _connection(self) -> ClientConnection:
        """The open connection, once there is one; raises what ended the subscription."""
        if self._failure is not None:
            raise self._failure
        await self._connected.wait()
        assert self._ws is not None
        return self._ws

    # ---- the connection loop --------------------------------------------------------

    def _status(self, message: str) -> None:
        if self._on_status is not None:
            self._on_status(message)

    async def _run(self) -> None:
        backoff = self._backoff
        try:
            while True:
                try:
                    await self._session()
                except _Reconnect as end:
                    code, reason = end.code, end.reason
                self._replies.fail_all(ConnectionLost(f"connection closed {code}: {reason}"))
                if self._progressed:
                    backoff.reset()  # this connection worked: a new series of reconnects
                delay = backoff.next_delay()
                if delay is None:
                    raise Unreachable(
                        f"gave up after {backoff.attempts} reconnects (last: {code} {reason})"
                    )
                if code == CLOSE_CLIENT_GAP:
                    delay = 0.0  # our own close to resume: nothing to wait for
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
        self._replies.fail_all(error)
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
                name=self.name,
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
        self.people = welcome.people
        self.viewer_id = welcome.viewer_id if isinstance(welcome.viewer_id, str) else ""
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
            self.viewers, self.people = frame.viewers, frame.people
            await self._queue.put((frame, text))
            return
        if isinstance(frame, protocol.Heartbeat):
            self.head = max(self.head, frame.head)
            self._progressed = True
            return
        if isinstance(frame, protocol.Accepted | protocol.Error | protocol.Pong):
            self._replies.resolve(frame)
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
    name: str | None = None,
) -> Conversation:
    """A subscription to use as ``async with connect(url, token) as conv``.

    ``url`` is a share link (the token in its ``#t=`` fragment) or a WebSocket URL.
    ``from_start=False`` yields only the events logged after connecting. ``max_buffered``
    bounds the frames waiting for the consumer; ``max_retries`` bounds consecutive failed
    reconnects (None: forever); ``on_status`` gets a line on every reconnect; ``name`` is
    the display name other viewers see (none: listed without a name).
    """
    return Conversation(
        parse_link(url, token),
        last_seq=last_seq,
        epoch=epoch,
        from_start=from_start,
        max_buffered=max_buffered,
        max_retries=max_retries,
        on_status=on_status,
        name=name,
    )
