"""Rotary positions for local and full attention layers.

Why rotary, and only there: a local layer sees the previous `bucket_size` tokens, so the relative offsets its
rotary angles encode never exceed what training saw, at any conversation length; that is what keeps the
model sane far beyond its training sequence length. LSH layers carry no positional signal at all (their
shared query/key vectors are hashed by content; a rotation would scatter one token's hashes by position).
They learn order from the local layers below them and from causality.

Angles are computed in float64: at position 10**6 a float32 angle has an error of ~0.06 rad.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Rotary(nn.Module):
    def __init__(self, d_head: int, base: float) -> None:
        super().__init__()
        self.d_head = d_head
        self.base = base

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate x (B, H, L, D) by its absolute positions (B, L)."""
        # Recomputed per call (cheap) instead of a buffer, so model.half() can never truncate it.
        exponents = torch.arange(0, self.d_head, 2, dtype=torch.float64, device=x.device) / self.d_head
        inv_freq = self.base**-exponents  # (D/2,)
        angles = positions.to(torch.float64)[..., None] * inv_freq  # (B, L, D/2)
        # The rotation itself in float32 (or wider) even for bf16 inputs: one rounding, at the end.
        exact = torch.promote_types(x.dtype, torch.float32)
        cos = angles.cos().to(exact)[:, None]  # (B, 1, L, D/2)
        sin = angles.sin().to(exact)[:, None]
        x1, x2 = x[..., 0::2].to(exact), x[..., 1::2].to(exact)  # (B, H, L, D/2) each
        # (x1 + i x2) * (cos + i sin)
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, H, L, D/2, 2)
        return out.flatten(-2).to(x.dtype)
