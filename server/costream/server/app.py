"""The Starlette app of one server process: its routes, the page, its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from costream.agent.runner import Runs
from costream.broker import Broker
from costream.config import Settings
from costream.errors import StorageUnavailable
from costream.metrics import Metrics
from costream.server import api, ingest
from costream.server.deps import Services, Sessions, services_of
from costream.server.hub import Hub
from costream.server.session import ViewerSession
from costream.store import Store

log = logging.getLogger(__name__)

_MAINTENANCE_S = 2.0


def web_dir() -> Path:
    """The static client: inside the wheel, or ``web/`` of a source checkout."""
    packaged = Path(__file__).parents[1] / "web"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[3] / "web"


def make_broker(settings: Settings) -> Broker:
    if settings.redis_url:
        from costream.broker.redis.broker import RedisBroker

        return RedisBroker(settings.redis_url, log_retain=settings.log_retain)
    from costream.broker.memory import MemoryBroker

    return MemoryBroker(log_retain=settings.log_retain)


PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    # Model output is untrusted: the page renders it sanitized, and this policy stops any
    # script that slipped through from running or sending data elsewhere.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",  # share links carry tokens (in the fragment, still)
    "X-Content-Type-Options": "nosniff",
}


async def page(request: Request) -> Response:
    return FileResponse(web_dir() / "index.html", headers=PAGE_HEADERS)


async def websocket_endpoint(websocket: WebSocket) -> None:
    services = services_of(websocket)
    await ViewerSession(services, websocket, websocket.path_params["conversation_id"]).serve()


# ---- lifecycle ----------------------------------------------------------------------


async def _maintain(services: Services) -> None:
    """Keep local viewers counted, and end runs whose producer died (lease expired)."""
    broker, runs = services.broker, services.runs
    while True:
        await asyncio.sleep(_MAINTENANCE_S)
        for conversation_id in services.hub.conversations():
            try:
                await broker.presence_refresh(
                    conversation_id,
                    services.sessions.viewer_ids(conversation_id),
                    services.settings.presence_ttl_ms,
                )
                active = await broker.active_run(conversation_id)
                if active is not None and not active.lease_alive:
                    await runs.reap(conversation_id)
            except StorageUnavailable:
                log.warning("storage unavailable; will retry")
            except Exception:
                log.exception("maintenance of a conversation failed")


async def _warm_up(settings: Settings) -> None:
    """Load LiteLLM in the background at start, so the first message streams at once."""
    from costream.agent import llm  # LiteLLM: imported once the server is up

    try:
        await llm.warm_up(settings)
    except Exception:
        log.warning("warming up LiteLLM failed; the first run will load it", exc_info=True)


def _warn_about_exposure(settings: Settings) -> None:
    try:
        loopback = ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        loopback = settings.host == "localhost"
    if not loopback and not settings.is_demo and settings.create_key is None:
        log.warning(
            "listening on %s with a real model (%s) and no COSTREAM_CREATE_KEY: anyone who "
            "reaches this server can create conversations and spend your LLM credit",
            settings.host,
            settings.model,
        )


def create_app(settings: Settings) -> Starlette:
    """The ASGI app for one server process."""
    broker = make_broker(settings)
    store = Store(broker)
    metrics_registry = Metrics()
    hub = Hub(broker, metrics_registry)
    services = Services(
        settings=settings,
        broker=broker,
        store=store,
        hub=hub,
        runs=Runs(settings, broker, store, metrics_registry),
        metrics=metrics_registry,
        sessions=Sessions(),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await broker.start(hub.on_frame, hub.on_resync)
        if settings.is_demo:
            log.info("no LLM_API_KEY: using the built-in demo model (%s)", settings.model)
        else:
            log.info("LLM model: %s", settings.model)
        _warn_about_exposure(settings)
        maintenance = asyncio.create_task(_maintain(services))
        warm_up = asyncio.create_task(_warm_up(settings))
        try:
            yield
        finally:
            maintenance.cancel()
            warm_up.cancel()
            for session in services.sessions.all():
                await session.close_going_away()
            await services.runs.shutdown(settings.shutdown_grace_s)
            await broker.close()

    conversation = "/api/conversations/{conversation_id}"
    routes = [
        Route("/", page),
        Route("/c/{conversation_id}", page),
        Route("/healthz", api.healthz),
        Route("/readyz", api.readyz),
        Route("/metrics", api.metrics),
        Route("/api/conversations", api.create_conversation, methods=["POST"]),
        Route(conversation, api.get_conversation),
        Route(f"{conversation}/links", api.get_links),
        Route(f"{conversation}/messages", api.post_message, methods=["POST"]),
        Route(f"{conversation}/cancel", api.cancel_run, methods=["POST"]),
        Route(f"{conversation}/events", api.get_events),
        Route(f"{conversation}/files", api.list_files),
        Route(f"{conversation}/files/{{path:path}}", api.get_file),
        *ingest.routes(),
        WebSocketRoute("/ws/conversations/{conversation_id}", websocket_endpoint),
        Mount("/assets", StaticFiles(directory=web_dir(), check_dir=False), name="assets"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.services = services
    return app
