"""Strictly causal LSH attention with a bounded decode state.

Semantics (docs/DESIGN.md, "Attention"): per head and hash round, queries and keys are hashed into one of
`n_buckets` buckets by a fixed random rotation. A query attends to the at most `bucket_size` most recent
earlier keys whose key bucket is its query bucket; rounds are combined with their logsumexp weights. Two
variants (`ReformerConfig.shared_qk`):

- separate Q/K: queries and keys come from their own projections, hashed with the same rotations; a query
  also always sees its own key, at its real score. Queries and keys sort differently, so each query's
  window is gathered from the keys' sorted order (key_windows.py).
- shared QK (the Reformer paper's): keys are the normalised queries, so a token's query and key share a
  bucket, and a token attends to itself only when it has nothing else. Sorting all entries by (bucket,
  position) puts each query's candidate keys right before it, within `bucket_size` places, so the
  full-sequence path is chunked attention over the sorted order (chunked_attention.py).

Either way the output at position t depends only on tokens <= t: which keys a query sees never depends on
where later tokens land. Decoding keeps, per key bucket, the last `bucket_size` keys, which are exactly the
keys any future query of that bucket can see.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .chunked_attention import sorted_chunk_attention
from .config import ReformerConfig
from .key_windows import key_window_attention
from .state import LSHLayerState


def hash_buckets(qk: Tensor, rotations: Tensor) -> Tensor:
    """Angular LSH: bucket = argmax([xR; -xR]) for each head and round.

    qk (B, H, L, D), rotations (H, R, D, NB/2) -> buckets (B, H, R, L) int64. In float32 whatever the
    autocast: a bf16 rotation would move near-tied tokens to other buckets than the fp32 one the model
    was trained with, and a bucket is all or nothing for the keys a query sees.
    """
    with torch.autocast(qk.device.type, enabled=False):
        rotated = torch.einsum("bhld,hrdk->bhrlk", qk.float(), rotations.float())  # (B, H, R, L, NB/2)
        return torch.cat((rotated, -rotated), dim=-1).argmax(dim=-1)


def combine_rounds(out: Tensor, lse: Tensor) -> Tensor:
    """Weight each round's output by its share of the total attention mass.

    out (B, H, R, T, D), lse (B, H, R, T) -> (B, H, T, D) in out's dtype; the weights and the weighted sum
    are float32 (or wider) whatever the autocast.
    """
    exact = torch.promote_types(lse.dtype, torch.float32)
    with torch.autocast(out.device.type, enabled=False):
        weights = torch.softmax(lse.to(exact), dim=2)  # (B, H, R, T): exp(lse_r) / sum_r exp(lse_r)
        return (out.to(exact) * weights[..., None]).sum(dim=2).to(out.dtype)


class LSHAttention(nn.Module):
    """LSH attention (shared QK or separate Q/K): full-sequence forward(), and decode() with a per-bucket
    state."""

    rotations: Tensor  # (H, R, D, NB/2), a buffer

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.n_heads, self.d_head = config.n_heads, config.d_head
        self.n_hashes, self.n_buckets = config.n_hashes, config.n_buckets
        self.bucket_size = config.bucket_size
        self.self_score = config.self_attn_score
        self.shared_qk = config.shared_qk
        inner = config.n_heads * config.d_head
        if config.shared_qk:
            self.to_qk = nn.Linear(config.d_model, inner, bias=False)
        else:
            self.to_q = nn.Linear(config.d_model, inner, bias=False)
            self.to_k = nn.Linear(config.d_model, inner, bias=False)
        self.to_v = nn.Linear(config.d_model, inner, bias=False)
        self.to_out = nn.Linear(inner, config.d_model)
        # Fixed per layer and saved with the weights: hashing is deterministic at inference, and the
        # reversible backward pass hashes with the very rotations the forward pass used.
        rotations = torch.randn(config.n_heads, config.n_hashes, config.d_head, config.n_buckets // 2)
        self.register_buffer("rotations", rotations)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, d_model) -> queries (not yet scaled), keys, values, each (B, H, L, D).

        Shared QK: the keys are the unit-length queries."""
        B, L, _ = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(B, L, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, L, D)

        if self.shared_qk:
            q = heads(self.to_qk(x))
            k = F.normalize(q, dim=-1)
        else:
            q, k = heads(self.to_q(x)), heads(self.to_k(x))
        return q, k, heads(self.to_v(x))

    def _hash(self, q: Tensor, k: Tensor) -> Tensor:
        """Buckets (B, H, R, L) of the shared query/key; with separate Q/K, (B, H, 2R, L): the R rounds'
        query buckets, then the R rounds' key buckets (one tensor, so the reversible record keeps both)."""
        if self.shared_qk:
            return hash_buckets(q, self.rotations)
        return torch.cat((hash_buckets(q, self.rotations), hash_buckets(k, self.rotations)), dim=2)

    def _merge_heads(self, out: Tensor) -> Tensor:
        B, H, L, D = out.shape
        return self.to_out(out.transpose(1, 2).reshape(B, L, H * D))  # (B, L, d_model)

    def forward(
        self, x: Tensor, positions: Tensor, buckets: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Full-sequence path. positions (B, L); buckets (from _hash) of an earlier pass to reuse."""
        q, k, v = self._project(x)
        if buckets is None:
            buckets = self._hash(q, k)
        q = q * self.d_head**-0.5
        B, H, L, _ = q.shape
        pos = positions[:, None, None, :].expand(B, H, self.n_hashes, L)
        # One set of entries (G = 1) that every hash round sorts its own way.
        q, k, v = q[:, :, None], k[:, :, None], v[:, :, None]  # (B, H, 1, L, D)
        if self.shared_qk:
            out, lse = sorted_chunk_attention(q, k, v, buckets, pos, self.bucket_size, self.self_score)
        else:
            q_buckets, k_buckets = buckets.split(self.n_hashes, dim=2)
            out, lse = key_window_attention(q, k, v, q_buckets, pos, k_buckets, pos, self.bucket_size, 0)
        return self._merge_heads(combine_rounds(out, lse)), buckets

    # ---- decoding -------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> LSHLayerState:
        shape = (batch_size, self.n_heads, self.n_hashes, self.n_buckets, self.bucket_size)
        return LSHLayerState(
            keys=torch.zeros(*shape, self.d_head, device=device, dtype=dtype),
            values=torch.zeros(*shape, self.d_head, device=device, dtype=dtype),
            positions=torch.full(shape, -1, device=device, dtype=torch.long),
        )

    def decode(self, x: Tensor, positions: Tensor, state: LSHLayerState) -> Tensor:
        """New tokens x (B, T, d_model) at positions (B, T), after what `state` holds; updates `state`."""
        q, k, v = self._project(x)
        buckets = self._hash(q, k)  # (B, H, R, T), or (B, H, 2R, T) with separate Q/K
        if self.shared_qk:
            q_buckets = k_buckets = buckets
        else:
            q_buckets, k_buckets = buckets.split(self.n_hashes, dim=2)
        q = q * self.d_head**-0.5
        if x.shape[1] == 1:
            out = self._decode_one(q, k, v, q_buckets, k_buckets, positions, state)
        else:
            out = self._decode_many(q, k, v, q_buckets, k_buckets, positions, state)
        return self._merge_heads(out)

    def _decode_one(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_buckets: Tensor,
        k_buckets: Tensor,
        positions: Tensor,
        state: LSHLayerState,
    ) -> Tensor:
        """One token: read its query bucket's window directly, no sort. O(bucket_size) per head and round.

        The state is viewed as (B * H * R * NB) bucket rows of S slots; each (sequence, head, round) reads
        the row its query hashed to and then rewrites the row its key hashed to (the same row with shared
        QK), by plain row indexing (memcpy-sized, unlike gather).
        """
        B, H, _, D = q.shape
        R, NB, S = self.n_hashes, self.n_buckets, self.bucket_size
        if not state.keys.is_contiguous():  # e.g. a state sliced out of a batch: rows must be views
            state.keys, state.values = state.keys.contiguous(), state.values.contiguous()
            state.positions = state.positions.contiguous()
        base = torch.arange(B * H * R, device=q.device) * NB
        read = base + q_buckets.reshape(-1)  # (B*H*R,) one bucket row per sequence, head and round
        write = base + k_buckets.reshape(-1)
        keys = state.keys.view(-1, S, D)
        values = state.values.view(-1, S, D)
        slot_pos = state.positions.view(-1, S)
        window_k = keys[read].view(B, H, R, S, D)
        window_v = values[read].view(B, H, R, S, D)
        window_pos = slot_pos[read].view(B, H, R, S)

        # Products in the compute dtype (bf16 under autocast) as in the chunked path, statistics in float32.
        query = q[:, :, 0]  # (B, H, D)
        scores = torch.einsum("bhd,bhrsd->bhrs", query, window_k.to(query.dtype)).float()  # (B, H, R, S)
        scores = scores.masked_fill(window_pos < 0, float("-inf"))
        if self.shared_qk:  # its own key only when there is nothing else
            own = torch.full_like(scores[..., :1], self.self_score)
        else:  # its own key, always, at its real score
            # Elementwise in float32 from the compute-dtype values, as key_windows.py scores the own key.
            own_score = (query.float() * k[:, :, 0].float()).sum(-1)  # (B, H)
            own = own_score[:, :, None, None].expand(B, H, R, 1)
        scores = torch.cat((scores, own), dim=-1)  # (B, H, R, S + 1)
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.exp(scores - lse)
        v_new = v[:, :, None].expand(-1, -1, R, -1, -1).to(window_v.dtype)  # (B, H, R, 1, D)
        if self.shared_qk:  # the own slot is one more key of the product, as in chunked_attention.py
            all_v = torch.cat((window_v, v_new), dim=3)  # (B, H, R, S + 1, D)
            out = torch.einsum("bhrs,bhrsd->bhrd", probs.to(all_v.dtype), all_v).float()
        else:  # the window's values by a product, the own value added in float32, as key_windows.py does
            pair = torch.einsum("bhrs,bhrsd->bhrd", probs[..., :S].to(query.dtype), window_v.to(query.dtype))
            out = pair.float() + probs[..., S:] * v[:, :, 0, None].float()  # (B, H, R, D)
        combined = combine_rounds(out[:, :, :, None].to(v.dtype), lse)  # (B, H, 1, D)

        # Append to the key's bucket: drop its oldest slot, the new token becomes slot S-1.
        k_new = k[:, :, None].expand(-1, -1, R, -1, -1).to(keys.dtype)  # (B, H, R, 1, D)
        pos_new = positions[:, None, None, :].expand(B, H, R, 1)
        if not self.shared_qk:  # the key's row is not the window just read
            window_k = keys[write].view(B, H, R, S, D)
            window_v = values[write].view(B, H, R, S, D)
            window_pos = slot_pos[write].view(B, H, R, S)
        keys[write] = torch.cat((window_k[..., 1:, :], k_new), dim=3).view(-1, S, D)
        values[write] = torch.cat((window_v[..., 1:, :], v_new), dim=3).view(-1, S, D)
        slot_pos[write] = torch.cat((window_pos[..., 1:], pos_new), dim=3).view(-1, S)
        return combined

    def _decode_many(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_buckets: Tensor,
        k_buckets: Tensor,
        positions: Tensor,
        state: LSHLayerState,
    ) -> Tensor:
        """Parallel prefill: the state's entries go in front of the new tokens and the full-sequence path
        runs once over all of them; only the new tokens query."""
        B, H, T, _ = q.shape
        R, NB, S = self.n_hashes, self.n_buckets, self.bucket_size
        old_k = state.keys.flatten(3, 4)  # (B, H, R, NB*S, D)
        old_v = state.values.flatten(3, 4)
        old_pos = state.positions.flatten(3, 4)  # (B, H, R, NB*S)
        slot_bucket = torch.arange(NB, device=q.device).repeat_interleave(S).expand_as(old_pos)
        old_buckets = torch.where(old_pos >= 0, slot_bucket, NB)  # empty slots: bucket NB, seen by no one

        expand = (-1, -1, R, -1, -1)
        new_pos = positions[:, None, None, :].expand(B, H, R, T)
        new_k, new_v = k[:, :, None].expand(*expand), v[:, :, None].expand(*expand)  # (B, H, R, T, D)
        all_k = torch.cat((old_k, new_k.to(old_k.dtype)), dim=3)
        all_v = torch.cat((old_v, new_v.to(old_v.dtype)), dim=3)
        all_b = torch.cat((old_buckets, k_buckets), dim=3)
        all_pos = torch.cat((old_pos, new_pos), dim=3)
        if self.shared_qk:
            all_q = torch.cat((torch.zeros_like(old_k), q[:, :, None].expand(*expand)), dim=3)
            out, lse = sorted_chunk_attention(all_q, all_k, all_v, all_b, all_pos, S, self.self_score)
            out, lse = out[..., -T:, :], lse[..., -T:]
        else:  # only the new tokens are queries; new token i's own key is entry NB*S + i
            out, lse = key_window_attention(
                q[:, :, None], all_k, all_v, q_buckets, new_pos, all_b, all_pos, S, NB * S
            )
            # Rounded as the forward pass rounds it (to the new values' dtype: bf16 under autocast), whatever
            # the state's dtype: a float32 state must not give more exact outputs than a bf16 one.
            out = out.to(v.dtype)
        combined = combine_rounds(out, lse)  # (B, H, T, D)

        self._append(state, new_k, new_v, new_pos, k_buckets)
        return combined

    def _append(self, state: LSHLayerState, k: Tensor, v: Tensor, pos: Tensor, buckets: Tensor) -> None:
        """Keep, per bucket, the last `bucket_size` of the old entries and the new ones.

        k, v (B, H, R, T, D); pos, buckets (B, H, R, T).
        """
        B, H, R, _, D = k.shape
        NB, S = self.n_buckets, self.bucket_size
        one_hot = F.one_hot(buckets, NB)  # (B, H, R, T, NB)
        counts = one_hot.sum(dim=3)  # (B, H, R, NB): new tokens per bucket
        # How many same-bucket new tokens come after each new token.
        after = (one_hot.flip(3).cumsum(3).flip(3) - one_hot).gather(4, buckets[..., None]).squeeze(4)

        # Old slot s + count moves to slot s; slots that fall off the front are overwritten below.
        source = torch.arange(S, device=k.device) + counts[..., None]  # (B, H, R, NB, S)
        kept = source < S
        source = source.clamp(max=S - 1)
        index = source[..., None].expand(-1, -1, -1, -1, -1, D)
        keys = state.keys.gather(4, index)
        values = state.values.gather(4, index)
        positions = torch.where(kept, state.positions.gather(4, source), -1)

        # New token with `after` successors in its bucket lands at slot S-1-after, if that is >= 0;
        # the others go to a scratch slot at the end that is then dropped.
        target = torch.where(after < S, buckets * S + (S - 1 - after), NB * S)  # (B, H, R, T)
        flat_k = torch.cat((keys.flatten(3, 4), keys.new_zeros(B, H, R, 1, D)), dim=3)
        flat_v = torch.cat((values.flatten(3, 4), values.new_zeros(B, H, R, 1, D)), dim=3)
        flat_pos = torch.cat((positions.flatten(3, 4), positions.new_full((B, H, R, 1), -1)), dim=3)
        flat_k.scatter_(3, target[..., None].expand(-1, -1, -1, -1, D), k.to(flat_k.dtype))
        flat_v.scatter_(3, target[..., None].expand(-1, -1, -1, -1, D), v.to(flat_v.dtype))
        flat_pos.scatter_(3, target, pos)
        state.keys = flat_k[..., :-1, :].reshape(B, H, R, NB, S, D).contiguous()
        state.values = flat_v[..., :-1, :].reshape(B, H, R, NB, S, D).contiguous()
        state.positions = flat_pos[..., :-1].reshape(B, H, R, NB, S).contiguous()
