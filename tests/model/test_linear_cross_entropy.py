"""The chunked head loss with in-pass gradients equals cross-entropy on full logits, value and gradients."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from model import ReformerConfig, ReformerLM
from model.linear_cross_entropy import linear_cross_entropy


def _reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100, reduction="sum")


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), chunk=st.integers(1, 17), ignored=st.integers(0, 40), seed=st.integers(0, 99))
def test_value_and_gradients_match_full_logits(n: int, chunk: int, ignored: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (n,), generator=generator)
    targets[: min(ignored, n)] = -100

    ours = linear_cross_entropy(hidden, weight, targets, chunk)
    (ours * 3.0).backward()  # a non-unit upstream gradient must scale both gradients
    ours_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    expected = _reference(hidden, weight, targets)
    (expected * 3.0).backward()

    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(ours_grads[0], hidden.grad)
    torch.testing.assert_close(ours_grads[1], weight.grad)


def test_without_grad_it_only_computes_the_loss() -> None:
    hidden, weight = torch.randn(9, 6), torch.randn(11, 6)
    targets = torch.randint(0, 11, (9,))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, 4)
    torch.testing.assert_close(loss, _reference(hidden, weight, targets))
    assert loss.grad_fn is None


def test_model_loss_matches_cross_entropy_on_forward_logits() -> None:
    torch.manual_seed(0)
    config = ReformerConfig.tiny(loss_chunk_size=7)
    model = ReformerLM(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 45))
    targets = ids.clone()
    targets[:, :5] = -100
    loss = model.loss(ids, targets)
    loss.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
