"""One WebSocket session: hello, auth, welcome, replay or snapshot, live tail, writes.

Every rejection happens after the upgrade is accepted, with a close code (a browser sees
no reason for a refused handshake). A reader, in the connection's own task, parses client
frames and queues replies. A writer task runs only while there is something to send and
is the only one that sends (besides the fan-out loop writing a live frame while no writer
runs), so frames never interleave. A writer that fails ends the session; the reader
ending cancels the writer.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, cast

import msgspec
from starlette.datastructures import Headers
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from costream import names, protocol
from costream.errors import (
    ExternallyProduced,
    NoRun,
    NotFound,
    RunActive,
    StorageUnavailable,
    TooManyRuns,
)
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
from costream.server.client_frames import Close, decode, text_of
from costream.server.guard import origin_allowed
from costream.server.hub import FellBehind, Follower
from costream.server.pacing import RateLimit, SendWatchdog, StopReader
from costream.server.wire import Wire
from costream.store import mint_id

if TYPE_CHECKING:
    from costream.broker import LogState
    from costream.server.deps import Services

log = logging.getLogger(__name__)

_person_decoder = msgspec.json.Decoder(protocol.Person)
_CLOSE_WAIT_S: Final = 2.0


@dataclass(frozen=True, slots=True)
class _Start:
    """Where a session starts, and what its ``welcome`` tells."""

    follower: Follower
    state: LogState
    replay: bool
    model: str
    name: str | None  # the display name the client gave
    snapshot: bytes | None  # MESSAGES_SNAPSHOT to send after welcome


class ViewerSession:
    """Serves one WebSocket client of one conversation."""

    __slots__ = (
        "conversation_id", "follower", "frames", "messages", "name", "role",
        "services", "settings", "stop", "viewer_id", "websocket", "wire", "writer",
        "writer_error",
    )  # fmt: skip

    def __init__(self, services: Services, websocket: WebSocket, conversation_id: str) -> None:
        self.services = services
        self.settings = services.settings
        self.websocket = websocket
        self.conversation_id = conversation_id
        self.viewer_id = mint_id(12)
        self.role: Literal["viewer", "writer"] = "viewer"
        self.follower: Follower | None = None
        self.name: str | None = None  # the display name it gave, cleaned
        self.messages: RateLimit | None = None  # made by the first message (writers only)
        self.frames = RateLimit(rate=20, burst=60)
        self.wire: Wire | None = None  # the connection's transport, where frames can go
        self.writer: asyncio.Task[None] | None = None  # running while there is work
        self.writer_error: BaseException | None = None  # what a writer raised
        self.stop: StopReader | None = None  # cancels the reader when a writer fails

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
        # Not ``websocket.headers``: that keeps a Headers object for the session's life.
        if not origin_allowed(Headers(scope=self.websocket.scope), self.settings):
            raise Close(CLOSE_BAD_ORIGIN, "origin not allowed")
        self.wire = Wire.of(self.websocket.scope)

    async def _serve_accepted(self) -> None:
        """Run the reader in this task (the connection's own), and a writer whenever there
        is something to send, until the reader ends or a writer fails; re-raise what ended
        it. A failed writer cancels this task, told apart from a cancellation from outside
        by ``uncancel``, as ``asyncio.timeout`` does."""
        # Per idle viewer, as little as possible is kept: no writer task (it ends when
        # nothing is left to send), and this frame keeps neither the welcome (up to
        # PRESENCE_MAX_PEOPLE decoded people) nor a snapshot.
        start = await self._start()
        follower, services = start.follower, self.services
        async with follower:
            self.follower = follower
            services.sessions.add(self)
            try:
                await self._welcome(start)
                del start
                services.metrics.viewers.add(1)
                stop = self.stop = StopReader(cast("asyncio.Task[None]", asyncio.current_task()))
                if self.wire is not None:
                    follower.send_at_once(self.wire)
                self.start_writer()  # the replay, or whatever came since the subscribe
                try:
                    receive = self.websocket.receive  # the reader: here, no coroutine of its own
                    while True:
                        await self._handle(decode(text_of(await receive())))
                except asyncio.CancelledError:
                    if stop.reader_ended():
                        raise  # cancelled from outside (too)
                finally:
                    stop.reader_ended()
                    services.metrics.viewers.add(-1)
                    follower.queue.close()  # no writer starts from here on
                    error = await self._writer_ended()
                if error is not None:
                    raise error
            finally:
                services.sessions.discard(self)
                await self._leave_presence()

    async def _start(self) -> _Start:
        """Hello, the checks, then where this client starts."""
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
        return _Start(follower, state, replay, conversation.model, hello.name, snapshot)

    async def _welcome(self, start: _Start) -> None:
        """Join presence, then send ``welcome`` and the snapshot, if any."""
        broker = self.services.broker
        person = self._person(start.name)
        viewers = await broker.presence_join(
            self.conversation_id,
            self.viewer_id,
            self.settings.presence_ttl_ms,
            protocol.encoder.encode(person),
        )
        people = await broker.presence_people(self.conversation_id)
        welcome = protocol.Welcome(
            conversation_id=self.conversation_id,
            epoch=start.state.epoch,
            head=start.state.head,
            role=self.role,
            viewers=viewers,
            mode="replay" if start.replay else "snapshot",
            model=start.model,
            people=[_person_decoder.decode(entry) for entry in people],
            viewer_id=self.viewer_id,
        )
        start.follower.presence_told = protocol.presence_frame(viewers, people).decode()
        await self._send(protocol.encode(welcome).decode())
        if start.snapshot is not None:
            await self._send(start.snapshot.decode())

    async def _leave_presence(self) -> None:
        try:
            await self.services.broker.presence_leave(self.conversation_id, self.viewer_id)
        except StorageUnavailable:
            pass  # the entry expires on its own

    async def _receive_hello(self) -> protocol.Hello:
        try:
            async with asyncio.timeout(self.settings.hello_timeout_s):
                text = text_of(await self.websocket.receive())
        except TimeoutError:
            raise Close(CLOSE_BAD_FRAME, "no hello in time") from None
        frame = decode(text)
        if not isinstance(frame, protocol.Hello):
            raise Close(CLOSE_BAD_FRAME, "the first frame must be hello")
        if frame.conversation_id != self.conversation_id:
            raise Close(CLOSE_BAD_FRAME, "conversationId does not match the URL")
        return frame

    async def _writer_ended(self) -> BaseException | None:
        """Cancel the writer, if one runs, until it ends; what a writer raised."""
        writer = self.writer
        while writer is not None and not writer.done():
            # Cancel again until it ends: a cancel that lands inside a Redis command can be
            # lost (seen with redis-py: the writer went on to wait for its next heartbeat),
            # and then a bad frame after hello was never answered 4400.
            writer.cancel()
            await asyncio.wait((writer,), timeout=StopReader.AGAIN_S)
        return self.writer_error

    def start_writer(self) -> None:
        """Start a writer: called once the session is welcomed, then by the queue when
        something comes for a parked writer."""
        writer = self.writer = asyncio.get_running_loop().create_task(self._writer())
        writer.add_done_callback(self._writer_done)

    def _writer_done(self, writer: asyncio.Task[None]) -> None:
        if self.writer is writer:
            self.writer = None  # a parked session keeps no task
        if writer.cancelled():
            return  # by ``_writer_ended``: the session is ending
        error = writer.exception()
        if error is not None and self.writer_error is None:
            self.writer_error = error
            assert self.stop is not None
            self.stop()

    async def _writer(self) -> None:
        """Send what is queued, the log's pages and heartbeats, then park: end, leaving
        the queue to start the next writer. Live frames go out from the fan-out loop,
        written to the transport, while no writer runs; what cannot, comes here."""
        assert self.follower is not None
        follower, queue, wire = self.follower, self.follower.queue, self.wire
        sent = self.services.metrics.frames_sent
        try:
            async with asyncio.timeout(None) as deadline:
                watchdog = SendWatchdog(deadline, self.settings.send_timeout_s)
                try:
                    while True:
                        batch = await follower.take()
                        if batch:
                            await self._send_batch(batch, watchdog, wire)
                            sent.inc(len(batch))
                        elif queue.heartbeat_due:
                            queue.heartbeat_due = False
                            head = await follower.check_head()
                            heartbeat = protocol.encode(protocol.Heartbeat(head=head)).decode()
                            await self._send_batch([heartbeat], watchdog, wire)
                        elif queue.park(self, self.settings.heartbeat_s):
                            return
                finally:
                    watchdog.stop()
        except FellBehind:
            self.services.metrics.slow_closes.inc()
            raise Close(CLOSE_SLOW_CONSUMER, "fell too far behind, reconnect and resume") from None
        except TimeoutError:
            if not deadline.expired():
                raise  # not the send timeout
            self.services.metrics.slow_closes.inc()
            raise Close(CLOSE_SLOW_CONSUMER, "not reading, reconnect and resume") from None

    def _person(self, name: str | None) -> protocol.Person:
        """This session's entry in presence: the name cleaned, a colour that stays with the
        name (or, unnamed, with the session)."""
        self.name = names.clean_name(name)
        return protocol.Person(
            id=self.viewer_id,
            role=self.role,
            since=protocol.now_ms(),
            color=names.person_color(self.name or self.viewer_id),
            name=self.name,
        )

    async def _handle(self, frame: protocol.ClientFrame) -> None:
        """One frame the client sent after hello; replies are queued for the writer."""
        if isinstance(frame, protocol.Hello):
            raise Close(CLOSE_BAD_FRAME, "hello was already sent")
        if not self.frames.allow():
            self._reply(self._error("rate_limited", "too many frames, slow down"))
        elif isinstance(frame, protocol.Ping):
            self._reply('{"type":"pong"}')
        elif isinstance(frame, protocol.SendMessage):
            self._reply(await self._start_run(frame.content))
        elif isinstance(frame, protocol.Cancel) and (refusal := await self._cancel()):
            self._reply(refusal)

    def _reply(self, frame: str) -> None:
        """Queue a reply for the writer; 4008 when this client lets more than the limits
        (``max_replies``, ``max_reply_bytes``) wait: it sends and does not read, and
        without a bound each of its frames would cost the server memory."""
        assert self.follower is not None
        waiting = self.follower.queue.control
        settings = self.settings
        if (
            len(waiting) >= settings.max_replies
            or sum(map(len, waiting)) + len(frame) > settings.max_reply_bytes
        ):
            self.services.metrics.slow_closes.inc()
            raise Close(CLOSE_SLOW_CONSUMER, "replies not read, reconnect and resume")
        self.follower.queue.reply(frame)

    async def _start_run(self, content: str) -> str:
        if self.role != "writer":
            return self._error("forbidden", "this token can only view")
        if len(content) > self.settings.max_message_chars:
            limit = self.settings.max_message_chars
            return self._error("too_large", f"message longer than {limit} characters")
        if not content.strip():
            return self._error("bad_request", "message is empty")
        if self.messages is None:
            self.messages = RateLimit(rate=0.5, burst=5)
        if not self.messages.allow():
            return self._error("rate_limited", "too many messages, slow down")
        try:
            run_id = await self.services.runs.start(self.conversation_id, content, sender=self.name)
        except TooManyRuns:
            return self._error(
                "rate_limited", "this server runs as many conversations as it may, retry later"
            )
        except ExternallyProduced:
            return self._error(
                "external_producer",
                "this conversation's runs come from an external program (its publisher)",
            )
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

    async def _send_batch(
        self, batch: list[str], watchdog: SendWatchdog, wire: Wire | None
    ) -> None:
        """Send frames in order: the first ones in one transport write when the ``wire``
        takes them now, the rest one by one under one timeout (the ``watchdog``'s)."""
        written = 0 if wire is None else wire.write_texts(batch)
        if written == len(batch):
            return
        send = self.websocket.send
        watchdog.begin()
        try:
            for frame in batch[written:]:
                await send({"type": "websocket.send", "text": frame})
        finally:
            watchdog.end()

    async def _send(self, text: str) -> None:
        """Send one frame before the writer runs (welcome, snapshot): written at once when
        the wire takes it, so no timer is left behind (a cancelled one stays in the
        loop's heap until its time)."""
        if self.wire is not None and self.wire.write_texts([text]):
            return
        try:
            async with asyncio.timeout(self.settings.send_timeout_s):
                await self.websocket.send_text(text)
        except TimeoutError:
            raise Close(CLOSE_SLOW_CONSUMER, "not reading, reconnect and resume") from None

    async def close_going_away(self) -> None:
        """Server shutdown: tell the client to reconnect elsewhere."""
        await self._close(CLOSE_GOING_AWAY, "server shutting down")

    async def _close(self, code: int, reason: str) -> None:
        """Send the close frame, waiting at most ``_CLOSE_WAIT_S``: a client that does not
        read would otherwise hold the session (its follower, presence) while the server's
        WebSocket library waits out its own close timeouts."""
        if self.websocket.application_state == WebSocketState.CONNECTED:
            try:
                async with asyncio.timeout(_CLOSE_WAIT_S):
                    await self.websocket.close(code=code, reason=reason[:120])
            except (RuntimeError, OSError, TimeoutError, WebSocketDisconnect):
                pass  # already gone, or not reading: the transport is dropped behind us
