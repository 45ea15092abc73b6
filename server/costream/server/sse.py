"""Server-Sent Events and the JSON events endpoint: the conversation's log after a seq,
then (SSE) its live tail. Both resume as a WebSocket does (``hub.resume_point``): when the
events after ``after`` were trimmed, the latest ``MESSAGES_SNAPSHOT`` comes first, then
the events after it, never an empty answer."""

from __future__ import annotations

from collections.abc import AsyncIterator

from costream.errors import StorageUnavailable
from costream.protocol import seq_of, seq_of_text
from costream.server.deps import Services
from costream.server.hub import FellBehind, Follower, Resume, resume_point


def _sse(frame: str) -> str:
    return f"id: {seq_of_text(frame)}\ndata: {frame}\n\n"


async def event_stream(services: Services, conversation_id: str, after: int) -> AsyncIterator[str]:
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
