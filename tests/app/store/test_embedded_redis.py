"""The embedded Redis keeps its promises as the running server reports them: every write fsynced
(`appendfsync always`, append-only on), no TCP listener, and a unix socket only its owner can open.

The persistence tests (tests/e2e/test_persistence.py) stop the server with SIGTERM, which flushes the file
whatever the fsync policy, so they cannot tell `always` from `no`; the server's own CONFIG can.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.store.embedded_redis import EmbeddedRedis


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _socket_path(server: EmbeddedRedis) -> str:
    assert server.url is not None and server.url.startswith("unix://")
    return server.url.removeprefix("unix://")


def test_every_write_is_fsynced_to_the_append_only_file(embedded: EmbeddedRedis) -> None:
    with redis.Redis(unix_socket_path=_socket_path(embedded), decode_responses=True) as client:
        config = client.config_get("append*")
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "always"
        assert client.config_get("dir")["dir"] == str(embedded.directory)


def test_it_listens_on_a_private_unix_socket_only(embedded: EmbeddedRedis) -> None:
    path = _socket_path(embedded)
    with redis.Redis(unix_socket_path=path, decode_responses=True) as client:
        assert client.config_get("port")["port"] == "0"  # no TCP listener at all
        assert client.config_get("unixsocketperm")["unixsocketperm"] == "700"
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) & 0o077 == 0, f"socket mode {stat.S_IMODE(mode):o}: group or others may connect"
    directory = stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)
    assert directory & 0o077 == 0, f"socket directory mode {directory:o}: group or others may enter"
