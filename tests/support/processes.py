"""Starting and stopping the subprocesses the tests run as real parts: costream, Redis, nginx.

A plain module, not a pytest plugin, so the fixture plugins can all import it (a plugin
importing a sibling plugin stops pytest from rewriting that sibling's asserts).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(
    process: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    what: str,
    log_text: Callable[[], str],
    timeout: float = 30.0,
) -> None:
    """Wait until ``ready()``; RuntimeError with the log if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited early:\n{log_text()}")
        if ready():
            return
        time.sleep(0.03)
    raise RuntimeError(f"{what} did not get ready in {timeout:g} s:\n{log_text()}")


def answers_ok(url: str) -> bool:
    """Whether a GET of ``url`` answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def stop_process(
    process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 20.0
) -> None:
    """Send ``sig`` and wait; SIGKILL if it is still running after ``timeout``."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
