"""The LLM provider in our own words: its name in messages, its failures, its prices.

Used by the built-in runner and by the publisher alike. LiteLLM is only looked at here,
never imported for it: :func:`classify` is handed LiteLLM's own exceptions (so LiteLLM is
loaded already) and :func:`cost_usd` prices a step only where LiteLLM is loaded.
Messages are ours (status, provider), never LiteLLM's text, which may quote the request
or the provider's answer, and so the API key.
"""

from __future__ import annotations

import errno
import socket
import ssl
import sys
from collections.abc import Mapping, Sequence
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


def _causes(error: BaseException) -> list[BaseException]:
    """The error and what it was raised from, outermost first (LiteLLM wraps the OpenAI
    SDK's error, which wraps httpx's or aiohttp's, which wraps the socket's)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(chain) < 12 and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _named(error: BaseException, *names: str) -> bool:
    """Whether the error's class, or a base class, has one of these names (httpx, aiohttp
    and the OpenAI SDK are matched by name: none of them is imported here)."""
    return any(cls.__name__ in names for cls in type(error).__mro__)


def _connection_failure(error: BaseException, provider: str) -> LLMFailure | None:
    """What went wrong on the way to the provider, when no HTTP answer came back.

    Looked for before any status: LiteLLM reports a connection that never opened as an
    ``InternalServerError`` with ``status_code`` 500, an answer nobody sent."""
    chain = _causes(error)
    for cause in chain:
        if isinstance(cause, ConnectionRefusedError):
            return LLMFailure(
                "upstream", f"could not connect to {provider}: connection refused", True
            )
        if isinstance(cause, socket.gaierror):
            return LLMFailure("upstream", f"could not connect to {provider}: host not found", True)
        if isinstance(cause, ssl.SSLError):
            return LLMFailure(
                "upstream", f"could not connect to {provider}: the TLS handshake failed", True
            )
    for cause in chain:
        if _named(cause, "ConnectTimeout", "ServerTimeoutError", "ConnectionTimeoutError"):
            return LLMFailure("timeout", f"connecting to {provider} timed out", True)
        if _named(cause, "ReadTimeout", "APITimeoutError", "TimeoutException") or isinstance(
            cause, TimeoutError
        ):
            return LLMFailure("timeout", f"{provider} timed out", True)
        if _named(cause, "RemoteProtocolError", "ServerDisconnectedError", "ReadError") or (
            isinstance(cause, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError))
        ):
            return LLMFailure(
                "upstream", f"the connection to {provider} broke before the answer ended", True
            )
        if _named(cause, "ConnectError", "ClientConnectorError", "APIConnectionError") or (
            isinstance(cause, OSError) and cause.errno in _UNREACHABLE_ERRNOS
        ):
            return LLMFailure(
                "upstream", f"could not connect to {provider}: it is unreachable", True
            )
    return None


_UNREACHABLE_ERRNOS = frozenset(
    {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN, errno.EADDRNOTAVAIL}
)


def classify(error: BaseException, provider: str) -> LLMFailure:
    """Map an exception of an LLM call to a RUN_ERROR code, in our own words: what happened
    (refused, unreachable, timed out, the HTTP status the provider answered).

    ``provider`` is :func:`provider_phrase`; the exception's own text is never used."""
    if isinstance(error, LLMFailure):
        return error
    if isinstance(error, TimeoutError):
        return LLMFailure("timeout", f"{provider} sent nothing in time", True)
    litellm = _litellm()

    def kind(*names: str) -> bool:
        return litellm is not None and isinstance(error, tuple(getattr(litellm, n) for n in names))

    connection = _connection_failure(error, provider)
    if connection is not None:
        return connection
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


# ---- usage of a cut stream ----------------------------------------------------------


def estimate_usage(
    model: str, messages: Sequence[Mapping[str, object]], output: str, reasoning: str
) -> Usage:
    """Tokens of a stream that was cut before its usage chunk (cancelled, failed): the
    request's ``messages`` as input, the streamed ``output`` (all of it, ``reasoning``
    included) as output, counted with LiteLLM's tokenizer for ``model`` where LiteLLM is
    loaded, else at about four characters a token."""
    litellm = _litellm()

    def count(**what: object) -> int | None:
        if litellm is None:
            return None
        try:
            return int(litellm.token_counter(model=model, **what))
        except Exception:  # a model LiteLLM cannot tokenize: the rough count will do
            return None

    def rough(text: str) -> int:
        return -(-len(text) // 4)

    prompt = count(messages=list(messages)) if messages else 0
    if prompt is None:
        prompt = rough("".join(str(m.get("content") or "") for m in messages))
    completion = count(text=output) if output else 0
    thinking = count(text=reasoning) if reasoning else 0
    return Usage(
        input_tokens=prompt,
        output_tokens=rough(output) if completion is None else completion,
        reasoning_tokens=rough(reasoning) if thinking is None else thinking,
    )


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
