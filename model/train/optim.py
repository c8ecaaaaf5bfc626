"""The optimiser and learning-rate schedule of the trainer (model/train/trainer.py).

AdamW with weight decay on matrices only: decay pulls weights towards zero, which regularises the
matrices that mix features (projections, embeddings, head) but only fights LayerNorm gains and biases,
whose job is to set a scale or an offset. Linear warmup, because Adam's second-moment estimates are
noise for the first few hundred steps and a full learning rate then sends the model somewhere it never
recovers from; cosine decay to a floor, because it spends most of the run near the peak rate and still
ends with small, averaging steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
) -> torch.optim.AdamW:
    """AdamW over `model`'s parameters, decaying only those with two or more dimensions.

    beta2 = 0.95 rather than Adam's 0.999: the second-moment estimate then follows the gradient scale
    within ~20 steps, which keeps small-batch language-model training stable (GPT-3, nanoGPT).
    """
    if lr <= 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight decay must be >= 0, got {weight_decay}")
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    on_cuda = bool(params) and params[0].is_cuda
    # fused=True runs the whole update as one CUDA kernel; on the CPU the default (foreach) is best.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=on_cuda or None)


@dataclass(frozen=True)
class WarmupCosine:
    """Learning rate: linear warmup over `warmup_steps`, then cosine decay to `min_ratio * peak`.

    The decay is driven by a progress fraction in [0, 1] that the caller computes, so the same schedule
    serves a run bounded by steps (progress = steps done after warmup / steps planned after warmup) and a
    run bounded by time (progress = elapsed / budget).
    """

    peak_lr: float
    warmup_steps: int
    # Ending at 10% of the peak rather than at zero: the last steps still learn, and a resumed or
    # extended run does not start from a dead learning rate.
    min_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.peak_lr <= 0:
            raise ValueError(f"peak learning rate must be > 0, got {self.peak_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in [0, 1], got {self.min_ratio}")

    def __call__(self, step: int, progress: float) -> float:
        """The rate for optimizer step `step` (0-based) at decay progress `progress`."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        progress = min(max(progress, 0.0), 1.0)
        # lr = min + (peak - min) * (1 + cos(pi * progress)) / 2
        floor = self.min_ratio * self.peak_lr
        return floor + (self.peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def step_progress(self, step: int, total_steps: int) -> float:
        """Decay progress of a step-bounded run: 0 at the end of warmup, 1 at the last step."""
        decay_steps = max(1, total_steps - 1 - self.warmup_steps)
        return (step - self.warmup_steps) / decay_steps
