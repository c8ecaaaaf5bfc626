"""Local and full causal attention, and the factory that picks a layer's attention by its kind.

LSH attention lives in lsh.py. All three share one interface:
  forward(x, positions, buckets=None) -> (out, buckets or None)   full-sequence path
  init_state(batch_size, device, dtype) -> layer state
  decode(x, positions, state) -> out                             new tokens after the state; updates it
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .chunked_attention import window_attention
from .config import ReformerConfig
from .lsh import LSHAttention
from .positions import Rotary
from .state import FullLayerState, LocalLayerState


class _QKVAttention(nn.Module):
    """Separate query, key and value projections with rotary positions (local and full layers)."""

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.n_heads, self.d_head = config.n_heads, config.d_head
        inner = config.n_heads * config.d_head
        self.to_qkv = nn.Linear(config.d_model, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, config.d_model)
        self.rotary = Rotary(config.d_head, config.rotary_base)

    def _project(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, d_model) -> rotated q, rotated k, v, each (B, H, L, D)."""
        B, L, _ = x.shape
        qkv = (
            self.to_qkv(x).view(B, L, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        )  # (3, B, H, L, D)
        q, k, v = qkv.unbind(0)
        return self.rotary(q, positions), self.rotary(k, positions), v

    def _merge_heads(self, out: Tensor) -> Tensor:
        B, H, L, D = out.shape
        return self.to_out(out.transpose(1, 2).reshape(B, L, H * D))  # (B, L, d_model)


class LocalAttention(_QKVAttention):
    """Each token attends to itself and the previous `bucket_size` tokens; state: that window."""

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__(config)
        self.window = config.bucket_size

    def forward(
        self, x: Tensor, positions: Tensor, buckets: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        q, k, v = self._project(x, positions)
        return self._merge_heads(window_attention(q, k, v, self.window)), None

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> LocalLayerState:
        shape = (batch_size, self.n_heads, self.window, self.d_head)
        return LocalLayerState(
            keys=torch.zeros(shape, device=device, dtype=dtype),
            values=torch.zeros(shape, device=device, dtype=dtype),
            positions=torch.full((batch_size, self.window), -1, device=device, dtype=torch.long),
        )

    def decode(self, x: Tensor, positions: Tensor, state: LocalLayerState) -> Tensor:
        """New tokens x (B, T, d_model) after the state's last `window` tokens; updates `state`.

        One token scores the state's window plus itself directly (_decode_one); T > 1 puts the state's
        tokens in front of the new ones and runs one chunked pass (window_attention) for all T.
        """
        q, k, v = self._project(x, positions)
        T = x.shape[1]
        if T == 1:
            return self._merge_heads(self._decode_one(q, k, v, positions, state).to(x.dtype))
        all_k = torch.cat((state.keys, k.to(state.keys.dtype)), dim=2)  # (B, H, W + T, D)
        all_v = torch.cat((state.values, v.to(state.values.dtype)), dim=2)
        all_pos = torch.cat((state.positions, positions), dim=1)  # (B, W + T)
        q_all = torch.cat((torch.zeros_like(state.keys), q.to(state.keys.dtype)), dim=2)
        out = window_attention(q_all, all_k, all_v, self.window, valid=all_pos >= 0)[:, :, -T:]
        state.keys = all_k[:, :, -self.window :].contiguous()
        state.values = all_v[:, :, -self.window :].contiguous()
        state.positions = all_pos[:, -self.window :].contiguous()
        return self._merge_heads(out.to(x.dtype))

    def _decode_one(
        self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, state: LocalLayerState
    ) -> Tensor:
        """One token: its window is exactly the state (the last `window` tokens) plus itself, so it scores
        those window + 1 keys directly instead of a chunked pass over 2 x window query slots."""
        D = q.shape[-1]
        all_k = torch.cat((state.keys, k.to(state.keys.dtype)), dim=2)  # (B, H, W + 1, D)
        all_v = torch.cat((state.values, v.to(state.values.dtype)), dim=2)
        all_pos = torch.cat((state.positions, positions), dim=1)  # (B, W + 1)
        # Products in the compute dtype (bf16 under autocast) as in the chunked path, softmax in float32.
        scores = torch.matmul(q, all_k.to(q.dtype).transpose(-1, -2)).float() * D**-0.5  # (B, H, 1, W + 1)
        scores = scores.masked_fill((all_pos < 0)[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.matmul(probs, all_v.to(q.dtype)).float()  # (B, H, 1, D)
        # Shift the window in place: a state that is a view of a batch pool stays one (no copy back).
        state.keys.copy_(all_k[:, :, 1:])
        state.values.copy_(all_v[:, :, 1:])
        state.positions.copy_(all_pos[:, 1:])
        return out


class FullAttention(_QKVAttention):
    """Exact causal attention (SDPA): the honest baseline. Its decode state grows with the history."""

    def forward(
        self, x: Tensor, positions: Tensor, buckets: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        q, k, v = self._project(x, positions)
        return self._merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True)), None

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> FullLayerState:
        empty = torch.zeros(batch_size, self.n_heads, 0, self.d_head, device=device, dtype=dtype)
        return FullLayerState(keys=empty, values=empty.clone())

    def decode(self, x: Tensor, positions: Tensor, state: FullLayerState) -> Tensor:
        q, k, v = self._project(x, positions)
        state.keys = torch.cat((state.keys, k.to(state.keys.dtype)), dim=2)  # (B, H, N, D)
        state.values = torch.cat((state.values, v.to(state.values.dtype)), dim=2)
        T, N = x.shape[1], state.keys.shape[2]
        # New token t (at index N - T + t) sees keys 0 .. N - T + t.
        mask = torch.ones(T, N, dtype=torch.bool, device=x.device).tril(diagonal=N - T)
        out = F.scaled_dot_product_attention(
            q, state.keys.to(q.dtype), state.values.to(q.dtype), attn_mask=mask
        )
        return self._merge_heads(out)


Attention = LSHAttention | LocalAttention | FullAttention


def build_attention(kind: str, config: ReformerConfig) -> Attention:
    if kind == "lsh":
        return LSHAttention(config)
    if kind == "local":
        return LocalAttention(config)
    if kind == "full":
        return FullAttention(config)
    raise ValueError(f"unknown attention kind {kind!r}: use 'lsh', 'local' or 'full'")
