"""The HTTP API of PROTOCOL.md: conversations, messages, cancel, events, files, health."""

from __future__ import annotations

import hmac
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from costream.bodies import ascii_int
from costream.errors import NoRun
from costream.server.deps import (
    HTTPError,
    api,
    authorize,
    bearer_token,
    check_rate,
    error_response,
    read_json_body,
    services_of,
    start_run,
)
from costream.server.sse import counted_stream, logged_events


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
    check_rate(request, services.limits.create, "conversations")
    if settings.create_key is not None:
        token = bearer_token(request) or ""
        if not hmac.compare_digest(token.encode(), settings.create_key.encode()):
            raise HTTPError(401, "unauthorized", "creating conversations needs the server's key")
    body = await read_json_body(request, settings.max_body_bytes)
    if not isinstance(body, dict):
        raise HTTPError(400, "bad_request", "body must be a JSON object")
    title = _optional_str(body, "title", 200) or "Untitled conversation"
    # An operator's allow-list: anyone may create, so a free choice would let anyone spend
    # the server's key on any model, or send it to any provider.
    model = _optional_str(body, "model", 200)
    if model is not None and model not in settings.models:
        allowed = ", ".join(settings.models)
        raise HTTPError(400, "bad_request", f"model must be one of: {allowed}")
    model = model or settings.model
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
async def get_links(request: Request) -> Response:
    """The conversation's share links that the caller's token may hand out: the view link
    for anyone, the write link too for a writer (the token is the caller's own)."""
    services, conversation, role = await authorize(request)
    token = bearer_token(request) or ""
    page = f"{str(request.base_url).rstrip('/')}/c/{conversation.id}#t="
    if role != "writer":
        return JSONResponse({"viewUrl": page + token, "writeUrl": None})
    view_token = await services.store.view_token(conversation.id, token)
    return JSONResponse(
        {"viewUrl": page + view_token if view_token else None, "writeUrl": page + token}
    )


@api
async def post_message(request: Request) -> Response:
    check_rate(request, services_of(request).limits.message, "messages")
    services, conversation, _ = await authorize(request, write=True)
    body = await read_json_body(request, services.settings.max_body_bytes)
    content = body.get("content") if isinstance(body, dict) else None
    limit = services.settings.max_message_chars
    if isinstance(content, str) and len(content) > limit:
        raise HTTPError(413, "too_large", f"message longer than {limit} characters")
    if not isinstance(content, str) or not content.strip():
        raise HTTPError(400, "bad_request", 'body must be {"content": "<non-empty text>"}')
    run_id = await start_run(services, conversation.id, content)
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
    value = ascii_int(raw, maximum)
    if value is None:
        raise HTTPError(400, "bad_request", f"{name} must be an integer from 0 to {maximum}")
    return value


@api
async def get_events(request: Request) -> Response:
    services, conversation, _ = await authorize(request)
    after = _int_param(request, "after", 0, 2**62)
    if "text/event-stream" in request.headers.get("accept", ""):
        last_event_id = request.headers.get("last-event-id", "")
        if last_event_id:
            resumed = ascii_int(last_event_id, 2**62)
            if resumed is None:
                raise HTTPError(
                    400, "bad_request", "Last-Event-ID must be an integer from 0 to 2**62"
                )
            after = resumed
        return StreamingResponse(
            counted_stream(services, conversation.id, after),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    limit = _int_param(request, "limit", 1000, 10_000)
    body = await logged_events(services, conversation.id, after, limit)
    return Response(body, media_type="application/json")


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
    """200 ``ready`` once LiteLLM is loaded and warm and the storage answers; 503
    ``loading`` before (the first run would wait seconds for LiteLLM), 503 when the
    storage does not answer."""
    if await services_of(request).broker.ping():
        readiness = getattr(request.app.state, "readiness", None)
        if readiness is not None and not readiness.loaded:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready"})
    return error_response(503, "unavailable", "storage unavailable")


async def metrics(request: Request) -> Response:
    text = services_of(request).metrics.render()
    return Response(text, media_type="text/plain; version=0.0.4")
