"""AG-UI's own transport: an AG-UI client (``HttpAgent``, CopilotKit) runs and watches a
conversation as it would any AG-UI agent.

- ``POST /api/conversations/{id}/agui`` (write token) takes a ``RunAgentInput``, starts a
  run with the client's ``runId`` and the id of its last user message, and streams that
  run, ``RUN_STARTED`` to ``RUN_FINISHED`` or ``RUN_ERROR``, as Server-Sent Events; then
  the stream ends, so ``runAgent()`` resolves. Every other viewer sees the run as it sees
  one started from the page: the log is the same.
- ``POST /api/conversations/{id}/agui/connect`` (view or write token) streams the
  conversation so far as one ``MESSAGES_SNAPSHOT`` inside a ``RUN_STARTED`` /
  ``RUN_FINISHED`` pair (AG-UI 1.0 streams must begin with ``RUN_STARTED``), then the run
  under way, if any; with ``forwardedProps.follow`` it goes on with every later run.

The log's frames are rendered for AG-UI clients, one at a time (:class:`AguiRendering`):
``seq`` moves into ``rawEvent.seq`` and ``TOOL_CALL_RESULT.metadata`` into
``rawEvent.metadata`` (the client folds an event's ``metadata`` into the message it
builds, so either would make its messages differ from every snapshot), ``RUN_STARTED``
declares ``protocolVersion``. The rendering also follows what the client builds from the
events (:class:`ClientMessages`, the client's ``defaultApplyEvents`` for the events
costream sends); where that differs from costream's snapshot at the end of a run (the
abandoned output of a retried step, a tool call cut by a cancel, an error tool result,
a step that streamed its text in several pieces) it sends that snapshot before the run's
last event.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any, Final

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from costream import protocol
from costream.errors import StorageUnavailable
from costream.server.agui_messages import ClientMessages, Json
from costream.server.deps import (
    HTTPError,
    Services,
    api,
    authorize,
    read_json_body,
    start_run,
)
from costream.server.hub import FellBehind, Follower

PROTOCOL_VERSION: Final = "1.0"  # the AG-UI version whose schemas these streams follow
_ID: Final = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
_ENDINGS: Final = ("RUN_FINISHED", "RUN_ERROR")
_HEADERS: Final = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _encode(event: Json) -> str:
    return msgspec.json.encode(event).decode()


def _sse(event: Json, seq: int | None = None) -> str:
    head = f"id: {seq}\n" if seq else ""
    return f"{head}data: {_encode(event)}\n\n"


# ---- the input ------------------------------------------------------------------------


class RunInput(msgspec.Struct, frozen=True):
    """What costream takes from a ``RunAgentInput``."""

    run_id: str | None
    message_id: str | None
    content: str | None
    messages: list[Json]  # as the client holds them (what it will rebuild on)
    follow: bool


def _text_of(content: Any) -> str | None:
    """A user message's text: a string, or the text parts of AG-UI content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    return None


def parse_run_input(body: Any, conversation_id: str, max_chars: int, *, run: bool) -> RunInput:
    """A ``RunAgentInput`` body (400, 413). ``run``: it must carry a ``runId`` and end with a
    user message, the new one."""
    if not isinstance(body, dict):
        raise HTTPError(400, "bad_request", "body must be an AG-UI RunAgentInput object")
    thread_id = body.get("threadId", conversation_id)
    if thread_id != conversation_id:
        raise HTTPError(400, "bad_request", "threadId must be the conversation's id")
    messages = body.get("messages", [])
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise HTTPError(400, "bad_request", "messages must be a list of AG-UI messages")
    props = body.get("forwardedProps")
    follow = isinstance(props, dict) and props.get("follow") is True
    if not run:
        return RunInput(None, None, None, messages, follow)
    run_id = body.get("runId")
    if not isinstance(run_id, str) or not _ID.fullmatch(run_id):
        raise HTTPError(400, "bad_request", "runId must be an id of 1 to 100 URL-safe characters")
    last = messages[-1] if messages else {}
    if last.get("role") != "user":
        raise HTTPError(400, "bad_request", "the last message must be the new user message")
    message_id = last.get("id")
    if not isinstance(message_id, str) or not _ID.fullmatch(message_id):
        raise HTTPError(400, "bad_request", "the user message needs an id of URL-safe characters")
    content = _text_of(last.get("content"))
    if content is not None and len(content) > max_chars:
        raise HTTPError(413, "too_large", f"message longer than {max_chars} characters")
    if content is None or not content.strip():
        raise HTTPError(400, "bad_request", "the user message must have non-empty text")
    return RunInput(run_id, message_id, content, messages, follow)


# ---- rendering ----------------------------------------------------------------------------


class AguiRendering:
    """Logged frames of one conversation as one AG-UI client's stream should carry them."""

    def __init__(self, services: Services, conversation_id: str, messages: list[Json]) -> None:
        self.services = services
        self.conversation_id = conversation_id
        self.client = ClientMessages(messages)
        self._failed_results: dict[str, str] = {}  # tool call id -> its error text

    def snapshot(self, messages: list[Json], seq: int, timestamp: int) -> str:
        """``MESSAGES_SNAPSHOT`` events after which the client holds ``messages``, in order.

        A snapshot cannot move what the client holds (it keeps its own order and appends
        what is new), so when the order would differ a prefix of ``messages`` that the
        client would hold as is goes first: then the rest is appended in order."""
        out = ""
        if self.client.replaced(messages) != messages:
            for end in range(len(messages) - 1, -1, -1):
                if self.client.replaced(messages[:end]) == messages[:end]:
                    out = self._snapshot_event(messages[:end], seq, timestamp)
                    break
        return out + self._snapshot_event(messages, seq, timestamp)

    def _snapshot_event(self, messages: list[Json], seq: int, timestamp: int) -> str:
        self.client.replace(messages)
        event = {"type": "MESSAGES_SNAPSHOT", "timestamp": timestamp, "messages": messages}
        event["rawEvent"] = {"seq": seq}
        return _sse(event)

    def resync(self, history: list[Json], run_started: str) -> str:
        """Right after ``RUN_STARTED``: costream's history and the new user message, for a
        client that held other messages."""
        event: Json = msgspec.json.decode(run_started)
        messages = [*history, *event["input"]["messages"]]
        return self.snapshot(messages, event["seq"], event["timestamp"])

    def wrapped_snapshot(self, messages: list[Json], seq: int, timestamp: int) -> str:
        """The conversation so far as a run of its own: a late joiner's first events."""
        run_id = f"snapshot-{seq}"
        ids = {"threadId": self.conversation_id, "runId": run_id}
        started = {"type": "RUN_STARTED", "timestamp": timestamp, **ids}
        started |= {"protocolVersion": PROTOCOL_VERSION, "input": {**ids, "messages": []}}
        finished = {"type": "RUN_FINISHED", "timestamp": timestamp, **ids}
        finished["outcome"] = {"type": "success"}
        return _sse(started) + self.snapshot(messages, seq, timestamp) + _sse(finished)

    async def render(self, text: str) -> str:
        """One logged frame as SSE, preceded by a correcting snapshot where it ends a run
        whose messages the client would otherwise hold wrong."""
        event: Json = msgspec.json.decode(text)
        seq = event.pop("seq")
        raw: Json = {"seq": seq}
        kind = event["type"]
        if kind == "RUN_STARTED":
            event["protocolVersion"] = PROTOCOL_VERSION
            self._failed_results.clear()
        elif kind == "TOOL_CALL_RESULT" and "metadata" in event:
            raw["metadata"] = event.pop("metadata")
            if raw["metadata"].get("isError"):
                self._failed_results[event["toolCallId"]] = event["content"]
        event["rawEvent"] = raw
        out = ""
        if kind in _ENDINGS:
            out = await self._correction(seq, event["timestamp"])
        self.client.apply(event)
        return out + _sse(event, seq)

    async def _correction(self, seq: int, timestamp: int) -> str:
        stored = await self.services.broker.read_snapshot(self.conversation_id)
        if stored is None or protocol.seq_of(stored) != seq:
            return ""  # a later run already ended: its own end corrects the client
        messages: list[Json] = msgspec.json.decode(stored)["messages"]
        for message in messages:
            failed = self._failed_results.get(message.get("toolCallId", ""))
            if message.get("role") == "tool" and failed is not None:
                message["error"] = failed  # AG-UI's place for a tool's failure
        if messages == self.client.messages:
            return ""
        return self.snapshot(messages, seq, timestamp)


# ---- the endpoints ---------------------------------------------------------------------


async def _history(services: Services, conversation_id: str) -> list[Json]:
    messages = await services.store.messages(conversation_id)
    return [msgspec.to_builtins(m) for m in messages]


def _follower(services: Services, conversation_id: str, after: int) -> Follower:
    """The logged frames after ``after``, then live. Entered by the stream itself: a
    response that never starts holds no subscription, and what was logged in between
    comes from the log."""
    settings = services.settings
    return Follower(
        services.hub, conversation_id, after, settings.viewer_queue_frames, logged_only=True
    )


def _lost_stream_error() -> str:
    message = "lost the live stream (the run goes on): connect again to follow it"
    return _sse({"type": "RUN_ERROR", "message": message, "code": "stream_lost"})


@api
async def run(request: Request) -> Response:
    """``POST /api/conversations/{id}/agui``: start a run, stream it to its end."""
    services, conversation, _ = await authorize(request, write=True)
    settings = services.settings
    body = await read_json_body(request, settings.max_body_bytes)
    run_input = parse_run_input(body, conversation.id, settings.max_message_chars, run=True)
    assert run_input.content is not None and run_input.run_id is not None
    history = await _history(services, conversation.id)
    if any(m["id"] == run_input.message_id for m in history):
        raise HTTPError(400, "bad_request", "the user message's id is already in the conversation")
    state = await services.broker.log_state(conversation.id)
    follower = _follower(services, conversation.id, state.head if state else 0)
    run_id = await start_run(
        services,
        conversation.id,
        run_input.content,
        run_id=run_input.run_id,
        message_id=run_input.message_id,
    )
    # The client rebuilds on what it holds; when that is not costream's history, the
    # run's first events put costream's in its place.
    client_history = run_input.messages[:-1]
    resync = None if client_history == history else history
    rendering = AguiRendering(services, conversation.id, run_input.messages)
    stream = _run_stream(services, follower, rendering, run_id, resync)
    return StreamingResponse(stream, media_type="text/event-stream", headers=_HEADERS)


async def _run_stream(
    services: Services,
    follower: Follower,
    rendering: AguiRendering,
    run_id: str,
    resync: list[Json] | None,
) -> AsyncIterator[str]:
    started = False
    try:
        async with follower:
            while True:
                batch = await follower.next_batch(services.settings.heartbeat_s)
                if not batch:
                    await follower.check_head()
                    yield ": heartbeat\n\n"
                    continue
                out = []
                for text in batch:
                    kind = _kind(text)
                    if not started:
                        # Frames before this run's RUN_STARTED (a dead run being ended)
                        # are not this client's.
                        if kind != "RUN_STARTED" or f'"runId":"{run_id}"' not in text:
                            continue
                        started = True
                        out.append(await rendering.render(text))
                        if resync is not None:
                            out.append(rendering.resync(resync, text))
                        continue
                    out.append(await rendering.render(text))
                    if kind in _ENDINGS:
                        yield "".join(out)
                        return
                if out:
                    yield "".join(out)
    except (FellBehind, StorageUnavailable):
        yield _lost_stream_error()


def _kind(text: str) -> str:
    """The type of a logged frame, ``{"seq":N,"type":"..."``, read without decoding it."""
    start = text.index('"type":"') + 8
    return text[start : text.index('"', start)]


@api
async def connect(request: Request) -> Response:
    """``POST /api/conversations/{id}/agui/connect``: the conversation so far, then the
    run under way (and every later one with ``forwardedProps.follow``)."""
    services, conversation, _ = await authorize(request)
    body = await read_json_body(request, services.settings.max_body_bytes)
    watch = parse_run_input(body, conversation.id, services.settings.max_message_chars, run=False)
    stored = await services.broker.read_snapshot(conversation.id)
    after = protocol.seq_of(stored) if stored is not None else 0
    follower = _follower(services, conversation.id, after)
    rendering = AguiRendering(services, conversation.id, watch.messages)
    if stored is not None:
        snapshot: Json = msgspec.json.decode(stored)
        first = rendering.wrapped_snapshot(snapshot["messages"], after, snapshot["timestamp"])
    else:
        first = rendering.wrapped_snapshot([], 0, protocol.now_ms())
    stream = _connect_stream(services, follower, rendering, first, watch.follow)
    return StreamingResponse(stream, media_type="text/event-stream", headers=_HEADERS)


async def _connect_stream(
    services: Services, follower: Follower, rendering: AguiRendering, first: str, follow: bool
) -> AsyncIterator[str]:
    broker, conversation_id = services.broker, follower.conversation_id
    in_run = False
    try:
        async with follower:
            yield first
            while True:
                if not in_run and not follow:
                    active = await broker.active_run(conversation_id)
                    state = await broker.log_state(conversation_id)
                    if active is None and (state is None or follower.last_sent >= state.head):
                        return
                batch = await follower.next_batch(services.settings.heartbeat_s)
                if not batch:
                    await follower.check_head()
                    yield ": heartbeat\n\n"
                    continue
                for text in batch:
                    yield await rendering.render(text)
                    in_run = _kind(text) not in _ENDINGS
    except (FellBehind, StorageUnavailable):
        if in_run:
            yield _lost_stream_error()


def routes(conversation: str) -> list[Route]:
    """The AG-UI routes under ``conversation`` (``/api/conversations/{conversation_id}``)."""
    return [
        Route(f"{conversation}/agui", run, methods=["POST"]),
        Route(f"{conversation}/agui/connect", connect, methods=["POST"]),
    ]
