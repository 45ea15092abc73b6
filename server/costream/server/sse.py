"""Server-Sent Events: the conversation's log after a seq, then its live tail."""

from __future__ import annotations

from collections.abc import AsyncIterator

from costream.errors import StorageUnavailable
from costream.server.deps import Services
from costream.server.hub import FellBehind, Follower, seq_of_text


async def event_stream(services: Services, conversation_id: str, after: int) -> AsyncIterator[str]:
    follower = Follower(
        services.hub,
        conversation_id,
        after,
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
                yield "".join(f"id: {seq_of_text(frame)}\ndata: {frame}\n\n" for frame in batch)
        except (FellBehind, StorageUnavailable):
            return  # the client reconnects with Last-Event-ID
