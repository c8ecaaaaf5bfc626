"""The chunked attention kernel behind LSH layers and local windows.

LSH (sorted_chunk_attention): sorting every (head, round)'s entries by (bucket, position) puts each query's
candidate keys right before it, within `bucket_size` places. So attention is chunked: each chunk of
S = bucket_size sorted queries attends to the previous chunk and itself, same bucket only, at most S places
back; a query's own slot scores a constant (`self_score`), so it wins only when nothing else is there.

Local windows (window_attention) are the same computation with one bucket and the identity order: each
position sees itself (by its score) and the `window` positions before it.

`ChunkAttention` does this without ever materialising the sorted copies of q, k and v or the (n x 2S)
scores for the whole sequence: it works one group of chunks at a time (~8 MB of scores), gathers that
group's rows from the unsorted inputs by index, writes outputs straight back to the entries' original
order, and in backward recomputes the group's probabilities (as flash attention does) and adds the
gradients into the inputs' rows. A training step's attention memory is then the inputs, the outputs and
index tensors, nothing sequence-times-window sized.

Precision: the matrix products run in the compute dtype, which is autocast's (bf16) when autocast is on for
the inputs' device and the inputs' own dtype otherwise; the scores' mask, logsumexp and softmax, the outputs'
accumulation and the gradients' accumulation are float32 (float64 for float64 inputs) whatever the autocast.
The kernel casts explicitly with autocast off, so forward and backward round the same way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# Sort key = bucket * _POSITION_SPAN + position; positions stay far below 2**40.
_POSITION_SPAN = 1 << 40
# Score elements (query x key pairs, all batch rows, heads and rounds) one group of chunks may hold at once:
# ~8 MB of float32 scores, whatever the sequence length.
_GROUP_SCORES = 1 << 21


def sorted_chunk_attention(
    q: Tensor, k: Tensor, v: Tensor, buckets: Tensor, positions: Tensor, bucket_size: int, self_score: float
) -> tuple[Tensor, Tensor]:
    """Attention of every entry over its bucket's `bucket_size` most recent earlier entries.

    q, k, v (B, H, G, N, D), where G is 1 (one set of entries shared by every hash round) or R (each round
    its own); buckets, positions (B, H, R, N). Entries that are not real keys carry a bucket id no real
    query has (e.g. n_buckets). Returns outputs (B, H, R, N, D) and their logsumexps (B, H, R, N), in the
    entries' original order.
    """
    S = bucket_size
    N = buckets.shape[-1]
    order = (buckets * _POSITION_SPAN + positions).argsort(dim=-1)  # (B, H, R, N): sorted place -> entry
    pad = (-N) % S
    # One chunk in front of the first (its "previous chunk") and padding up to a multiple of S: those slots
    # read entry 0 with bucket -1, which no real query has, and write to a scratch row N that is dropped.
    source = F.pad(order, (S, pad), value=0)
    target = F.pad(order, (S, pad), value=N)
    sorted_buckets = F.pad(buckets.gather(3, order), (S, pad), value=-1)
    out, lse = ChunkAttention.apply(q, k, v, source, target, sorted_buckets, S, self_score)
    return out.to(v.dtype), lse


def window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, valid: Tensor | None = None) -> Tensor:
    """Local attention: each position sees itself and the `window` positions before it.

    q, k, v (B, H, N, D) in position order (consecutive positions), q not yet scaled -> outputs
    (B, H, N, D). `valid` (B, N), if given, marks the entries that are real keys: a decode state's empty
    slots are not (their outputs are meaningless and dropped by the caller). The same chunked computation
    as LSH attention with one bucket and the identity order: the same memory-lean backward.
    """
    B, H, N, _ = q.shape
    S = window
    pad = (-N) % S
    order = torch.arange(N, device=q.device).expand(B, H, 1, N)
    source = F.pad(order, (S, pad), value=0)
    target = F.pad(order, (S, pad), value=N)
    real = torch.zeros_like(order) if valid is None else torch.where(valid, 0, -1)[:, None, None, :]
    buckets = F.pad(real.expand(B, H, 1, N), (S, pad), value=-1)  # bucket -1: seen by no real query
    scaled = q * q.shape[-1] ** -0.5
    shared = (scaled[:, :, None], k[:, :, None], v[:, :, None])  # G = R = 1
    out, _ = ChunkAttention.apply(*shared, source, target, buckets, S, None)
    return out[:, :, 0].to(v.dtype)


class ChunkAttention(torch.autograd.Function):
    """Chunked attention over the sorted order given as indices, a group of chunks at a time.

    q, k, v (B, H, G, N, D); source, target (B, H, R, (C+1)*S): for each sorted slot, the entry it reads
    (in q, k, v) and the entry its output belongs to (N = a scratch row); buckets (B, H, R, (C+1)*S) in
    sorted order. Slot chunk 0 is only ever a previous chunk. A `self_score` of None lets a query score
    itself like any key and see S + 1 keys (local attention). Returns outputs (B, H, R, N, D) and
    logsumexps (B, H, R, N) in float32 (float64 for float64 inputs), in the entries' original order.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        source: Tensor,
        target: Tensor,
        buckets: Tensor,
        bucket_size: int,
        self_score: float | None,
    ) -> tuple[Tensor, Tensor]:
        B, H, R, _ = source.shape
        N, D = q.shape[-2:]
        ctx.input_dtypes = (q.dtype, k.dtype, v.dtype)
        compute = _compute_dtype(q)
        q, k, v = (t.to(compute) for t in (q, k, v))  # cast once, then gather half the bytes in bf16
        rows = _Rows(B, H, R, q.shape[2], q.device)
        out = q.new_zeros((B, H, R, N + 1, D), dtype=_exact(q.dtype))
        lse = q.new_zeros((B, H, R, N + 1), dtype=_exact(q.dtype))
        with torch.autocast(q.device.type, enabled=False):
            for first, last in _groups(source.shape, bucket_size):
                group = _Group(q, k, v, source, buckets, rows, first, last, bucket_size, self_score)
                where = rows.output(target[..., group.queries])
                out[where] = (group.probs.to(compute) @ group.values).flatten(3, 4).to(out.dtype)
                lse[where] = group.lse.flatten(3, 4).to(lse.dtype)
        # The backward pass recomputes the probabilities from these (already cast) inputs, exactly as
        # this pass computed them.
        ctx.save_for_backward(q, k, v, source, target, buckets, out)
        ctx.bucket_size, ctx.self_score = bucket_size, self_score
        return out[..., :N, :], lse[..., :N]

    @staticmethod
    def backward(ctx: Any, d_out: Tensor, d_lse: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, source, target, buckets, out = ctx.saved_tensors
        S = ctx.bucket_size
        B, H, R, _ = source.shape
        N = q.shape[-2]
        rows = _Rows(B, H, R, q.shape[2], q.device)
        compute = q.dtype
        d_q, d_k, d_v = (torch.zeros_like(t, dtype=_exact(t.dtype)) for t in (q, k, v))
        with torch.autocast(q.device.type, enabled=False):
            for first, last in _groups(source.shape, S):
                group = _Group(q, k, v, source, buckets, rows, first, last, S, ctx.self_score)
                c = last - first
                owner = target[..., group.queries]  # (B, H, R, c*S); N for padding
                real = (owner < N)[..., None]
                where = rows.output(owner.clamp(max=N - 1))
                g_out = (d_out[where].to(out.dtype) * real).unflatten(3, (c, S))  # (B, H, R, c, S, D)
                g_lse = (d_lse[where].to(out.dtype) * real[..., 0]).unflatten(3, (c, S))[..., None]
                # d(score) = p * (d(p) - sum_j p_j d(p_j) + d(lse)); that sum is d_out . out per query.
                delta = (g_out * out[rows.output(owner)].unflatten(3, (c, S))).sum(-1, keepdim=True)
                g_probs = (g_out.to(compute) @ group.values.transpose(-1, -2)).to(out.dtype)
                d_scores = group.probs * (g_probs - delta + g_lse)
                if ctx.self_score is not None:
                    d_scores[..., _self_slot(S, q.device)] = 0.0  # the own slot's score is a constant
                d_scores = d_scores.to(compute)
                d_keys = d_scores.transpose(-1, -2) @ group.q  # (B, H, R, c, 2S, D): previous, own chunk
                d_values = group.probs.to(compute).transpose(-1, -2) @ g_out.to(compute)
                own = source[..., group.queries]
                previous = source[..., first * S : last * S]
                _add_rows(d_q, rows.input(own), d_scores @ group.k)
                for grad, pair_grad in ((d_k, d_keys), (d_v, d_values)):
                    _add_rows(grad, rows.input(previous), pair_grad[..., :S, :])
                    _add_rows(grad, rows.input(own), pair_grad[..., S:, :])
        q_dtype, k_dtype, v_dtype = ctx.input_dtypes
        return d_q.to(q_dtype), d_k.to(k_dtype), d_v.to(v_dtype), None, None, None, None, None


class _Rows:
    """Broadcastable (batch, head, round) index tensors that address entries by their place in a row."""

    def __init__(self, B: int, H: int, R: int, G: int, device: torch.device) -> None:
        self.b = torch.arange(B, device=device).view(B, 1, 1, 1)
        self.h = torch.arange(H, device=device).view(1, H, 1, 1)
        self.r = torch.arange(R, device=device).view(1, 1, R, 1)
        # Inputs shared by every round (G = 1) are read at round index 0.
        self.g = self.r if G == R else torch.zeros_like(self.r)

    def input(self, entries: Tensor) -> tuple[Tensor, ...]:
        return self.b, self.h, self.g, entries

    def output(self, entries: Tensor) -> tuple[Tensor, ...]:
        return self.b, self.h, self.r, entries


class _Group:
    """Chunks first..last-1 of the sorted order: their queries, keys and values gathered from the inputs
    (in the inputs' dtype, the compute dtype), and their attention probabilities (B, H, R, c, S, 2S) and
    logsumexps (B, H, R, c, S) in float32 (float64 for float64 inputs)."""

    def __init__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        source: Tensor,
        buckets: Tensor,
        rows: _Rows,
        first: int,
        last: int,
        S: int,
        self_score: float | None,
    ) -> None:
        c = last - first
        # Slot chunk 0 is the padding in front, so query chunk i is slot chunk i + 1 and its previous chunk
        # is slot chunk i.
        self.queries = slice((first + 1) * S, (last + 1) * S)
        keys = slice(first * S, (last + 1) * S)  # c + 1 slot chunks: each query chunk's previous and own
        self.q = q[rows.input(source[..., self.queries])].unflatten(3, (c, S))  # (B, H, R, c, S, D)
        key_rows = rows.input(source[..., keys])
        self.k = _pairs(k[key_rows], c, S)  # (B, H, R, c, 2S, D)
        self.values = _pairs(v[key_rows], c, S)
        bucket_q = buckets[..., self.queries].unflatten(3, (c, S))  # (B, H, R, c, S)
        bucket_k = _pairs(buckets[..., keys][..., None], c, S)[..., 0]  # (B, H, R, c, 2S)

        scores = (self.q @ self.k.transpose(-1, -2)).to(_exact(q.dtype))  # (B, H, R, c, S, 2S)
        # Rank distance from query i (own chunk) to key j (previous chunk then own chunk).
        distance = torch.arange(S, device=q.device)[:, None] + S - torch.arange(2 * S, device=q.device)
        # LSH: the S keys before the query, itself only at a constant score. Local: itself too, by its score.
        window = (distance > 0) & (distance <= S) if self_score is not None else (distance <= S)
        visible = (bucket_q[..., :, None] == bucket_k[..., None, :]) & window & (distance >= 0)
        scores = scores.masked_fill(~visible, float("-inf"))
        if self_score is not None:
            scores[..., distance == 0] = self_score
        self.lse = torch.logsumexp(scores, dim=-1)  # (B, H, R, c, S)
        self.probs = torch.exp(scores - self.lse[..., None])


def _add_rows(grad: Tensor, where: tuple[Tensor, ...], chunks: Tensor) -> None:
    """grad[where] += chunks (B, H, R, c, S, D), summing where slots read the same entry (hash rounds
    that share their inputs, padding slots)."""
    grad.index_put_(where, chunks.flatten(3, 4).to(grad.dtype), accumulate=True)


def _pairs(x: Tensor, c: int, S: int) -> Tensor:
    """(B, H, R, (c+1)*S, D) slots -> (B, H, R, c, 2S, D): each chunk after its previous chunk."""
    chunks = x.unflatten(3, (c + 1, S))
    return torch.cat((chunks[:, :, :, :-1], chunks[:, :, :, 1:]), dim=4)


def _exact(dtype: torch.dtype) -> torch.dtype:
    """The dtype attention is accumulated in: float32, or the input's if wider."""
    return torch.promote_types(dtype, torch.float32)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the matrix products: autocast's for float32 inputs when it is on, else the input's."""
    kind = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _groups(shape: torch.Size, bucket_size: int) -> list[tuple[int, int]]:
    """[first, last) query-chunk ranges small enough that a group's scores stay near _GROUP_SCORES."""
    B, H, R, slots = shape
    chunks = slots // bucket_size - 1
    size = max(1, _GROUP_SCORES // (B * H * R * bucket_size * 2 * bucket_size))
    return [(first, min(chunks, first + size)) for first in range(0, chunks, size)]


def _self_slot(S: int, device: torch.device) -> Tensor:
    """(S, 2S) True where key j (previous chunk then own chunk) is query i itself."""
    return torch.arange(2 * S, device=device)[None, :] == torch.arange(S, device=device)[:, None] + S
