"""The Starlette app of one server process: its routes, the page, its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from costream.agent.runner import Runs
from costream.broker import ActiveRun, Broker
from costream.broker.sqlite import SqliteBroker
from costream.config import Settings
from costream.errors import StorageUnavailable
from costream.metrics import Metrics
from costream.server import agui, api, ingest
from costream.server.deps import Services, Sessions, services_of
from costream.server.guard import Guard
from costream.server.hub import Hub
from costream.server.ratelimit import HTTPLimits
from costream.server.session import ViewerSession
from costream.store import Store

log = logging.getLogger(__name__)

_MAINTENANCE_S = 2.0
_MAINTENANCE_PAGE = 16  # conversations whose calls go out together (2 pooled connections each)
_EXPIRE_PAGE = 100  # idle conversations deleted per sweep at most


def web_dir() -> Path:
    """The static client: inside the wheel, or ``web/`` of a source checkout."""
    packaged = Path(__file__).parents[1] / "web"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[3] / "web"


def make_broker(settings: Settings) -> Broker:
    """Redis with a URL; else SQLite in the data directory, locked and opened now (so a
    directory in use or an unreadable database stops the start with ``DataDirError``);
    else, with no data directory, memory. Each gets the settings' retention, run size
    and idle TTL limits."""
    if settings.redis_url:
        from costream.broker.redis.broker import RedisBroker

        return RedisBroker(
            settings.redis_url,
            settings.log_retain,
            log_retain_bytes=settings.log_retain_bytes,
            max_run_bytes=settings.max_run_bytes,
            conversation_ttl_s=settings.conversation_ttl_s,
        )
    if settings.data_dir is not None:
        broker = SqliteBroker(
            Path(settings.data_dir),
            settings.log_retain,
            log_retain_bytes=settings.log_retain_bytes,
            max_run_bytes=settings.max_run_bytes,
            conversation_ttl_s=settings.conversation_ttl_s,
        )
        broker.open()
        return broker
    from costream.broker.memory import MemoryBroker

    return MemoryBroker(
        settings.log_retain,
        log_retain_bytes=settings.log_retain_bytes,
        max_run_bytes=settings.max_run_bytes,
        conversation_ttl_s=settings.conversation_ttl_s,
    )


def _say_where_data_lives(settings: Settings) -> None:
    if settings.redis_url:
        return
    if settings.data_dir is None:
        log.info("--memory: conversations live in this process only and end with it")
    else:
        log.info("conversations are kept in %s", Path(settings.data_dir).resolve())


async def _end_interrupted_runs(services: Services) -> None:
    """End the runs that were streaming when the previous process stopped (RUN_ERROR
    producer_lost), so that no run stays open across a restart."""
    broker = services.broker
    if not isinstance(broker, SqliteBroker):
        return  # with Redis, a live process's maintenance reaps them once their lease ends
    for conversation_id in broker.interrupted_runs():
        try:
            await services.runs.reap(conversation_id)
        except Exception:
            log.exception("ending the interrupted run of %s failed", conversation_id)


async def page(request: Request) -> Response:
    """The page; ``guard.Guard`` adds the page headers (CSP) to it as to every HTML answer."""
    return FileResponse(web_dir() / "index.html")


def websocket_endpoint(websocket: WebSocket) -> Awaitable[None]:
    # The session's coroutine itself, not one awaiting it: one frame fewer per viewer.
    services = services_of(websocket)
    return ViewerSession(services, websocket, websocket.path_params["conversation_id"]).serve()


# ---- lifecycle ----------------------------------------------------------------------


async def _maintain(services: Services) -> None:
    """Keep local viewers counted, end runs whose producer died (lease expired), and
    delete conversations idle past ``conversation_ttl_s`` (embedded brokers; Redis
    expires their keys by itself)."""
    while True:
        await asyncio.sleep(_MAINTENANCE_S)
        await _maintain_once(services)
        await _expire_idle(services)


async def _expire_idle(services: Services) -> None:
    """One page of idle conversations deleted (bounded work per sweep; the next sweep
    goes on where this one stopped)."""
    try:
        expired = await services.broker.expire_idle(_EXPIRE_PAGE)
    except StorageUnavailable:
        log.warning("maintenance: storage unavailable for expiring idle conversations")
    except Exception:
        log.exception("maintenance: expiring idle conversations failed; will retry")
    else:
        if expired:
            ttl = services.settings.conversation_ttl_s
            log.info("deleted %d conversation(s) idle for %g s", expired, ttl)


async def _maintain_once(services: Services) -> None:
    """One sweep over the followed conversations: their calls go out together, a page at a
    time (one round trip per page, not two per conversation), and the sweep logs one line
    for all its failures."""
    conversations = services.hub.conversations()
    failures: list[BaseException] = []
    for start in range(0, len(conversations), _MAINTENANCE_PAGE):
        page = conversations[start : start + _MAINTENANCE_PAGE]
        results = await asyncio.gather(
            *(_maintain_conversation(services, c) for c in page), return_exceptions=True
        )
        failures += [result for result in results if isinstance(result, BaseException)]
    if not failures:
        return
    unavailable = sum(isinstance(error, StorageUnavailable) for error in failures)
    if unavailable == len(failures):
        log.warning(
            "maintenance: storage unavailable for %d of %d conversations; will retry",
            len(failures),
            len(conversations),
        )
    else:
        kinds = sorted({type(error).__name__ for error in failures})
        log.error(
            "maintenance failed for %d of %d conversations (%s); will retry",
            len(failures),
            len(conversations),
            ", ".join(kinds),
        )


async def _maintain_conversation(services: Services, conversation_id: str) -> None:
    broker = services.broker
    refreshed, active = await asyncio.gather(
        broker.presence_refresh(
            conversation_id,
            services.sessions.viewer_ids(conversation_id),
            services.settings.presence_ttl_ms,
        ),
        broker.active_run(conversation_id),
        return_exceptions=True,
    )
    for result in (refreshed, active):
        if isinstance(result, BaseException):
            raise result
    if isinstance(active, ActiveRun) and not active.lease_alive:
        await services.runs.reap(conversation_id)


async def _warm_up(settings: Settings, readiness: Readiness) -> None:
    """Load LiteLLM in the background at start, so the first message streams at once;
    then the process is ready (``/readyz``), and says so once, with how long it took."""
    from costream.agent import llm  # LiteLLM: imported once the server is up

    try:
        await llm.warm_up(settings)
    except Exception:
        log.warning("warming up LiteLLM failed; the first run will load it", exc_info=True)
    readiness.loaded = True
    log.info("ready in %.1f s", time.monotonic() - readiness.since)


@dataclass
class Readiness:
    """Whether LiteLLM is loaded and warm (``/readyz`` says ``loading`` until then)."""

    since: float = field(default_factory=time.monotonic)
    loaded: bool = False


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
    readiness = Readiness()
    broker = make_broker(settings)
    store = Store(broker)
    metrics_registry = Metrics()
    hub = Hub(broker, metrics_registry, recent_frames_bytes=settings.recent_frames_bytes)
    services = Services(
        settings=settings,
        broker=broker,
        store=store,
        hub=hub,
        runs=Runs(settings, broker, store, metrics_registry),
        metrics=metrics_registry,
        sessions=Sessions(),
        limits=HTTPLimits(settings),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await broker.start(hub.on_frame, hub.on_resync)
        _say_where_data_lives(settings)
        await _end_interrupted_runs(services)
        if settings.is_demo:
            log.info("no LLM_API_KEY: using the built-in demo model (%s)", settings.model)
        else:
            log.info("LLM model: %s", settings.model)
        _warn_about_exposure(settings)
        maintenance = asyncio.create_task(_maintain(services))
        warm_up = asyncio.create_task(_warm_up(settings, readiness))
        for started in services.on_started:
            started()
        try:
            yield
        finally:
            maintenance.cancel()
            warm_up.cancel()
            # Awaited, so neither is still touching the broker when it closes.
            await asyncio.gather(maintenance, warm_up, return_exceptions=True)
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
        # With --metrics-listen, /metrics has a listener of its own (serve.py), not this port.
        *([Route("/metrics", api.metrics)] if settings.metrics_listen is None else []),
        Route("/api/conversations", api.create_conversation, methods=["POST"]),
        Route(conversation, api.get_conversation),
        Route(f"{conversation}/links", api.get_links),
        Route(f"{conversation}/messages", api.post_message, methods=["POST"]),
        Route(f"{conversation}/cancel", api.cancel_run, methods=["POST"]),
        Route(f"{conversation}/events", api.get_events),
        Route(f"{conversation}/files", api.list_files),
        Route(f"{conversation}/files/{{path:path}}", api.get_file),
        *ingest.routes(),
        *agui.routes(conversation),
        WebSocketRoute("/ws/conversations/{conversation_id}", websocket_endpoint),
        Mount("/assets", StaticFiles(directory=web_dir(), check_dir=False), name="assets"),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, middleware=[Middleware(Guard, settings=settings)]
    )
    app.state.services = services
    app.state.readiness = readiness
    return app
