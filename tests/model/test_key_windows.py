"""Separate-Q/K LSH attention: the windowed kernel is the rule read literally, and its backward is the true
gradient; the LSH layer wires query buckets to queries and key buckets to keys."""

import math

import pytest
import torch

from model import ReformerConfig, key_windows
from model.key_windows import key_window_attention
from model.lsh import LSHAttention, hash_buckets

B, H, R, D = 2, 2, 3, 3


def _inputs(n_keys: int, n_queries: int, shared_keys: bool, seed: int) -> tuple[torch.Tensor, ...]:
    """q (B, H, 1, Nq, D), k, v (B, H, G, Nk, D) with G = 1 when shared by the rounds, else R; query and key
    buckets from 3 buckets; keys 0 .. Nk-Nq-1 are history (positions 0 ..), the last Nq keys belong to the
    queries, two history keys are empty slots (bucket 3, position -1, as in decode's state)."""
    generator = torch.Generator().manual_seed(seed)
    G = 1 if shared_keys else R
    q = torch.randn(B, H, 1, n_queries, D, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(B, H, G, n_keys, D, generator=generator, dtype=torch.float64) for _ in range(2))
    q_buckets = torch.randint(0, 3, (B, H, R, n_queries), generator=generator)
    k_buckets = torch.randint(0, 3, (B, H, R, n_keys), generator=generator)
    history = n_keys - n_queries
    k_positions = torch.arange(n_keys).expand(B, H, R, n_keys).clone()
    if history >= 2:
        k_buckets[..., :2] = 3
        k_positions[..., :2] = -1
    q_positions = k_positions[..., history:]
    return (
        q.requires_grad_(),
        k.requires_grad_(),
        v.requires_grad_(),
        q_buckets,
        q_positions,
        k_buckets,
        k_positions,
    )


def _brute_force(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_buckets: torch.Tensor,
    q_positions: torch.Tensor,
    k_buckets: torch.Tensor,
    k_positions: torch.Tensor,
    S: int,
    own_offset: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The rule, one query at a time: its own key, and of the keys with key bucket = its query bucket and an
    earlier position, the S latest. Also counts the windows that had to drop keys (so the test knows the
    truncation was exercised)."""
    q, k, v = q.detach(), k.detach(), v.detach()
    n_queries = q.shape[3]
    out = torch.zeros(B, H, R, n_queries, v.shape[-1], dtype=torch.float64)
    lse = torch.zeros(B, H, R, n_queries, dtype=torch.float64)
    truncated = 0
    for b in range(B):
        for h in range(H):
            for r in range(R):
                g = 0 if k.shape[2] == 1 else r
                for t in range(n_queries):
                    bucket, position = int(q_buckets[b, h, r, t]), int(q_positions[b, h, r, t])
                    earlier = [
                        j
                        for j in range(k.shape[3])
                        if int(k_buckets[b, h, r, j]) == bucket
                        and 0 <= int(k_positions[b, h, r, j]) < position
                    ]
                    earlier.sort(key=lambda j: int(k_positions[b, h, r, j]))
                    truncated += len(earlier) > S
                    seen = [*earlier[-S:], own_offset + t]
                    scores = torch.stack([q[b, h, 0, t] @ k[b, h, g, j] for j in seen])
                    total = math.log(sum(math.exp(float(s)) for s in scores))
                    weights = torch.exp(scores - total)
                    out[b, h, r, t] = sum(w * v[b, h, g, j] for w, j in zip(weights, seen, strict=True))
                    lse[b, h, r, t] = total
    return out, lse, truncated


@pytest.mark.parametrize(
    ("n_keys", "n_queries", "shared_keys"),
    [(40, 40, True), (40, 25, False)],  # forward: every key is a query's; prefill: history keys in front
)
def test_matches_a_brute_force_reading_of_the_rule(n_keys: int, n_queries: int, shared_keys: bool) -> None:
    S = 4
    inputs = _inputs(n_keys, n_queries, shared_keys, seed=n_keys + n_queries)
    own_offset = n_keys - n_queries
    out, lse = key_window_attention(*inputs, S, own_offset)
    expected_out, expected_lse, truncated = _brute_force(*inputs, S, own_offset)
    assert truncated > 50  # plenty of windows held more than S candidates
    torch.testing.assert_close(lse, expected_lse)
    torch.testing.assert_close(out, expected_out)


@pytest.mark.parametrize("group_elements", [1, 10**9])  # one query per group / everything in one group
@pytest.mark.parametrize(("n_keys", "n_queries", "shared_keys"), [(13, 13, True), (17, 9, False)])
def test_gradients_match_finite_differences(
    monkeypatch: pytest.MonkeyPatch, group_elements: int, n_keys: int, n_queries: int, shared_keys: bool
) -> None:
    monkeypatch.setattr(key_windows, "_GROUP_ELEMENTS", group_elements)
    q, k, v, *buckets_and_positions = _inputs(n_keys, n_queries, shared_keys, seed=n_keys)
    own_offset = n_keys - n_queries

    def attention(*qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return key_window_attention(*qkv, *buckets_and_positions, 3, own_offset)

    assert torch.autograd.gradcheck(attention, (q, k, v), eps=1e-6, atol=1e-5)


def test_the_layer_hashes_queries_and_keys_apart_and_attends_by_the_rule() -> None:
    """LSHAttention.forward with separate Q/K against the brute-force rule fed with the layer's own
    projections and hashes: query buckets from the queries, key buckets from the keys."""
    config = ReformerConfig.tiny(shared_qk=False, n_heads=H, n_hashes=R, bucket_size=4, n_buckets=4)
    torch.manual_seed(3)
    layer = LSHAttention(config).double().eval()
    x = torch.randn(B, 50, config.d_model, dtype=torch.float64)
    positions = torch.arange(50).expand(B, 50)
    with torch.no_grad():
        got, _ = layer(x, positions)
        q = (layer.to_q(x).view(B, 50, H, -1).transpose(1, 2) * config.d_head**-0.5)[:, :, None]
        k = layer.to_k(x).view(B, 50, H, -1).transpose(1, 2)[:, :, None]
        v = layer.to_v(x).view(B, 50, H, -1).transpose(1, 2)[:, :, None]
        q_buckets, k_buckets = (
            hash_buckets(q[:, :, 0], layer.rotations),
            hash_buckets(k[:, :, 0], layer.rotations),
        )
        assert not torch.equal(q_buckets, k_buckets)
        pos = positions[:, None, None, :].expand(B, H, R, 50)
        out, lse, truncated = _brute_force(q, k, v, q_buckets, pos, k_buckets, pos, config.bucket_size, 0)
        weights = torch.softmax(lse, dim=2)[..., None]  # rounds by their logsumexp
        combined = (out * weights).sum(dim=2)  # (B, H, L, D)
        expected = layer.to_out(combined.transpose(1, 2).reshape(B, 50, -1))
    assert truncated > 0
    torch.testing.assert_close(got, expected)
