"""A real three-master Redis Cluster on free ports, started once per test module.

    def test_something(redis_cluster):
        redis_cluster.url                   # redis+cluster://127.0.0.1:<port of the first>
        redis_cluster.kill_pubsub()         # CLIENT KILL TYPE pubsub, on every node
        redis_cluster.node_holding(key)     # the port of the master that owns key's slot
        redis_cluster.move_slot(key, port)  # reshard that slot (and its keys) to another master

Each node is ``redis-server --cluster-enabled yes`` with no persistence; ``redis-cli
--cluster create`` gives each a third of the slots, without replicas. The fixtures are
blocking on purpose (sync fixtures are fine under pytest-asyncio); from an async test,
call the methods through ``asyncio.to_thread``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

_BUS_OFFSET = 10_000  # a cluster node also listens on its port + 10000 (the cluster bus)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_node_port(taken: set[int]) -> int:
    """A free port whose bus port (+10000) is free too."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        bus = port + _BUS_OFFSET
        if port in taken or bus in taken or bus > 65_535:
            continue
        if _bindable(bus):
            return port
    raise RuntimeError("no free port pair (port, port + 10000) for a cluster node")


class RedisCluster:
    """Three cluster-enabled ``redis-server`` processes joined into one cluster."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.directory = directory
        taken: set[int] = set()
        self.ports: list[int] = []
        for _ in range(masters):
            port = _free_node_port(taken)
            taken |= {port, port + _BUS_OFFSET}
            self.ports.append(port)
        self.processes: list[subprocess.Popen[bytes]] = []
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """The URL a broker connects with: one startup node, the rest is discovered."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def client(self, port: int) -> redis.Redis:
        """A plain blocking client to one node, for the test's own commands."""
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def start(self, timeout: float = 30.0) -> None:
        """Start the nodes, create the cluster, and wait until every node says it is ok."""
        binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if binary is None or cli is None:
            raise RuntimeError("redis-server and redis-cli are needed (scripts/test installs them)")
        for port in self.ports:
            args = [
                binary,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.directory / f"nodes-{port}.conf"),
                "--cluster-node-timeout", "5000",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
                "--logfile", str(self.directory / f"redis-{port}.log"),
            ]  # fmt: skip
            self.processes.append(
                subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        deadline = time.monotonic() + timeout
        for port in self.ports:
            self._wait(deadline, lambda client: bool(client.ping()), port)
        create = [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)]
        subprocess.run(
            [*create, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        for port in self.ports:
            self._wait(deadline, _cluster_ok, port)

    def _wait(self, deadline: float, ready: Callable[[redis.Redis], bool], port: int) -> None:
        while time.monotonic() < deadline:
            if any(process.poll() is not None for process in self.processes):
                raise RuntimeError(f"a cluster node exited early:\n{self.log_text()}")
            try:
                with self.client(port) as client:
                    if ready(client):
                        return
            except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"cluster node {port} did not get ready:\n{self.log_text()}")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop every node."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def node_holding(self, key: str | bytes) -> int:
        """The port of the master that owns the slot of ``key``."""
        with self.client(self.ports[0]) as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        raise AssertionError(f"slot {slot} is not covered")

    def move_slot(self, key: str | bytes, to_port: int) -> None:
        """Reshard: move the slot of ``key``, with its keys, to the master on ``to_port``."""
        from_port = self.node_holding(key)
        with self.client(from_port) as source, self.client(to_port) as target:
            slot = int(source.execute_command("CLUSTER", "KEYSLOT", key))
            source_id = source.execute_command("CLUSTER", "MYID").decode()
            target_id = target.execute_command("CLUSTER", "MYID").decode()
            target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                source.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
        # The new owner first, then the old one, then the rest (as redis-cli --cluster does).
        others = [port for port in self.ports if port not in (from_port, to_port)]
        for port in (to_port, from_port, *others):
            with self.client(port) as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def add_user(self, name: str, password: str) -> None:
        """Create an ACL user with every right, on every node (the default user stays open)."""
        for port in self.ports:
            with self.client(port) as client:
                client.execute_command(
                    "ACL", "SETUSER", name, "on", f">{password}", "~*", "&*", "+@all"
                )

    def kill_pubsub(self) -> int:
        """Close every pub/sub connection on every node (``CLIENT KILL TYPE pubsub``); how many."""
        killed = 0
        for port in self.ports:
            with self.client(port) as client:
                killed += int(client.client_kill_filter(_type="pubsub"))
        return killed

    def log_text(self) -> str:
        """What the nodes logged so far."""
        return "\n".join(
            path.read_text(errors="replace") for path in sorted(self.directory.glob("redis-*.log"))
        )


def _cluster_ok(client: redis.Redis) -> bool:
    info = client.execute_command("CLUSTER", "INFO")
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A three-master cluster shared by the tests of a module (their conversation ids differ)."""
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
