"""Reversible residual blocks: y1 = x1 + f(x2), y2 = x2 + g(y1).

In reversible mode the forward pass stores no activations: the backward pass walks the blocks from the
top, recovering each block's inputs from its outputs (x2 = y2 - g(y1), x1 = y1 - f(x2)) and recomputing
f and g with gradients on. For that to give the gradients of the forward pass, the recomputation must be
the same computation: each block records, in the forward pass, the RNG state before f and before g (dropout
masks replay, without touching the global generator) and the LSH buckets f used (a rounding difference in the
recovered x2 can never move a token to another bucket).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import build_attention
from .autocast import Autocast
from .config import ReformerConfig
from .feedforward import ChunkedFeedForward


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


class ReformerBlock(nn.Module):
    def __init__(self, config: ReformerConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.attn_norm = nn.LayerNorm(config.d_model)
        self.attn = build_attention(kind, config)
        self.ff = ChunkedFeedForward(config)
        self.dropout = config.dropout

    def f(self, x2: Tensor, positions: Tensor, buckets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        out, buckets = self.attn(self.attn_norm(x2), positions, buckets)
        return F.dropout(out, self.dropout, self.training), buckets

    def forward(self, x1: Tensor, x2: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        y1 = x1 + self.f(x2, positions)[0]
        y2 = x2 + self.ff(y1)
        return y1, y2

    def forward_recorded(
        self, x1: Tensor, x2: Tensor, positions: Tensor, record: BlockRecord
    ) -> tuple[Tensor, Tensor]:
        """forward(), remembering what the backward recomputation must replay."""
        record.autocast = Autocast.capture(x2.device)
        record.rng_f = RNGState.capture(x2.device)
        f_out, record.buckets = self.f(x2, positions)
        y1 = x1 + f_out
        record.rng_g = RNGState.capture(y1.device)
        y2 = x2 + self.ff(y1)
        return y1, y2

    def backward_pass(
        self, y1: Tensor, y2: Tensor, dy1: Tensor, dy2: Tensor, positions: Tensor, record: BlockRecord
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """From outputs and their gradients to inputs and theirs; parameter gradients accumulate in .grad."""
        if record.rng_f is None or record.rng_g is None or record.autocast is None:
            raise RuntimeError("backward_pass needs the record that forward_recorded filled in")
        # g, chunk by chunk in the forward pass's order: the d_ff activation exists for one chunk at a time.
        y1 = y1.detach().requires_grad_()
        g_chunks = []
        with record.rng_g.replay(), record.autocast.context(), torch.enable_grad():
            for y1_chunk, dy2_chunk in zip(self.ff.chunks(y1), self.ff.chunks(dy2), strict=True):
                g_chunk = self.ff.forward_chunk(y1_chunk)
                torch.autograd.backward(g_chunk, dy2_chunk)
                g_chunks.append(g_chunk.detach())
        with torch.no_grad():
            x2 = y2 - torch.cat(g_chunks, dim=1)  # x2 = y2 - g(y1)
            dy1 = dy1 + y1.grad  # total gradient reaching y1: directly and through g
        x2 = x2.detach().requires_grad_()
        with record.rng_f.replay(), record.autocast.context(), torch.enable_grad():
            f_out, _ = self.f(x2, positions, record.buckets)
            torch.autograd.backward(f_out, dy1)
        with torch.no_grad():
            x1 = y1 - f_out  # x1 = y1 - f(x2)
            dx2 = dy2 + x2.grad
        return x1.detach(), x2.detach(), dy1, dx2


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


__all__ = ["Autocast", "BlockRecord", "RNGState", "ReformerBlock", "ReversibleRun", "reversible_forward"]
