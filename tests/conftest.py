"""Fixtures live in tests/support/, one module per real part the tests start."""

import os

# LiteLLM must never try to download its cost map: these machines are offline.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

pytest_plugins = [
    "tests.support.redis",
    "tests.support.llm_server",
    "tests.support.servers",
    "tests.support.redis_cluster",
    "tests.support.browser",
    "tests.support.front",
]
