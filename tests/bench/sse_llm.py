"""A tiny OpenAI-compatible streaming server for the benchmarks, as fast as it can go.

``POST /v1/chat/completions`` (or ``/chat/completions``) answers every request with a
Server-Sent Events stream of chat completion chunks: a role chunk, ``N`` content chunks
of one short word each, a ``finish_reason`` chunk, a usage chunk and ``[DONE]``. ``N``
comes from the requested model name, ``chunks-N`` (``openai/chunks-2000`` through
LiteLLM); default 1000. Bodies are built once per ``N`` and written in one go with a
Content-Length, over keep-alive connections: the server costs next to nothing per chunk,
so what is measured is the client.

Run: ``python tests/bench/sse_llm.py --port P`` (prints ``LISTENING P``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from functools import cache

WORDS = ("alpha ", "beta ", "gamma ", "delta ", "stream ", "token ", "viewer ", "costream ")
DEFAULT_CHUNKS = 1000


def _chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "chunks",
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


@cache
def stream_body(chunks: int) -> bytes:
    """The whole SSE body for ``chunks`` content chunks."""
    parts = [_chunk({"role": "assistant", "content": ""})]
    parts += [_chunk({"content": WORDS[i % len(WORDS)]}) for i in range(chunks)]
    parts.append(_chunk({}, "stop"))
    usage = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "chunks",
        "choices": [],
        "usage": {"prompt_tokens": 10, "completion_tokens": chunks, "total_tokens": chunks + 10},
    }
    parts.append(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n")
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def chunks_for(model: object) -> int:
    if isinstance(model, str) and "chunks-" in model:
        tail = model.rsplit("chunks-", 1)[1]
        if tail.isdigit():
            return int(tail)
    return DEFAULT_CHUNKS


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            raw = await reader.readexactly(length) if length else b"{}"
            try:
                model = json.loads(raw).get("model")
            except ValueError:
                model = None
            body = stream_body(chunks_for(model))
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"cache-control: no-cache\r\ncontent-length: %d\r\n\r\n" % len(body)
            )
            writer.write(body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print(f"LISTENING {port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
