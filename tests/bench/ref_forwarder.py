"""The reference for the fan-out benchmarks: a bare Starlette WebSocket forwarder.

One Redis subscription per process (one channel per conversation with local sockets), and
each published message goes out as the same text, one frame per message, to every local
socket of that conversation, in a plain loop. It speaks just enough of costream's protocol
(subprotocol ``costream.v1``, ``hello`` then ``welcome``) for the same viewer processes to
measure it. No log, no resume, no presence, no slow-consumer policy: the least a Python
forwarder on Starlette and uvicorn can do, run with the same uvicorn options as
``costream serve``. Producers ``PUBLISH`` to ``ref:{conversation id}``.

Run by the benchmarks: ``python tests/bench/ref_forwarder.py --port P --redis-url URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import redis.asyncio as redis
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

CHANNEL_PREFIX = "ref:"


class Forwarder:
    """One pub/sub connection; the local sockets of each conversation."""

    def __init__(self, redis_url: str) -> None:
        self.client = redis.Redis.from_url(redis_url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.sockets: dict[str, set[WebSocket]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        self._reader = asyncio.create_task(self._forward())

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self.pubsub.aclose()
        await self.client.aclose()

    async def join(self, conversation_id: str, websocket: WebSocket) -> None:
        sockets = self.sockets.get(conversation_id)
        if sockets is None:
            sockets = self.sockets[conversation_id] = set()
            await self.pubsub.subscribe(CHANNEL_PREFIX + conversation_id)
            self._subscribed.set()
        sockets.add(websocket)

    def leave(self, conversation_id: str, websocket: WebSocket) -> None:
        self.sockets.get(conversation_id, set()).discard(websocket)

    async def _forward(self) -> None:
        await self._subscribed.wait()  # redis-py's pub/sub cannot be read before a subscribe
        prefix = len(CHANNEL_PREFIX)
        while True:
            message = await self.pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            conversation_id = message["channel"][prefix:].decode()
            text = message["data"].decode()
            for websocket in list(self.sockets.get(conversation_id, ())):
                try:
                    await websocket.send_text(text)
                except Exception:
                    self.leave(conversation_id, websocket)


def create_app(redis_url: str) -> Starlette:
    forwarder = Forwarder(redis_url)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await forwarder.start()
        yield
        await forwarder.close()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def viewer(websocket: WebSocket) -> None:
        await websocket.accept(subprotocol="costream.v1")
        hello = json.loads(await websocket.receive_text())
        conversation_id = websocket.path_params["conversation_id"]
        welcome = {
            "type": "welcome",
            "conversationId": hello["conversationId"],
            "epoch": "reference",
            "head": 0,
            "role": "viewer",
            "viewers": 0,
            "mode": "replay",
            "model": "none",
        }
        await websocket.send_text(json.dumps(welcome))
        await forwarder.join(conversation_id, websocket)
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            pass
        finally:
            forwarder.leave(conversation_id, websocket)

    routes = [
        Route("/healthz", healthz),
        WebSocketRoute("/ws/conversations/{conversation_id}", viewer),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()
    # The same transport options as costream.server.serve.serve.
    uvicorn.run(
        create_app(args.redis_url),
        host="127.0.0.1",
        port=args.port,
        ws_max_size=1024 * 1024,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        ws_per_message_deflate=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
