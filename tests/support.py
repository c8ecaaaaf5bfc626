"""Shared test support (the fixtures that use it are in tests/conftest.py): a tiny real checkpoint, test
settings, a real uvicorn server on a free loopback port, and Redis clean-up under a test-owned key prefix.

Nothing here is a fake: the checkpoint is a randomly initialised ReformerLM saved by save_checkpoint with
a SentencePiece tokenizer trained on a slice of the corpus, loaded through MODEL_DIR like production.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
import uvicorn
from websockets.sync.client import ClientConnection, connect

from app.cli import bound_url
from app.config import Settings
from app.factory import create_app
from app.protocols import uvicorn_config
from model.checkpoint import save_checkpoint
from model.config import ReformerConfig
from model.reformer import ReformerLM
from model.tokenizer import ChatTokenizer
from model.train.corpus import texts

# CI's Redis; DB 9 and a random key prefix per test keep clear of everyone else's keys.
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
TOKENIZER_VOCAB = 400
_TOKENIZER_TEXTS = 4000


def build_tiny_checkpoint(directory: Path) -> Path:
    """Write (once per directory) a checkpoint of ReformerConfig.tiny with a small trained tokenizer."""
    if (directory / "config.json").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tokenizer_path = directory.parent / f"{directory.name}-tokenizer.model"
    tokenizer = ChatTokenizer.train(
        itertools.islice(texts("train"), _TOKENIZER_TEXTS), tokenizer_path, vocab_size=TOKENIZER_VOCAB
    )
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig.tiny(vocab_size=tokenizer.vocab_size))
    save_checkpoint(directory, model, tokenizer_path)
    return directory


def redis_reachable(url: str = TEST_REDIS_URL) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def new_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


def delete_prefix(prefix: str, url: str = TEST_REDIS_URL) -> None:
    """Remove this test's keys, and only them."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def make_settings(checkpoint: Path, **overrides: Any) -> Settings:
    """Settings for a test server: tiny limits, one torch thread, never reading a stray .env file, fp32
    (tests compare replies with the fp32 model; PRECISION=auto would pick by the machine's CPU)."""
    values: dict[str, Any] = {
        "model_dir": checkpoint,
        "device": "cpu",
        "precision": "fp32",
        "torch_threads": 1,
        "redis_url": TEST_REDIS_URL,
        "redis_key_prefix": new_prefix(),
        "max_new_tokens": 48,
        "max_message_chars": 400,
        "session_lock_seconds": 5,
        "retry_after_seconds": 1,
        "redis_timeout_seconds": 1,
        "log_level": "warning",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(settings: Settings) -> Iterator[str]:
    """A real uvicorn serving create_app(settings) on a free loopback port, in a thread; yields its URL."""
    config = uvicorn_config(settings, create_app(settings), "127.0.0.1", 0)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the test server failed to start: see the captured log")
        time.sleep(0.02)
    try:
        yield bound_url(server, "127.0.0.1")
    finally:
        server.should_exit = True
        thread.join()


@contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """running_server(), then delete the keys it wrote under its prefix on CI's Redis."""
    try:
        with running_server(settings) as url:
            yield url
    finally:
        if settings.redis_url == TEST_REDIS_URL:
            delete_prefix(settings.redis_key_prefix)


@dataclass(frozen=True)
class LiveServer:
    """A running test server: its base URL and the settings it runs with."""

    url: str
    settings: Settings

    @property
    def prefix(self) -> str:
        """Its Redis key prefix (unique per server)."""
        return self.settings.redis_key_prefix


# The `live_server` fixture (tests/conftest.py): `with live_server(**settings) as live:`.
LiveServerFactory = Callable[..., AbstractContextManager[LiveServer]]


@contextmanager
def live_server(checkpoint: Path, **overrides: Any) -> Iterator[LiveServer]:
    """serving(make_settings(checkpoint, **overrides)) on CI's Redis (skips the test without one)."""
    require_redis()
    settings = make_settings(checkpoint, **overrides)
    with serving(settings) as url:
        yield LiveServer(url, settings)


def require_redis() -> None:
    if not redis_reachable():
        pytest.skip(
            f"no Redis answering at TEST_REDIS_URL={TEST_REDIS_URL}: start one (redis-server) to run this"
        )


def ws_url(base_url: str, session_id: str, query: str = "") -> str:
    return base_url.replace("http://", "ws://") + f"/v1/sessions/{session_id}/stream{query}"


def open_ws(
    base_url: str, session_id: str, headers: dict[str, str] | None = None, query: str = ""
) -> ClientConnection:
    """A websocket client without client-side timeouts (pytest-timeout bounds a hung test)."""
    return connect(
        ws_url(base_url, session_id, query),
        additional_headers=headers,
        proxy=None,
        open_timeout=None,
        ping_interval=None,
        close_timeout=None,
    )


def frame(ws: ClientConnection) -> dict[str, Any]:
    """The next server frame, decoded."""
    return json.loads(ws.recv())


def send(ws: ClientConnection, **fields: Any) -> None:
    ws.send(json.dumps(fields))


def quiet_params(**overrides: Any) -> dict[str, Any]:
    """Sampling fields for a deterministic (greedy) reply of a few tokens."""
    return {"temperature": 0, "max_tokens": 8, **overrides}


def endless_params(tokenizer: ChatTokenizer, max_tokens: int) -> dict[str, Any]:
    """Sampling fields that ban every token that could end the reply, so it runs until cancelled or
    max_tokens: OpenAI-style logit_bias -100 on end-of-turn and the role tokens."""
    banned = (tokenizer.end_id, tokenizer.user_id, tokenizer.assistant_id, tokenizer.system_id)
    return {"temperature": 0, "max_tokens": max_tokens, "logit_bias": {str(i): -100 for i in banned}}


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked websocket frame as a client sends it (RFC 6455 5.2), for raw-socket tests; payload under
    64 KiB. Opcodes: 1 text, 2 binary, 9 ping."""
    mask = os.urandom(4)
    length = len(payload)
    head = bytes([0x80 | opcode])
    head += bytes([0x80 | length]) if length < 126 else bytes([0x80 | 126]) + length.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def handshake_request(base_url: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    """A websocket upgrade request (HTTP/1.1 GET with the handshake headers) for a raw socket."""
    host = base_url.split("://", 1)[1]
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def raw_connection(base_url: str) -> socket.socket:
    host, port = base_url.split("://", 1)[1].rsplit(":", 1)
    return socket.create_connection((host, int(port)))


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (pytest-timeout bounds a hang)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received
