"""Bisect on the copy task: our model with one factor at a time moved toward the issue's reference model.

Why: the reference experiment (`../shared/experiments/copy_task_qk.py`: plain pre-norm residual blocks,
PyTorch's default init with biases, a dense-masked reading of the same attention rule) learns the copy task
with separate Q/K, while ours (bench/copy_task.py) had not left chance by step 600. This script trains one
variant of our `ReformerLM` on bench/copy_task.py's data and prints accuracy on the second copy every
`--eval-every` steps; run several at once, one process each. Variants (combine freely):

- ``--shared-qk``: the paper's shared-QK rule instead of separate Q/K.
- ``--torch-init``: PyTorch's default initialisation (embedding N(0, 1), Linear kaiming-uniform with
  uniform biases) instead of the model's std-0.02 normal with zero biases.
- ``--plain``: one ordinary residual stream (x = x + attn(LN x); x = x + ff(x)) instead of the two
  reversible streams (y1 = x1 + attn(LN x2); y2 = x2 + ff(y1)).
- ``--dense``: every query and key in one bucket, with buckets as long as the sequence: the LSH layers
  become exact causal attention, which isolates the model and recipe from the hashing. The reference's
  ``dense`` mode is the same control on its side.
- ``--embed-n01`` / ``--linear-torch``: one half of ``--torch-init`` (the embedding's N(0, 1), or the Linear
  layers' kaiming-uniform weights and uniform biases).
- ``--qkv-bias``: biases in the query, key and value projections (the reference has them; ours do not).
- ``--bf16``: train and evaluate under bf16 autocast (~2x faster on this CPU).

The variants patch the model in this process only (the block's forward, the hash function); nothing else
changes. Run from the repository root, e.g. ``python -m bench.copy_bisect dense-base 80 --dense --bf16``.
Results: docs/BENCHMARKS.md, "Copy task".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import model.block as block_module
import model.lsh as lsh_module
from bench.copy_task import HALF, batch, copy_config
from model import ReformerLM


def _plain_forward(
    self: block_module.ReformerBlock, x1: Tensor, x2: Tensor, positions: Tensor
) -> tuple[Tensor, Tensor]:
    """One residual stream; both outputs carry it, so the final norm sees it twice (a fixed rescaling)."""
    x = x1 + self.f(x1, positions)[0]
    x = x + self.ff(x)
    return x, x


def _one_bucket(qk: Tensor, rotations: Tensor) -> Tensor:
    """Every entry in bucket 0: (B, H, L, D), (H, R, D, NB/2) -> (B, H, R, L)."""
    B, H, L, _ = qk.shape
    return torch.zeros(B, H, rotations.shape[1], L, dtype=torch.long, device=qk.device)


def build(args: argparse.Namespace) -> ReformerLM:
    config = copy_config(args.shared_qk)
    if args.dense:
        config = config.replace(bucket_size=2 * HALF)  # a bucket holds the whole sequence
        lsh_module.hash_buckets = _one_bucket
    if args.plain:
        config = config.replace(reversible=False)
        block_module.ReformerBlock.forward = _plain_forward  # type: ignore[method-assign]
    model = ReformerLM(config).train()
    if args.qkv_bias:
        for module in model.modules():
            for name in ("to_q", "to_k", "to_v", "to_qkv"):
                old = getattr(module, name, None)
                if isinstance(old, torch.nn.Linear):
                    setattr(module, name, torch.nn.Linear(old.in_features, old.out_features, bias=True))
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and (args.torch_init or args.embed_n01):
            module.reset_parameters()
        if isinstance(module, torch.nn.Linear) and (args.torch_init or args.linear_torch):
            module.reset_parameters()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name")
    parser.add_argument("steps", type=int)
    for flag in (
        "--shared-qk",
        "--torch-init",
        "--plain",
        "--dense",
        "--bf16",
        "--qkv-bias",
        "--embed-n01",
        "--linear-torch",
    ):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None, help="JSON curve (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1)
    eval_inputs, eval_targets = batch(64, torch.Generator().manual_seed(12345))

    def autocast() -> contextlib.AbstractContextManager[Any]:
        return torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    curve, start = [], time.time()
    for step in range(1, args.steps + 1):
        inputs, targets = batch(32, data)
        with autocast():
            loss = model.loss(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0:
            model.eval()
            with torch.no_grad(), autocast():
                logits = model(eval_inputs)[:, HALF:]
            model.train()
            acc = (logits.argmax(-1) == eval_targets[:, HALF:]).float().mean().item()
            curve.append({"step": step, "loss": loss.item(), "accuracy": acc})
            elapsed = time.time() - start
            line = f"{args.name} step {step} t {elapsed:.0f}s loss {loss.item():.3f} acc {acc:.3f}"
            print(line, flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"variant": vars(args) | {"out": str(args.out)}, "curve": curve}))


if __name__ == "__main__":
    main()
