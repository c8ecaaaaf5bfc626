"""Chunking is an implementation detail: chunked feed-forward and chunked loss equal the unchunked math."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from model import ReformerConfig, ReformerLM
from model.feedforward import ChunkedFeedForward


@settings(max_examples=20, deadline=None)
@given(length=st.integers(1, 50), chunk=st.integers(1, 60))
def test_chunked_feedforward_equals_unchunked(length: int, chunk: int) -> None:
    torch.manual_seed(0)
    whole = ChunkedFeedForward(ReformerConfig.tiny(ff_chunk_size=1000)).eval()
    chunked = ChunkedFeedForward(ReformerConfig.tiny(ff_chunk_size=chunk)).eval()
    chunked.load_state_dict(whole.state_dict())
    x = torch.randn(2, length, 32)
    torch.testing.assert_close(chunked(x), whole(x), rtol=1e-6, atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(length=st.integers(1, 70), chunk=st.integers(1, 80))
def test_chunked_loss_equals_cross_entropy_of_full_logits(length: int, chunk: int) -> None:
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig.tiny(vocab_size=40, loss_chunk_size=chunk)).eval()
    ids = torch.randint(0, 40, (2, length))
    targets = torch.randint(0, 40, (2, length))
    targets[0, : length // 2] = -100  # ignored positions do not count
    expected = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(model.loss(ids, targets), expected, rtol=1e-5, atol=1e-6)


def test_chunked_loss_gradients_equal_full_logits_gradients() -> None:
    torch.manual_seed(0)
    config = ReformerConfig.tiny(vocab_size=40, loss_chunk_size=7, reversible=False)
    model = ReformerLM(config)
    ids = torch.randint(0, 40, (2, 30))
    model.loss(ids, ids).backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(chunked[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
