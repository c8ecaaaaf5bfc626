"""SortedChunkAttention's hand-written backward (recomputed one group at a time) is the true gradient."""

import pytest
import torch

from model import lsh
from model.lsh import SortedChunkAttention


def _inputs(n: int, n_buckets: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    shape = (1, 2, 2, n, 3)  # (B, H, R, n, D)
    qs, ks, vs = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))
    bs = torch.randint(0, n_buckets, shape[:-1], generator=generator).sort(dim=-1).values
    bs[..., -3:] = -1  # a few padding entries, as after a pad to a bucket multiple
    return qs.requires_grad_(), ks.requires_grad_(), vs.requires_grad_(), bs


@pytest.mark.parametrize("group_scores", [1, 10**9])  # one chunk per group / everything in one group
@pytest.mark.parametrize("seed", [0, 1])
def test_gradients_match_finite_differences(
    monkeypatch: pytest.MonkeyPatch, group_scores: int, seed: int
) -> None:
    monkeypatch.setattr(lsh, "_GROUP_SCORES", group_scores)
    qs, ks, vs, bs = _inputs(n=16, n_buckets=3, seed=seed)

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return SortedChunkAttention.apply(q, k, v, bs, 4, -1e5)

    assert torch.autograd.gradcheck(attention, (qs, ks, vs), eps=1e-6, atol=1e-5)


def test_grouping_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    qs, ks, vs, bs = _inputs(n=24, n_buckets=2, seed=3)
    results = []
    for group_scores in (1, 10**9):
        monkeypatch.setattr(lsh, "_GROUP_SCORES", group_scores)
        out, lse = SortedChunkAttention.apply(qs, ks, vs, bs, 4, -1e5)
        (out.square().sum() + lse.sum()).backward()
        results.append((out.detach(), lse.detach(), qs.grad.clone(), ks.grad.clone(), vs.grad.clone()))
        qs.grad = ks.grad = vs.grad = None
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)
