"""Start-up: ``/readyz`` says ``loading`` until LiteLLM is loaded and warm, then
``ready``, and the server says once how long that took; the model comes from
``LLM_MODEL`` with or without a key."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import pytest

from costream.config import DEMO_MODEL, Settings
from tests.support.servers import ServerProcess
from tests.support.ws import ahttp, create_conversation, open_session

WAIT_S = 120.0  # a bound against hanging: LiteLLM's import is slow on a loaded machine


async def test_readyz_says_loading_until_litellm_is_warm_then_ready(server: ServerProcess) -> None:
    """Right after start /readyz answers 503 loading (the first run would wait for
    LiteLLM); once it is loaded and warm it answers 200 ready, and the log says
    ``ready in X s`` once."""
    assert await ahttp("GET", f"{server.url}/readyz") == (503, {"status": "loading"})
    async with asyncio.timeout(WAIT_S):
        while (answer := await ahttp("GET", f"{server.url}/readyz"))[0] == 503:
            assert answer[1] == {"status": "loading"}
            await asyncio.sleep(0.05)
        assert answer == (200, {"status": "ready"})
        while not re.search(r"ready in \d+\.\d s", server.log_text()):
            await asyncio.sleep(0.05)
    assert len(re.findall(r"ready in \d+\.\d s", server.log_text())) == 1


def test_llm_model_without_a_key_is_the_model_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """``LLM_MODEL`` without ``LLM_API_KEY`` (a local model) is used as is; with neither,
    the demo model answers."""
    for name in ("LLM_MODEL", "LLM_API_KEY", "LLM_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    assert Settings.from_env().model == DEMO_MODEL
    monkeypatch.setenv("LLM_MODEL", "ollama/llama3")
    settings = Settings.from_env()
    assert (settings.model, settings.api_key, settings.is_demo) == ("ollama/llama3", None, False)


async def test_a_server_with_llm_model_and_no_key_names_that_model(
    start_server: Callable[..., ServerProcess],
) -> None:
    """``LLM_MODEL=ollama/llama3 costream serve`` with no key: conversations and viewers
    are told that model, not the demo."""
    server = start_server(env={"LLM_MODEL": "ollama/llama3"})
    conv = await create_conversation(server.url)
    session = await open_session(server.ws_url(conv["id"]), conv["id"], conv["viewToken"])
    assert session.welcome["model"] == "ollama/llama3"
    await session.close()
    assert "LLM model: ollama/llama3" in server.log_text()
