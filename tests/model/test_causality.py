"""Property 1: with LSH layers and several hash rounds, logits at t never depend on tokens after t."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import ReformerConfig, ReformerLM

CONFIG = ReformerConfig.tiny(
    vocab_size=64, n_layers=3, attn_layers=("lsh", "local", "lsh"), n_hashes=3, bucket_size=4, n_buckets=4
)


def _model(seed: int, shared_qk: bool) -> ReformerLM:
    torch.manual_seed(seed)
    return ReformerLM(CONFIG.replace(shared_qk=shared_qk)).eval()


@pytest.mark.parametrize("shared_qk", [True, False])
@settings(max_examples=25, deadline=None)
@given(length=st.integers(2, 90), cut=st.data(), seed=st.integers(0, 2**16))
def test_changing_a_suffix_leaves_the_prefix_unchanged(
    shared_qk: bool, length: int, cut: st.DataObject, seed: int
) -> None:
    t = cut.draw(st.integers(1, length - 1))
    model = _model(seed % 4, shared_qk)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CONFIG.vocab_size, (2, length), generator=generator)
    changed = ids.clone()
    changed[:, t:] = torch.randint(0, CONFIG.vocab_size, (2, length - t), generator=generator)
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-5)
