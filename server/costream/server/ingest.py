"""Runs produced by another program, through HTTP: the server side of ``costream.publisher``.

A program that cannot reach the servers' Redis publishes its LLM stream with the
conversation's write token:

- ``POST /api/conversations/{id}/runs`` ``{"input"}``: takes the run lease and appends
  ``RUN_STARTED`` (201 ``{"runId", "leaseTtlMs"}``; 409 while a run is active).
- ``POST .../runs/{runId}/events`` with a JSON array of events without ``seq``: each is
  checked with the protocol's decoder, stamped with the server's time and appended in
  order under the run's lease, which the call renews (202 ``{"head", "cancelRequested"}``;
  ``[]`` only renews). A run's own boundaries (``RUN_STARTED``, ``RUN_FINISHED``,
  ``RUN_ERROR``) and ``MESSAGES_SNAPSHOT`` are refused.
- ``POST .../runs/{runId}/finish`` ``{"outcome", "usage"?, "costUsd"?, "model"?,
  "error"?, "messages"?}``: closes what is still open, records the history and cost,
  appends ``RUN_FINISHED`` or ``RUN_ERROR`` and releases the lease (200).

The fence the run started with is kept beside it, so a call for a run that was reaped
(its lease expired: ``producer_lost``) gets 409 even though the reaper holds a lease.
Checks run in PROTOCOL.md's order: 404, 401, 403, 413, 400, 409.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from costream import protocol
from costream.broker import ActiveRun, RunLease
from costream.errors import LeaseLost, NotFound, RunActive
from costream.lifecycle import RunEnd, finish_external_run, open_run
from costream.protocol import ErrorCode, Event, SnapshotMessage, Usage
from costream.server.deps import HTTPError, Services, api, authorize, read_json_body

_FENCES: Final = "ingest_fences"  # store map: run id -> the fence it started with
_REFUSED: Final = (
    protocol.RunStarted,
    protocol.RunFinished,
    protocol.RunError,
    protocol.MessagesSnapshot,
)
_MAX_ERROR_CHARS: Final = 500


class _ErrorBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    code: ErrorCode = "internal"
    message: Annotated[str, msgspec.Meta(max_length=_MAX_ERROR_CHARS)] = "the run failed"


class _FinishBody(msgspec.Struct, rename="camel", kw_only=True, forbid_unknown_fields=True):
    outcome: Literal["success", "cancelled", "error"]
    usage: Usage = msgspec.field(default_factory=Usage)
    cost_usd: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    model: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    error: _ErrorBody | None = None
    messages: list[SnapshotMessage] = msgspec.field(default_factory=list)


def _bad_request(message: str) -> HTTPError:
    return HTTPError(400, "bad_request", message)


def _no_run(run_id: str) -> HTTPError:
    return HTTPError(409, "no_run", f"run {run_id} is not active (it ended or was reaped)")


async def _lease(
    services: Services, conversation_id: str, run_id: str
) -> tuple[RunLease, ActiveRun]:
    """The lease of an ingest run that is still the one that started; 409 otherwise."""
    broker = services.broker
    fence = await broker.map_get(conversation_id, _FENCES, run_id)
    active = await broker.active_run(conversation_id)
    if (
        fence is None
        or active is None
        or active.run_id != run_id
        or str(active.fence) != fence.decode()
    ):
        raise _no_run(run_id)
    return RunLease(conversation_id, run_id, active.fence), active


@api
async def start_run(request: Request) -> Response:
    services, conversation, _ = await authorize(request, write=True)
    settings = services.settings
    body = await read_json_body(request, settings.max_body_bytes)
    content = body.get("input") if isinstance(body, dict) else None
    if isinstance(content, str) and len(content) > settings.max_message_chars:
        raise HTTPError(
            413, "too_large", f"input longer than {settings.max_message_chars} characters"
        )
    if not isinstance(content, str) or not content.strip():
        raise _bad_request('body must be {"input": "<the user\'s message>"}')
    try:
        lease = await open_run(
            services.broker,
            services.store,
            conversation.id,
            content,
            settings.lease_ttl_ms,
            services.runs.reap,
        )
    except RunActive:
        raise HTTPError(409, "run_active", "a run is already active") from None
    except NotFound:
        raise HTTPError(404, "not_found", "unknown conversation") from None
    await services.broker.map_set(conversation.id, _FENCES, lease.run_id, str(lease.fence).encode())
    services.metrics.runs_started.inc()
    services.metrics.events_appended.inc()
    return JSONResponse(
        {"runId": lease.run_id, "leaseTtlMs": settings.lease_ttl_ms}, status_code=201
    )


def _decode_events(body: Any) -> list[bytes]:
    """The events of a request, checked and re-encoded with the server's timestamp."""
    if not isinstance(body, list):
        raise _bad_request("body must be a JSON array of events")
    bodies = []
    for position, item in enumerate(body):
        try:
            event: Event = msgspec.convert(item, Event)
        except msgspec.ValidationError as error:
            raise _bad_request(f"event {position}: {error}") from None
        if isinstance(event, _REFUSED):
            raise _bad_request(f"event {position}: {type(event).__name__} is not allowed here")
        stamped = msgspec.structs.replace(event, seq=msgspec.UNSET, timestamp=protocol.now_ms())
        bodies.append(protocol.encode(stamped))
    return bodies


@api
async def post_events(request: Request) -> Response:
    services, conversation, _ = await authorize(request, write=True)
    body = await read_json_body(request, services.settings.max_body_bytes)
    bodies = _decode_events(body)
    run_id = request.path_params["run_id"]
    lease, _ = await _lease(services, conversation.id, run_id)
    broker = services.broker
    try:
        head = await broker.append(lease, bodies) if bodies else None
        cancel = await broker.renew_lease(lease, services.settings.lease_ttl_ms)
    except LeaseLost:
        raise _no_run(run_id) from None
    services.metrics.events_appended.inc(len(bodies))
    return JSONResponse({"head": head, "cancelRequested": cancel}, status_code=202)


@api
async def finish_run(request: Request) -> Response:
    services, conversation, _ = await authorize(request, write=True)
    body = await read_json_body(request, services.settings.max_body_bytes)
    try:
        finish = msgspec.convert(body, _FinishBody)
    except msgspec.ValidationError as invalid:
        raise _bad_request(str(invalid)) from None
    run_id = request.path_params["run_id"]
    lease, active = await _lease(services, conversation.id, run_id)
    error = finish.error or _ErrorBody()
    end = RunEnd(
        finish.outcome,
        usage=finish.usage,
        cost_usd=finish.cost_usd,
        model=finish.model or conversation.model,
        error_code=error.code,
        error_message=error.message,
        messages=finish.messages,
    )
    # Whatever the producer left open is closed here, as the reaper would.
    closing = await services.runs.closing_events(conversation.id, active.start_seq)
    try:
        head = await finish_external_run(services.broker, services.store, lease, end, closing)
    except LeaseLost:
        raise _no_run(run_id) from None
    await services.broker.map_delete(conversation.id, _FENCES, run_id)
    services.metrics.events_appended.inc(len(closing) + 1)
    if finish.outcome == "error":
        services.metrics.run_errors.inc()
    return JSONResponse({"runId": run_id, "head": head})


def routes() -> list[BaseRoute]:
    """The ingest endpoints, for ``create_app``'s route list."""
    runs = "/api/conversations/{conversation_id}/runs"
    return [
        Route(runs, start_run, methods=["POST"]),
        Route(f"{runs}/{{run_id}}/events", post_events, methods=["POST"]),
        Route(f"{runs}/{{run_id}}/finish", finish_run, methods=["POST"]),
    ]
