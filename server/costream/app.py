"""The Starlette app: HTTP API, Server-Sent Events, WebSocket route, the page, lifespan.

HTTP checks run in PROTOCOL.md's order: 404, 401, 403, 413, 400, 409 (a conversation's
existence is not a secret; its content is).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from .broker import Broker
from .config import Settings
from .errors import NoRun, NotFound, RunActive, StorageUnavailable
from .hub import FellBehind, Follower, Hub, seq_of_text
from .metrics import Metrics
from .runner import Runs
from .store import Conversation, Role, Store
from .viewer import Sessions, ViewerSession

log = logging.getLogger("costream")

_MAINTENANCE_S = 2.0


def web_dir() -> Path:
    """The static client: inside the wheel, or ``web/`` of a source checkout."""
    packaged = Path(__file__).parent / "web"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "web"


@dataclass
class Services:
    """What every request handler of one process shares."""

    settings: Settings
    broker: Broker
    store: Store
    hub: Hub
    runs: Runs
    metrics: Metrics
    sessions: Sessions


def make_broker(settings: Settings) -> Broker:
    if settings.redis_url:
        from .broker_redis import RedisBroker

        return RedisBroker(settings.redis_url, log_retain=settings.log_retain)
    from .broker_memory import MemoryBroker

    return MemoryBroker(log_retain=settings.log_retain)


# ---- HTTP helpers -------------------------------------------------------------------


class HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


async def read_json_body(request: Request, limit: int) -> Any:
    """The JSON body, at most ``limit`` bytes (413), parsed (400)."""
    declared = request.headers.get("content-length")
    too_large = HTTPError(413, "too_large", f"body larger than {limit} bytes")
    if declared and declared.isdigit() and int(declared) > 4 * limit:
        raise too_large  # not worth reading: the connection is dropped after the answer
    body = bytearray()
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > 4 * limit:
            raise too_large
        if received <= limit:
            body += chunk
    # A body a little over the limit is read to its end before the 413, so that the
    # client, still sending, gets the answer instead of a broken pipe.
    if received > limit:
        raise too_large
    if not body:
        return {}
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise HTTPError(400, "bad_request", "body is not valid JSON") from None


def services_of(request: Request | WebSocket) -> Services:
    services: Services = request.app.state.services
    return services


async def authorize(
    request: Request, *, write: bool = False
) -> tuple[Services, Conversation, Role]:
    """404 unknown conversation, 401 no or wrong token, 403 a view token that must write."""
    services = services_of(request)
    conversation = await services.store.get(request.path_params["conversation_id"])
    if conversation is None:
        raise HTTPError(404, "not_found", "unknown conversation")
    token = bearer_token(request)
    if token is None:
        raise HTTPError(401, "unauthorized", "send the conversation's token as a Bearer token")
    role = await services.store.role_for(conversation.id, token)
    if role is None:
        raise HTTPError(401, "unauthorized", "wrong token")
    if write and role != "writer":
        raise HTTPError(403, "forbidden", "this token can only view")
    return services, conversation, role


Handler = Callable[[Request], Awaitable[Response]]


def api(handler: Handler) -> Handler:
    """Turn HTTPError and storage failures into PROTOCOL.md's error bodies."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except HTTPError as error:
            return error_response(error.status, error.code, error.message)
        except StorageUnavailable:
            return error_response(503, "unavailable", "storage unavailable, try again")

    return wrapped


# ---- HTTP API -----------------------------------------------------------------------


def _optional_str(body: dict[str, Any], name: str, limit: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise HTTPError(
            400, "bad_request", f"{name} must be a string of at most {limit} characters"
        )
    return value


@api
async def create_conversation(request: Request) -> Response:
    services = services_of(request)
    settings = services.settings
    if settings.create_key is not None:
        token = bearer_token(request) or ""
        if not hmac.compare_digest(token.encode(), settings.create_key.encode()):
            raise HTTPError(401, "unauthorized", "creating conversations needs the server's key")
    body = await read_json_body(request, settings.max_body_bytes)
    if not isinstance(body, dict):
        raise HTTPError(400, "bad_request", "body must be a JSON object")
    title = _optional_str(body, "title", 200) or "Untitled conversation"
    model = _optional_str(body, "model", 200) or settings.model
    system = _optional_str(body, "system", settings.max_message_chars) or ""
    created = await services.store.create(title=title, model=model, system=system)
    base = str(request.base_url).rstrip("/")
    conversation_id = created.conversation.id
    return JSONResponse(
        {
            "id": conversation_id,
            "writeToken": created.write_token,
            "viewToken": created.view_token,
            "viewUrl": f"{base}/c/{conversation_id}#t={created.view_token}",
            "writeUrl": f"{base}/c/{conversation_id}#t={created.write_token}",
            "model": model,
        },
        status_code=201,
    )


@api
async def get_conversation(request: Request) -> Response:
    services, conversation, _ = await authorize(request)
    broker = services.broker
    state = await broker.log_state(conversation.id)
    active = await broker.active_run(conversation.id)
    viewers = await broker.presence_refresh(conversation.id, [], services.settings.presence_ttl_ms)
    usage, cost = await services.store.totals(conversation.id)
    return JSONResponse(
        {
            "id": conversation.id,
            "title": conversation.title,
            "model": conversation.model,
            "status": "running" if active else "idle",
            "runId": active.run_id if active else None,
            "head": state.head if state else 0,
            "epoch": conversation.epoch,
            "viewers": viewers,
            "usage": msgspec.to_builtins(usage),
            "totalCostUsd": cost,
        }
    )


@api
async def post_message(request: Request) -> Response:
    services, conversation, _ = await authorize(request, write=True)
    body = await read_json_body(request, services.settings.max_body_bytes)
    content = body.get("content") if isinstance(body, dict) else None
    limit = services.settings.max_message_chars
    if isinstance(content, str) and len(content) > limit:
        raise HTTPError(413, "too_large", f"message longer than {limit} characters")
    if not isinstance(content, str) or not content.strip():
        raise HTTPError(400, "bad_request", 'body must be {"content": "<non-empty text>"}')
    try:
        run_id = await services.runs.start(conversation.id, content)
    except RunActive:
        raise HTTPError(409, "run_active", "a run is already active") from None
    except NotFound:
        raise HTTPError(404, "not_found", "unknown conversation") from None
    return JSONResponse({"runId": run_id}, status_code=202)


@api
async def cancel_run(request: Request) -> Response:
    services, conversation, _ = await authorize(request, write=True)
    try:
        run_id = await services.runs.cancel(conversation.id)
    except NoRun:
        raise HTTPError(409, "no_run", "nothing is running") from None
    return JSONResponse({"runId": run_id}, status_code=202)


def _int_param(request: Request, name: str, default: int, maximum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > maximum:
        raise HTTPError(400, "bad_request", f"{name} must be an integer from 0 to {maximum}")
    return int(raw)


@api
async def get_events(request: Request) -> Response:
    services, conversation, _ = await authorize(request)
    after = _int_param(request, "after", 0, 2**62)
    if "text/event-stream" in request.headers.get("accept", ""):
        last_event_id = request.headers.get("last-event-id", "")
        if last_event_id.isdigit():
            after = int(last_event_id)
        return StreamingResponse(
            _event_stream(services, conversation.id, after),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    limit = _int_param(request, "limit", 1000, 10_000)
    frames = await services.broker.read_log(conversation.id, after, limit)
    return Response(b"[" + b",".join(frames) + b"]", media_type="application/json")


async def _event_stream(services: Services, conversation_id: str, after: int) -> AsyncIterator[str]:
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


@api
async def list_files(request: Request) -> Response:
    services, conversation, _ = await authorize(request)
    files = await services.store.list_files(conversation.id)
    return JSONResponse([{"path": path, "size": size} for path, size in files.items()])


@api
async def get_file(request: Request) -> Response:
    services, conversation, _ = await authorize(request)
    text = await services.store.read_file(conversation.id, request.path_params["path"])
    if text is None:
        raise HTTPError(404, "not_found", "no such file")
    return Response(text, media_type="text/plain; charset=utf-8")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    if await services_of(request).broker.ping():
        return JSONResponse({"status": "ready"})
    return error_response(503, "unavailable", "storage unavailable")


async def metrics(request: Request) -> Response:
    text = services_of(request).metrics.render()
    return Response(text, media_type="text/plain; version=0.0.4")


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
    from . import llm

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

    from . import ingest  # here, not at the top: ingest imports this module

    conversation = "/api/conversations/{conversation_id}"
    routes = [
        Route("/", page),
        Route("/c/{conversation_id}", page),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/api/conversations", create_conversation, methods=["POST"]),
        Route(conversation, get_conversation),
        Route(f"{conversation}/messages", post_message, methods=["POST"]),
        Route(f"{conversation}/cancel", cancel_run, methods=["POST"]),
        Route(f"{conversation}/events", get_events),
        Route(f"{conversation}/files", list_files),
        Route(f"{conversation}/files/{{path:path}}", get_file),
        *ingest.routes(),
        WebSocketRoute("/ws/conversations/{conversation_id}", websocket_endpoint),
        Mount("/assets", StaticFiles(directory=web_dir(), check_dir=False), name="assets"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.services = services
    return app
