"""Cold start: time from ``costream serve`` to the first token of the first run.

Starts a fresh ``costream serve --memory`` (the demo model, no key) with the environment a
user has (``LITELLM_LOCAL_MODEL_COST_MAP`` unset), polls ``/healthz`` and ``/readyz``,
and the moment ``/readyz`` says ready creates a conversation, sends the first message and
reads the events (SSE) until the first reasoning or content delta. Prints, per start and as
medians: when the port answered, when ``/readyz`` said ready, the first token, and the gap
between the run's ``STEP_STARTED`` and its first token (where a cold LiteLLM used to sit).

Run: ``.venv/bin/python tests/bench/bench_startup.py [--repeat 3]``. To measure another
checkout, give its package directory: ``--pythonpath /tmp/wt-before/server --serve-args ''``
(a checkout from before ``--memory``, where memory was the default).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

FIRST_TOKEN = ('"REASONING_MESSAGE_CONTENT"', '"TEXT_MESSAGE_CONTENT"')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def call(method: str, url: str, body: dict[str, Any], token: str | None = None) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())


def one_start(pythonpath: str | None, serve_args: list[str]) -> dict[str, float]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "COSTREAM_"))}
    env.pop("LITELLM_LOCAL_MODEL_COST_MAP", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    with tempfile.TemporaryDirectory() as workdir:
        began = time.perf_counter()
        server = subprocess.Popen(
            [sys.executable, "-m", "costream.cli", "serve", "--port", str(port), *serve_args],
            cwd=workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            return measure(base, began)
        finally:
            server.terminate()
            server.wait(30)


def measure(base: str, began: float) -> dict[str, float]:
    deadline = began + 120
    while status_of(f"{base}/healthz") != 200:
        if time.perf_counter() > deadline:
            raise TimeoutError("the server did not answer")
        time.sleep(0.02)
    healthy = time.perf_counter() - began
    while status_of(f"{base}/readyz") != 200:
        if time.perf_counter() > deadline:
            raise TimeoutError("the server never said ready")
        time.sleep(0.02)
    ready = time.perf_counter() - began
    created = call("POST", f"{base}/api/conversations", {})
    conversation = f"{base}/api/conversations/{created['id']}"
    call("POST", f"{conversation}/messages", {"content": "hello"}, created["writeToken"])
    request = urllib.request.Request(f"{conversation}/events")
    request.add_header("Accept", "text/event-stream")
    request.add_header("Authorization", f"Bearer {created['viewToken']}")
    step_started = first_token = 0.0
    with urllib.request.urlopen(request, timeout=120) as stream:
        for raw in stream:
            line = raw.decode()
            if '"STEP_STARTED"' in line and not step_started:
                step_started = time.perf_counter() - began
            if any(kind in line for kind in FIRST_TOKEN):
                first_token = time.perf_counter() - began
                break
    return {
        "port answers (s)": healthy,
        "/readyz ready (s)": ready,
        "first token (s)": first_token,
        "STEP_STARTED to first token (s)": first_token - step_started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pythonpath", default=None, help="another checkout's server/ dir")
    parser.add_argument(
        "--serve-args", default="--memory", help="for `costream serve` (before --memory: '')"
    )
    args = parser.parse_args()
    runs = [one_start(args.pythonpath, args.serve_args.split()) for _ in range(args.repeat)]
    for name in runs[0]:
        values = ", ".join(f"{run[name]:.2f}" for run in runs)
        print(f"{name:34} median {statistics.median(r[name] for r in runs):6.2f}   ({values})")


if __name__ == "__main__":
    main()
