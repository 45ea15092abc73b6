"""Shared parts of the costream benchmarks: processes on free ports, CPU and RSS, figures.

Not a benchmark itself. Imported by the ``bench_*.py`` scripts next to it, which are run by
hand (``.venv/bin/python tests/bench/bench_<name>.py``), so this directory is on
``sys.path`` and the import is plain ``import benchlib``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent
PYTHON = sys.executable
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def base_env(**extra: str) -> dict[str, str]:
    """This environment without costream/LLM/Redis settings, offline LiteLLM, plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("LLM_", "COSTREAM_", "REDIS_"))
    }
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "server"), str(BENCH_DIR)])
    env.update(extra)
    return env


# ---- CPU and memory of processes ------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (not its children), in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


class CpuMeter:
    """CPU seconds spent by some processes between ``start`` and ``stop``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}
        self._wall = 0.0
        self.used: dict[str, float] = {}
        self.wall = 0.0

    def start(self) -> None:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._wall = time.monotonic()

    def stop(self) -> None:
        self.wall = time.monotonic() - self._wall
        self.used = {name: cpu_seconds(pid) - self._start[name] for name, pid in self.pids.items()}

    def share(self, name: str) -> float:
        """CPU of ``name`` as a fraction of one core over the measured wall time."""
        return self.used[name] / self.wall if self.wall else 0.0


# ---- statistics and tables ------------------------------------------------------------


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (nan when empty)."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def median(values: Sequence[float]) -> float:
    return percentile(sorted(values), 0.5)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with a title line."""
    cells = [[str(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title, ""]
    for index, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


# ---- child processes ------------------------------------------------------------------


@dataclass
class Child:
    """A subprocess whose output goes to a log file."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.args, env=self.env, stdout=log, stderr=log, cwd=ROOT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Workdir:
    """A temporary directory for logs and data of one benchmark run, and its children."""

    path: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="costream-bench-")))
    children: list[Child] = field(default_factory=list)

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, args, env or base_env(), self.path / f"{name}.log")
        self.children.append(child)
        child.start()
        return child

    def close(self, keep: bool = False) -> None:
        for child in reversed(self.children):
            child.stop()
        if not keep:
            shutil.rmtree(self.path, ignore_errors=True)


def wait_until(check: Any, timeout: float, what: str, child: Child | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited early:\n{child.log_text()[-3000:]}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    detail = child.log_text()[-3000:] if child is not None else ""
    raise RuntimeError(f"timed out waiting for {what}\n{detail}")


def start_redis(work: Workdir) -> tuple[Child, str]:
    """A private ``redis-server`` on a free port, no persistence; returns it and its URL."""
    port = free_port()
    child = work.spawn(
        f"redis-{port}",
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(work.path),
        ],
    )

    def answers() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    wait_until(answers, 10, "redis-server", child)
    return child, f"redis://127.0.0.1:{port}/0"


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            return bool(answer.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def start_costream(
    work: Workdir, redis_url: str | None, env: dict[str, str] | None = None
) -> tuple[Child, str]:
    """A ``costream serve`` process, healthy; returns it and its base URL. With
    ``BENCH_PROFILE_DIR`` set, under cProfile (``profiled_serve.py``)."""
    port = free_port()
    args = [PYTHON, "-m", "costream.cli", "serve", "--port", str(port)]
    if os.environ.get("BENCH_PROFILE_DIR"):
        args[1:3] = [str(BENCH_DIR / "profiled_serve.py")]
    # Without Redis: the in-memory broker, the embedded mode these benchmarks compare with
    # Redis, unless the caller names a data directory (the durable default, SQLite).
    if redis_url:
        args += ["--redis-url", redis_url]
    elif "COSTREAM_DATA_DIR" not in (env or {}):
        args.append("--memory")
    # The benchmarks load one server far past a public deployment's abuse limits.
    unlimited = {
        "COSTREAM_MAX_RUNS": "1000",
        "COSTREAM_CREATE_RATE": "0",
        "COSTREAM_MESSAGE_RATE": "0",
    }
    child = work.spawn(f"costream-{port}", args, base_env(**(unlimited | (env or {}))))
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(f"{url}/healthz"), 60, "costream serve", child)
    # And warm (LiteLLM imported in a thread after start-up): that import's CPU and memory
    # would otherwise land in whatever is measured first.
    wait_until(lambda: http_ok(f"{url}/readyz"), 120, "costream serve ready", child)
    return child, url


def start_reference(work: Workdir, redis_url: str) -> tuple[Child, str]:
    """The bare Starlette forwarder (``ref_forwarder.py``); returns it and its base URL."""
    port = free_port()
    args = [
        PYTHON,
        str(BENCH_DIR / "ref_forwarder.py"),
        "--port",
        str(port),
        "--redis-url",
        redis_url,
    ]
    child = work.spawn(f"reference-{port}", args)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(f"{url}/healthz"), 30, "reference forwarder", child)
    return child, url


def http_json(method: str, url: str, body: Any = None, token: str | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def metric_value(base_url: str, name: str) -> float:
    """One unlabelled value from a server's ``/metrics``."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    raise KeyError(name)
