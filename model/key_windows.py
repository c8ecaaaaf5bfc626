"""The core of LSH attention with separate queries and keys: each query over a window of the sorted keys.

With separate query and key projections a query's bucket and its candidate keys' buckets are hashed from
different vectors, so queries and keys no longer share one sorted order and the "own chunk plus previous
chunk" pattern of chunked_attention.py does not apply. Instead the keys alone are sorted by (key bucket,
position). The keys query t may see (key bucket = t's query bucket, position < t) then lie right before the
place E_t where (t's query bucket, t) would fall in that order, and the at most `bucket_size` most recent of
them are those of t's bucket among the S = `bucket_size` sorted slots [E_t - S, E_t). Query t also always
sees its own key, whatever that key's bucket, at its real score.

Tiles, as in flash attention: the sorted keys are cut into blocks of S, so query t's window lies inside the
two blocks m_t - 1 and m_t, where m_t = E_t // S ("key pair m_t"). Queries sorted by (query bucket, position)
have nondecreasing E_t; those sharing a key pair are packed S to a query chunk (a key pair's last chunk
padded), so every chunk is an (S x 2S) score tile against one key pair plus each query's own key, and there
are at most Nq / S + Nk / S + 1 chunks. `KeyWindowAttention` gathers a group of chunks' rows by index from the
unsorted inputs, writes outputs back in the queries' order, and in backward recomputes the group's
probabilities and adds the gradients into the inputs' rows: nothing sequence-times-window sized is built.
Precision as in chunked_attention.py: products in the compute dtype (bf16 under autocast), scores,
logsumexps, probabilities and accumulators in float32, with explicit casts and autocast off.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunked_attention import _POSITION_SPAN, _compute_dtype, _exact, _Rows

# Gathered key elements (chunks x 2S keys x head dim, all batch rows, heads and rounds) one group of chunks
# may hold at once: ~8 MB of float32 keys, as many values, whatever the sequence length.
_GROUP_ELEMENTS = 1 << 21


def key_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_buckets: Tensor,
    q_positions: Tensor,
    k_buckets: Tensor,
    k_positions: Tensor,
    bucket_size: int,
    own_offset: int,
) -> tuple[Tensor, Tensor]:
    """Attention of every query over its own key and the `bucket_size` most recent earlier keys whose key
    bucket is its query bucket.

    q (B, H, Gq, Nq, D), k, v (B, H, G, Nk, D), where a G of 1 means one set shared by every hash round;
    q_buckets, q_positions (B, H, R, Nq); k_buckets, k_positions (B, H, R, Nk). Query i's own key is key
    `own_offset + i`. Keys that are not real (decode's empty state slots) carry a bucket id no query has
    (e.g. n_buckets). q is already scaled. Returns outputs (B, H, R, Nq, D) and logsumexps (B, H, R, Nq), in
    the queries' order.
    """
    S = bucket_size
    Nk = k_buckets.shape[-1]
    k_sort = k_buckets * _POSITION_SPAN + k_positions  # (B, H, R, Nk)
    k_order = k_sort.argsort(dim=-1)  # sorted place -> key entry
    q_sort = q_buckets * _POSITION_SPAN + q_positions  # (B, H, R, Nq)
    q_order = q_sort.argsort(dim=-1)
    # Window ends E: where each query (in query-sorted order) falls among the sorted keys; nondecreasing.
    ends = torch.searchsorted(k_sort.gather(3, k_order).contiguous(), q_sort.gather(3, q_order).contiguous())

    # Key slots: one block of padding in front (key pair 0's "previous block"), then the sorted keys, padded
    # to whole blocks; padding reads key 0 with bucket -1, which no query has.
    pairs = Nk // S + 1  # key pairs m = 0 .. Nk // S (E can be Nk)
    pad_back = S * (pairs + 1) - S - Nk
    k_source = F.pad(k_order, (S, pad_back), value=0)  # (B, H, R, S * (pairs + 1))
    k_slot_buckets = F.pad(k_buckets.gather(3, k_order), (S, pad_back), value=-1)

    plan = _pack_queries(ends, q_order, q_buckets.gather(3, q_order), S, pairs)
    out, lse = KeyWindowAttention.apply(q, k, v, *plan, k_source, k_slot_buckets, S, own_offset)
    return out.to(v.dtype), lse


def _pack_queries(
    ends: Tensor, q_order: Tensor, sorted_buckets: Tensor, S: int, pairs: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pack the queries of each key pair into whole chunks of S, pairs in order.

    ends, q_order, sorted_buckets (B, H, R, Nq): each sorted query's window end, entry and bucket. Returns
    q_source, slot_ends, slot_buckets (B, H, R, C*S): each query slot's entry (Nq = padding), window end and
    bucket (-2 for padding, which no key has); chunk_pair (B, H, R, C): each chunk's key pair.
    """
    lead, Nq, device = ends.shape[:3], ends.shape[3], ends.device
    pair = ends // S  # (B, H, R, Nq), nondecreasing
    counts = torch.zeros(*lead, pairs, dtype=torch.long, device=device)
    counts.scatter_add_(3, pair, torch.ones_like(pair))  # queries per key pair
    chunks = (counts + S - 1) // S
    chunk_end = chunks.cumsum(3)  # (B, H, R, pairs): chunks up to and including each pair
    n_chunks = int(chunk_end[..., -1].max())
    first_of_pair = counts.cumsum(3) - counts  # sorted index of each pair's first query
    rank = torch.arange(Nq, device=device) - first_of_pair.gather(3, pair)  # place within its pair
    slot = (chunk_end - chunks).gather(3, pair) * S + rank  # (B, H, R, Nq): each sorted query's slot
    q_source = torch.full((*lead, n_chunks * S), Nq, dtype=torch.long, device=device)
    q_source.scatter_(3, slot, q_order)
    slot_ends = torch.zeros_like(q_source).scatter_(3, slot, ends)
    slot_buckets = torch.full_like(q_source, -2).scatter_(3, slot, sorted_buckets)
    chunk = torch.arange(n_chunks, device=device).expand(*lead, -1).contiguous()
    chunk_pair = torch.searchsorted(chunk_end, chunk, right=True)  # pairs whose chunks all come before
    return q_source, slot_ends, slot_buckets, chunk_pair.clamp(max=pairs - 1)  # past the last pair: padding


class KeyWindowAttention(torch.autograd.Function):
    """Query chunks against key pairs, given as indices, a group of chunks at a time.

    q (B, H, Gq, Nq, D), k, v (B, H, G, Nk, D); q_source, slot_ends, slot_buckets (B, H, R, C*S): each query
    slot's query entry (Nq = padding), window end E and query bucket; chunk_pair (B, H, R, C): each chunk's
    key pair; k_source, k_slot_buckets (B, H, R, (pairs+1)*S): each key slot's key entry and bucket (slot
    s + S holds sorted key s). Returns outputs (B, H, R, Nq, D) and logsumexps (B, H, R, Nq) in float32
    (float64 for float64 inputs), in the queries' order.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_source: Tensor,
        slot_ends: Tensor,
        slot_buckets: Tensor,
        chunk_pair: Tensor,
        k_source: Tensor,
        k_slot_buckets: Tensor,
        bucket_size: int,
        own_offset: int,
    ) -> tuple[Tensor, Tensor]:
        B, H, R, _ = chunk_pair.shape
        Nq, D = q.shape[-2:]
        ctx.input_dtypes = (q.dtype, k.dtype, v.dtype)
        compute = _compute_dtype(q)
        q, k, v = (t.to(compute) for t in (q, k, v))  # cast once, then gather half the bytes in bf16
        rows = _Rows(B, H, R, k.shape[2], q.device)
        q_rows = _Rows(B, H, R, q.shape[2], q.device)
        out = q.new_zeros((B, H, R, Nq + 1, D), dtype=_exact(q.dtype))
        lse = q.new_zeros((B, H, R, Nq + 1), dtype=_exact(q.dtype))
        inputs = (q, k, v, q_source, slot_ends, slot_buckets, chunk_pair, k_source, k_slot_buckets)
        with torch.autocast(q.device.type, enabled=False):
            for first, last in _groups(chunk_pair.shape, bucket_size, D):
                group = _Group(*inputs, rows, q_rows, first, last, bucket_size, own_offset)
                where = rows.output(group.entries.flatten(3))
                pair_out = group.probs[..., :-1].to(compute) @ group.values  # (B, H, R, c, S, D)
                own_out = group.probs[..., -1:] * group.own_v
                out[where] = (pair_out + own_out).flatten(3, 4).to(out.dtype)
                lse[where] = group.lse.flatten(3, 4).to(lse.dtype)
        # The backward pass recomputes the probabilities from these (already cast) inputs, exactly as this
        # pass computed them.
        ctx.save_for_backward(*inputs, out)
        ctx.bucket_size, ctx.own_offset = bucket_size, own_offset
        return out[..., :Nq, :], lse[..., :Nq]

    @staticmethod
    def backward(ctx: Any, d_out: Tensor, d_lse: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, q_source, slot_ends, slot_buckets, chunk_pair, k_source, k_slot_buckets, out = (
            ctx.saved_tensors
        )
        inputs = (q, k, v, q_source, slot_ends, slot_buckets, chunk_pair, k_source, k_slot_buckets)
        S = ctx.bucket_size
        B, H, R, _ = chunk_pair.shape
        Nq, D = q.shape[-2:]
        rows = _Rows(B, H, R, k.shape[2], q.device)
        q_rows = _Rows(B, H, R, q.shape[2], q.device)
        compute = q.dtype
        d_q, d_k, d_v = (torch.zeros_like(t, dtype=_exact(t.dtype)) for t in (q, k, v))
        with torch.autocast(q.device.type, enabled=False):
            for first, last in _groups(chunk_pair.shape, S, D):
                group = _Group(*inputs, rows, q_rows, first, last, S, ctx.own_offset)
                real = (group.entries < Nq)[..., None]  # (B, H, R, c, S, 1)
                where = rows.output(group.entries.clamp(max=Nq - 1).flatten(3))
                g_out = d_out[where].to(out.dtype).unflatten(3, group.entries.shape[3:]) * real
                g_lse = d_lse[where].to(out.dtype).unflatten(3, group.entries.shape[3:])[..., None] * real
                # d(score) = p * (d(p) - sum_j p_j d(p_j) + d(lse)); that sum is d_out . out per query.
                kept = out[rows.output(group.entries.flatten(3))].unflatten(3, group.entries.shape[3:])
                delta = (g_out * kept).sum(-1, keepdim=True)
                g_pair = (g_out.to(compute) @ group.values.transpose(-1, -2)).to(out.dtype)
                d_probs = torch.cat((g_pair, (g_out * group.own_v).sum(-1, keepdim=True)), dim=-1)
                d_scores = group.probs * (d_probs - delta + g_lse)  # (B, H, R, c, S, 2S + 1)
                d_pair, d_own = d_scores[..., :-1].to(compute), d_scores[..., -1:]
                d_query = (d_pair @ group.k).to(out.dtype) + d_own * group.own_k  # (B, H, R, c, S, D)
                d_q.index_put_(
                    q_rows.input(group.q_entries.flatten(3)),
                    d_query.flatten(3, 4).to(d_q.dtype),
                    accumulate=True,
                )
                pair_rows = rows.input(group.k_entries.flatten(3))
                d_k.index_put_(
                    pair_rows,
                    (d_pair.transpose(-1, -2) @ group.q).flatten(3, 4).to(d_k.dtype),  # compute dtype
                    accumulate=True,
                )
                d_v.index_put_(
                    pair_rows,
                    (group.probs[..., :-1].to(compute).transpose(-1, -2) @ g_out.to(compute))
                    .flatten(3, 4)
                    .to(d_v.dtype),
                    accumulate=True,
                )
                own_rows = rows.input(group.own_entries.flatten(3))
                d_k.index_put_(own_rows, (d_own * group.q).flatten(3, 4).to(d_k.dtype), accumulate=True)
                d_v.index_put_(
                    own_rows, (group.probs[..., -1:] * g_out).flatten(3, 4).to(d_v.dtype), accumulate=True
                )
        q_dtype, k_dtype, v_dtype = ctx.input_dtypes
        return d_q.to(q_dtype), d_k.to(k_dtype), d_v.to(v_dtype), *([None] * 8)


class _Group:
    """Query chunks first..last-1: their query entries (B, H, R, c, S) (Nq = padding), gathered queries, key
    pairs' keys and values (B, H, R, c, 2S, D) and own keys and values (B, H, R, c, S, D); probabilities
    (B, H, R, c, S, 2S + 1), the last column being the own key, and logsumexps (B, H, R, c, S)."""

    def __init__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_source: Tensor,
        slot_ends: Tensor,
        slot_buckets: Tensor,
        chunk_pair: Tensor,
        k_source: Tensor,
        k_slot_buckets: Tensor,
        rows: _Rows,
        q_rows: _Rows,
        first: int,
        last: int,
        S: int,
        own_offset: int,
    ) -> None:
        c = last - first
        Nq = q.shape[-2]
        dtype = _exact(q.dtype)
        device = q.device
        queries = slice(first * S, last * S)
        self.entries = q_source[..., queries].unflatten(3, (c, S))  # (B, H, R, c, S)
        self.q_entries = self.entries.clamp(max=Nq - 1)  # padding reads the last query; its output is dropped
        self.own_entries = own_offset + self.q_entries
        # Gathered in the inputs' dtype (the compute dtype); the own key and value, used elementwise, widened.
        self.q = q[q_rows.input(self.q_entries.flatten(3))].unflatten(3, (c, S))  # (B, H, R, c, S, D)
        own = rows.input(self.own_entries.flatten(3))
        self.own_k = k[own].to(dtype).unflatten(3, (c, S))
        self.own_v = v[own].to(dtype).unflatten(3, (c, S))

        # Key pair m is key slots [m*S, (m+2)*S), i.e. sorted keys [(m-1)*S, (m+1)*S).
        key_slots = chunk_pair[..., first:last, None] * S + torch.arange(
            2 * S, device=device
        )  # (B, H, R, c, 2S)
        self.k_entries = k_source.gather(3, key_slots.flatten(3)).unflatten(3, (c, 2 * S))
        pair = rows.input(self.k_entries.flatten(3))
        self.k = k[pair].unflatten(3, (c, 2 * S))  # (B, H, R, c, 2S, D)
        self.values = v[pair].unflatten(3, (c, 2 * S))
        key_buckets = k_slot_buckets.gather(3, key_slots.flatten(3)).unflatten(3, (c, 2 * S))

        # Visible: same bucket and sorted index in [E - S, E), i.e. key slot in [E, E + S).
        ends = slot_ends[..., queries].unflatten(3, (c, S))[..., None]  # (B, H, R, c, S, 1)
        key_slot = key_slots[..., None, :]  # (B, H, R, c, 1, 2S)
        visible = key_buckets[..., None, :] == slot_buckets[..., queries].unflatten(3, (c, S))[..., None]
        visible &= (key_slot >= ends) & (key_slot < ends + S)
        scores = (self.q @ self.k.transpose(-1, -2)).to(dtype).masked_fill(~visible, float("-inf"))
        own_scores = (self.q.to(dtype) * self.own_k).sum(-1, keepdim=True)
        scores = torch.cat((scores, own_scores), dim=-1)  # (B, H, R, c, S, 2S + 1)
        self.lse = torch.logsumexp(scores, dim=-1)  # finite: the own key is always visible
        self.probs = torch.exp(scores - self.lse[..., None])


def _groups(shape: torch.Size, bucket_size: int, d_head: int) -> list[tuple[int, int]]:
    """[first, last) chunk ranges small enough that a group's gathered key pairs stay near _GROUP_ELEMENTS."""
    B, H, R, n_chunks = shape
    size = max(1, _GROUP_ELEMENTS // (B * H * R * 2 * bucket_size * d_head))
    return [(first, min(n_chunks, first + size)) for first in range(0, n_chunks, size)]
