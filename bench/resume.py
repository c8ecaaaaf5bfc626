"""Resume benchmark (issue 17): the first turn after a restart, from a decode-state snapshot, against a warm
turn; what writing snapshots costs a warm turn; and the Redis bytes of a conversation.

    python -m bench.resume                                  # 1K, 16K, 64K; about 20 minutes on 2 busy cores
    python -m bench.resume --lengths 1024,16384,65536,262144 --rebuild-max 16384

Live `python -m app` servers on the shipped checkpoint and one Redis (bench/_serve.py's harness), turns
over the websocket API, a 20-token message and a 32-token reply (reply-ending tokens banned):

1. Restart. One conversation per length is grown (big messages, 1-token replies) on a server with the
   default snapshot policy, then gets warm turns (its state cached). Per length, a freshly started server
   (warmed up on another, short conversation, as any server is by its first users) takes the next turn:
   "resumed" (from the snapshot; snapshots on, the default) and, up to --rebuild-max, "rebuilt" (snapshots
   off: every stored token re-fed, as before issue 17). Each is followed by a warm turn on the same server.
2. Write cost. Three servers, one conversation each of --cost-history tokens, take --cost-turns turns in
   turn (so all see the same machine load): snapshots off, the default policy, and a snapshot after every
   turn. Per turn: wall clock at the client and the server's CPU seconds (which include the background
   snapshot writes, spread over the turns), and the snapshot bytes written.
3. Redis bytes per conversation (MEMORY USAGE of its keys) at each length.

Ratios are taken inside one run, side by side: the machine is shared, absolute seconds are not stable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from app.config import SHIPPED_MODEL_DIR
from app.store.embedded_redis import EmbeddedRedis
from bench._common import REPO_ROOT, environment, write_json
from bench._serve import (
    Messages,
    ServerProcess,
    ServerSpec,
    TurnRecord,
    create_session,
    gauge,
    redis_seconds,
    run_turn,
)
from model import ChatTokenizer

LOG = logging.getLogger("bench.resume")
MESSAGE_TOKENS = 20
REPLY_TOKENS = 32
GROW_TOKENS = 4096
TURN_TOKENS = MESSAGE_TOKENS + 3 + REPLY_TOKENS + 1
PREFILL = "reformer_chat_prefill_tokens_total"  # tokens fed before the reply: history re-fed + the prompt
POLICIES = {
    "off": {"SNAPSHOTS_ENABLED": "false"},
    "default": {},  # the shipped defaults of SNAPSHOT_MIN_TOKENS / SNAPSHOT_EVERY_TOKENS
    "every-turn": {"SNAPSHOT_MIN_TOKENS": "0", "SNAPSHOT_EVERY_TOKENS": "1"},
}


class Bench:
    def __init__(self, args: argparse.Namespace, redis_url: str, log_dir: Path) -> None:
        self.args = args
        self.redis_url = redis_url
        self.prefix = f"bench:{uuid.uuid4().hex[:10]}:"
        self.log_dir = log_dir
        self.messages = Messages(ChatTokenizer.load(Path(args.model_dir) / "tokenizer.model"))
        self.turns: list[dict[str, Any]] = []
        self.cost: list[dict[str, Any]] = []
        self.redis_bytes: list[dict[str, Any]] = []
        self._seed = 0

    def start(self, name: str, policy: str) -> ServerProcess:
        spec = ServerSpec(name, Path(self.args.model_dir), 256 << 20, self.args.threads, env=POLICIES[policy])
        return ServerProcess(spec, self.redis_url, self.prefix, self.log_dir)

    def turn(
        self, server: ServerProcess, session_id: str, content: str, params: dict[str, Any]
    ) -> TurnRecord:
        cpu = server.cpu_seconds()
        record = asyncio.run(run_turn(server, session_id, content, params))
        record.server_cpu_s = server.cpu_seconds() - cpu
        if record.error is not None:
            raise RuntimeError(f"turn on {server.spec.name} failed: {record.error}")
        return record

    def measured(self, server: ServerProcess, session_id: str, mode: str, history: int) -> TurnRecord:
        self._seed += 1
        params = self.messages.reply_params(REPLY_TOKENS, self._seed)
        fed = gauge(server.metrics(), PREFILL) or 0.0
        record = self.turn(server, session_id, self.messages.make(MESSAGE_TOKENS), params)
        self.turns.append(
            {
                "mode": mode,
                "history": history,
                "context_after": record.context_tokens,
                "fed_tokens": (gauge(server.metrics(), PREFILL) or 0.0) - fed,
                "latency_s": record.latency,
                "ttft_s": record.ttft,
                "server_cpu_s": record.server_cpu_s,
            }
        )
        LOG.info("%-8s history %6d: %.3f s, CPU %.3f s, fed %d", mode, history, record.latency,
                 record.server_cpu_s, self.turns[-1]["fed_tokens"])  # fmt: skip
        return record

    def grow(self, server: ServerProcess, session_id: str, target: int) -> int:
        context = 0
        while target - context - TURN_TOKENS >= 8:
            size = min(GROW_TOKENS, target - context - TURN_TOKENS)
            context = self.turn(
                server, session_id, self.messages.make(size), {"max_tokens": 1}
            ).context_tokens
        return context

    def warm_up(self, server: ServerProcess) -> None:
        """A first short turn on another conversation: what every new server gets from its first users."""
        self.turn(server, create_session(server), self.messages.make(MESSAGE_TOKENS), {"max_tokens": 4})

    def writes_done(self, server: ServerProcess) -> None:
        """Let the background snapshot writes of the last turn land before the server is replaced."""
        time.sleep(1.0)
        assert gauge(server.metrics(), "reformer_chat_snapshot_bytes") is not None

    # ---- phases ---------------------------------------------------------------------------------------
    def restart(self) -> None:
        args = self.args
        with self.start("first", "default") as server:
            sessions = {n: create_session(server) for n in args.lengths}
            for n in args.lengths:
                started = time.perf_counter()
                self.grow(server, sessions[n], n)
                LOG.info("grew %d tokens in %.0f s", n, time.perf_counter() - started)
            for _ in range(args.warm_turns):
                for n in args.lengths:
                    self.measured(server, sessions[n], "warm", n)
            self.writes_done(server)
            self.record_redis_bytes(sessions)
        for n in args.lengths:
            runs = [("resumed", "default")] * args.restarts
            runs += [("rebuilt", "off")] if n <= args.rebuild_max else []
            for mode, policy in runs:
                with self.start(mode, policy) as fresh:
                    self.warm_up(fresh)
                    self.measured(fresh, sessions[n], mode, n)
                    self.measured(fresh, sessions[n], "warm", n)
                    self.writes_done(fresh)

    def record_redis_bytes(self, sessions: dict[int, str]) -> None:
        with redis.Redis.from_url(self.redis_url) as client:
            for n, session_id in sessions.items():
                row: dict[str, Any] = {"history": n}
                for part in ("meta", "msgs", "ids", "snap"):
                    row[part] = (
                        client.memory_usage(f"{self.prefix}chat:{{{session_id}}}:{part}", samples=0) or 0
                    )
                self.redis_bytes.append(row)

    def write_cost(self) -> None:
        args = self.args
        servers = {policy: self.start(f"cost-{policy}", policy) for policy in POLICIES}
        try:
            sessions = {}
            for policy, server in servers.items():
                sessions[policy] = create_session(server)
                self.grow(server, sessions[policy], args.cost_history)
                self.warm_up(server)
            before = {p: (s.cpu_seconds(), s.metrics()) for p, s in servers.items()}
            records: dict[str, list[TurnRecord]] = {policy: [] for policy in servers}
            for _ in range(args.cost_turns):
                for policy, server in servers.items():
                    self._seed += 1
                    params = self.messages.reply_params(REPLY_TOKENS, self._seed)
                    content = self.messages.make(MESSAGE_TOKENS)
                    records[policy].append(self.turn(server, sessions[policy], content, params))
            time.sleep(1.0)
            for policy, server in servers.items():
                cpu_before, metrics_before = before[policy]
                metrics_after = server.metrics()
                written = _delta(metrics_before, metrics_after, "reformer_chat_snapshot_write_bytes_total")
                writes = redis_seconds([(metrics_before, metrics_after)]).get("snapshot_write", {})
                latencies = [r.latency for r in records[policy]]
                self.cost.append(
                    {
                        "policy": policy,
                        "turns": len(latencies),
                        "latency_median_s": statistics.median(latencies),
                        "latency_mean_s": statistics.fmean(latencies),
                        "server_cpu_per_turn_s": (server.cpu_seconds() - cpu_before) / len(latencies),
                        "snapshot_bytes_written_per_turn": written / len(latencies),
                        # Time the server waited on Redis for snapshot writes (Lua's pass over the bytes).
                        "snapshot_write_redis_s_per_turn": writes.get("sum_s", 0.0) / len(latencies),
                    }
                )
                LOG.info("cost %s: %s", policy, self.cost[-1])
        finally:
            for server in servers.values():
                server.stop()


def _delta(before: str, after: str, name: str) -> float:
    return (gauge(after, name) or 0.0) - (gauge(before, name) or 0.0)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    aligns = ["---" if h in ("policy",) else "---:" for h in header]
    return ["| " + " | ".join(r) + " |" for r in [header, aligns, *rows]]


def _cell(value: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def _ratio(a: float | None, b: float | None, fmt: str = "{:.2f}x") -> str:
    return "-" if a is None or not b else fmt.format(a / b)


def report(payload: dict[str, Any]) -> str:
    turns = payload["turns"]
    lines = ["Restart: the first turn after a restart vs a warm turn (medians; CPU = server CPU seconds)", ""]
    rows = []
    for n in payload["setup"]["lengths"]:

        def med(mode: str, key: str, n: int = n) -> float | None:
            values = [t[key] for t in turns if t["mode"] == mode and t["history"] == n]
            return statistics.median(values) if values else None

        warm, resumed, rebuilt = (med(m, "latency_s") for m in ("warm", "resumed", "rebuilt"))
        warm_cpu, resumed_cpu, rebuilt_cpu = (med(m, "server_cpu_s") for m in ("warm", "resumed", "rebuilt"))
        rows.append(
            [f"{n:,}", _cell(warm), _cell(resumed), _ratio(resumed, warm), _cell(rebuilt),
             _ratio(rebuilt, warm), _ratio(resumed_cpu, warm_cpu), _ratio(rebuilt_cpu, warm_cpu, "{:.1f}x"),
             _cell(med("warm", "fed_tokens"), "{:.0f}"), _cell(med("resumed", "fed_tokens"), "{:.0f}"),
             _cell(med("rebuilt", "fed_tokens"), "{:.0f}")]
        )  # fmt: skip
    header = ["history", "warm s", "resumed s", "resumed/warm", "rebuilt s", "rebuilt/warm",
              "CPU resumed/warm", "CPU rebuilt/warm", "fed warm", "fed resumed", "fed rebuilt"]  # fmt: skip
    lines += _table(header, rows)
    if payload["cost"]:
        off = next(c for c in payload["cost"] if c["policy"] == "off")
        lines += ["", "Write cost: warm turns with snapshots off, the default policy, every turn", ""]
        rows = [
            [c["policy"], str(c["turns"]), _cell(c["latency_median_s"]),
             _ratio(c["latency_median_s"], off["latency_median_s"], "{:.3f}x"),
             _cell(c["server_cpu_per_turn_s"]),
             _ratio(c["server_cpu_per_turn_s"], off["server_cpu_per_turn_s"], "{:.3f}x"),
             f"{c['snapshot_bytes_written_per_turn']:,.0f}", _cell(c["snapshot_write_redis_s_per_turn"])]
            for c in payload["cost"]
        ]  # fmt: skip
        header = [
            "policy",
            "turns",
            "median s",
            "vs off",
            "server CPU s/turn",
            "vs off",
            "snapshot bytes/turn",
            "snapshot write s/turn (Redis)",
        ]
        lines += _table(header, rows)
    if payload["redis_bytes"]:
        lines += ["", "Redis bytes per conversation (MEMORY USAGE of its keys)", ""]
        parts = ("meta", "msgs", "ids", "snap")
        rows = [
            [f"{r['history']:,}", *(f"{r[p]:,}" for p in parts), f"{sum(r[p] for p in parts):,}"]
            for r in payload["redis_bytes"]
        ]
        lines += _table(["history", *parts, "total"], rows)
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", default=str(SHIPPED_MODEL_DIR))
    parser.add_argument("--lengths", type=ints, default=[1024, 16384, 65536])
    parser.add_argument("--warm-turns", type=int, default=3)
    parser.add_argument("--restarts", type=int, default=3, help="fresh servers resuming each conversation")
    parser.add_argument(
        "--rebuild-max", type=int, default=16384, help="longest history re-fed with snapshots off"
    )
    parser.add_argument("--cost-history", type=int, default=4096)
    parser.add_argument("--cost-turns", type=int, default=12)
    parser.add_argument("--phases", default="restart,cost")
    parser.add_argument("--threads", type=int, default=1, help="TORCH_THREADS of the servers")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
    parser.add_argument("--name", default="resume")
    return parser.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the servers
    args.model_dir = str(Path(args.model_dir).resolve())
    workdir = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    embedded = EmbeddedRedis(workdir / "data")
    bench = Bench(args, embedded.start(), workdir)
    started = time.perf_counter()
    phases = set(args.phases.split(","))
    try:
        if "restart" in phases:
            bench.restart()
        if "cost" in phases:
            bench.write_cost()
    finally:
        embedded.stop()
    payload: dict[str, Any] = {
        "environment": environment("cpu", args.threads),
        "setup": {
            "lengths": args.lengths,
            "restarts": args.restarts,
            "message_tokens": MESSAGE_TOKENS,
            "reply_tokens": REPLY_TOKENS,
            "cost_history": args.cost_history,
            "policies": POLICIES,
            "run_s": time.perf_counter() - started,
        },
        "turns": bench.turns,
        "cost": bench.cost,
        "redis_bytes": bench.redis_bytes,
    }
    payload["report"] = report(payload)
    write_json(Path(args.out) / f"{args.name}.json", payload)
    print(payload["report"])
    print(json.dumps(payload["setup"]))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
