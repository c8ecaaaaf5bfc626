"""Serving benchmark (issue 6): flat turns as one conversation grows, many conversations at once, and the
baselines people run today, all against live `python -m app` servers driven over websockets.

    python -m bench.serve --full-model-dir runs/small-full/checkpoint   # about 25 minutes on 2 busy CPU cores

1. Flat turns. One conversation grows to 100 ... 64K tokens: big user messages with 1-token replies, fed
   through the websocket API like any turn (so the stored ids, messages and states are the real ones).
   At each length: warm turns (the state is cached), a cold turn (the server was restarted, the state is
   rebuilt from Redis), the server's memory, and the same turn on the baselines:
   - "refeed": the same checkpoint with STATE_CACHE_BYTES=0, so every turn feeds the whole stored
     conversation through the model, as a stateless server without prefix caching does;
   - "full": a checkpoint of the same shape with "full" attention layers (warm: its growing KV state is
     cached), and "full-refeed": that model re-fed from scratch every turn, the stateless transformer.
   A measured turn is a 20-token message and a 32-token reply (reply-ending tokens banned).
2. Concurrency: 1, 4, 16, 64 conversations each run back-to-back turns at once; aggregate tokens/s,
   TTFT and inter-token latency percentiles, errors; once per --precisions (PRECISION of the server:
   fp32, bf16), side by side.
3. Redis: time per operation and per turn, from the servers' own Prometheus histograms.
4. Busy (issue 14): a conversation at --busy-history tokens and one at 100 take turns in alternation while
   --busy-crowd others stream back-to-back turns on the same server; a long history must not make a turn
   slower when the batch is full of other conversations.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

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
from bench._serve_report import plots, report
from model import ChatTokenizer

LOG = logging.getLogger("bench.serve")
MESSAGE_TOKENS = 20
REPLY_TOKENS = 32
GROW_TOKENS = 4096  # user tokens per history-building message
TURN_TOKENS = MESSAGE_TOKENS + 3 + REPLY_TOKENS + 1  # role, text, end, assistant prefix, reply, end
PRIME_TOKENS = 200  # history each concurrent conversation starts with
STATE_BYTES = "reformer_chat_state_cache_bytes"
STEPS, STEP_ROWS = "reformer_chat_decode_steps_total", "reformer_chat_decode_step_rows_total"
# glibc raises its mmap threshold after big frees, so later big tensors come from (and stay in) the heap:
# RSS then keeps whatever peak the heap reached. A fixed threshold hands big blocks back on free.
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}
# Cache room per conversation of the crowd phases (the shipped model's state is 8.3 MB): 64 conversations
# in the default 256 MiB would rebuild every state at every turn, measuring the cache and not batching.
CROWD_STATE_BYTES = 12 << 20
FULL_CACHE_BYTES = 8 << 30  # a 64K-token "full" state is 256 MiB: cache it, the baseline's best case


class Bench:
    """One run: a Redis, the messages, and the rows measured so far."""

    def __init__(self, args: argparse.Namespace, redis_url: str, log_dir: Path) -> None:
        self.args = args
        self.redis_url = redis_url
        self.prefix = f"bench:{uuid.uuid4().hex[:10]}:"
        self.log_dir = log_dir
        self.messages = Messages(ChatTokenizer.load(Path(args.model_dir) / "tokenizer.model"))
        self.turns: list[dict[str, Any]] = []
        self.memory: list[dict[str, Any]] = []
        self.concurrency: list[dict[str, Any]] = []
        # Per group of measured turns: (label, turns, /admin/metrics before, after).
        self.redis_scrapes: list[tuple[str, int, str, str]] = []
        self._seed = 0

    def spec(
        self,
        name: str,
        *,
        full: bool = False,
        cache: bool = True,
        max_running: int = 16,
        env: dict[str, str] | None = None,
        sessions: int = 0,
    ) -> ServerSpec:
        """`sessions`: conversations that must all keep their states cached (the crowd phases)."""
        model_dir = Path(self.args.full_model_dir if full else self.args.model_dir)
        room = FULL_CACHE_BYTES if full else max(256 << 20, sessions * CROWD_STATE_BYTES)
        cache_bytes = room if cache else 0
        # A "cold" turn here is the rebuild from the stored ids; resuming from a snapshot is
        # bench/resume.py's subject.
        env = {"SNAPSHOTS_ENABLED": "false", "PRECISION": self.args.precisions[0], **(env or {})}
        return ServerSpec(name, model_dir, cache_bytes, self.args.threads, max_running, env)

    def start(self, spec: ServerSpec) -> ServerProcess:
        LOG.info("starting server %s", spec.name)
        return ServerProcess(spec, self.redis_url, self.prefix, self.log_dir)

    # ---- one conversation ---------------------------------------------------------------------------
    def turn(
        self, server: ServerProcess, session_id: str, content: str, params: dict[str, Any]
    ) -> TurnRecord:
        cpu = server.cpu_seconds()
        record = asyncio.run(run_turn(server, session_id, content, params))
        record.server_cpu_s = server.cpu_seconds() - cpu
        if record.error is not None:
            raise RuntimeError(f"turn on {server.spec.name} failed: {record.error}")
        return record

    def measured(self, server: ServerProcess, session_id: str, mode: str, history: int, context: int) -> int:
        """One 20-token message -> 32-token reply, recorded; returns the stored length after it."""
        self._seed += 1
        params = self.messages.reply_params(REPLY_TOKENS, self._seed)
        record = self.turn(server, session_id, self.messages.make(MESSAGE_TOKENS), params)
        self.turns.append(
            {
                "mode": mode,
                "history": history,
                "context_before": context,
                "ttft_s": record.ttft,
                "latency_s": record.latency,
                "server_cpu_s": record.server_cpu_s,
                "completion_tokens": record.completion_tokens,
            }
        )
        LOG.info(
            "%-12s history %6d: turn %.3f s, TTFT %.3f s", mode, context, record.latency, record.ttft or 0
        )
        return record.context_tokens

    def grow(self, server: ServerProcess, session_id: str, target: int, context: int) -> int:
        """Big messages with 1-token replies until one more measured turn would pass `target`."""
        started = time.perf_counter()
        while target - context - TURN_TOKENS >= 8:
            size = min(GROW_TOKENS, target - context - TURN_TOKENS)
            record = self.turn(server, session_id, self.messages.make(size), {"max_tokens": 1})
            context = record.context_tokens
        LOG.info(
            "%s: history %d after %.0f s of growing", server.spec.name, context, time.perf_counter() - started
        )
        return context

    def _count(self, mode: str) -> int:
        return sum(1 for turn in self.turns if turn["mode"] == mode)

    def remember(self, server: ServerProcess, mode: str, history: int) -> None:
        """The server's memory, and the bytes of the decode states it caches (the conversation's state)."""
        state_bytes = gauge(server.metrics(), STATE_BYTES)
        self.memory.append({"mode": mode, "history": history, **server.memory(), "state_bytes": state_bytes})

    # ---- phases -------------------------------------------------------------------------------------
    def flat(self) -> None:
        """One conversation per length. Their warm turns are interleaved (100, 1K, ..., 64K, 100, ...) so
        that every length sees the same load on this shared machine. Then per length: the re-feed
        baseline's turn, a freshly started server's cold turn (state rebuilt from Redis; its memory is
        read then, a server that holds just that conversation), and one more warm turn right after, so
        every cold and re-feed turn has a warm turn measured in the same minute."""
        args = self.args
        contexts: dict[int, int] = {}
        with self.start(self.spec("stateful")) as server:
            sessions = {history: create_session(server) for history in args.lengths}
            for history in args.lengths:
                contexts[history] = self.grow(server, sessions[history], history, 0)
            before = server.metrics()
            for _ in range(args.warm_turns):
                for history in args.lengths:
                    contexts[history] = self.measured(
                        server, sessions[history], "warm", history, contexts[history]
                    )
            with self.start(self.spec("refeed", cache=False)) as refeed:
                for history in args.lengths:
                    session = sessions[history]
                    if history <= args.refeed_max:
                        contexts[history] = self.measured(
                            refeed, session, "refeed", history, contexts[history]
                        )
                    with self.start(self.spec("stateful")) as fresh:
                        contexts[history] = self.measured(fresh, session, "cold", history, contexts[history])
                        self.remember(fresh, "stateful", history)
                    with self.start(self.spec("stateful-fixed-mmap", env=FIXED_MMAP)) as fresh:
                        contexts[history] = self.measured(
                            fresh, session, "cold-fixed-mmap", history, contexts[history]
                        )
                        self.remember(fresh, "stateful-fixed-mmap", history)
                    contexts[history] = self.measured(server, session, "warm", history, contexts[history])
            self.redis_scrapes.append(
                ("one conversation at a time", self._count("warm"), before, server.metrics())
            )

    def full(self) -> None:
        """The "full" attention checkpoint, warm (its KV state cached) and re-fed every turn."""
        args = self.args
        server = self.start(self.spec("full", full=True))
        refeed = self.start(self.spec("full-refeed", full=True, cache=False))
        try:
            session_id, context = create_session(server), 0
            for history in [h for h in args.lengths if h <= args.full_max]:
                context = self.grow(server, session_id, history, context)
                for _ in range(args.full_warm_turns):
                    context = self.measured(server, session_id, "full", history, context)
                self.remember(server, "full", history)
                if history <= args.full_refeed_max:
                    context = self.measured(refeed, session_id, "full-refeed", history, context)
        finally:
            server.stop()
            refeed.stop()

    def crowd(self) -> None:
        """Many conversations at once, each taking back-to-back turns."""
        args = self.args
        max_running = args.max_running or max(args.concurrency)
        sessions = max(args.concurrency)
        for precision in args.precisions:
            spec = self.spec(
                f"stateful-crowd-{precision}",
                max_running=max_running,
                env={"PRECISION": precision},
                sessions=sessions,
            )
            server = self.start(spec)
            try:
                for count in args.concurrency:
                    self.concurrency.append({**self._crowd(server, count), "precision": precision})
            finally:
                server.stop()

    def busy(self) -> None:
        """Warm turns of a long and a short conversation, alternating, while a crowd streams."""
        args = self.args
        spec = self.spec("stateful-busy", max_running=args.busy_crowd + 2, sessions=args.busy_crowd + 2)
        with self.start(spec) as server:
            long_id, short_id = create_session(server), create_session(server)
            contexts = {
                args.busy_history: self.grow(server, long_id, args.busy_history, 0),
                100: self.grow(server, short_id, 100, 0),
            }
            sessions = {args.busy_history: long_id, 100: short_id}
            crowd = [create_session(server) for _ in range(args.busy_crowd)]
            crowd_turns = 0

            async def stream_until(session_id: str, stop: asyncio.Event, seed: int) -> None:
                nonlocal crowd_turns
                params = self.messages.reply_params(REPLY_TOKENS, seed)
                while not stop.is_set():
                    record = await run_turn(server, session_id, self.messages.make(MESSAGE_TOKENS), params)
                    if record.error is not None:
                        raise RuntimeError(f"a crowd turn failed: {record.error}")
                    crowd_turns += 1

            async def measured() -> None:
                stop = asyncio.Event()
                streams = [asyncio.create_task(stream_until(s, stop, 1000 + i)) for i, s in enumerate(crowd)]
                while crowd_turns < len(crowd):  # every crowd conversation is streaming by now
                    await asyncio.sleep(0.1)
                for turn in range(args.busy_turns):
                    for history in (args.busy_history, 100) if turn % 2 else (100, args.busy_history):
                        self._seed += 1
                        params = self.messages.reply_params(REPLY_TOKENS, self._seed)
                        record = await run_turn(
                            server, sessions[history], self.messages.make(MESSAGE_TOKENS), params
                        )
                        if record.error is not None:
                            raise RuntimeError(f"a measured busy turn failed: {record.error}")
                        self.turns.append(
                            {
                                "mode": "busy",
                                "history": history,
                                "context_before": contexts[history],
                                "ttft_s": record.ttft,
                                "latency_s": record.latency,
                                "server_cpu_s": None,
                                "completion_tokens": record.completion_tokens,
                            }
                        )
                        contexts[history] = record.context_tokens
                        LOG.info("busy: history %6d: turn %.3f s", history, record.latency)
                stop.set()
                await asyncio.gather(*streams)

            asyncio.run(measured())

    def _crowd(self, server: ServerProcess, count: int) -> dict[str, Any]:
        sessions = [create_session(server) for _ in range(count)]
        prime_params = self.messages.reply_params(8, 0)
        primers = [run_turn(server, s, self.messages.make(PRIME_TOKENS), prime_params) for s in sessions]
        contents = [
            [self.messages.make(MESSAGE_TOKENS) for _ in range(self.args.crowd_turns)] for _ in sessions
        ]

        async def conversation(session_id: str, texts: list[str], seed: int) -> list[TurnRecord]:
            params = self.messages.reply_params(REPLY_TOKENS, seed)
            return [await run_turn(server, session_id, text, params) for text in texts]

        async def everyone() -> list[list[TurnRecord]]:
            pairs = zip(sessions, contents, strict=True)
            return await asyncio.gather(*(conversation(s, c, i) for i, (s, c) in enumerate(pairs)))

        async def prime() -> None:
            await asyncio.gather(*primers)

        asyncio.run(prime())  # every conversation starts with some history, outside the timed window
        before = server.metrics()
        cpu, started = server.cpu_seconds(), time.perf_counter()
        records = [r for rs in asyncio.run(everyone()) for r in rs]
        wall, cpu = time.perf_counter() - started, server.cpu_seconds() - cpu
        self.redis_scrapes.append(
            (
                f"{count} conversation{'s' if count > 1 else ''} at once",
                len(records),
                before,
                after := server.metrics(),
            )
        )
        row = crowd_row(count, records, wall, cpu)
        steps = (gauge(after, STEPS) or 0) - (gauge(before, STEPS) or 0)
        rows = (gauge(after, STEP_ROWS) or 0) - (gauge(before, STEP_ROWS) or 0)
        row["rows_per_step"] = rows / steps if steps else None
        LOG.info("%d conversations: %.1f tokens/s, %d errors", count, row["tokens_per_s"], row["errors"])
        return row


def crowd_row(count: int, records: list[TurnRecord], wall: float, cpu: float) -> dict[str, Any]:
    """Aggregate one concurrency level: tokens/s is every measured reply token over the window from the
    first message sent to the last reply done, so stragglers count against it."""
    import numpy as np

    ok = [r for r in records if r.error is None]
    tokens = sum(r.completion_tokens for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]

    def pct(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"p50": None, "p95": None, "p99": None}
        p50, p95, p99 = np.percentile(values, [50, 95, 99])
        return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}

    return {
        "conversations": count,
        "turns": len(records),
        "tokens": tokens,
        "wall_s": wall,
        "server_cpu_s": cpu,
        "tokens_per_s": tokens / wall,
        "tokens_per_cpu_s": tokens / cpu if cpu else None,
        "ttft_s": pct(ttft),
        "itl_s": pct(gaps),
        "errors": len(records) - len(ok),
        "error_samples": sorted({r.error for r in records if r.error})[:3],
    }


def rerender(out: Path, name: str) -> None:
    """Tables and plots again from a finished run's JSON (e.g. after changing the report)."""
    path = out / f"{name}.json"
    payload = json.loads(path.read_text())
    payload["report"] = report(payload)
    write_json(path, payload)
    plots(payload, out, name)
    print(payload["report"])


def delete_keys(url: str, prefix: str) -> None:
    """On a shared Redis, remove this run's keys and only them."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
    finally:
        client.close()


def parse_args() -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", default=str(SHIPPED_MODEL_DIR), help="the lsh/local checkpoint served")
    parser.add_argument(
        "--full-model-dir", help="a same-shape checkpoint with full attention (skip if unset)"
    )
    parser.add_argument("--lengths", type=ints, default=[100, 1024, 4096, 16384, 65536])
    parser.add_argument("--warm-turns", type=int, default=3)
    parser.add_argument("--refeed-max", type=int, default=65536, help="longest history for the refeed turn")
    # Building a "full" history costs O(L^2): 16K -> 64K alone is about 10 minutes of prefill here.
    parser.add_argument("--full-max", type=int, default=16384, help="longest history for the full model")
    parser.add_argument("--full-refeed-max", type=int, default=16384, help="its refeed costs O(L^2)")
    parser.add_argument("--full-warm-turns", type=int, default=2)
    parser.add_argument("--concurrency", type=ints, default=[1, 4, 16, 64])
    parser.add_argument("--crowd-turns", type=int, default=2, help="turns per conversation in phase 2")
    parser.add_argument(
        "--max-running", type=int, help="crowd server's MAX_RUNNING_REQUESTS (default: most conversations)"
    )
    parser.add_argument("--busy-history", type=int, default=65536, help="the long conversation of phase 4")
    parser.add_argument("--busy-crowd", type=int, default=16, help="conversations streaming in phase 4")
    parser.add_argument("--busy-turns", type=int, default=6, help="measured turns per conversation, phase 4")
    parser.add_argument("--threads", type=int, default=1, help="TORCH_THREADS of the servers")
    parser.add_argument(
        "--precisions",
        type=lambda text: [p for p in text.split(",") if p],
        default=["auto"],
        help="PRECISION of the servers (auto, fp32, bf16); the crowd phase runs once per entry, the other "
        "phases use the first",
    )
    parser.add_argument("--phases", default="flat,full,crowd")
    parser.add_argument("--redis-url", help="use this Redis instead of starting one (keys under bench:...)")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
    parser.add_argument("--name", default="serve", help="output files: <out>/<name>.json, <name>_*.png")
    parser.add_argument(
        "--report-only", action="store_true", help="redo tables and plots of <out>/<name>.json"
    )
    return parser.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the progress
    args = parse_args()
    if args.report_only:
        rerender(Path(args.out), args.name)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the servers
    phases = set(args.phases.split(","))
    if "full" in phases and not args.full_model_dir:
        LOG.warning("no --full-model-dir: skipping the full-attention baseline")
        phases.discard("full")
    # Absolute: the servers run in an empty working directory (no stray .env).
    args.model_dir = str(Path(args.model_dir).resolve())
    args.full_model_dir = str(Path(args.full_model_dir).resolve()) if "full" in phases else None
    for directory in filter(None, (args.model_dir, args.full_model_dir)):
        if not (Path(directory) / "config.json").is_file():
            raise SystemExit(f"no checkpoint at {directory}: pass a checkpoint directory (with config.json)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    redis = None if args.redis_url else EmbeddedRedis(workdir / "data")
    redis_url = args.redis_url or redis.start()  # type: ignore[union-attr]
    bench = Bench(args, redis_url, workdir)
    started = time.perf_counter()
    try:
        for phase in ("flat", "full", "crowd", "busy"):
            if phase in phases:
                getattr(bench, phase)()
                save(bench, args, time.perf_counter() - started, final=False)  # a later crash keeps this
    finally:
        if redis is not None:
            redis.stop()
        else:
            delete_keys(args.redis_url, bench.prefix)
    payload = save(bench, args, time.perf_counter() - started, final=True)
    print(payload["report"])
    shutil.rmtree(workdir, ignore_errors=True)


def save(bench: Bench, args: argparse.Namespace, run_s: float, *, final: bool) -> dict[str, Any]:
    """Write the JSON (with its tables) and, at the end, the plots."""
    payload: dict[str, Any] = {
        "environment": environment("cpu", args.threads),
        "setup": {
            "message_tokens": MESSAGE_TOKENS,
            "reply_tokens": REPLY_TOKENS,
            "grow_tokens": GROW_TOKENS,
            "model_dir": args.model_dir,
            "full_model_dir": args.full_model_dir,
            "run_s": run_s,
            "complete": final,
            "history_built": "through the websocket API: user messages of up to 4096 tokens, 1-token replies",
        },
        "turns": bench.turns,
        "memory": bench.memory,
        "concurrency": bench.concurrency,
        "redis": [
            {"label": label, "turns": turns, "operations": redis_seconds([(before, after)])}
            for label, turns, before, after in bench.redis_scrapes
        ],
    }
    out = Path(args.out)
    payload["report"] = report(payload)
    write_json(out / f"{args.name}.json", payload)
    if final:
        plots(payload, out, args.name)
    return payload


if __name__ == "__main__":
    main()
