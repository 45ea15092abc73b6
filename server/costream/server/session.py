"""One WebSocket session: hello, auth, welcome, replay or snapshot, live tail, writes.

Every rejection happens after the upgrade is accepted, with a close code (a browser sees
no reason for a refused handshake). One reader task and one writer task per session in
one task group: the reader parses client frames and queues replies; the writer is the
only one that sends, so frames never interleave.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from costream import protocol
from costream.errors import NoRun, NotFound, RunActive, StorageUnavailable
from costream.protocol import (
    CLOSE_BAD_FRAME,
    CLOSE_BAD_ORIGIN,
    CLOSE_BAD_TOKEN,
    CLOSE_GOING_AWAY,
    CLOSE_LOST_TAIL,
    CLOSE_OVERLOADED,
    CLOSE_SLOW_CONSUMER,
    CLOSE_UNKNOWN_CONVERSATION,
    SUBPROTOCOL,
)
from costream.server.hub import FellBehind, Follower
from costream.store import mint_id

if TYPE_CHECKING:
    from costream.server.deps import Services

log = logging.getLogger(__name__)

_PRESENCE_PREFIX = '{"type":"presence"'
_presence_decoder = msgspec.json.Decoder(protocol.Presence)


class Close(Exception):
    """End the session with this close code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class RateLimit:
    """A token bucket: ``rate`` frames per second, bursts of ``burst``."""

    rate: float
    burst: float
    tokens: float = 0.0
    stamp: float = 0.0

    def allow(self) -> bool:
        now = time.monotonic()
        if self.stamp == 0.0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def origin_allowed(websocket: WebSocket, allowed: tuple[str, ...]) -> bool:
    """No Origin (not a browser), one of ``allowed``, or else the server's own host
    or loopback."""
    origin = websocket.headers.get("origin")
    if origin is None:
        return True
    if allowed:
        return origin in allowed or "*" in allowed
    host = origin.split("://", 1)[-1].split("/", 1)[0]
    hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if hostname in ("localhost", "127.0.0.1", "[::1]"):
        return True
    return host == websocket.headers.get("host")


class ViewerSession:
    """Serves one WebSocket client of one conversation."""

    def __init__(self, services: Services, websocket: WebSocket, conversation_id: str) -> None:
        self.services = services
        self.settings = services.settings
        self.websocket = websocket
        self.conversation_id = conversation_id
        self.viewer_id = mint_id(12)
        self.role: Literal["viewer", "writer"] = "viewer"
        self.follower: Follower | None = None
        self.viewers_told = 0  # the viewer count this client was last told
        self.messages = RateLimit(rate=0.5, burst=5)
        self.frames = RateLimit(rate=20, burst=60)
        self._sending_since: float | None = None  # loop time the current batch began
        self._send_timed_out = False
        self._watchdog: asyncio.TimerHandle | None = None

    async def serve(self) -> None:
        metrics = self.services.metrics
        metrics.connections.add(1)
        try:
            await self._accept()
            await self._serve_accepted()
        except Close as close:
            await self._close(close.code, close.reason)
        except (WebSocketDisconnect, OSError):
            pass  # the client went away
        except StorageUnavailable:
            await self._close(CLOSE_LOST_TAIL, "storage unavailable, reconnect and resume")
        finally:
            metrics.connections.add(-1)

    async def _accept(self) -> None:
        offered = self.websocket.scope.get("subprotocols") or []
        chosen = SUBPROTOCOL if SUBPROTOCOL in offered else (offered[0] if offered else None)
        await self.websocket.accept(subprotocol=chosen)
        if chosen != SUBPROTOCOL:
            raise Close(CLOSE_BAD_FRAME, f"subprotocol {SUBPROTOCOL} required")
        if not origin_allowed(self.websocket, self.settings.allowed_origins):
            raise Close(CLOSE_BAD_ORIGIN, "origin not allowed")

    async def _serve_accepted(self) -> None:
        hello = await self._receive_hello()
        services = self.services
        conversation = await services.store.get(self.conversation_id)
        if conversation is None:
            raise Close(CLOSE_UNKNOWN_CONVERSATION, "unknown conversation")
        role = await services.store.role_for(self.conversation_id, hello.token)
        if role is None:
            raise Close(CLOSE_BAD_TOKEN, "missing or wrong token")
        self.role = role
        if (
            services.sessions.count(self.conversation_id)
            >= self.settings.max_viewers_per_conversation
        ):
            raise Close(CLOSE_OVERLOADED, "too many viewers, retry later")

        state = await services.broker.log_state(self.conversation_id)
        if state is None:
            raise Close(CLOSE_UNKNOWN_CONVERSATION, "unknown conversation")
        replay = (
            (hello.epoch is None or hello.epoch == state.epoch)
            and hello.last_seq <= state.head
            and (hello.last_seq + 1 >= state.first_seq or hello.last_seq == state.head)
        )
        start = hello.last_seq if replay else 0
        snapshot = None if replay else await services.broker.read_snapshot(self.conversation_id)
        if snapshot is not None:
            start = protocol.seq_of(snapshot)

        follower = Follower(
            services.hub, self.conversation_id, start, self.settings.viewer_queue_frames
        )
        async with follower:
            self.follower = follower
            services.sessions.add(self)
            try:
                viewers = await services.broker.presence_join(
                    self.conversation_id, self.viewer_id, self.settings.presence_ttl_ms
                )
                welcome = protocol.Welcome(
                    conversation_id=self.conversation_id,
                    epoch=state.epoch,
                    head=state.head,
                    role=role,
                    viewers=viewers,
                    mode="replay" if replay else "snapshot",
                    model=conversation.model,
                )
                self.viewers_told = viewers
                await self._send(protocol.encode(welcome).decode())
                if snapshot is not None:
                    await self._send(snapshot.decode())
                services.metrics.viewers.add(1)
                try:
                    await self._run_tasks()
                finally:
                    services.metrics.viewers.add(-1)
            finally:
                services.sessions.discard(self)
                await self._leave_presence()

    async def _leave_presence(self) -> None:
        try:
            await self.services.broker.presence_leave(self.conversation_id, self.viewer_id)
        except StorageUnavailable:
            pass  # the entry expires on its own

    async def _receive_hello(self) -> protocol.Hello:
        try:
            async with asyncio.timeout(self.settings.hello_timeout_s):
                text = await self.websocket.receive_text()
        except TimeoutError:
            raise Close(CLOSE_BAD_FRAME, "no hello in time") from None
        except KeyError:
            raise Close(CLOSE_BAD_FRAME, "text frames only") from None
        frame = self._decode(text)
        if not isinstance(frame, protocol.Hello):
            raise Close(CLOSE_BAD_FRAME, "the first frame must be hello")
        if frame.conversation_id != self.conversation_id:
            raise Close(CLOSE_BAD_FRAME, "conversationId does not match the URL")
        return frame

    @staticmethod
    def _decode(text: str) -> protocol.ClientFrame:
        try:
            frame: protocol.ClientFrame = protocol.client_frame_decoder.decode(text)
        except msgspec.ValidationError as error:
            raise Close(CLOSE_BAD_FRAME, f"bad frame: {error}"[:120]) from None
        except msgspec.DecodeError:
            raise Close(CLOSE_BAD_FRAME, "bad frame: not JSON") from None
        return frame

    async def _run_tasks(self) -> None:
        """Run the reader and the writer until either ends; re-raise what ended it.
        (Not a TaskGroup: it would wrap a ``Close`` in an ExceptionGroup.)"""
        reader = asyncio.create_task(self._reader())
        writer = asyncio.create_task(self._writer())
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(self.settings.send_timeout_s, self._watch_sends, writer)
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
        for task in done:
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error

    async def _writer(self) -> None:
        assert self.follower is not None
        follower = self.follower
        sent = self.services.metrics.frames_sent
        heartbeat_s = self.settings.heartbeat_s
        try:
            while True:
                batch = await follower.next_batch(heartbeat_s)
                if not batch:
                    head = await follower.check_head()
                    await self._send_batch(
                        [protocol.encode(protocol.Heartbeat(head=head)).decode()]
                    )
                    continue
                await self._send_batch(batch)
                sent.inc(len(batch))
        except FellBehind:
            self.services.metrics.slow_closes.inc()
            raise Close(CLOSE_SLOW_CONSUMER, "fell too far behind, reconnect and resume") from None
        except asyncio.CancelledError:
            if not self._send_timed_out:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            raise Close(CLOSE_SLOW_CONSUMER, "not reading, reconnect and resume") from None

    def _watch_sends(self, writer: asyncio.Task[None]) -> None:
        """The writer's send timeout: one timer per session that moves on when it fires,
        not a timer scheduled and cancelled for every batch. A batch still not sent after
        ``send_timeout_s`` cancels the writer, which closes 4008."""
        loop = writer.get_loop()
        timeout = self.settings.send_timeout_s
        since = self._sending_since
        if since is not None and loop.time() - since >= timeout:
            self._watchdog = None
            self._send_timed_out = True
            writer.cancel()
            return
        start = loop.time() if since is None else since
        self._watchdog = loop.call_at(start + timeout, self._watch_sends, writer)

    def _presence_changed(self, frame: str) -> bool:
        """Whether a presence frame tells this client a count it has not been told yet
        (its own join is already counted in ``welcome``)."""
        viewers = _presence_decoder.decode(frame).viewers
        if viewers == self.viewers_told:
            return False
        self.viewers_told = viewers
        return True

    async def _reader(self) -> None:
        assert self.follower is not None
        queue = self.follower.queue
        while True:
            try:
                text = await self.websocket.receive_text()
            except KeyError:
                raise Close(CLOSE_BAD_FRAME, "text frames only") from None
            frame = self._decode(text)
            if isinstance(frame, protocol.Hello):
                raise Close(CLOSE_BAD_FRAME, "hello was already sent")
            if not self.frames.allow():
                queue.reply(self._error("rate_limited", "too many frames, slow down"))
                continue
            if isinstance(frame, protocol.Ping):
                queue.reply('{"type":"pong"}')
            elif isinstance(frame, protocol.SendMessage):
                queue.reply(await self._start_run(frame.content))
            elif isinstance(frame, protocol.Cancel) and (refusal := await self._cancel()):
                queue.reply(refusal)

    async def _start_run(self, content: str) -> str:
        if self.role != "writer":
            return self._error("forbidden", "this token can only view")
        if len(content) > self.settings.max_message_chars:
            limit = self.settings.max_message_chars
            return self._error("too_large", f"message longer than {limit} characters")
        if not content.strip():
            return self._error("bad_request", "message is empty")
        if not self.messages.allow():
            return self._error("rate_limited", "too many messages, slow down")
        try:
            run_id = await self.services.runs.start(self.conversation_id, content)
        except RunActive:
            return self._error("run_active", "a run is already active")
        except NotFound:
            raise Close(CLOSE_UNKNOWN_CONVERSATION, "unknown conversation") from None
        return protocol.encode(protocol.Accepted(run_id=run_id)).decode()

    async def _cancel(self) -> str:
        if self.role != "writer":
            return self._error("forbidden", "this token can only view")
        try:
            await self.services.runs.cancel(self.conversation_id)
        except NoRun:
            return self._error("no_run", "nothing is running")
        # A cancel has no reply frame of its own: its outcome is RUN_FINISHED (cancelled)
        # in the log, which every viewer sees.
        return ""

    @staticmethod
    def _error(code: protocol.RefusalCode, message: str) -> str:
        return protocol.encode(protocol.Error(code=code, message=message)).decode()

    async def _send_batch(self, batch: list[str]) -> None:
        """Send frames in order, under one timeout for the batch (``_watch_sends``)."""
        # Starlette's WebSocket.send_text re-checks the session's state machine on every
        # frame, two coroutine layers above the ASGI ``send``. The writer is the only sender
        # of a connected session, so frames go to that ``send`` (Starlette keeps it as
        # ``_send``) directly; a dead connection raises OSError all the same.
        send = self.websocket._send
        self._sending_since = asyncio.get_running_loop().time()
        try:
            for frame in batch:
                if frame.startswith(_PRESENCE_PREFIX) and not self._presence_changed(frame):
                    continue
                await send({"type": "websocket.send", "text": frame})
        finally:
            self._sending_since = None

    async def _send(self, text: str) -> None:
        try:
            async with asyncio.timeout(self.settings.send_timeout_s):
                await self.websocket.send_text(text)
        except TimeoutError:
            raise Close(CLOSE_SLOW_CONSUMER, "not reading, reconnect and resume") from None

    async def close_going_away(self) -> None:
        """Server shutdown: tell the client to reconnect elsewhere."""
        await self._close(CLOSE_GOING_AWAY, "server shutting down")

    async def _close(self, code: int, reason: str) -> None:
        if self.websocket.application_state == WebSocketState.CONNECTED:
            try:
                await self.websocket.close(code=code, reason=reason[:120])
            except (RuntimeError, OSError):
                pass  # already gone
