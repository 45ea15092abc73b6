"""Waiting for servers to be ready (``/readyz`` 200: storage answers, LiteLLM loaded).

A test that bounds how long a run takes must start the clock once the server is ready:
on a loaded machine, loading LiteLLM alone takes tens of seconds, and a first run waits
for it.
"""

from __future__ import annotations

import asyncio

from tests.support.servers import ServerProcess
from tests.support.ws import ahttp


async def until_ready(*servers: ServerProcess, timeout: float = 100.0) -> None:
    """Wait until every server answers ``/readyz`` with 200."""
    async with asyncio.timeout(timeout):
        for server in servers:
            while (await ahttp("GET", f"{server.url}/readyz"))[0] != 200:
                await asyncio.sleep(0.1)
