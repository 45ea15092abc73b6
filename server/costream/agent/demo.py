"""The built-in demo model: a LiteLLM ``CustomLLM`` provider, ``costream/demo``.

With no API key the server talks to this model through LiteLLM like to any other, so the
whole product (thinking, text, streamed tool calls, tool results, usage) runs offline.
The model plays the scripted turns of :mod:`costream.agent.demo_turns`, streamed in
word-sized pieces every ``delay_ms``.

LiteLLM's ``GenericStreamingChunk`` (what ``CustomLLM.astreaming`` is declared to yield)
has no field for ``delta.reasoning_content`` and carries one tool call per chunk, so the
demo yields ``ModelResponseStream`` objects, which ``CustomStreamWrapper`` passes through
unchanged for custom providers.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Final

import httpx
import litellm
from litellm.llms.custom_httpx.http_handler import AsyncHTTPHandler, HTTPHandler
from litellm.llms.custom_llm import CustomLLM
from litellm.types.utils import Delta, ModelResponse, ModelResponseStream, StreamingChoices, Usage

from costream.agent.demo_turns import Turn, message_text, plan_turn

PROVIDER: Final = "costream"
MODEL: Final = "costream/demo"

_PIECE = re.compile(r"\s*\S+\s*|\s+")
_MAX_PIECE = 24  # characters per streamed piece of tool-call arguments


# ---- streaming ----------------------------------------------------------------------------


def _pieces(text: str, max_len: int | None = None) -> Iterator[str]:
    for piece in _PIECE.findall(text):
        if max_len is None:
            yield piece
        else:
            for start in range(0, len(piece), max_len):
                yield piece[start : start + max_len]


def _tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def turn_chunks(turn: Turn, prompt_tokens: int) -> Iterator[ModelResponseStream]:
    """The stream of one turn, as an OpenAI-compatible provider would send it."""
    response_id = f"chatcmpl-demo-{secrets.token_hex(8)}"
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> ModelResponseStream:
        return ModelResponseStream(
            id=response_id,
            created=created,
            model=MODEL,
            object="chat.completion.chunk",
            choices=[StreamingChoices(index=0, delta=Delta(**delta), finish_reason=finish_reason)],
        )

    role: dict[str, Any] = {"role": "assistant"}
    for piece in _pieces(turn.reasoning):
        yield chunk({**role, "reasoning_content": piece})
        role = {}
    for piece in _pieces(turn.content):
        yield chunk({**role, "content": piece})
        role = {}
    arguments = ""
    if turn.tool_name:
        call_id = f"call_{secrets.token_hex(12)}"
        function = {"name": turn.tool_name, "arguments": ""}
        yield chunk(
            {
                **role,
                "tool_calls": [
                    {"index": 0, "id": call_id, "type": "function", "function": function}
                ],
            }
        )
        arguments = json.dumps(turn.tool_arguments)
        for piece in _pieces(arguments, _MAX_PIECE):
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
    # The usage chunk goes before the finish chunk: CustomStreamWrapper ends a custom
    # provider's stream at the first chunk without content after a finish_reason, so a
    # usage chunk sent last would be dropped and LiteLLM would count tokens itself.
    reasoning_tokens = _tokens(turn.reasoning)
    completion_tokens = reasoning_tokens + _tokens(turn.content) + _tokens(arguments)
    usage_chunk = ModelResponseStream(
        id=response_id, created=created, model=MODEL, object="chat.completion.chunk", choices=[]
    )
    usage_chunk.usage = Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        completion_tokens_details={"reasoning_tokens": reasoning_tokens},
    )
    yield usage_chunk
    yield chunk({}, turn.finish_reason)


def _prompt_tokens(messages: list[object], tools: object) -> int:
    text = "".join(message_text(m) for m in messages)
    return _tokens(text) + (_tokens(json.dumps(tools)) if tools else 0) + 4 * len(messages)


class DemoLLM(CustomLLM):
    """The ``costream/demo`` provider: scripted turns streamed at a steady pace."""

    def __init__(self, delay_ms: float = 0.0) -> None:
        super().__init__()
        self.delay_ms = delay_ms

    async def stream(
        self, messages: list[object], tools: object = None
    ) -> AsyncIterator[ModelResponseStream]:
        """The chunks of the next turn: the first at once, then one every ``delay_ms``."""
        turn = plan_turn(messages)
        for number, chunk in enumerate(turn_chunks(turn, _prompt_tokens(messages, tools))):
            if number:
                # The first piece goes out at once; sleep(0) still yields to the loop, so
                # a cancelled run stops between any two pieces.
                await asyncio.sleep(self.delay_ms / 1000)
            chunk._hidden_params["custom_llm_provider"] = PROVIDER  # cost lookup hint
            yield chunk

    # LiteLLM declares astreaming to yield GenericStreamingChunk; see the module docstring.
    async def astreaming(  # type: ignore[override]
        self,
        model: str,
        messages: list[Any],
        api_base: str,
        custom_prompt_dict: dict[str, Any],
        model_response: ModelResponse,
        print_verbose: Callable[..., Any],
        encoding: Any,
        api_key: Any,
        logging_obj: Any,
        optional_params: dict[str, Any],
        acompletion: Any = None,
        litellm_params: Any = None,
        logger_fn: Any = None,
        headers: dict[str, Any] | None = None,
        timeout: float | httpx.Timeout | None = None,
        client: AsyncHTTPHandler | None = None,
    ) -> AsyncIterator[ModelResponseStream]:
        """Stream the next turn for ``messages``."""
        async for chunk in self.stream(messages, optional_params.get("tools")):
            yield chunk

    async def acompletion(
        self,
        model: str,
        messages: list[Any],
        api_base: str,
        custom_prompt_dict: dict[str, Any],
        model_response: ModelResponse,
        print_verbose: Callable[..., Any],
        encoding: Any,
        api_key: Any,
        logging_obj: Any,
        optional_params: dict[str, Any],
        acompletion: Any = None,
        litellm_params: Any = None,
        logger_fn: Any = None,
        headers: dict[str, Any] | None = None,
        timeout: float | httpx.Timeout | None = None,
        client: AsyncHTTPHandler | HTTPHandler | None = None,
    ) -> ModelResponse:
        """The next turn as one response (``stream=False``)."""
        chunks = [c async for c in self.stream(messages, optional_params.get("tools"))]
        built = litellm.stream_chunk_builder(chunks, messages=messages)
        assert isinstance(built, ModelResponse)
        return built


_HANDLER: Final = DemoLLM()
_COST_ENTRY: Final = {
    "litellm_provider": PROVIDER,
    "mode": "chat",
    "input_cost_per_token": 0.0,
    "output_cost_per_token": 0.0,
    "cache_read_input_token_cost": 0.0,
    "cache_creation_input_token_cost": 0.0,
    "supports_function_calling": True,
    "supports_reasoning": True,
}


def register(delay_ms: float) -> None:
    """Route ``costream/demo`` to the demo provider at ``delay_ms`` per token. Idempotent."""
    _HANDLER.delay_ms = max(0.0, delay_ms)
    current = litellm.custom_provider_map
    if not any(e["provider"] == PROVIDER and e["custom_handler"] is _HANDLER for e in current):
        others = [e for e in current if e["provider"] != PROVIDER]
        litellm.custom_provider_map = [*others, {"provider": PROVIDER, "custom_handler": _HANDLER}]
    if MODEL not in litellm.model_cost:
        # A zero price: LiteLLM's cost calculation then answers 0.0 instead of raising.
        litellm.register_model({MODEL: dict(_COST_ENTRY)})
    # LiteLLM names the finish and usage chunks it makes itself "demo" (the model without
    # the provider) and then prints a "Provider List" banner to stdout each time its
    # stream_chunk_builder looks that name up; the lookup failure itself is harmless.
    litellm.suppress_debug_info = True
