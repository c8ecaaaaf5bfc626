"""Recall: does a chat model use what it was told long ago? Copy spans, facts in chat, plain-chat bits/char.

    python -m bench.recall --subject shipped=checkpoints/reformer-chat-small
    python -m bench.recall --subject reformer=RUN/checkpoint --subject full=FULL/checkpoint \\
        --subject local=LOCAL/checkpoint --gaps 256,1024,4096,16384,65536 --fact-samples 40
    python -m bench.recall --subject shipped=checkpoints/reformer-chat-small --quick   # a minute or two

Three measurements per subject (bench/_recall_probes.py has the details), subjects side by side:
- copy: a span of ordinary words opens a user turn, held-out chat follows, the same span opens a user turn
  again after each gap; perplexity of the second occurrence over the first (1.0 = no recall; 0 = perfect);
- facts: an eval-side fact (value and phrasing never in training, model/train/facts.py) opens the first user
  turn, held-out chat follows, the user asks; the greedy reply must contain the value. Samples alternate
  seen and unseen phrasings, and kinds round-robin. Also per gap: the decode state's bytes when the question
  is asked and CPU ms per generated token;
- plain chat: test-split bits per character of message text (role and end-token losses counted, message
  characters in the denominator), in windows of each model's training length.
Prints a markdown table; writes bench/results/recall.json and recall.png.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench._common import Panel, environment, kilo, markdown_table, plot, write_json
from bench._recall_probes import CopyResult, FactResult, bits_per_char, copy_probe, fact_probe, filler_turns
from model import load_checkpoint
from model.checkpoint import read_training_info
from model.train.corpus import conversations
from model.train.facts import SIDES

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_GAPS = (256, 1024, 4096, 16384, 65536)
QUICK_GAPS = (256, 1024)


def _subject(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(
            "give NAME=CHECKPOINT_DIR, e.g. shipped=checkpoints/reformer-chat-small"
        )
    return name, Path(path)


def _gaps(text: str) -> tuple[int, ...]:
    try:
        gaps = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"gaps are comma-separated token counts: {exc}") from exc
    if not gaps or gaps[0] < 1:
        raise argparse.ArgumentTypeError("give at least one gap >= 1 token, e.g. 256,1024")
    return gaps


def measure(name: str, path: Path, args: argparse.Namespace, test: list) -> dict[str, Any]:
    """Every measurement on one checkpoint."""
    model, tokenizer = load_checkpoint(path, device="cpu")
    model.eval()
    started = time.perf_counter()
    window = model.config.max_train_len
    bpc = bits_per_char(model, tokenizer, test, window, max_tokens=args.bpc_tokens)
    print(f"[{name}] bits/char {bpc.bits_per_char:.4f} over {bpc.tokens:,} tokens", flush=True)
    copies: list[CopyResult] = []
    for sample in range(args.copy_samples):
        rng = np.random.Generator(np.random.PCG64([args.seed, 0, sample]))
        filler = filler_turns(test, start=int(rng.integers(len(test))))
        copies += copy_probe(model, tokenizer, filler, rng, args.gaps, args.span_words)
    print(f"[{name}] copy done ({time.perf_counter() - started:.0f} s)", flush=True)
    facts: list[FactResult] = []
    for sample in range(args.fact_samples):
        rng = np.random.Generator(np.random.PCG64([args.seed, 1, sample]))
        filler = filler_turns(test, start=int(rng.integers(len(test))))
        facts += fact_probe(
            model, tokenizer, filler, rng, args.gaps, SIDES[sample % 2], kind_index=sample // 2
        )
    print(f"[{name}] facts done ({time.perf_counter() - started:.0f} s)", flush=True)
    return {
        "checkpoint": str(path),
        "attn_layers": list(model.config.attn_layers),
        "parameters": model.num_parameters(),
        "config": model.config.to_dict(),
        "training": read_training_info(path),
        "plain_chat": asdict(bpc),
        "copy": _copy_summary(copies, args.gaps),
        "facts": _fact_summary(facts, args.gaps),
        "copy_samples": [asdict(c) for c in copies],
        "fact_samples": [asdict(f) for f in facts],
        "seconds": round(time.perf_counter() - started, 1),
    }


def _by_gap(items: list[Any], gaps: tuple[int, ...]) -> dict[int, list[Any]]:
    """Results grouped by the gap asked for: each probe returns one result per gap, in sorted order."""
    return {gap: items[i :: len(gaps)] for i, gap in enumerate(gaps)}


def _copy_summary(copies: list[CopyResult], gaps: tuple[int, ...]) -> dict[str, Any]:
    summary = {}
    for gap, group in _by_gap(copies, gaps).items():
        if group:
            first = float(np.mean([c.first_nats for c in group]))
            second = float(np.mean([c.second_nats for c in group]))
            summary[str(gap)] = {
                "ratio": math.exp(second - first),
                "first_ppl": math.exp(first),
                "second_ppl": math.exp(second),
                "mean_actual_gap": float(np.mean([c.gap for c in group])),
                "samples": len(group),
            }
    return summary


def _fact_summary(facts: list[FactResult], gaps: tuple[int, ...]) -> dict[str, Any]:
    summary = {}
    for gap, group in _by_gap(facts, gaps).items():
        if not group:
            continue
        row: dict[str, Any] = {"samples": len(group), "accuracy": float(np.mean([f.correct for f in group]))}
        for side in SIDES:
            mine = [f.correct for f in group if f.phrasing == side]
            row[f"accuracy_{side}_phrasing"] = float(np.mean(mine)) if mine else None
        row["state_bytes"] = int(max(f.state_bytes for f in group))
        row["cpu_ms_per_token"] = float(np.median([f.cpu_ms_per_token for f in group]))
        row["mean_actual_gap"] = float(np.mean([f.gap for f in group]))
        summary[str(gap)] = row
    return summary


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def report(results: dict[str, dict[str, Any]], gaps: tuple[int, ...]) -> str:
    heads = ["subject", "layers", "params", "bits/char"]
    heads += [f"{kilo(g)}: facts seen / unseen, copy ratio, state, ms/token" for g in gaps]
    rows = []
    for name, r in results.items():
        cells = [
            name,
            ",".join(r["attn_layers"]),
            f"{r['parameters']:,}",
            f"{r['plain_chat']['bits_per_char']:.3f}",
        ]
        for gap in gaps:
            fact, copy = r["facts"].get(str(gap)), r["copy"].get(str(gap))
            if fact is None:
                cells.append("-")
                continue
            ratio = f"{copy['ratio']:.2f}" if copy else "-"
            cells.append(
                f"{_pct(fact['accuracy_train_phrasing'])} / {_pct(fact['accuracy_eval_phrasing'])}, {ratio}, "
                f"{fact['state_bytes'] / 2**20:.1f} MiB, {fact['cpu_ms_per_token']:.1f}"
            )
        rows.append(cells)
    return markdown_table(heads, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subject", type=_subject, action="append", required=True,
                        help="NAME=CHECKPOINT_DIR; repeat for side-by-side subjects")  # fmt: skip
    parser.add_argument("--gaps", type=_gaps, default=DEFAULT_GAPS, help="tokens, comma-separated")
    parser.add_argument("--fact-samples", type=int, default=40, help="facts per gap (%(default)s)")
    parser.add_argument("--copy-samples", type=int, default=8, help="copy spans per gap (%(default)s)")
    parser.add_argument("--span-words", type=int, default=16, help="words per copy span (%(default)s)")
    parser.add_argument("--bpc-tokens", type=int, help="plain chat on about this many test tokens (all)")
    parser.add_argument("--quick", action="store_true", help="gaps 256,1024, 8 facts, 2 spans, 50K tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "recall.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.gaps, args.fact_samples, args.copy_samples = QUICK_GAPS, 8, 2
        args.bpc_tokens = args.bpc_tokens or 50_000
    torch.set_num_threads(args.threads)
    test = conversations("test")
    results = {name: measure(name, path, args, test) for name, path in args.subject}
    options = {**vars(args), "gaps": list(args.gaps), "out": str(args.out),
               "subject": [f"{name}={path}" for name, path in args.subject]}  # fmt: skip
    write_json(
        args.out, {"environment": environment("cpu", args.threads), "options": options, "results": results}
    )
    plot(
        args.out.with_suffix(".png"),
        [
            Panel("Facts in chat (eval values)", "greedy reply contains the value",
                  {n: [(g, r["facts"][str(g)]["accuracy"]) for g in args.gaps if str(g) in r["facts"]]
                   for n, r in results.items()},
                  logy=False),
            Panel("Copy: ppl second / first occurrence", "perplexity ratio",
                  {n: [(g, r["copy"][str(g)]["ratio"]) for g in args.gaps if str(g) in r["copy"]]
                   for n, r in results.items()}),
            Panel("Decode state when asked", "bytes",
                  {n: [(g, r["facts"][str(g)]["state_bytes"]) for g in args.gaps if str(g) in r["facts"]]
                   for n, r in results.items()}),
        ],
        xlabel="gap (tokens between first occurrence and question)",
    )  # fmt: skip
    print(report(results, args.gaps))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
