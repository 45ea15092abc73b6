"""Runs produced by another program, through HTTP: the server side of ``costream.publisher``.

A program that cannot reach the servers' Redis publishes its LLM stream with the
conversation's write token:

- ``POST /api/conversations/{id}/runs`` ``{"input", "model"?, "exclusive"?}``: takes the
  run lease and appends ``RUN_STARTED`` (201 ``{"runId", "leaseTtlMs", "head"}``; 409
  while a run is active). ``model`` becomes the model shown to viewers; ``exclusive:
  true`` marks the conversation as owned by an external producer: from then on a writer's
  message starts no run on the servers (409 ``external_producer``), only these endpoints.
- ``POST .../runs/{runId}/events`` with a JSON array of events without ``seq``: each is
  checked with the protocol's decoder, stamped with the server's time and appended in
  order under the run's lease, which the call renews (202 ``{"head", "cancelRequested"}``;
  ``[]`` only renews). With ``?expectedHead=N`` (the head before this batch: the start's
  or the previous append's ``head``) a batch sent again after a lost answer is stored
  once: when the head is already ``N + len(batch)`` the answer is 202 with that head and
  nothing is appended; a head that is neither is 409 ``head_mismatch``. A run's own
  boundaries (``RUN_STARTED``, ``RUN_FINISHED``, ``RUN_ERROR``) and ``MESSAGES_SNAPSHOT``
  are refused. Sizes (:mod:`costream.sizes`): a delta whose logged frame would pass
  ``max_event_bytes`` is stored as several consecutive deltas (the answer's ``head``
  counts them); any other event that large is 413 ``event_too_large``; a batch that
  would take the run's logged events past ``max_run_bytes`` is 413 ``run_too_large``
  (nothing of it is stored; finish the run).
- ``POST .../runs/{runId}/finish`` ``{"outcome", "usage"?, "costUsd"?, "model"?,
  "error"?, "messages"?}``: closes what is still open, records the history and cost,
  appends ``RUN_FINISHED`` or ``RUN_ERROR`` and releases the lease (200); ``model``
  becomes the model shown to viewers. Sent again after a lost answer, it is answered 200
  with the same ``runId`` and ``head`` and ``"alreadyEnded": true`` (nothing appended);
  for a run that was reaped, 409 ``no_run``.

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

from costream import lifecycle, protocol
from costream.bodies import ascii_int
from costream.broker import ActiveRun, AppendConflict, RunLease
from costream.errors import LeaseLost, NotFound, RunActive, RunTooLarge
from costream.grammar import GrammarError, RunGrammar, grammar_decoder, grammar_encoder
from costream.lifecycle import RunEnd, open_run
from costream.protocol import ErrorCode, Event, SnapshotMessage, Usage
from costream.server.deps import HTTPError, Services, api, authorize, read_json_body
from costream.sizes import DELTA_TYPES, event_size, split_deltas

_FENCES: Final = "ingest_fences"  # store map: run id -> the fence it started with
_GRAMMAR: Final = "ingest_grammar"  # store map: run id -> its RunGrammar so far
_ENDED: Final = "ingest_ended"  # store map: run id -> "head ms" of the latest runs finished
_ENDED_KEPT: Final = 16  # finished runs remembered, for a finish sent again
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
    cost_usd: protocol.CostUsd = 0.0
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
    model, exclusive = body.get("model"), body.get("exclusive", False)
    if model is not None and (not isinstance(model, str) or not 0 < len(model) <= 200):
        raise _bad_request("model must be a model name of 1 to 200 characters")
    if not isinstance(exclusive, bool):
        raise _bad_request("exclusive must be true or false")
    store = services.store
    if exclusive and not conversation.external:
        await store.mark_external(conversation.id)
    try:
        lease = await open_run(
            services.broker,
            store,
            conversation.id,
            content,
            settings.lease_ttl_ms,
            services.runs.reap,
            external=True,
        )
    except RunActive:
        raise HTTPError(409, "run_active", "a run is already active") from None
    except NotFound:
        raise HTTPError(404, "not_found", "unknown conversation") from None
    await _forget_ended_runs(services, conversation.id)
    await services.broker.map_set(conversation.id, _FENCES, lease.run_id, str(lease.fence).encode())
    if model and model != conversation.model:
        await store.set_model(conversation.id, model)
    services.metrics.runs_started.inc()
    services.metrics.events_appended.inc()
    active = await services.broker.active_run(conversation.id)
    head = active.start_seq if active is not None and active.run_id == lease.run_id else None
    return JSONResponse(
        {"runId": lease.run_id, "leaseTtlMs": settings.lease_ttl_ms, "head": head},
        status_code=201,
    )


def _decode_events(body: Any, max_bytes: int) -> list[Event]:
    """The events of a request, checked one by one and stamped with the server's time, a
    delta longer than ``max_bytes`` split in several. A non-delta event over ``max_bytes``
    is 413, before the first malformed event's 400 (PROTOCOL.md's order)."""
    if not isinstance(body, list):
        raise _bad_request("body must be a JSON array of events")
    events: list[Event] = []
    invalid: HTTPError | None = None
    for position, item in enumerate(body):
        try:
            event: Event = msgspec.convert(item, Event)
        except msgspec.ValidationError as error:
            invalid = invalid or _bad_request(f"event {position}: {error}")
            continue
        if isinstance(event, _REFUSED):
            name = type(event).__name__
            invalid = invalid or _bad_request(f"event {position}: {name} is not allowed here")
            continue
        event = msgspec.structs.replace(event, seq=msgspec.UNSET, timestamp=protocol.now_ms())
        if not isinstance(event, DELTA_TYPES) and (size := event_size(event)) > max_bytes:
            raise HTTPError(
                413,
                "event_too_large",
                f"event {position}: its frame would be {size:,} bytes; the limit per event "
                f"is {max_bytes:,} bytes (only deltas are split)",
            )
        events.append(event)
    if invalid is not None:
        raise invalid
    return split_deltas(events, max_bytes)


async def _forget_ended_runs(services: Services, conversation_id: str) -> None:
    """Drop what is kept beside earlier ingest runs. One run at a time per conversation:
    once a new one holds the lease, every earlier one has ended or was reaped (whose
    producer never called finish, so nothing else removes its entries)."""
    broker = services.broker
    for name in (_FENCES, _GRAMMAR):
        for run_id in await broker.map_all(conversation_id, name):
            await broker.map_delete(conversation_id, name, run_id)


async def _check_grammar(
    services: Services, conversation_id: str, run_id: str, events: list[Event]
) -> bytes:
    """The run's grammar state once ``events`` are taken in (400 naming the first event
    that breaks the segment grammar). Kept beside the run, so any process may take the
    run's next request."""
    stored = await services.broker.map_get(conversation_id, _GRAMMAR, run_id)
    state = RunGrammar() if stored is None else grammar_decoder.decode(stored)
    try:
        state.check(events)
    except GrammarError as error:
        raise _bad_request(str(error)) from None
    return grammar_encoder.encode(state)


def _expected_head(request: Request) -> int | None:
    """``?expectedHead=N`` (ASCII digits), or None when absent; 400 when malformed."""
    raw = request.query_params.get("expectedHead")
    if raw is None:
        return None
    value = ascii_int(raw, 2**62)
    if value is None:
        raise _bad_request("expectedHead must be a seq written in ASCII digits")
    return value


@api
async def post_events(request: Request) -> Response:
    services, conversation, _ = await authorize(request, write=True)
    body = await read_json_body(request, services.settings.max_body_bytes)
    events = _decode_events(body, services.settings.max_event_bytes)
    expected_head = _expected_head(request)
    run_id = request.path_params["run_id"]
    lease, _ = await _lease(services, conversation.id, run_id)
    broker = services.broker
    bodies = [protocol.encode(event) for event in events]
    try:
        head = await _append(services, lease, events, bodies, expected_head)
        cancel = await broker.renew_lease(lease, services.settings.lease_ttl_ms)
    except AppendConflict as conflict:
        raise HTTPError(
            409,
            "head_mismatch",
            f"expectedHead {conflict.expected_head} does not match the log's head "
            f"{conflict.head} (before or after this batch)",
        ) from None
    except LeaseLost:
        raise _no_run(run_id) from None
    except RunTooLarge as refused:
        raise HTTPError(
            413,
            "run_too_large",
            f"this batch would take the run's logged events past {refused.limit:,} bytes "
            "(max_run_bytes); nothing of it was stored: finish the run",
        ) from None
    return JSONResponse({"head": head, "cancelRequested": cancel}, status_code=202)


async def _append(
    services: Services,
    lease: RunLease,
    events: list[Event],
    bodies: list[bytes],
    expected_head: int | None,
) -> int:
    """Append a batch after the grammar check; the head after it (an empty batch without
    ``expected_head`` reads it: how a producer that lost count finds its place). A batch the log already holds (a retry: the head is
    ``expected_head + len(bodies)``) is answered with the head, before the grammar, which
    took it in already and would refuse it a second time; a head that is neither is a
    conflict (409) before any grammar check."""
    broker, conversation_id = services.broker, lease.conversation_id
    if expected_head is not None and bodies:
        state = await broker.log_state(conversation_id)
        head = 0 if state is None else state.head
        if head == expected_head + len(bodies):
            # The broker checks again, atomically with the lease: nothing is appended.
            return await broker.append(lease, bodies, expected_head)
        if head != expected_head:  # the grammar's state is of another position: 409 first
            raise AppendConflict(conversation_id, head, expected_head)
    if not bodies and expected_head is None:
        state = await broker.log_state(conversation_id)
        return 0 if state is None else state.head
    if not bodies:
        return await broker.append(lease, [], expected_head)
    grammar = await _check_grammar(services, conversation_id, lease.run_id, events)
    head = await broker.append(lease, bodies, expected_head)
    # Saved once the batch is stored, so a batch that was not stored can be sent again.
    await broker.map_set(conversation_id, _GRAMMAR, lease.run_id, grammar)
    services.metrics.events_appended.inc(len(bodies))
    return head


@api
async def finish_run(request: Request) -> Response:
    services, conversation, _ = await authorize(request, write=True)
    body = await read_json_body(request, services.settings.max_body_bytes)
    try:
        finish = msgspec.convert(body, _FinishBody)
    except msgspec.ValidationError as invalid:
        raise _bad_request(str(invalid)) from None
    run_id = request.path_params["run_id"]
    try:
        lease, active = await _lease(services, conversation.id, run_id)
    except HTTPError:
        earlier = await services.broker.map_get(conversation.id, _ENDED, run_id)
        if earlier is None:
            raise  # reaped, or never ours: 409 no_run
        head = int(earlier.split()[0])  # finished by an earlier call whose answer was lost
        return JSONResponse({"runId": run_id, "head": head, "alreadyEnded": True})
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
    if finish.model and finish.model != conversation.model:
        await services.store.set_model(conversation.id, finish.model)  # before viewers see the end
    # Whatever the producer left open is closed here, as the reaper would.
    closing = await lifecycle.closing_events(services.broker, conversation.id, active.start_seq)
    try:
        ended = await lifecycle.end_run(
            services.broker,
            services.store,
            lease,
            end,
            closing,
            max_snapshot_bytes=services.settings.max_event_bytes,
        )
    except LeaseLost:
        raise _no_run(run_id) from None
    await _remember_ended(services, conversation.id, run_id, ended.head)
    await services.broker.map_delete(conversation.id, _FENCES, run_id)
    await services.broker.map_delete(conversation.id, _GRAMMAR, run_id)
    services.metrics.events_appended.inc(ended.events)
    if finish.outcome == "error":
        services.metrics.run_errors.inc()
    return JSONResponse({"runId": run_id, "head": ended.head})


async def _remember_ended(services: Services, conversation_id: str, run_id: str, head: int) -> None:
    """Keep a finished run's head, so a finish sent again is answered as the first was;
    the latest :data:`_ENDED_KEPT` runs only."""
    broker = services.broker
    await broker.map_set(conversation_id, _ENDED, run_id, b"%d %d" % (head, protocol.now_ms()))
    ended = await broker.map_all(conversation_id, _ENDED)
    by_age = sorted(ended, key=lambda key: int(ended[key].split()[-1]))
    for old in by_age[: max(len(by_age) - _ENDED_KEPT, 0)]:
        await broker.map_delete(conversation_id, _ENDED, old)


def routes() -> list[BaseRoute]:
    """The ingest endpoints, for ``create_app``'s route list."""
    runs = "/api/conversations/{conversation_id}/runs"
    return [
        Route(runs, start_run, methods=["POST"]),
        Route(f"{runs}/{{run_id}}/events", post_events, methods=["POST"]),
        Route(f"{runs}/{{run_id}}/finish", finish_run, methods=["POST"]),
    ]
