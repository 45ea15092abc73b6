"""Talking to LiteLLM: its lazy import, the request, the demo model's registration.

- Import: LiteLLM takes seconds and ~200 MB to import, so it is imported on first use,
  in a thread (:func:`load_litellm`). Only the runner calls LiteLLM during a run.
- Requests: :func:`to_llm_messages` turns a conversation's AG-UI history into the
  OpenAI/LiteLLM chat messages of a call, :func:`completion_options` into the call's
  arguments; LiteLLM's own retries are off, the runner's are visible to viewers.
- Errors and prices are worded in :mod:`costream.provider`, which the publisher shares.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, Final, Protocol

import msgspec

from costream.config import DEMO_MODEL, Settings
from costream.protocol import FunctionCall, SnapshotMessage
from costream.sizes import fit_arguments, fit_text

log = logging.getLogger(__name__)

_json: Final = msgspec.json.Encoder()

LLMMessage = dict[str, object]
ToolSpec = dict[str, object]  # an OpenAI function-tool definition


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
        # LiteLLM fetches its price list from the internet at import unless told not to:
        # seconds of retries (and a warning each) offline. Its packaged copy is the default
        # here; a user who set the variable keeps their choice.
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        litellm: Any = await asyncio.to_thread(importlib.import_module, "litellm")
        litellm.suppress_debug_info = True  # no "Give Feedback" banners quoting errors
        for name in _LITELLM_LOGGERS:
            logger = logging.getLogger(name)
            # LiteLLM logs a line per call at INFO; the server's log keeps to its own events.
            logger.setLevel(logging.WARNING)
            # It also adds a handler of its own, so each warning printed twice (once there,
            # once through the root handler): keep only the process's handlers.
            logger.handlers.clear()
        _litellm_loaded = True
    litellm_module: LiteLLM = _litellm()
    return litellm_module


_LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")
_litellm_loaded = False
_demo_registered = False


def _register_demo(delay_ms: float) -> None:
    """Add the demo model to LiteLLM's providers (demo.py), once."""
    global _demo_registered
    if _demo_registered:
        return
    try:
        demo = importlib.import_module("costream.agent.demo")
    except ImportError:
        log.error("the demo model (costream.agent.demo) is not available")
        return
    demo.register(delay_ms)
    _demo_registered = True


def completion_options(
    model: str, messages: list[LLMMessage], tools: Sequence[ToolSpec], settings: Settings
) -> dict[str, object]:
    """The arguments of a streamed ``litellm.acompletion`` call offering ``tools``."""
    options: dict[str, object] = {
        "model": model,
        "messages": messages,
        "tools": list(tools),
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


# ---- messages -------------------------------------------------------


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


def _fit_message(message: LLMMessage, max_bytes: int) -> LLMMessage:
    """``message`` with a content or tool-call arguments longer than ``max_bytes`` cut."""
    content = message.get("content")
    calls = message.get("tool_calls")
    if isinstance(content, str):
        message = {**message, "content": fit_text(content, max_bytes)}
    if isinstance(calls, list):
        message = {**message, "tool_calls": [_fit_call(call, max_bytes) for call in calls]}
    return message


def _fit_call(call: object, max_bytes: int) -> object:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(call, dict) or not isinstance(function, dict):
        return call
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        return call
    return {**call, "function": {**function, "arguments": fit_arguments(arguments, max_bytes)}}


def bounded_messages(messages: list[SnapshotMessage], max_bytes: int) -> list[SnapshotMessage]:
    """``messages`` for the history with each content and tool call's arguments within
    ``max_bytes``, cut with a marker (the tools get their arguments whole: a 50 MB
    ``write_file`` is refused, not stored)."""
    out = []
    for message in messages:
        calls = [
            msgspec.structs.replace(
                call,
                function=FunctionCall(
                    name=call.function.name,
                    arguments=fit_arguments(call.function.arguments, max_bytes),
                ),
            )
            for call in message.tool_calls or ()
        ]
        content = message.content
        out.append(
            msgspec.structs.replace(
                message,
                content=content if content is None else fit_text(content, max_bytes),
                tool_calls=calls or message.tool_calls,
            )
        )
    return out


def _turns(messages: Sequence[LLMMessage]) -> list[list[LLMMessage]]:
    """Messages grouped into turns, each from a user message to the next one. A tool
    call and its result are always in one turn."""
    turns: list[list[LLMMessage]] = []
    for message in messages:
        if message.get("role") == "user" or not turns:
            turns.append([])
        turns[-1].append(message)
    return turns


def _units(turn: list[LLMMessage]) -> list[list[LLMMessage]]:
    """A turn's parts that can go without the others: each message, except that an
    assistant message and the tool results after it are one."""
    units: list[list[LLMMessage]] = []
    for message in turn:
        if message.get("role") == "tool" and units:
            units[-1].append(message)
        else:
            units.append([message])
    return units


def _size(messages: Sequence[LLMMessage]) -> int:
    return sum(len(_json.encode(message)) + 1 for message in messages)


def bound_history(messages: Sequence[LLMMessage], max_bytes: int) -> list[LLMMessage]:
    """The messages of a call within ``max_bytes`` of JSON (``Settings.max_history_bytes``).

    Any content or tool-call arguments longer than a quarter of the bound is cut with a
    marker (arguments stay JSON); then the oldest turns go, whole (a tool call never
    without its result, as providers require), then, in the last turn, its oldest replies
    after the user's message. The system prompt and the latest message always stay."""
    system = [m for m in messages[:1] if m.get("role") == "system"]
    rest = [_fit_message(m, max(max_bytes // 4, 1024)) for m in messages[len(system) :]]
    room = max_bytes - _size(system)
    turns = _turns(rest)
    while len(turns) > 1 and _size([m for turn in turns for m in turn]) > room:
        turns.pop(0)
    if not turns:
        return system
    kept = [m for turn in turns[:-1] for m in turn]
    units = _units(turns[-1])
    head = units.pop(0) if len(units) > 1 and units[0][0].get("role") == "user" else []
    while len(units) > 1 and _size(kept + head + [m for unit in units for m in unit]) > room:
        units.pop(0)
    return [*system, *kept, *head, *(m for unit in units for m in unit)]


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
    # The first chunk has paid for LiteLLM's lazy imports; the rest of the demo's answer
    # would only keep the server from being ready at the demo's pace (seconds).
    try:
        async for _ in stream:
            break
    finally:
        await stream.aclose()
