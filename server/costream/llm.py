"""Talking to LiteLLM: its lazy import, the request, the reply's chunks, its errors, prices.

- Import: LiteLLM takes seconds and ~200 MB to import, so it is imported on first use,
  in a thread (:func:`load_litellm`). Only the runner calls LiteLLM during a run; the
  publisher uses the wording and prices here, never importing LiteLLM for them.
- Requests: :func:`to_llm_messages` turns a conversation's AG-UI history into the
  OpenAI/LiteLLM chat messages of a call, :func:`completion_options` into the call's
  arguments; LiteLLM's own retries are off, the runner's are visible to viewers.
- Errors: :func:`classify` maps an exception of a call to a ``RUN_ERROR`` code and a
  message in our own words (status, provider), never LiteLLM's text, which may quote the
  request or the provider's answer, and so the API key.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, Protocol

from .config import DEMO_MODEL, Settings
from .protocol import ErrorCode, SnapshotMessage, Usage
from .tools import TOOL_SPECS

log = logging.getLogger("costream.llm")

LLMMessage = dict[str, object]


class CompletionStream(Protocol):
    """What ``litellm.acompletion(stream=True)`` returns: chunks, and a way to close it."""

    def __aiter__(self) -> AsyncIterator[object]: ...

    def aclose(self) -> Awaitable[object]: ...


class LiteLLM(Protocol):
    """The part of the ``litellm`` module the runner calls."""

    def acompletion(self, **options: object) -> Awaitable[CompletionStream]: ...


def _litellm() -> Any:
    """The ``litellm`` module, imported on first use (slow, heavy).

    Through importlib so mypy does not type-check all of LiteLLM (minutes); its values
    stay inside this module."""
    return importlib.import_module("litellm")


async def load_litellm() -> LiteLLM:
    """``litellm``, imported in a thread the first time: the import takes seconds, and the
    event loop keeps serving viewers meanwhile."""
    global _litellm_loaded
    if not _litellm_loaded:
        litellm: Any = await asyncio.to_thread(importlib.import_module, "litellm")
        litellm.suppress_debug_info = True  # no "Give Feedback" banners quoting errors
        # LiteLLM logs a line per call at INFO; the server's log keeps to its own events.
        logging.getLogger("LiteLLM").setLevel(logging.WARNING)
        _litellm_loaded = True
    litellm_module: LiteLLM = _litellm()
    return litellm_module


_litellm_loaded = False
_demo_registered = False


def _register_demo(delay_ms: float) -> None:
    """Add the demo model to LiteLLM's providers (demo.py), once."""
    global _demo_registered
    if _demo_registered:
        return
    try:
        demo = importlib.import_module("costream.demo")
    except ImportError:
        log.error("the demo model (costream.demo) is not available")
        return
    demo.register(delay_ms)
    _demo_registered = True


def completion_options(
    model: str, messages: list[LLMMessage], settings: Settings
) -> dict[str, object]:
    """The arguments of a streamed ``litellm.acompletion`` call with the workspace tools."""
    options: dict[str, object] = {
        "model": model,
        "messages": messages,
        "tools": TOOL_SPECS,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_retries": 0,  # the retries are ours, with events viewers can see
    }
    if model == DEMO_MODEL:
        _register_demo(settings.demo_delay_ms)
    else:
        if settings.api_key:
            options["api_key"] = settings.api_key
        if settings.base_url:
            options["api_base"] = settings.base_url
    return options


# ---- failures ---------------------------------------------------------------------


class LLMFailure(Exception):
    """An LLM call failed; ``message`` is ours and safe to show."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        transient: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.transient = transient
        self.retry_after_s = retry_after_s


def _status_of(error: BaseException) -> int | None:
    status = getattr(error, "status_code", None)
    return status if isinstance(status, int) else None


def _retry_after(error: BaseException) -> float | None:
    """A provider's ``Retry-After`` in seconds (LiteLLM keeps the response on the error)."""
    for source in (getattr(error, "response", None), error):
        headers = getattr(source, "headers", None)
        if headers is None:
            continue
        try:
            value = headers.get("retry-after") or headers.get("Retry-After")
        except AttributeError:
            continue
        if value is None:
            continue
        try:
            return max(0.0, float(value))
        except (TypeError, ValueError):
            return None
    return None


def provider_phrase(model: str) -> str:
    """How errors name the model's provider: "the LLM provider (openai)"."""
    return f"the LLM provider ({model.split('/', 1)[0]})" if "/" in model else "the LLM provider"


def classify(error: BaseException, provider: str) -> LLMFailure:
    """Map an exception of an LLM call to a RUN_ERROR code, in our own words.

    ``provider`` is :func:`provider_phrase`; the exception's own text is never used."""
    if isinstance(error, LLMFailure):
        return error
    if isinstance(error, TimeoutError):
        return LLMFailure("timeout", f"{provider} sent nothing in time", True)
    litellm = _litellm()
    status = _status_of(error)
    if isinstance(error, litellm.RateLimitError) or status == 429:
        return LLMFailure(
            "rate_limited",
            f"{provider} is rate limiting requests (HTTP 429)",
            True,
            _retry_after(error),
        )
    if isinstance(error, litellm.AuthenticationError | litellm.PermissionDeniedError) or status in (
        401,
        403,
    ):
        return LLMFailure(
            "auth",
            f"{provider} refused the credentials (HTTP {status or 401})",
        )
    if isinstance(error, litellm.Timeout) or status in (408,):
        return LLMFailure("timeout", f"{provider} timed out", True)
    if isinstance(error, litellm.ContextWindowExceededError):
        return LLMFailure("bad_request", "the conversation is too long for the model")
    if isinstance(
        error,
        litellm.BadRequestError | litellm.NotFoundError | litellm.UnprocessableEntityError,
    ) or (status is not None and 400 <= status < 500):
        return LLMFailure("bad_request", f"{provider} rejected the request (HTTP {status})")
    if status is not None and status >= 500:
        return LLMFailure("upstream", f"{provider} failed (HTTP {status})", True)
    if isinstance(
        error,
        litellm.APIConnectionError
        | litellm.InternalServerError
        | litellm.ServiceUnavailableError
        | litellm.BadGatewayError
        | litellm.APIError
        | OSError,
    ) or type(error).__module__.startswith(("httpx", "httpcore", "aiohttp", "openai")):
        return LLMFailure("upstream", f"the connection to {provider} failed", True)
    return LLMFailure("internal", "the run failed unexpectedly")


# ---- messages, chunks, prices -------------------------------------------------------


def to_llm_messages(system: str, history: Sequence[SnapshotMessage]) -> list[LLMMessage]:
    """The conversation's AG-UI history as OpenAI/LiteLLM chat messages.

    Reasoning is not sent back. A tool call with no result in the history (its run was
    cancelled or failed before the tool ran) is left out: providers reject it."""
    answered = {m.tool_call_id for m in history if m.role == "tool" and m.tool_call_id}
    messages: list[LLMMessage] = []
    if system:
        messages.append({"role": "system", "content": system})
    for message in history:
        if message.role in ("user", "system"):
            messages.append({"role": message.role, "content": message.content or ""})
        elif message.role == "assistant":
            calls = [c for c in message.tool_calls or () if c.id in answered]
            if not calls and not message.content:
                continue
            item: LLMMessage = {"role": "assistant", "content": message.content or None}
            if calls:
                item["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": c.function.arguments},
                    }
                    for c in calls
                ]
            messages.append(item)
        elif message.role == "tool":
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": message.tool_call_id or "",
                    "content": message.content or "",
                }
            )
    return messages


def cost_usd(model: str, usage: Usage) -> float:
    """What LiteLLM's price table says a step cost; 0 for a model it does not know."""
    if not (usage.input_tokens or usage.output_tokens):
        return 0.0
    try:
        prompt, completion = _litellm().cost_per_token(
            model=model,
            prompt_tokens=usage.input_tokens,
            completion_tokens=usage.output_tokens,
        )
        return float(prompt) + float(completion)
    except Exception:  # unknown model: LiteLLM raises; a price is never worth a failed run
        return 0.0


async def warm_up(settings: Settings) -> None:
    """Import LiteLLM and make one tiny call to the demo model, at server start.

    LiteLLM's first call in a process spends seconds on imports (a few hundred ms of it
    on the event loop, which a thread cannot take); paid here, the first user message
    streams at once. The demo call is local, costs nothing and never reaches a provider.
    """
    litellm = await load_litellm()
    _register_demo(settings.demo_delay_ms)
    stream = await litellm.acompletion(
        model=DEMO_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    async for _ in stream:
        pass
