"""Server-Sent Events and the JSON events endpoint: the conversation's log after a seq,
then (SSE) its live tail. Both resume as a WebSocket does (``hub.resume_point``): when the
events after ``after`` were trimmed, the latest ``MESSAGES_SNAPSHOT`` comes first, then
the events after it, never an empty answer."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import AsyncGenerator, AsyncIterator

from costream.errors import StorageUnavailable
from costream.protocol import seq_of, seq_of_text
from costream.server.deps import HTTPError, Services, Sessions
from costream.server.hub import FellBehind, Follower, Resume, resume_point

OVERLOADED_RETRY_AFTER_S = 5


def _sse(frame: str) -> str:
    return f"id: {seq_of_text(frame)}\ndata: {frame}\n\n"


class _Slot:
    """One SSE stream's place in the viewer count, given back once."""

    def __init__(self, sessions: Sessions, conversation_id: str) -> None:
        self.sessions, self.conversation_id = sessions, conversation_id
        sessions.open_stream(conversation_id)
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.sessions.close_stream(self.conversation_id)


def counted_stream(services: Services, conversation_id: str, after: int) -> AsyncIterator[str]:
    """``event_stream``, counted toward ``max_viewers_per_conversation`` as a WebSocket
    is: 503 ``overloaded`` with ``Retry-After`` when the conversation has that many
    viewers on this process."""
    sessions = services.sessions
    if sessions.count(conversation_id) >= services.settings.max_viewers_per_conversation:
        raise HTTPError(
            503,
            "overloaded",
            "too many viewers, retry later",
            {"Retry-After": str(OVERLOADED_RETRY_AFTER_S)},
        )
    slot = _Slot(sessions, conversation_id)
    body = _released(slot, event_stream(services, conversation_id, after))
    # A body the server never starts (the client left first) runs no ``finally``: the
    # slot is then given back when the generator is collected.
    weakref.finalize(body, slot.release)
    return body


async def _released(slot: _Slot, body: AsyncGenerator[str]) -> AsyncIterator[str]:
    try:
        async with contextlib.aclosing(body):
            async for chunk in body:
                yield chunk
    finally:
        slot.release()


async def event_stream(services: Services, conversation_id: str, after: int) -> AsyncGenerator[str]:
    """The SSE body: the snapshot if the events after ``after`` were trimmed, the log,
    then live, with a comment line as heartbeat when idle."""
    try:
        resume = await resume_point(services.broker, conversation_id, after)
    except StorageUnavailable:
        return  # the client reconnects with Last-Event-ID
    if resume is None:
        return
    if resume.snapshot is not None:
        yield _sse(resume.snapshot.decode())
    follower = Follower(
        services.hub,
        conversation_id,
        resume.start,
        services.settings.viewer_queue_frames,
        logged_only=True,
    )
    async with follower:
        try:
            while True:
                batch = await follower.next_batch(services.settings.heartbeat_s)
                if not batch:
                    await follower.check_head()
                    yield ": heartbeat\n\n"
                    continue
                yield "".join(_sse(frame) for frame in batch)
        except (FellBehind, StorageUnavailable):
            return  # the client reconnects with Last-Event-ID


async def logged_events(services: Services, conversation_id: str, after: int, limit: int) -> bytes:
    """The JSON events answer: at most ``limit`` logged events after ``after``, preceded by
    the latest snapshot when the events right after ``after`` were trimmed."""
    for _ in range(2):  # the log may be trimmed between the two reads: then once more
        resume: Resume | None = await resume_point(services.broker, conversation_id, after)
        if resume is None:
            return b"[]"
        frames = await services.broker.read_log(conversation_id, resume.start, limit)
        if resume.snapshot is not None:
            return b"[" + b",".join([resume.snapshot, *frames]) + b"]"
        if not frames or seq_of(frames[0]) == resume.start + 1:
            return b"[" + b",".join(frames) + b"]"
    raise StorageUnavailable("the log is being trimmed faster than it can be read")
