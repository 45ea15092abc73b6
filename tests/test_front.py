"""The compose.yaml topology, run as processes: Redis, two replicas, the nginx front.

Docker does not run on the test machines, so the replicas are started with the command,
environment and healthcheck that compose.yaml gives them (only ports and host names
changed), and nginx with the config file compose mounts (deploy/nginx.conf, only the
upstream addresses and the listen port changed).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.front import (
    ComposeService,
    compose_service,
    compose_service_names,
)
from tests.support.processes import free_port
from tests.support.servers import ServerProcess
from tests.support.ws import (
    ahttp,
    assert_well_formed,
    create_conversation,
    open_session,
)

VIEWERS = 6

# What the image's Dockerfile sets with ENV (server/Dockerfile).
IMAGE_ENV = {"PYTHONUNBUFFERED": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def _start_replica(service: ComposeService, redis_port: int, log_dir: Path) -> ServerProcess:
    """A replica started as compose starts it, on a free port of this machine."""
    port = free_port()
    command = list(service.command)
    assert command[:2] == ["costream", "serve"], command
    command[0] = str(Path(sys.executable).parent / "costream")  # the image's entry point
    command[command.index("--port") + 1] = str(port)
    command[command.index("--host") + 1] = "127.0.0.1"  # 0.0.0.0 in a container
    environment = dict(service.environment)
    environment["REDIS_URL"] = environment["REDIS_URL"].replace(
        "redis:6379", f"127.0.0.1:{redis_port}"
    )
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("LLM_", "COSTREAM_", "REDIS_"))
    }
    env.update(IMAGE_ENV)
    env.update(environment)
    replica = ServerProcess(command, env, log_dir / f"{service.name}.log", port)
    replica.start()
    return replica


def _healthcheck(service: ComposeService, port: int) -> int:
    """Run the service's compose healthcheck against ``port``; its exit status."""
    kind, *command = service.healthcheck
    assert kind == "CMD" and command[0] == "python", service.healthcheck
    command = [sys.executable, *(part.replace(":8000/", f":{port}/") for part in command[1:])]
    return subprocess.run(command, timeout=30, check=False, capture_output=True).returncode


def _until_healthy(service: ComposeService, port: int, timeout: float = 60.0) -> None:
    """Run the healthcheck until it passes, as compose does (a replica answers /readyz 503
    while it loads LiteLLM, longer on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while _healthcheck(service, port) != 0:
        assert time.monotonic() < deadline, f"{service.name} never became healthy"


def _viewers_metric(text: str) -> int:
    match = re.search(r"^costream_viewers (\d+)", text, flags=re.MULTILINE)
    assert match, text
    return int(match.group(1))


async def test_compose_topology_serves_a_multi_viewer_session_through_the_front(
    redis_server: Any,
    start_nginx: Any,
    tmp_path: Path,
) -> None:  # type: ignore[no-untyped-def]
    """Redis, both replicas and nginx as compose.yaml configures them: viewers through the
    front land on both replicas and all get the same complete run."""
    redis = compose_service("redis")
    assert redis.command[redis.command.index("--appendonly") + 1] == "yes"
    front_service = compose_service("front")
    assert any(v.startswith("./deploy/nginx.conf:") for v in front_service.volumes)
    replicas = [compose_service(name) for name in compose_service_names() if name != "redis"]
    replicas = [service for service in replicas if service.command]
    assert [service.name for service in replicas] == ["costream-1", "costream-2"]

    servers = []
    try:
        for service in replicas:
            servers.append(_start_replica(service, redis_server.port, tmp_path))
            _until_healthy(service, servers[-1].port)
        front = start_nginx([server.port for server in servers])

        conv = await create_conversation(front.url)
        sessions = [
            await open_session(front.ws_url(conv["id"]), conv["id"], conv["viewToken"])
            for _ in range(VIEWERS)
        ]
        writer = await open_session(front.ws_url(conv["id"]), conv["id"], conv["writeToken"])
        placed = []
        for server in servers:
            status, metrics = await ahttp("GET", f"{server.url}/metrics")
            assert status == 200
            placed.append(_viewers_metric(metrics))
        assert sum(placed) == VIEWERS + 1 and min(placed) > 0, placed

        await writer.send({"type": "message", "content": "Hello from behind the front"})
        assert (await writer.until("accepted"))["type"] == "accepted"
        for session in (writer, *sessions):
            end = await session.until_run_ends(timeout=60)
            assert end["type"] == "RUN_FINISHED"
            assert session.logged() == writer.logged()
        assert_well_formed(writer.events())
        status, events = await ahttp(
            "GET", f"{front.url}/api/conversations/{conv['id']}/events", token=conv["viewToken"]
        )
        assert status == 200 and len(events) == len(writer.events())
        for session in (*sessions, writer):
            await session.close()
    finally:
        for server in servers:
            server.stop()
