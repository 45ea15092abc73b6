"""A real ``redis-server`` on a free port, which a test may stop, kill, restart or pause.

    def test_something(redis_server, redis_url):
        redis_url                       # redis://127.0.0.1:<port>/0
        redis_server.kill_pubsub()      # CLIENT KILL TYPE pubsub
        redis_server.stop(); redis_server.start()   # the append-only file keeps the data

``RedisServer(directory, tls=RedisTls(cert, key, ca))`` serves TLS only (on ``port``; the
plain port is off), and its ``url`` is ``rediss://...?ssl_cert_reqs=required&ssl_ca_certs=<ca>``.

The fixtures are blocking on purpose (sync fixtures are fine under pytest-asyncio); from an
async test, call the methods through ``asyncio.to_thread``.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from tests.support.processes import free_port, stop_process, wait_ready


@dataclass(frozen=True)
class RedisTls:
    """The PEM files of a TLS-only redis-server: its certificate, its key, the CA that signed it."""

    cert_file: Path
    key_file: Path
    ca_file: Path


class RedisServer:
    """One ``redis-server`` process, its data and log in ``directory``."""

    def __init__(
        self,
        directory: Path,
        *,
        appendonly: bool = True,
        password: str | None = None,
        tls: RedisTls | None = None,
    ) -> None:
        self.directory = directory
        self.appendonly = appendonly
        self.password = password
        self.tls = tls
        self._port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def port(self) -> int:
        """The TCP port (the TLS port with ``tls``), the same across restarts."""
        return self._port

    @property
    def url(self) -> str:
        """The URL a broker connects with (carrying the password, if any)."""
        auth = f":{self.password}@" if self.password else ""
        if self.tls is not None:
            ca = quote(str(self.tls.ca_file), safe="/")
            query = f"?ssl_cert_reqs=required&ssl_ca_certs={ca}"
            return f"rediss://{auth}127.0.0.1:{self._port}/0{query}"
        return f"redis://{auth}127.0.0.1:{self._port}/0"

    def client(self) -> redis.Redis:
        """A plain blocking client, for the test's own commands."""
        if self.tls is not None:
            return redis.Redis(
                host="127.0.0.1",
                port=self._port,
                password=self.password,
                socket_timeout=5,
                ssl=True,
                ssl_cert_reqs="required",
                ssl_ca_certs=str(self.tls.ca_file),
            )
        return redis.Redis(
            host="127.0.0.1", port=self._port, password=self.password, socket_timeout=5
        )

    def start(self, timeout: float = 20.0) -> None:
        """Start the server (same port, same data directory) and wait until PING answers."""
        if self.process is not None and self.process.poll() is None:
            return
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/test installs it)")
        args = [
            binary,
            "--port", str(self._port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--dir", str(self.directory),
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls is not None:
            args[1:3] = ["--port", "0", "--tls-port", str(self._port)]
            args += [
                "--tls-cert-file", str(self.tls.cert_file),
                "--tls-key-file", str(self.tls.key_file),
                "--tls-ca-cert-file", str(self.tls.ca_file),
                "--tls-auth-clients", "no",  # clients check the server, show no certificate
            ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ready(self.process, self._answers_ping, "redis-server", self.log_text, timeout)

    def _answers_ping(self) -> bool:
        try:
            with self.client() as client:
                return bool(client.ping())
        except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Stop the server (SIGTERM: it flushes the append-only file first)."""
        stop_process(self.process, sig, timeout)

    def kill(self) -> None:
        """SIGKILL: the server dies without any cleanup."""
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        """Stop, then start again with the same port and data."""
        self.stop()
        self.start()

    def kill_pubsub(self) -> int:
        """Close every pub/sub connection (``CLIENT KILL TYPE pubsub``); how many."""
        with self.client() as client:
            return int(client.client_kill_filter(_type="pubsub"))

    def pause(self, ms: int) -> None:
        """Stop serving clients for ``ms`` milliseconds (``CLIENT PAUSE``)."""
        with self.client() as client:
            client.client_pause(ms)

    def log_text(self) -> str:
        """What redis-server logged so far."""
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server with an append-only file, stopped after the test."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of the test's redis-server."""
    return redis_server.url
