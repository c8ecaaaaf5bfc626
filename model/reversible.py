"""Reversible execution of residual blocks (y1 = x1 + f(x2), y2 = x2 + g(y1); the block is model/block.py).

In reversible mode the forward pass stores no activations: the backward pass walks the blocks from the
top, recovering each block's inputs from its outputs (x2 = y2 - g(y1), x1 = y1 - f(x2)) and recomputing
f and g with gradients on. For that to give the gradients of the forward pass, the recomputation must be
the same computation: each block records, in the forward pass, the RNG state before f and before g (dropout
masks replay, without touching the global generator), the LSH buckets f used (a rounding difference in the
recovered x2 can never move a token to another bucket) and the autocast setting (a recomputation in another
precision would give other gradients).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .autocast import Autocast

if TYPE_CHECKING:
    from .block import ReformerBlock


@dataclass
class RNGState:
    """The generator states a sub-layer's dropout draws from, captured so the draws can be replayed."""

    cpu: Tensor
    cuda: Tensor | None
    device: torch.device

    @classmethod
    def capture(cls, device: torch.device) -> RNGState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body with the captured state; the global generators are left as they were."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


@dataclass
class BlockRecord:
    """What one block's forward pass leaves for its backward recomputation."""

    rng_f: RNGState | None = None
    rng_g: RNGState | None = None
    buckets: Tensor | None = None
    # The forward pass's autocast setting: recomputing in another precision would give other gradients.
    autocast: Autocast | None = None


@dataclass
class ReversibleRun:
    """Everything the autograd Function needs besides its tensor inputs, in one object."""

    blocks: list[ReformerBlock]
    positions: Tensor
    records: list[BlockRecord] = field(default_factory=list)


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x1: Tensor, x2: Tensor, run: ReversibleRun) -> tuple[Tensor, Tensor]:
        run.records = [BlockRecord() for _ in run.blocks]
        with torch.no_grad():
            for block, record in zip(run.blocks, run.records, strict=True):
                x1, x2 = block.forward_recorded(x1, x2, run.positions, record)
        ctx.run = run
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx: Any, dy1: Tensor, dy2: Tensor) -> tuple[Tensor, Tensor, None]:
        y1, y2 = ctx.saved_tensors
        run: ReversibleRun = ctx.run
        for block, record in zip(reversed(run.blocks), reversed(run.records), strict=True):
            y1, y2, dy1, dy2 = block.backward_pass(y1, y2, dy1, dy2, run.positions, record)
        return dy1, dy2, None


def reversible_forward(
    blocks: list[ReformerBlock], x1: Tensor, x2: Tensor, positions: Tensor
) -> tuple[Tensor, Tensor]:
    """Run the blocks storing only the final outputs; gradients flow by recomputation.

    Parameter gradients are accumulated by the backward recomputation itself, so use loss.backward()
    (torch.autograd.grad with respect to parameters does not see them).
    """
    return _ReversibleFunction.apply(x1, x2, ReversibleRun(blocks, positions))


__all__ = ["BlockRecord", "RNGState", "ReversibleRun", "reversible_forward"]
