"""ChunkAttention's hand-written backward (recomputed a group of chunks at a time) is the true gradient."""

import pytest
import torch

from model import chunked_attention
from model.chunked_attention import sorted_chunk_attention, window_attention

SELF_SCORE = -1e5


def _inputs(n: int, shared: bool, seed: int) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, H, G, n, D) and buckets/positions (B, H, R, n) with R = 2 rounds; G = 1 when shared."""
    generator = torch.Generator().manual_seed(seed)
    B, H, R, D = 1, 2, 2, 3
    G = 1 if shared else R
    q, k, v = (torch.randn(B, H, G, n, D, generator=generator, dtype=torch.float64) for _ in range(3))
    buckets = torch.randint(0, 3, (B, H, R, n), generator=generator)
    buckets[..., -2:] = 3  # entries no real query sees, like decode's empty state slots
    positions = torch.arange(n).expand(B, H, R, n)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), buckets, positions


@pytest.mark.parametrize("group_scores", [1, 10**9])  # one chunk per group / everything in one group
@pytest.mark.parametrize(("n", "shared"), [(16, True), (13, False)])  # 13: padded to a bucket multiple
def test_gradients_match_finite_differences(
    monkeypatch: pytest.MonkeyPatch, group_scores: int, n: int, shared: bool
) -> None:
    monkeypatch.setattr(chunked_attention, "_GROUP_SCORES", group_scores)
    q, k, v, buckets, positions = _inputs(n, shared, seed=n)

    def attention(*qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sorted_chunk_attention(*qkv, buckets, positions, 4, SELF_SCORE)

    assert torch.autograd.gradcheck(attention, (q, k, v), eps=1e-6, atol=1e-5)


def test_matches_dense_attention_with_the_bucket_and_window_mask() -> None:
    """Against a direct O(n^2) reading of the rule: a query sees the at most S most recent earlier keys
    of its bucket (in each round), itself only when there is nothing else."""
    S, n = 4, 23
    q, k, v, buckets, positions = _inputs(n, shared=False, seed=5)
    out, lse = sorted_chunk_attention(q, k, v, buckets, positions, S, SELF_SCORE)
    for r in range(2):
        for h in range(2):
            b = buckets[0, h, r]
            same = b[:, None] == b[None, :]
            earlier = torch.arange(n)[None, :] < torch.arange(n)[:, None]
            # Rank among earlier same-bucket keys, counted back from the query: keep the S most recent.
            recency = (same & earlier).flip(1).cumsum(1).flip(1)
            visible = same & earlier & (recency <= S)
            scores = (q[0, h, r] @ k[0, h, r].T).masked_fill(~visible, float("-inf"))
            scores[torch.arange(n), torch.arange(n)] = SELF_SCORE
            expected_lse = torch.logsumexp(scores, dim=-1)
            torch.testing.assert_close(lse[0, h, r], expected_lse)
            torch.testing.assert_close(out[0, h, r], torch.softmax(scores, dim=-1) @ v[0, h, r])


def test_window_attention_is_dense_local_attention_with_true_gradients() -> None:
    """Local layers use the same kernel with one bucket, the identity order and a real self score."""
    S, n = 4, 14
    generator = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, n, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    offset = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    visible = (offset >= 0) & (offset <= S)  # itself and the S positions before it
    scores = (q @ k.transpose(-1, -2) * 3**-0.5).masked_fill(~visible, float("-inf"))
    torch.testing.assert_close(window_attention(q, k, v, S), torch.softmax(scores, dim=-1) @ v)
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda *qkv: window_attention(*qkv, S), inputs, eps=1e-6, atol=1e-5)
