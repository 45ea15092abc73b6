"""Real ``costream serve`` processes on free ports, for integration and browser tests.

    def test_something(start_server, redis_url):
        a = start_server(redis_url=redis_url)          # a ServerProcess, already healthy
        b = start_server(redis_url=redis_url, env={"LLM_MODEL": "openai/x"})
        a.url, a.ws_url(conversation_id), a.log_text(), a.kill(), a.restart()

Every process started through the fixture is stopped at the end of the test. The demo
model runs instantly (``COSTREAM_DEMO_DELAY_MS=0``) unless ``env`` says otherwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.support.processes import answers_ok, free_port, stop_process, wait_ready


class ServerProcess:
    """One ``costream serve`` subprocess; its output goes to ``log_path``."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, port: int) -> None:
        self.args, self.env, self.log_path, self.port = args, env, log_path, port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, conversation_id: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/conversations/{conversation_id}"

    def start(self, timeout: float = 30.0) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=log)
        wait_ready(
            self.process,
            lambda: answers_ok(f"{self.url}/healthz"),
            "costream serve",
            self.log_text,
            timeout,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        stop_process(self.process, sig, timeout)

    def kill(self) -> None:
        """SIGKILL: the process dies without any cleanup."""
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """A factory of healthy ``costream serve`` processes, all stopped after the test."""
    started: list[ServerProcess] = []

    def start(
        *, redis_url: str | None = None, env: dict[str, str] | None = None, args: Sequence[str] = ()
    ) -> ServerProcess:
        port = free_port()
        full_env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("LLM_", "COSTREAM_", "REDIS_"))
        }
        full_env.update(
            {
                "COSTREAM_DEMO_DELAY_MS": "0",
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "PYTHONUNBUFFERED": "1",
                # The embedded default keeps its data in a directory of its own per server
                # (a restart keeps it, as in production).
                "COSTREAM_DATA_DIR": str(tmp_path / f"data-{port}"),
            }
        )
        full_env.update(env or {})
        command = [sys.executable, "-m", "costream.cli", "serve", "--port", str(port), *args]
        if redis_url:
            command += ["--redis-url", redis_url]
        server = ServerProcess(command, full_env, tmp_path / f"server-{port}.log", port)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """One embedded-mode server (the default: SQLite in a temporary directory, demo model)."""
    return start_server()
