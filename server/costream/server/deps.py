"""What the server's handlers share: the process's services, HTTP errors, authorization.

HTTP checks run in PROTOCOL.md's order: 429 (per-client rate), 404, 401, 403, 413, 415, 408,
400, 409, 429 (runs per process) (a conversation's existence is not a secret; its content is).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket

from costream.agent.runner import Runs
from costream.bodies import BadInput, ascii_int, decode_json
from costream.broker import Broker
from costream.config import Settings
from costream.errors import (
    ExternallyProduced,
    NotFound,
    RunActive,
    StorageUnavailable,
    TooManyRuns,
)
from costream.metrics import Metrics
from costream.server.hub import Hub
from costream.server.ratelimit import ClientLimits, HTTPLimits
from costream.store import Conversation, Role, Store


class LocalSession(Protocol):
    """A viewer session of this process, as the registry sees it."""

    conversation_id: str
    viewer_id: str

    async def close_going_away(self) -> None: ...


class Sessions:
    """The sessions of this process, by conversation (limits, shutdown), and its SSE
    streams, which count toward the viewer limit too."""

    def __init__(self) -> None:
        self._by_conversation: dict[str, set[LocalSession]] = {}
        self._streams: dict[str, int] = {}

    def open_stream(self, conversation_id: str) -> None:
        self._streams[conversation_id] = self._streams.get(conversation_id, 0) + 1

    def close_stream(self, conversation_id: str) -> None:
        left = self._streams.get(conversation_id, 0) - 1
        if left > 0:
            self._streams[conversation_id] = left
        else:
            self._streams.pop(conversation_id, None)

    def add(self, session: LocalSession) -> None:
        self._by_conversation.setdefault(session.conversation_id, set()).add(session)

    def discard(self, session: LocalSession) -> None:
        sessions = self._by_conversation.get(session.conversation_id)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._by_conversation[session.conversation_id]

    def count(self, conversation_id: str) -> int:
        """WebSocket sessions and SSE streams of the conversation on this process."""
        sessions = len(self._by_conversation.get(conversation_id, ()))
        return sessions + self._streams.get(conversation_id, 0)

    def viewer_ids(self, conversation_id: str) -> list[str]:
        return [s.viewer_id for s in self._by_conversation.get(conversation_id, ())]

    def all(self) -> list[LocalSession]:
        return [s for sessions in self._by_conversation.values() for s in sessions]


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
    limits: HTTPLimits
    # Called once the app has started, inside the server's own start-up (serve.py hooks
    # its signal handling here, on top of uvicorn's).
    on_started: list[Callable[[], None]] = field(default_factory=list)


RUNS_RETRY_AFTER_S = 5  # a run slot frees when any run of the process ends


class HTTPError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def rate_limited(message: str, retry_after_s: int) -> HTTPError:
    """429 ``rate_limited`` with a ``Retry-After`` in whole seconds."""
    return HTTPError(429, "rate_limited", message, {"Retry-After": str(retry_after_s)})


def check_rate(request: Request, limits: ClientLimits, what: str) -> None:
    """429 when the request's client went over ``limits``."""
    wait = services_of(request).limits.check(limits, request)
    if wait is not None:
        raise rate_limited(f"too many {what} from this address, retry in {wait} s", wait)


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def read_json_body(request: Request, limit: int) -> Any:
    """The JSON body, at most ``limit`` bytes (413), sent as JSON (415), within
    ``body_timeout_s`` (408, and the connection closes), decoded (400: malformed, nested
    deeper than ``bodies.MAX_JSON_DEPTH``, lone surrogates, numbers out of range). Requiring a JSON content type keeps cross-site ``text/plain`` posts, which
    a browser sends without asking, from acting on the API."""
    declared = request.headers.get("content-length")
    too_large = HTTPError(413, "too_large", f"body larger than {limit} bytes")
    if (
        declared is not None
        and (size := ascii_int(declared, 2**62)) is not None
        and size > 4 * limit
    ):
        raise too_large  # not worth reading: the connection is dropped after the answer
    if not _is_json(request.headers.get("content-type", "")):
        raise HTTPError(415, "unsupported_media_type", "send the body as application/json")
    body = bytearray()
    received = 0
    timeout_s = services_of(request).settings.body_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                received += len(chunk)
                if received > 4 * limit:
                    raise too_large
                if received <= limit:
                    body += chunk
    except ClientDisconnect:
        raise HTTPError(400, "bad_request", "the client left before the body ended") from None
    except TimeoutError:
        # The rest of the body may still come: the connection cannot serve another request.
        raise HTTPError(
            408,
            "request_timeout",
            f"the body did not arrive within {timeout_s:g} s",
            {"Connection": "close"},
        ) from None
    # A body a little over the limit is read to its end before the 413, so that the
    # client, still sending, gets the answer instead of a broken pipe.
    if received > limit:
        raise too_large
    if not body:
        return {}
    try:
        return decode_json(bytes(body))
    except BadInput as error:
        raise HTTPError(400, "bad_request", error.message) from None


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
            return error_response(error.status, error.code, error.message, error.headers)
        except StorageUnavailable:
            return error_response(503, "unavailable", "storage unavailable, try again")

    return wrapped


async def start_run(
    services: Services,
    conversation_id: str,
    content: str,
    *,
    run_id: str | None = None,
    message_id: str | None = None,
) -> str:
    """Start a run from an HTTP request (the messages and AG-UI endpoints); its id.
    409 ``run_active`` or ``external_producer``, 404 for a conversation gone meanwhile,
    429 when this process runs its limit of runs."""
    try:
        return await services.runs.start(
            conversation_id, content, run_id=run_id, message_id=message_id
        )
    except TooManyRuns:
        raise rate_limited(
            "this server runs as many conversations as it may, retry later", RUNS_RETRY_AFTER_S
        ) from None
    except ExternallyProduced:
        raise HTTPError(
            409,
            "external_producer",
            "this conversation's runs come from an external program (its publisher)",
        ) from None
    except RunActive:
        raise HTTPError(409, "run_active", "a run is already active") from None
    except NotFound:
        raise HTTPError(404, "not_found", "unknown conversation") from None
