"""The LLM provider in our own words: its name in messages, its failures, its prices.

Used by the built-in runner and by the publisher alike. LiteLLM is only looked at here,
never imported for it: :func:`classify` is handed LiteLLM's own exceptions (so LiteLLM is
loaded already) and :func:`cost_usd` prices a step only where LiteLLM is loaded.
Messages are ours (status, provider), never LiteLLM's text, which may quote the request
or the provider's answer, and so the API key.
"""

from __future__ import annotations

import sys
from typing import Any

from costream.protocol import ErrorCode, Usage


def _litellm() -> Any:
    """The loaded ``litellm`` module; None where nothing loaded it."""
    return sys.modules.get("litellm")


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

    def kind(*names: str) -> bool:
        return litellm is not None and isinstance(error, tuple(getattr(litellm, n) for n in names))

    status = _status_of(error)
    if kind("RateLimitError") or status == 429:
        return LLMFailure(
            "rate_limited",
            f"{provider} is rate limiting requests (HTTP 429)",
            True,
            _retry_after(error),
        )
    if kind("AuthenticationError", "PermissionDeniedError") or status in (
        401,
        403,
    ):
        return LLMFailure(
            "auth",
            f"{provider} refused the credentials (HTTP {status or 401})",
        )
    if kind("Timeout") or status in (408,):
        return LLMFailure("timeout", f"{provider} timed out", True)
    if kind("ContextWindowExceededError"):
        return LLMFailure("bad_request", "the conversation is too long for the model")
    if kind("BadRequestError", "NotFoundError", "UnprocessableEntityError") or (
        status is not None and 400 <= status < 500
    ):
        return LLMFailure("bad_request", f"{provider} rejected the request (HTTP {status})")
    if status is not None and status >= 500:
        return LLMFailure("upstream", f"{provider} failed (HTTP {status})", True)
    if (
        kind(
            "APIConnectionError",
            "InternalServerError",
            "ServiceUnavailableError",
            "BadGatewayError",
            "APIError",
        )
        or isinstance(error, OSError)
        or type(error).__module__.startswith(("httpx", "httpcore", "aiohttp", "openai"))
    ):
        return LLMFailure("upstream", f"the connection to {provider} failed", True)
    return LLMFailure("internal", "the run failed unexpectedly")


# ---- prices ------------------------------------------------------------------------


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
