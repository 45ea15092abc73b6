"""Reading LiteLLM stream chunks: by attribute (``ModelResponseStream``) or by key (plain
dicts), never importing LiteLLM. What a chunk says: its text fields, whether it carries
output, its finish reason, its usage (also from OpenHands' and costream's usage shapes).
"""

from __future__ import annotations

from costream.protocol import Usage


def chunk_field(obj: object, name: str) -> object:
    """A field of a chunk or of a part of one: attribute (LiteLLM) or key (plain dict)."""
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def chunk_text(obj: object, name: str) -> str:
    """A string field, or "" when it is missing, None or not a string."""
    value = chunk_field(obj, name)
    return value if isinstance(value, str) else ""


def _count(obj: object, *names: str) -> int:
    for name in names:
        value = chunk_field(obj, name)
        if isinstance(value, int):
            return value
    return 0


def finish_reason_of(chunk: object) -> str | None:
    """The finish reason a streamed chunk carries, if any."""
    choices = chunk_field(chunk, "choices")
    for choice in choices if isinstance(choices, list) else ():
        reason = chunk_text(choice, "finish_reason")
        if reason:
            return reason
    return None


def as_usage(value: object) -> Usage:
    """Token counts from a costream ``Usage``, a LiteLLM or OpenHands usage, or a dict."""
    if isinstance(value, Usage):
        return value
    details = chunk_field(value, "completion_tokens_details")
    return Usage(
        input_tokens=_count(value, "prompt_tokens", "input_tokens", "inputTokens"),
        output_tokens=_count(value, "completion_tokens", "output_tokens", "outputTokens"),
        reasoning_tokens=_count(value, "reasoning_tokens", "reasoningTokens")
        or (_count(details, "reasoning_tokens") if details is not None else 0),
    )


def usage_of(chunk: object) -> Usage | None:
    """The usage of the stream's usage chunk; None for chunks without (or with zeros)."""
    value = chunk_field(chunk, "usage")
    if value is None:
        return None
    usage = as_usage(value)
    return usage if usage.input_tokens or usage.output_tokens else None


def _choices(chunk: object) -> list[object]:
    choices = chunk_field(chunk, "choices")
    return choices if isinstance(choices, list) else []


def has_output(chunk: object) -> bool:
    """Whether a chunk carries any reasoning, text or tool-call delta."""
    for choice in _choices(chunk):
        delta = chunk_field(choice, "delta")
        if delta is None:
            continue
        for name in ("reasoning_content", "reasoning", "content"):
            if chunk_text(delta, name):
                return True
        if chunk_field(delta, "tool_calls") or chunk_field(delta, "thinking_blocks"):
            return True
    return False
