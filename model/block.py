"""ReformerBlock: one layer, y1 = x1 + f(x2), y2 = x2 + g(y1), with f = attention and g = feed-forward.

The block runs either way: forward() as an ordinary module (standard mode, autograd stores activations),
or forward_recorded() + backward_pass() under reversible_forward (model/reversible.py), which stores
nothing and recomputes f and g from the block's outputs in the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import build_attention
from .autocast import Autocast
from .config import ReformerConfig
from .feedforward import ChunkedFeedForward
from .reversible import BlockRecord, RNGState


class ReformerBlock(nn.Module):
    """f = dropout(attention(LayerNorm(x2))) of the layer's kind; g = the chunked feed-forward."""

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
            dy1 = dy1 + _grad(y1)  # total gradient reaching y1: directly and through g
        x2 = x2.detach().requires_grad_()
        with record.rng_f.replay(), record.autocast.context(), torch.enable_grad():
            f_out, _ = self.f(x2, positions, record.buckets)
            torch.autograd.backward(f_out, dy1)
        with torch.no_grad():
            x1 = y1 - f_out  # x1 = y1 - f(x2)
            dx2 = dy2 + _grad(x2)
        return x1.detach(), x2.detach(), dy1, dx2


def _grad(t: Tensor) -> Tensor:
    """The gradient the recomputation just accumulated into a leaf it made."""
    if t.grad is None:
        raise RuntimeError("the recomputed sub-layer did not reach its input: nothing to reverse")
    return t.grad
