"""Responses API benchmark (issue 15): a long conversation continued through `POST /v1/responses` costs no
more per turn than a short one, on `conversation=` and on `previous_response_id=` chains alike.

    python -m bench.responses            # about 3 minutes on 2 busy CPU cores

One live `python -m app` server (the shipped checkpoint, one torch thread, decode-state cache on) and the
Redis it uses (the embedded one the app ships, started here). For each history length (100 ... 16K
tokens) two subjects are built through the official `openai` SDK:

- conversation: `conversations.create` with the history as user items (their token ids are stored, no
  generation), then turns with `responses.create(conversation=...)`;
- chain: a first `responses.create` whose `input` is the history, then turns with
  `previous_response_id=` the last response.

The first turn of each builds the decode state from the stored ids (cold); the measured turns after it
are interleaved across lengths and subjects (100, 1K, ..., 100, ...) so every length runs under the same
load. A measured turn: a 20-token message, a 32-token reply (reply-ending tokens banned through the
server's `logit_bias` extension, so every reply does the same work), seeded sampling. Reported per turn:
the server's CPU time (from /proc, medians; wall clock carries other people's load) and the tokens the
model was fed (`usage.input_tokens - input_tokens_details.cached_tokens`).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from openai import OpenAI

from app.config import SHIPPED_MODEL_DIR
from app.store.embedded_redis import EmbeddedRedis
from bench._common import REPO_ROOT, environment, write_json
from bench._serve import Messages, ServerProcess, ServerSpec
from model import ChatTokenizer

LOG = logging.getLogger("bench.responses")
LENGTHS = (100, 1024, 4096, 16384)
MESSAGE_TOKENS = 20
REPLY_TOKENS = 32
GROW_TOKENS = 4096  # tokens per history item


class Subject:
    """One conversation (or chain) of a given history length, and its measured turns."""

    def __init__(self, sdk: OpenAI, model: str, kind: str, length: int, messages: Messages) -> None:
        self.sdk, self.model, self.kind, self.length = sdk, model, kind, length
        sizes = [GROW_TOKENS] * (length // GROW_TOKENS) + (
            [length % GROW_TOKENS] if length % GROW_TOKENS else []
        )
        history = [{"role": "user", "content": messages.make(n)} for n in sizes]
        self.conversation: str | None = None
        self.previous: str | None = None
        if kind == "conversation":
            self.conversation = sdk.conversations.create(items=history).id  # type: ignore[arg-type]
        else:
            self._first_input: list[dict[str, str]] = history
        self.turns: list[dict[str, Any]] = []

    def turn(self, server: ServerProcess, content: str, params: dict[str, Any]) -> dict[str, Any]:
        where: dict[str, Any] = {}
        if self.kind == "conversation":
            where["conversation"] = self.conversation
        elif self.previous is not None:
            where["previous_response_id"] = self.previous
        else:
            content_or_items: Any = [*self._first_input, {"role": "user", "content": content}]
            return self._run(server, content_or_items, params, where)
        return self._run(server, content, params, where)

    def _run(
        self, server: ServerProcess, text: Any, params: dict[str, Any], where: dict[str, Any]
    ) -> dict[str, Any]:
        cpu, wall = server.cpu_seconds(), time.perf_counter()
        response = self.sdk.responses.create(model=self.model, input=text, **where, **params)
        record = {
            "server_cpu_s": server.cpu_seconds() - cpu,
            "wall_s": time.perf_counter() - wall,
            "input_tokens": response.usage.input_tokens if response.usage else 0,
            "cached_tokens": response.usage.input_tokens_details.cached_tokens if response.usage else 0,
            "output_tokens": response.usage.output_tokens if response.usage else 0,
        }
        record["fed_tokens"] = record["input_tokens"] - record["cached_tokens"]
        self.previous = response.id
        return record


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-responses-"))
    redis = EmbeddedRedis(workdir / "data")
    redis_url = redis.start()
    model_dir = Path(args.model_dir).resolve()
    spec = ServerSpec("warm", model_dir, cache_bytes=1 << 30, threads=1)
    tokenizer = ChatTokenizer.load(model_dir / "tokenizer.model")
    messages = Messages(tokenizer)
    params = {"temperature": 0.8, "top_p": 0.95, "max_output_tokens": REPLY_TOKENS}
    banned = messages.reply_params(REPLY_TOKENS, 0)["logit_bias"]
    results: dict[str, Any] = {}
    try:
        with ServerProcess(spec, redis_url, f"bench:{uuid.uuid4().hex[:8]}:", workdir) as server:
            sdk = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=None)
            model = sdk.models.list().data[0].id
            subjects = [
                Subject(sdk, model, kind, n, messages) for n in LENGTHS for kind in ("conversation", "chain")
            ]
            for round_ in range(args.rounds + 1):  # round 0 builds each state (cold): not reported
                for s in subjects:
                    seed = {"extra_body": {"seed": round_, "logit_bias": banned}}
                    record = s.turn(server, messages.make(MESSAGE_TOKENS), {**params, **seed})
                    record["cold"] = round_ == 0
                    s.turns.append(record)
                    LOG.info(
                        "%s %d round %d: %.0f ms CPU, fed %d",
                        s.kind,
                        s.length,
                        round_,
                        1000 * record["server_cpu_s"],
                        record["fed_tokens"],
                    )
            for s in subjects:
                results.setdefault(s.kind, {})[str(s.length)] = s.turns
    finally:
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def report(results: dict[str, Any]) -> str:
    header = (
        "history",
        "conversation= CPU/turn (x 100)",
        "fed tokens",
        "previous_response_id= CPU/turn (x 100)",
        "fed tokens",
        "cold turn CPU (conversation)",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def warm(kind: str, n: int, key: str) -> float:
        return statistics.median(t[key] for t in results[kind][str(n)] if not t["cold"])

    base = {k: warm(k, LENGTHS[0], "server_cpu_s") for k in ("conversation", "chain")}
    for n in LENGTHS:
        cells = [f"{n:,}"]
        for kind in ("conversation", "chain"):
            cpu = warm(kind, n, "server_cpu_s")
            cells += [f"{1000 * cpu:.0f} ms ({cpu / base[kind]:.2f}x)", f"{warm(kind, n, 'fed_tokens'):.0f}"]
        cold = next(t for t in results["conversation"][str(n)] if t["cold"])
        cells.append(f"{1000 * cold['server_cpu_s']:.0f} ms")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "openai"):  # one line per request drowns the progress
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=str(SHIPPED_MODEL_DIR))
    parser.add_argument("--rounds", type=int, default=4, help="measured turns per subject")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
    args = parser.parse_args()
    started = time.perf_counter()
    results = run(args)
    table = report(results)
    payload = {
        "environment": environment("cpu", 1),
        "setup": {
            "lengths": LENGTHS,
            "message_tokens": MESSAGE_TOKENS,
            "reply_tokens": REPLY_TOKENS,
            "rounds": args.rounds,
            "model_dir": args.model_dir,
            "run_s": time.perf_counter() - started,
        },
        "turns": results,
        "report": table,
    }
    write_json(Path(args.out) / "responses.json", payload)
    print(table)


if __name__ == "__main__":
    main()
