"""The compose.yaml topology as processes, and a TCP front that fails over between servers.

Docker does not run on the test machines, so the deployment is proved by starting what
``compose.yaml`` describes as plain processes: ``compose_service(name)`` reads a service's
command, environment and healthcheck from the file (``${VAR:-default}`` resolved to the
default, so no LLM key of the caller's leaks in), and the ``start_nginx`` fixture starts
the front from ``deploy/nginx.conf`` with only the upstream addresses and the listen
port substituted.

    def test_something(start_nginx, ...):
        front = start_nginx([a.port, b.port])      # an NginxFront, already answering
        front.url, front.ws_url(conversation_id)

``Failover`` is a tiny front for the fault tests: each new connection goes to the first
upstream port that accepts it, as nginx's ``proxy_next_upstream error`` does, so a client
whose server was killed reconnects to the next one.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.processes import answers_ok, free_port, stop_process, wait_ready
from tests.support.proxy import Relay

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"

_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


# ---- compose.yaml ---------------------------------------------------------------------


@dataclass(frozen=True)
class ComposeService:
    """What compose.yaml gives one service: its command, environment and healthcheck."""

    name: str
    command: list[str]
    environment: dict[str, str]
    healthcheck: list[str]
    volumes: list[str]


def _interpolate(value: object) -> str:
    """``${VAR:-default}`` as compose resolves it with ``VAR`` unset: the default."""
    return _VARIABLE.sub(lambda match: match.group(2) or "", str(value))


def compose_service(name: str) -> ComposeService:
    """One service of compose.yaml (anchors and ``<<`` merges resolved)."""
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    service = document["services"][name]
    environment = service.get("environment") or {}
    if isinstance(environment, list):  # the KEY=value list form
        environment = dict(item.split("=", 1) for item in environment)
    healthcheck = (service.get("healthcheck") or {}).get("test") or []
    return ComposeService(
        name=name,
        command=[_interpolate(part) for part in service.get("command") or []],
        environment={key: _interpolate(value) for key, value in environment.items()},
        healthcheck=[_interpolate(part) for part in healthcheck],
        volumes=[str(volume) for volume in service.get("volumes") or []],
    )


def compose_service_names() -> list[str]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return list(document["services"])


# ---- nginx ----------------------------------------------------------------------------


class NginxFront:
    """One nginx master (and its workers) running a copy of deploy/nginx.conf."""

    def __init__(self, directory: Path, upstream_ports: Sequence[int]) -> None:
        self.directory = directory
        self.port = free_port()
        self.upstream_ports = list(upstream_ports)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, conversation_id: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/conversations/{conversation_id}"

    def config_text(self) -> str:
        """deploy/nginx.conf with only the upstream servers and the listen port replaced."""
        text = NGINX_CONF.read_text()
        servers = re.findall(r"^(\s*)server\s+(\S+):(\d+)([^;]*);", text, flags=re.MULTILINE)
        assert len(servers) == len(self.upstream_ports), "one upstream server per replica"
        for (indent, host, port, options), upstream in zip(
            servers, self.upstream_ports, strict=True
        ):
            text = text.replace(
                f"{indent}server {host}:{port}{options};",
                f"{indent}server 127.0.0.1:{upstream}{options};",
                1,
            )
        text, listens = re.subn(r"listen\s+\d+;", f"listen 127.0.0.1:{self.port};", text, count=1)
        assert listens == 1, "deploy/nginx.conf has one listen port"
        return text

    def start(self, timeout: float = 20.0) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "nginx.conf"
        config.write_text(self.config_text())
        directives = (
            f"daemon off; pid {self.directory / 'nginx.pid'}; "
            f"error_log {self.directory / 'error.log'} info;"
        )
        # -e: the log before the config is read; -p: a prefix of our own (temp paths).
        args = [binary, "-p", str(self.directory), "-e", str(self.directory / "error.log")]
        args += ["-c", str(config), "-g", directives]
        log = (self.directory / "stderr.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=log)
        wait_ready(
            self.process, lambda: answers_ok(f"{self.url}/healthz"), "nginx", self.log_text, timeout
        )

    def stop(self) -> None:
        stop_process(self.process, signal.SIGQUIT, 10)  # SIGQUIT: finish open requests

    def log_text(self) -> str:
        parts = []
        for name in ("stderr.log", "error.log"):
            path = self.directory / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)


def nginx_available() -> bool:
    return shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()


@pytest.fixture
def start_nginx(tmp_path: Path) -> Iterator[Callable[[Sequence[int]], NginxFront]]:
    """A factory of nginx fronts over the given upstream ports, stopped after the test.
    Skips when nginx is not installed (scripts/test installs it)."""
    if not nginx_available():
        pytest.skip("nginx is not installed (scripts/test installs it)")
    started: list[NginxFront] = []

    def start(upstream_ports: Sequence[int]) -> NginxFront:
        front = NginxFront(tmp_path / f"nginx-{len(started)}", upstream_ports)
        started.append(front)
        front.start()
        return front

    yield start
    for front in started:
        front.stop()


# ---- a failover front for the fault tests ------------------------------------------------


class Failover(Relay):
    """Forwards ``127.0.0.1:port`` to the first of ``upstream_ports`` that accepts.

    Use as ``async with Failover([a.port, b.port]) as front``. When the upstream of a
    connection goes away, the client side is closed too, as a front would.
    """

    def __init__(self, upstream_ports: Sequence[int]) -> None:
        super().__init__()
        self.upstream_ports = list(upstream_ports)
        self.connections: list[int] = []  # the upstream port of each connection, in order

    def ws_url(self, conversation_id: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/conversations/{conversation_id}"

    async def _accept(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        for upstream in self.upstream_ports:
            try:
                server_in, server_out = await asyncio.open_connection("127.0.0.1", upstream)
            except OSError:
                continue
            self.connections.append(upstream)
            self._relay(client_in, server_out)
            self._relay(server_in, client_out)
            return
        client_out.close()  # no upstream answers
