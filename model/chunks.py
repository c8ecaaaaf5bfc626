"""The one reshaping trick both chunked attention paths share."""

from __future__ import annotations

import torch
from torch import Tensor


def with_previous_chunk(x: Tensor, chunk_dim: int, fill: float | int) -> Tensor:
    """Chunks (..., C, S, ...) -> (..., C, 2S, ...): each chunk preceded by the previous one.

    `chunk_dim` is the chunk-index dimension C; the positions within a chunk (S) follow it. The first chunk's
    "previous chunk" is `fill`, which callers choose so that it is masked out.
    """
    first = torch.full_like(x.narrow(chunk_dim, 0, 1), fill)
    previous = torch.cat((first, x.narrow(chunk_dim, 0, x.shape[chunk_dim] - 1)), dim=chunk_dim)
    return torch.cat((previous, x), dim=chunk_dim + 1)
