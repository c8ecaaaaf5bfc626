"""The Reformer paper's copy task on the project's model: shared QK against separate Q/K, side by side.

Why: in-context copying (an induction head: find the earlier occurrence of the current token, read what
followed it) is what long-range recall in chat rests on. Sequences are 0 w 0 w with w = 63 random symbols
from 63; the model is trained on the whole second half and scored by next-token accuracy on the second copy
(chance 1/63). Every subject is the same 4-layer local/LSH/local/LSH model and the same data stream and
initial seed; only `shared_qk` differs. Accuracy is reported by training step, and CPU time per step as the
cost of the separate projections.

Run from the repository root: ``python -m bench.copy_task`` (``--steps 50`` for a smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench._common import LOG, REPO_ROOT, Panel, environment, markdown_table, plot, write_json
from model import ReformerConfig, ReformerLM

SYMBOLS = 63  # w is drawn from 1 .. 63; 0 is the separator
HALF = SYMBOLS + 1  # "0 w"
SUBJECTS = {"shared-qk": True, "separate-qk": False}


def copy_config(shared_qk: bool) -> ReformerConfig:
    """The issue's setting: d_model 128, 2 heads, bucket 16, 8 buckets, 2 rounds, local/LSH/local/LSH."""
    return ReformerConfig(
        vocab_size=SYMBOLS + 1,
        d_model=128,
        n_layers=4,
        n_heads=2,
        d_head=64,
        d_ff=512,
        attn_layers=("local", "lsh", "local", "lsh"),
        bucket_size=16,
        n_buckets=8,
        n_hashes=2,
        max_train_len=2 * HALF - 1,
        shared_qk=shared_qk,
    )


def batch(size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (size, 2*HALF - 1) = 0 w 0 w without its last symbol, and targets: the next symbol where it
    is a symbol of the second copy, -100 (ignored) elsewhere."""
    w = torch.randint(1, SYMBOLS + 1, (size, SYMBOLS), generator=generator)
    zero = torch.zeros(size, 1, dtype=torch.long)
    sequence = torch.cat((zero, w, zero, w), dim=1)  # (size, 2 * HALF)
    targets = torch.full_like(sequence[:, 1:], -100)
    targets[:, HALF:] = sequence[:, HALF + 1 :]  # logits at the second 0 and after predict the second w
    return sequence[:, :-1], targets


@torch.no_grad()
def accuracy(model: ReformerLM, inputs: torch.Tensor, targets: torch.Tensor, autocast: bool) -> float:
    model.eval()
    with _autocast(autocast):
        logits = model(inputs)[:, HALF:]
    model.train()
    return (logits.argmax(-1) == targets[:, HALF:]).float().mean().item()


def _autocast(enabled: bool) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def train(shared_qk: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One subject, in its own process (see main)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = ReformerLM(copy_config(shared_qk)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data = torch.Generator().manual_seed(args.seed + 1)
    eval_inputs, eval_targets = batch(args.eval_size, torch.Generator().manual_seed(12345))
    curve, cpu_s = [], 0.0
    for step in range(1, args.steps + 1):
        inputs, targets = batch(args.batch_size, data)
        start = time.process_time()
        with _autocast(args.bf16):
            loss = model.loss(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        cpu_s += time.process_time() - start
        if step % args.eval_every == 0 or step == args.steps:
            acc = accuracy(model, eval_inputs, eval_targets, args.bf16)
            curve.append({"step": step, "loss": loss.item(), "accuracy": acc})
            LOG.info(
                "%s step %d loss %.3f accuracy %.3f",
                "shared" if shared_qk else "separate",
                step,
                curve[-1]["loss"],
                acc,
            )
    return {"curve": curve, "cpu_s_per_step": cpu_s / args.steps}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="train and evaluate under bf16 autocast")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--subjects", nargs="+", default=list(SUBJECTS), choices=list(SUBJECTS))
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "copy_task.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    payload: dict[str, Any] = {"benchmark": "copy_task", "environment": environment("cpu", args.threads)}
    payload["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "subjects")}
    # Subjects train at the same time, each in its own process with its own threads: side by side on the
    # same machine load, and the run takes one subject's time.
    with ProcessPoolExecutor(max_workers=len(args.subjects)) as pool:
        futures = {name: pool.submit(train, SUBJECTS[name], args) for name in args.subjects}
        payload["subjects"] = {name: future.result() for name, future in futures.items()}
    write_json(args.out, payload)

    results = payload["subjects"]
    steps = [point["step"] for point in next(iter(results.values()))["curve"]]
    rows = [
        [str(step)] + [f"{results[n]['curve'][i]['accuracy']:.1%}" for n in results]
        for i, step in enumerate(steps)
    ]
    rows.append(["CPU s / step"] + [f"{results[n]['cpu_s_per_step']:.3f}" for n in results])
    print(markdown_table(["step", *results], rows))
    series = {n: [(p["step"], p["accuracy"]) for p in results[n]["curve"]] for n in results}
    plot(
        args.out.with_suffix(".png"),
        [Panel("copy task: accuracy on the second copy", "accuracy", series, False)],
        "step",
    )


if __name__ == "__main__":
    main()
