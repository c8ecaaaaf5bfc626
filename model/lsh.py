"""Strictly causal LSH attention with a bounded decode state.

Semantics (DESIGN.md, "The model"): per head and hash round, each token is hashed into one of `n_buckets`
buckets by a fixed random rotation of its shared query/key vector. A query attends to the at most
`bucket_size` most recent earlier keys of its own bucket, and to itself only when it has nothing else. Rounds
are combined with their logsumexp weights.

Sorting all entries by (bucket, position) puts each query's candidate keys right before it, within
`bucket_size` places, so the full-sequence path is chunked attention over the sorted order (own chunk plus
the previous one) with a same-bucket and rank-distance mask. The output at position t depends only on tokens
<= t: which keys a query sees never depends on where later tokens land. Decoding keeps, per bucket, the last
`bucket_size` entries, which are exactly the keys any future query of that bucket can see.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autocast import Autocast
from .config import ReformerConfig
from .state import LSHLayerState

# Sort key = bucket * _POSITION_SPAN + position; positions stay far below 2**40.
_POSITION_SPAN = 1 << 40


def hash_buckets(qk: Tensor, rotations: Tensor) -> Tensor:
    """Angular LSH: bucket = argmax([xR; -xR]) for each head and round.

    qk (B, H, L, D), rotations (H, R, D, NB/2) -> buckets (B, H, R, L) int64.
    """
    rotated = torch.einsum("bhld,hrdk->bhrlk", qk.float(), rotations.float())  # (B, H, R, L, NB/2)
    return torch.cat((rotated, -rotated), dim=-1).argmax(dim=-1)


# Score elements (query x key pairs, all batch rows, heads and rounds) one group of chunks may hold at once:
# ~8 MB of float32 scores, whatever the sequence length.
_GROUP_SCORES = 1 << 21


def sorted_chunk_attention(
    q: Tensor, k: Tensor, v: Tensor, buckets: Tensor, positions: Tensor, bucket_size: int, self_score: float
) -> tuple[Tensor, Tensor]:
    """Attention of every entry over its bucket's `bucket_size` most recent earlier entries.

    q, k, v (B, H, R, N, D); buckets, positions (B, H, R, N). Entries that are not real keys carry a bucket
    id no real query has (e.g. n_buckets). Returns outputs (B, H, R, N, D) and their logsumexp (B, H, R, N),
    in the entries' original order.
    """
    N, D = q.shape[-2:]
    S = bucket_size
    order = (buckets * _POSITION_SPAN + positions).argsort(dim=-1)  # (B, H, R, N)
    gather = order[..., None].expand(-1, -1, -1, -1, D)
    qs, ks, vs = q.gather(3, gather), k.gather(3, gather), v.gather(3, gather)  # (B, H, R, N, D)
    bs = buckets.gather(3, order)  # (B, H, R, N)
    pad = (-N) % S
    if pad:
        qs, ks, vs = (F.pad(t, (0, 0, 0, pad)) for t in (qs, ks, vs))
        bs = F.pad(bs, (0, pad), value=-1)  # bucket -1: never anyone's bucket
    out, lse = SortedChunkAttention.apply(qs, ks, vs, bs, S, self_score)
    out, lse = out[..., :N, :].to(v.dtype), lse[..., :N]
    # Undo the sort: entry order[n] sits at sorted place n.
    unsorted_out = torch.empty_like(out).scatter_(3, gather, out)
    unsorted_lse = torch.empty_like(lse).scatter_(3, order, lse)
    return unsorted_out, unsorted_lse


class SortedChunkAttention(torch.autograd.Function):
    """Chunked attention over entries already sorted by (bucket, position), a group of chunks at a time.

    qs, ks, vs (B, H, R, n, D) with n a multiple of S = bucket_size; bs (B, H, R, n) their buckets. Each chunk
    of S queries attends to the previous chunk and itself: same bucket only, at most S places back in the
    sorted order; its own slot scores `self_score` (a constant), so it wins only when nothing else is there.
    Returns outputs (B, H, R, n, D) and logsumexps (B, H, R, n) in float32 (float64 for float64 inputs).

    Memory-efficient in the way flash attention is: the forward pass keeps only its inputs, outputs and
    logsumexps, and the backward pass recomputes one group's scores at a time. The (n x 2S) scores, masks and
    probabilities never exist for the whole sequence, in either pass.
    """

    @staticmethod
    def forward(
        ctx: Any, qs: Tensor, ks: Tensor, vs: Tensor, bs: Tensor, bucket_size: int, self_score: float
    ) -> tuple[Tensor, Tensor]:
        B, H, R, n, D = qs.shape
        out = qs.new_empty((B, H, R, n, D), dtype=_exact(qs.dtype))
        lse = qs.new_empty((B, H, R, n), dtype=_exact(qs.dtype))
        for first, last in _groups(qs.shape, bucket_size):
            probs, group_lse, vc = _group_probs(qs, ks, vs, bs, first, last, bucket_size, self_score)
            rows = slice(first * bucket_size, last * bucket_size)
            out[..., rows, :] = (probs @ vc).flatten(3, 4)
            lse[..., rows] = group_lse.flatten(3, 4)
        ctx.save_for_backward(qs, ks, vs, bs, out, lse)
        ctx.bucket_size, ctx.self_score = bucket_size, self_score
        # The backward pass recomputes the probabilities from the saved logsumexps: it must compute the
        # scores exactly as this pass did, so it re-enters this pass's autocast setting.
        ctx.autocast = Autocast.capture(qs.device)
        return out, lse

    @staticmethod
    def backward(ctx: Any, d_out: Tensor, d_lse: Tensor) -> tuple[Tensor | None, ...]:
        qs, ks, vs, bs, out, lse = ctx.saved_tensors
        S = ctx.bucket_size
        d_q, d_k, d_v = (torch.zeros_like(t, dtype=_exact(t.dtype)) for t in (qs, ks, vs))
        with ctx.autocast.context():
            for first, last in _groups(qs.shape, S):
                rows = slice(first * S, last * S)
                c = last - first
                probs, _, vc = _group_probs(qs, ks, vs, bs, first, last, S, ctx.self_score, lse[..., rows])
                g_out = d_out[..., rows, :].to(out.dtype).unflatten(3, (c, S))  # (B, H, R, c, S, D)
                # d(score) = p * (d(p) - sum_j p_j d(p_j) + d(lse)); that sum is d_out . out per query.
                delta = (g_out * out[..., rows, :].unflatten(3, (c, S))).sum(-1, keepdim=True)
                g_lse = d_lse[..., rows].to(lse.dtype).unflatten(3, (c, S))[..., None]
                d_scores = probs * (g_out @ vc.transpose(-1, -2) - delta + g_lse)  # (B, H, R, c, S, 2S)
                d_scores[..., _self_slot(S, qs.device)] = 0.0  # the own slot's score is a constant
                qc = qs[..., rows, :].to(d_q.dtype).unflatten(3, (c, S))
                kc = _with_previous(ks, first, last, S, 0.0).to(d_k.dtype)
                d_q[..., rows, :] = (d_scores @ kc).flatten(3, 4)
                _fold_into(d_k, d_scores.transpose(-1, -2) @ qc, first, last, S)
                _fold_into(d_v, probs.transpose(-1, -2) @ g_out, first, last, S)
        return d_q.to(qs.dtype), d_k.to(ks.dtype), d_v.to(vs.dtype), None, None, None


def _exact(dtype: torch.dtype) -> torch.dtype:
    """The dtype attention scores are accumulated in: float32, or the input's if wider."""
    return torch.promote_types(dtype, torch.float32)


def _groups(shape: torch.Size, bucket_size: int) -> list[tuple[int, int]]:
    """[first, last) chunk ranges small enough that a group's scores stay near _GROUP_SCORES elements."""
    B, H, R, n, _ = shape
    chunks = n // bucket_size
    size = max(1, _GROUP_SCORES // (B * H * R * bucket_size * 2 * bucket_size))
    return [(first, min(chunks, first + size)) for first in range(0, chunks, size)]


def _with_previous(x: Tensor, first: int, last: int, S: int, fill: float) -> Tensor:
    """Chunks first..last-1 of x (B, H, R, n, ...), each preceded by the chunk before it (`fill` before
    chunk 0): (B, H, R, c, 2S, ...)."""
    c = last - first
    own = x[:, :, :, first * S : last * S].unflatten(3, (c, S))
    if first > 0:
        previous = x[:, :, :, (first - 1) * S : (last - 1) * S].unflatten(3, (c, S))
    else:
        before = torch.full_like(x[:, :, :, :S], fill)
        previous = torch.cat((before, x[:, :, :, : (last - 1) * S]), dim=3).unflatten(3, (c, S))
    return torch.cat((previous, own), dim=4)


def _fold_into(grad: Tensor, chunk_grad: Tensor, first: int, last: int, S: int) -> None:
    """Add the (B, H, R, c, 2S, D) gradients of chunks' [previous, own] keys into grad (B, H, R, n, D)."""
    c = last - first
    grad[..., first * S : last * S, :] += chunk_grad[..., S:, :].flatten(3, 4)
    if first > 0:
        grad[..., (first - 1) * S : (last - 1) * S, :] += chunk_grad[..., :S, :].flatten(3, 4)
    elif c > 1:  # chunk 0's previous chunk is the fill: no gradient
        grad[..., : (last - 1) * S, :] += chunk_grad[..., 1:, :S, :].flatten(3, 4)


def _self_slot(S: int, device: torch.device) -> Tensor:
    """(S, 2S) True where key j (previous chunk then own chunk) is query i itself."""
    return torch.arange(2 * S, device=device)[None, :] == torch.arange(S, device=device)[:, None] + S


def _group_probs(
    qs: Tensor,
    ks: Tensor,
    vs: Tensor,
    bs: Tensor,
    first: int,
    last: int,
    S: int,
    self_score: float,
    lse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Chunks first..last-1: attention probabilities (B, H, R, c, S, 2S), logsumexps (B, H, R, c, S) and the
    chunks' values (B, H, R, c, 2S, D), all in float32 or wider. A known `lse` (B, H, R, c*S) is reused."""
    c = last - first
    qc = qs[..., first * S : last * S, :].to(_exact(qs.dtype)).unflatten(3, (c, S))  # (B, H, R, c, S, D)
    kc = _with_previous(ks, first, last, S, 0.0).to(_exact(ks.dtype))  # (B, H, R, c, 2S, D)
    vc = _with_previous(vs, first, last, S, 0.0).to(_exact(vs.dtype))
    bq = bs[..., first * S : last * S].unflatten(3, (c, S))  # (B, H, R, c, S)
    bk = _with_previous(bs, first, last, S, -1)  # (B, H, R, c, 2S)

    scores = qc @ kc.transpose(-1, -2)  # (B, H, R, c, S, 2S)
    # Rank distance from query i (own chunk) to key j (previous chunk then own chunk) in the sorted order.
    distance = torch.arange(S, device=qs.device)[:, None] + S - torch.arange(2 * S, device=qs.device)
    earlier = (distance > 0) & (distance <= S)  # (S, 2S)
    scores = scores.masked_fill(~((bq[..., :, None] == bk[..., None, :]) & earlier), float("-inf"))
    scores[..., distance == 0] = self_score
    # (B, H, R, c, S)
    group_lse = torch.logsumexp(scores, dim=-1) if lse is None else lse.unflatten(3, (c, S))
    return torch.exp(scores - group_lse[..., None]), group_lse, vc


def combine_rounds(out: Tensor, lse: Tensor) -> Tensor:
    """Weight each round's output by its share of the total attention mass.

    out (B, H, R, T, D), lse (B, H, R, T) -> (B, H, T, D)
    """
    weights = torch.softmax(lse, dim=2)  # (B, H, R, T): exp(lse_r) / sum_r exp(lse_r)
    return (out * weights[..., None].to(out.dtype)).sum(dim=2)


class LSHAttention(nn.Module):
    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.n_heads, self.d_head = config.n_heads, config.d_head
        self.n_hashes, self.n_buckets = config.n_hashes, config.n_buckets
        self.bucket_size = config.bucket_size
        self.self_score = config.self_attn_score
        inner = config.n_heads * config.d_head
        self.to_qk = nn.Linear(config.d_model, inner, bias=False)
        self.to_v = nn.Linear(config.d_model, inner, bias=False)
        self.to_out = nn.Linear(inner, config.d_model)
        # Fixed per layer and saved with the weights: hashing is deterministic at inference, and the
        # reversible backward pass hashes with the very rotations the forward pass used.
        rotations = torch.randn(config.n_heads, config.n_hashes, config.d_head, config.n_buckets // 2)
        self.register_buffer("rotations", rotations)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, d_model) -> shared qk, unit keys, values, each (B, H, L, D)."""
        B, L, _ = x.shape
        qk = self.to_qk(x).view(B, L, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, L, D)
        v = self.to_v(x).view(B, L, self.n_heads, self.d_head).transpose(1, 2)
        keys = F.normalize(qk, dim=-1)
        return qk, keys, v

    def _merge_heads(self, out: Tensor) -> Tensor:
        B, H, L, D = out.shape
        return self.to_out(out.transpose(1, 2).reshape(B, L, H * D))  # (B, L, d_model)

    def forward(
        self, x: Tensor, positions: Tensor, buckets: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Full-sequence path. positions (B, L); buckets (B, H, R, L) from an earlier pass to reuse."""
        qk, keys, v = self._project(x)
        if buckets is None:
            buckets = hash_buckets(qk, self.rotations)
        R = self.n_hashes
        q = qk * self.d_head**-0.5
        expand = (-1, -1, R, -1, -1)
        pos = positions[:, None, None, :].expand_as(buckets)
        out, lse = sorted_chunk_attention(
            q[:, :, None].expand(*expand),
            keys[:, :, None].expand(*expand),
            v[:, :, None].expand(*expand),
            buckets,
            pos,
            self.bucket_size,
            self.self_score,
        )
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
        qk, keys, v = self._project(x)
        buckets = hash_buckets(qk, self.rotations)  # (B, H, R, T)
        q = qk * self.d_head**-0.5
        if x.shape[1] == 1:
            out = self._decode_one(q, keys, v, buckets, positions, state)
        else:
            out = self._decode_many(q, keys, v, buckets, positions, state)
        return self._merge_heads(out)

    def _decode_one(
        self, q: Tensor, k: Tensor, v: Tensor, buckets: Tensor, positions: Tensor, state: LSHLayerState
    ) -> Tensor:
        """One token: read its bucket's window directly, no sort. O(bucket_size) per head and round.

        The state is viewed as (B * H * R * NB) bucket rows of S slots; each (sequence, head, round) reads
        and rewrites the one row its token hashed to, by plain row indexing (memcpy-sized, unlike gather).
        """
        B, H, _, D = q.shape
        R, NB, S = self.n_hashes, self.n_buckets, self.bucket_size
        if not state.keys.is_contiguous():  # e.g. a state sliced out of a batch: rows must be views
            state.keys, state.values = state.keys.contiguous(), state.values.contiguous()
            state.positions = state.positions.contiguous()
        base = torch.arange(B * H * R, device=q.device) * NB
        rows = base + buckets.reshape(-1)  # (B*H*R,) one bucket row per sequence, head and round
        keys = state.keys.view(-1, S, D)
        values = state.values.view(-1, S, D)
        slot_pos = state.positions.view(-1, S)
        window_k = keys[rows].view(B, H, R, S, D)
        window_v = values[rows].view(B, H, R, S, D)
        window_pos = slot_pos[rows].view(B, H, R, S)

        scores = torch.einsum("bhd,bhrsd->bhrs", q[:, :, 0].float(), window_k.float())  # (B, H, R, S)
        scores = scores.masked_fill(window_pos < 0, float("-inf"))
        own = torch.full_like(scores[..., :1], self.self_score)
        scores = torch.cat((scores, own), dim=-1)  # (B, H, R, S + 1)
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.exp(scores - lse)
        v_new = v[:, :, None].expand(-1, -1, R, -1, -1).to(window_v.dtype)  # (B, H, R, 1, D)
        all_v = torch.cat((window_v, v_new), dim=3)  # (B, H, R, S + 1, D)
        out = torch.einsum("bhrs,bhrsd->bhrd", probs, all_v.float())
        combined = combine_rounds(out[:, :, :, None].to(v.dtype), lse)  # (B, H, 1, D)

        # Append to the bucket: drop its oldest slot, the new token becomes slot S-1.
        k_new = k[:, :, None].expand(-1, -1, R, -1, -1).to(window_k.dtype)
        pos_new = positions[:, None, None, :].expand(B, H, R, 1)
        keys[rows] = torch.cat((window_k[..., 1:, :], k_new), dim=3).view(-1, S, D)
        values[rows] = all_v[..., 1:, :].reshape(-1, S, D)
        slot_pos[rows] = torch.cat((window_pos[..., 1:], pos_new), dim=3).view(-1, S)
        return combined

    def _decode_many(
        self, q: Tensor, k: Tensor, v: Tensor, buckets: Tensor, positions: Tensor, state: LSHLayerState
    ) -> Tensor:
        """Parallel prefill: the state's entries go in front of the new tokens and the chunked sorted path
        runs once over all of them; only the new tokens' outputs are kept."""
        B, H, T, _ = q.shape
        R, NB, S = self.n_hashes, self.n_buckets, self.bucket_size
        old_k = state.keys.flatten(3, 4)  # (B, H, R, NB*S, D)
        old_v = state.values.flatten(3, 4)
        old_pos = state.positions.flatten(3, 4)  # (B, H, R, NB*S)
        slot_bucket = torch.arange(NB, device=q.device).repeat_interleave(S).expand_as(old_pos)
        old_buckets = torch.where(old_pos >= 0, slot_bucket, NB)  # empty slots: bucket NB, seen by no one

        expand = (-1, -1, R, -1, -1)
        new_pos = positions[:, None, None, :].expand(B, H, R, T)
        all_q = torch.cat((torch.zeros_like(old_k), q[:, :, None].expand(*expand)), dim=3)
        all_k = torch.cat((old_k, k[:, :, None].expand(*expand)), dim=3)
        all_v = torch.cat((old_v, v[:, :, None].expand(*expand)), dim=3)
        all_b = torch.cat((old_buckets, buckets), dim=3)
        all_pos = torch.cat((old_pos, new_pos), dim=3)
        out, lse = sorted_chunk_attention(all_q, all_k, all_v, all_b, all_pos, S, self.self_score)
        combined = combine_rounds(out[..., -T:, :], lse[..., -T:])  # (B, H, T, D)

        self._append(state, k[:, :, None].expand(*expand), v[:, :, None].expand(*expand), new_pos, buckets)
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


def expected_state_bytes(config: ReformerConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one LSH layer's decode state for one sequence (keys, values, positions)."""
    slots = config.n_heads * config.n_hashes * config.n_buckets * config.bucket_size
    return slots * (2 * config.d_head * torch.finfo(dtype).bits // 8 + 8)
