"""Quality: our Reformer against the same model with every layer "full", and perplexity far past the
training length.

    python -m bench.quality --reformer runs/small-reformer --full runs/small-full
    python -m bench.quality --train "<common model.train args>" --reformer runs/r --full runs/f

With --train, both runs are trained first, in parallel, with identical arguments except
`--attn-layers full,...` for the baseline (same data, steps, seed, sequence length, tokenizer).

Two measurements on the test split (conversations concatenated in a fixed order, original orientation):
1. test perplexity on windows of the training length;
2. perplexity by position on long streams (16 K tokens by default), in bins inside and far beyond the
   training length: a model whose positions generalise keeps the same perplexity in every bin.
Writes bench/results/quality.json and quality.png, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model import ChatTokenizer, ReformerLM, load_checkpoint
from model.train.corpus import conversations

RESULTS = Path(__file__).resolve().parent / "results"


def test_stream(tokenizer: ChatTokenizer) -> torch.Tensor:
    ids: list[int] = []
    for conversation in conversations("test"):
        ids.extend(tokenizer.encode_chat(conversation))
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def windowed_perplexity(model: ReformerLM, stream: torch.Tensor, seq_len: int, batch: int) -> float:
    """Perplexity over non-overlapping windows of the training length (each window starts cold)."""
    n = (len(stream) - 1) // seq_len
    inputs = stream[: n * seq_len].view(n, seq_len)
    targets = stream[1 : n * seq_len + 1].view(n, seq_len)
    total, count = 0.0, 0
    for start in range(0, n, batch):
        x, y = inputs[start : start + batch], targets[start : start + batch]
        total += model.loss(x, y).item() * y.numel()
        count += y.numel()
    return math.exp(total / count)


@torch.no_grad()
def positional_losses(
    model: ReformerLM, stream: torch.Tensor, length: int, n_streams: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy (n_streams, length) of consecutive long slices of the stream, twice:
    as one long sequence (positions up to `length`), and cut into windows of the training length (every
    position inside the trained range). Same tokens both ways, so their ratio isolates what the long
    positions do to the model, free of which conversations happen to fall where."""
    long_losses, windowed_losses = [], []
    for i in range(n_streams):
        chunk = stream[i * (length + 1) : (i + 1) * (length + 1)]
        if len(chunk) < length + 1:
            break
        inputs, targets = chunk[:-1], chunk[1:]
        logits = model(inputs[None])
        long_losses.append(F.cross_entropy(logits[0].float(), targets, reduction="none"))
        windows = model(inputs.view(-1, seq_len))  # (length / seq_len, seq_len, vocab)
        windowed_losses.append(F.cross_entropy(windows.flatten(0, 1).float(), targets, reduction="none"))
    return torch.stack(long_losses), torch.stack(windowed_losses)


def bin_perplexities(losses: torch.Tensor, bins: list[tuple[int, int]]) -> dict[str, float]:
    return {f"{a}-{b}": math.exp(losses[:, a:b].mean().item()) for a, b in bins}


def bin_ratios(long: torch.Tensor, windowed: torch.Tensor, bins: list[tuple[int, int]]) -> dict[str, float]:
    """Perplexity of the same tokens at their long-stream positions over at in-range positions."""
    return {f"{a}-{b}": math.exp((long[:, a:b] - windowed[:, a:b]).mean().item()) for a, b in bins}


def train_both(common: str, reformer_dir: Path, full_dir: Path) -> None:
    base = [sys.executable, "-m", "model.train", *shlex.split(common)]
    jobs = [
        subprocess.Popen([*base, "--out", str(reformer_dir)]),
        subprocess.Popen([*base, "--out", str(full_dir), "--attn-layers", _all_full(common)]),
    ]
    for job in jobs:
        if job.wait() != 0:
            raise SystemExit(f"training failed: {job.args}")


def _all_full(common: str) -> str:
    args = shlex.split(common)
    n_layers = int(args[args.index("--n-layers") + 1]) if "--n-layers" in args else 4
    return ",".join(["full"] * n_layers)


def evaluate(run: Path, seq_len: int, length: int, n_streams: int, bins: list[tuple[int, int]]) -> dict:
    model, tokenizer = load_checkpoint(run / "checkpoint", device="cpu")
    stream = test_stream(tokenizer)
    started = time.perf_counter()
    result = {
        "run": str(run),
        "attn_layers": list(model.config.attn_layers),
        "parameters": model.num_parameters(),
        "test_tokens": len(stream),
        "test_ppl": windowed_perplexity(model, stream, seq_len, batch=8),
    }
    losses, windowed = positional_losses(model, stream, length, n_streams, seq_len)
    result["long_streams"] = losses.shape[0]
    result["position_ppl"] = bin_perplexities(losses, bins)
    result["same_tokens_in_range_ppl"] = bin_perplexities(windowed, bins)
    result["long_over_in_range"] = bin_ratios(losses, windowed, bins)
    result["curve"] = [math.exp(v) for v in losses.mean(0).view(-1, 256).mean(1).tolist()]
    result["ratio_curve"] = [math.exp(v) for v in (losses - windowed).mean(0).view(-1, 256).mean(1).tolist()]
    result["eval_seconds"] = round(time.perf_counter() - started, 1)
    training = run / "checkpoint" / "training.json"
    if training.exists():
        result["training"] = json.loads(training.read_text())
    return result


def plot(results: dict[str, dict], seq_len: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for name, result in results.items():
        xs = [256 * (i + 0.5) for i in range(len(result["curve"]))]
        left.plot(xs, result["curve"], label=name)
        right.plot(xs, result["ratio_curve"], label=name)
    for ax in (left, right):
        ax.axvline(seq_len, color="grey", linestyle="--", label=f"training length {seq_len}")
        ax.set_xlabel("position in the long stream (tokens)")
        ax.legend()
    left.set_ylabel("perplexity (256-token bins)")
    left.set_yscale("log")
    left.set_title("Test perplexity by position")
    right.set_ylabel("ppl at this position / ppl of the same tokens in range")
    right.axhline(1.0, color="black", linewidth=0.5)
    right.set_title("Same tokens: long position vs in range")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reformer", type=Path, required=True, help="run directory of the Reformer model")
    parser.add_argument("--full", type=Path, required=True, help="run directory of the all-full baseline")
    parser.add_argument("--train", default=None, help="train both first with these model.train arguments")
    parser.add_argument("--seq-len", type=int, default=512, help="training length (%(default)s)")
    parser.add_argument("--length", type=int, default=16384, help="long-stream length (%(default)s)")
    parser.add_argument("--streams", type=int, default=6, help="long streams to average (%(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.train:
        train_both(args.train, args.reformer, args.full)

    s = args.seq_len
    bins = [(64, s), (s, 2 * s), (2 * s, 4 * s), (4 * s, 8 * s), (8 * s, args.length)]
    bins = [(a, min(b, args.length)) for a, b in bins if a < args.length]
    results = {
        "reformer": evaluate(args.reformer, s, args.length, args.streams, bins),
        "full": evaluate(args.full, s, args.length, args.streams, bins),
    }
    ratio = results["reformer"]["test_ppl"] / results["full"]["test_ppl"]
    summary = {"reformer_over_full_test_ppl": ratio}
    for name, result in results.items():
        summary[f"{name}_worst_beyond_range_ratio"] = max(
            v for k, v in result["long_over_in_range"].items() if int(k.split("-")[0]) >= s
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "summary": summary, "bins": bins}, indent=2))
    plot(results, s, args.out.with_suffix(".png"))

    header = "".join(f" {a}-{b} |" for a, b in bins)
    print(f"| model | layers | parameters | test ppl (windows of {s}) |{header}")
    print("|---|---|---|---|" + "---|" * len(bins))
    for name, r in results.items():
        layers = ",".join(r["attn_layers"])
        cells = " | ".join(
            f"{p:.1f} ({q:.3f}x)"
            for p, q in zip(r["position_ppl"].values(), r["long_over_in_range"].values(), strict=True)
        )
        print(f"| {name} | {layers} | {r['parameters']:,} | {r['test_ppl']:.2f} | {cells} |")
    print("\nCells: perplexity at those positions of the long streams (ratio to the same tokens in range).")
    print()
    for key, value in summary.items():
        print(f"- {key}: {value:.3f}")


if __name__ == "__main__":
    main()
