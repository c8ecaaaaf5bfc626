"""Chunked position-wise feed-forward: the (L, d_ff) activation never exists for the whole sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ReformerConfig


class ChunkedFeedForward(nn.Module):
    """g(x) = Dropout(W2 GELU(W1 LayerNorm(x))), applied `chunk_size` positions at a time.

    Each position is independent, so chunking changes nothing but peak memory. The reversible backward
    pass walks the same chunks in the same order (ReformerBlock.backward_pass), so dropout masks replay
    exactly.
    """

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model)
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)
        self.dropout = config.dropout
        self.chunk_size = config.ff_chunk_size

    def chunks(self, x: Tensor) -> tuple[Tensor, ...]:
        return x.split(self.chunk_size, dim=1)  # views of (B, <=chunk, d_model)

    def forward_chunk(self, x: Tensor) -> Tensor:
        hidden = F.gelu(self.fc1(self.norm(x)))  # (B, chunk, d_ff)
        return F.dropout(self.fc2(hidden), self.dropout, self.training)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.forward_chunk(chunk) for chunk in self.chunks(x)], dim=1)
