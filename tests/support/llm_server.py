"""A scriptable OpenAI-compatible ``/v1/chat/completions`` server that streams over real HTTP.

    def test_something(llm_server, start_server):
        llm_server.enqueue(stream(reasoning("Let me see."), content("Hi"), finish("stop"),
                                  usage(12, 3)))
        llm_server.enqueue(error(429, retry_after=0))
        server = start_server(env={"LLM_MODEL": "openai/gpt-4o-mini",
                                   "LLM_API_KEY": "sk-test", "LLM_BASE_URL": llm_server.base_url})
        ...
        llm_server.requests[0].body["messages"], llm_server.requests[0].headers["authorization"]

Each request takes the next enqueued reply: a stream of chunk dicts sent as Server-Sent
Events (``data: {...}`` then ``data: [DONE]``), an HTTP error, a stream whose connection is
dropped after N chunks, or one that goes silent after N chunks. With nothing enqueued the
answer is a short text, so a stray call never hangs. uvicorn serves it from a thread of
the test process, on a free port, for the whole session; each test gets it reset.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn

from tests.support.processes import free_port

Chunk = dict[str, Any]

# ---- building replies ------------------------------------------------------------------


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> Chunk:
    """One ``chat.completion.chunk`` with a single choice."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def reasoning(text: str) -> Chunk:
    """A reasoning delta (``reasoning_content``, as DeepSeek and LiteLLM name it)."""
    return chunk({"role": "assistant", "reasoning_content": text})


def content(text: str) -> Chunk:
    """A content delta."""
    return chunk({"role": "assistant", "content": text})


def tool_call(
    index: int, *, id: str | None = None, name: str | None = None, arguments: str | None = None
) -> Chunk:
    """A tool-call fragment: the first of a call carries ``id`` and ``name``."""
    function: dict[str, str] = {}
    if name is not None:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    fragment: dict[str, Any] = {"index": index, "function": function}
    if id is not None:
        fragment["id"] = id
        fragment["type"] = "function"
    return chunk({"role": "assistant", "tool_calls": [fragment]})


def finish(reason: str = "stop") -> Chunk:
    """The chunk that ends the choice with ``finish_reason``."""
    return chunk({}, finish_reason=reason)


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int = 0) -> Chunk:
    """The final usage chunk of ``stream_options.include_usage``: no choices."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "gpt-4o-mini",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
        },
    }


@dataclass(frozen=True)
class Reply:
    """What the server answers to one request."""

    chunks: tuple[Chunk, ...] = ()
    status: int = 200
    body: Any = None  # the JSON body of an error answer
    headers: tuple[tuple[str, str], ...] = ()
    cut_after: int | None = None  # drop the connection after this many chunks
    hang_after: int | None = None  # send nothing more after this many chunks
    chunk_delay_s: float = 0.0  # pause before each chunk (a model that takes its time)


def stream(*chunks: Chunk, chunk_delay_s: float = 0.0) -> Reply:
    """A complete stream: the chunks, then ``data: [DONE]``."""
    return Reply(chunks=chunks, chunk_delay_s=chunk_delay_s)


def text(answer: str, prompt_tokens: int = 10, completion_tokens: int = 5) -> Reply:
    """A plain answer, one content delta per word, ``stop`` and a usage chunk."""
    words = [word + " " for word in answer.split(" ")]
    words[-1] = words[-1].rstrip(" ")
    return stream(
        *(content(w) for w in words), finish("stop"), usage(prompt_tokens, completion_tokens)
    )


def cut(*chunks: Chunk, after: int) -> Reply:
    """A stream whose connection drops after ``after`` of its chunks."""
    return Reply(chunks=chunks, cut_after=after)


def hang(*chunks: Chunk, after: int) -> Reply:
    """A stream that goes silent after ``after`` chunks, connection open."""
    return Reply(chunks=chunks, hang_after=after)


def error(status: int, body: Any = None, retry_after: float | None = None) -> Reply:
    """An HTTP error answer in OpenAI's error shape."""
    headers = (("retry-after", f"{retry_after:g}"),) if retry_after is not None else ()
    if body is None:
        body = {"error": {"message": f"scripted error {status}", "type": "test", "code": status}}
    return Reply(status=status, body=body, headers=headers)


# ---- the server --------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    """One request as the server got it (header names lower-case)."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class _DropConnection(Exception):
    """Raised mid-response: uvicorn then closes the connection without ending the body."""


@dataclass
class LLMServer:
    """The scripted server; ``base_url`` ends in ``/v1``."""

    port: int
    replies: deque[Reply] = field(default_factory=deque)
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def enqueue(self, *replies: Reply) -> None:
        """Answer the next requests with these, in order."""
        with self.lock:
            self.replies.extend(replies)

    def reset(self) -> None:
        with self.lock:
            self.replies.clear()
            self.requests.clear()

    def pending(self) -> int:
        """Replies not yet taken."""
        with self.lock:
            return len(self.replies)

    def _take(self, recorded: Recorded) -> Reply:
        with self.lock:
            self.requests.append(recorded)
            return self.replies.popleft() if self.replies else text("(no scripted reply)")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"]
                await send({"type": f"{kind}.complete"})  # lifespan.startup / .shutdown
                if kind == "lifespan.shutdown":
                    return
        assert scope["type"] == "http"
        raw = bytearray()
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        if scope["path"].rstrip("/") != "/v1/chat/completions":
            await _send_json(send, 404, {"error": {"message": "not found"}})
            return
        reply = self._take(Recorded(scope["path"], headers, body))
        if reply.status != 200:
            await _send_json(send, reply.status, reply.body, reply.headers)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        for position, item in enumerate(reply.chunks):
            if reply.cut_after is not None and position >= reply.cut_after:
                raise _DropConnection
            if reply.hang_after is not None and position >= reply.hang_after:
                await _wait_for_disconnect(receive)
                return
            if reply.chunk_delay_s:
                await asyncio.sleep(reply.chunk_delay_s)
            data = b"data: " + json.dumps(item).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": data, "more_body": True})
        if reply.cut_after is not None:
            raise _DropConnection
        if reply.hang_after is not None:
            await _wait_for_disconnect(receive)
            return
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def _send_json(
    send: Any, status: int, body: Any, headers: tuple[tuple[str, str], ...] = ()
) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json")]
    raw_headers += [(k.encode(), v.encode()) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


async def _wait_for_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _serve_in_thread(server: LLMServer) -> tuple[uvicorn.Server, threading.Thread]:
    config = uvicorn.Config(
        server,
        host="127.0.0.1",
        port=server.port,
        log_level="critical",
        lifespan="on",
        timeout_graceful_shutdown=1,
    )
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, name="llm-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uvicorn_server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test LLM server did not start")
        time.sleep(0.01)
    return uvicorn_server, thread


@pytest.fixture(scope="session")
def _llm_server_session() -> Iterator[LLMServer]:
    server = LLMServer(port=free_port())
    uvicorn_server, thread = _serve_in_thread(server)
    yield server
    uvicorn_server.should_exit = True
    thread.join(10)


@pytest.fixture
def llm_server(_llm_server_session: LLMServer) -> LLMServer:
    """The scripted OpenAI-compatible server, with no replies queued and no requests yet."""
    _llm_server_session.reset()
    return _llm_server_session
