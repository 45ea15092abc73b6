"""The client's requests (``message``, ``cancel``) and their replies, matched in order."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from costream import protocol
from costream.client.errors import ClientError, ConnectionLost, Refused

Reply = protocol.Accepted | protocol.Error | protocol.Pong


class PendingReplies:
    """Requests sent and waiting for their reply, oldest first.

    The server answers a session's frames in the order it got them (one reader per
    session), so each reply answers the oldest request still waiting. One request is
    sent at a time, so the frames of two requests never interleave.
    """

    def __init__(self) -> None:
        self._waiting: deque[asyncio.Future[Reply]] = deque()
        self._sending = asyncio.Lock()

    async def request(
        self,
        connection: Callable[[], Awaitable[ClientConnection]],
        frames: tuple[protocol.Frame, ...],
        timeout_s: float,
    ) -> Reply:
        """Send ``frames`` on the connection ``connection()`` gives; the reply to the
        first of them. Raises ``Refused`` for an ``error`` reply, ``ConnectionLost`` when
        the connection dropped or no reply came within ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                async with self._sending:
                    ws = await connection()
                    reply: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
                    self._waiting.append(reply)
                    try:
                        for frame in frames:
                            await ws.send(protocol.encode(frame).decode())
                    except ConnectionClosed:
                        raise ConnectionLost(
                            "the connection dropped before the request went out"
                        ) from None
                answer = await reply
        except TimeoutError:
            raise ConnectionLost(f"no reply within {timeout_s:.0f} s") from None
        if isinstance(answer, protocol.Error):
            raise Refused(answer.code, answer.message)
        return answer

    def resolve(self, frame: Reply) -> None:
        """A reply came: it answers the oldest request waiting."""
        if self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_result(frame)

    def fail_all(self, error: ClientError) -> None:
        """Every request waiting fails with ``error`` (the connection that carried it is gone)."""
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)
                future.exception()  # a waiter that already gave up must not warn
