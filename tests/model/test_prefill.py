"""Property 7: decode() of T tokens is one chunked pass over the state plus the new tokens, not a loop."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import ReformerConfig, ReformerLM


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _ops_for_prefill(model: ReformerLM, n_new: int) -> Counter[str]:
    with torch.no_grad():
        state = model.init_state(1)
        model.decode(torch.randint(0, 64, (1, 50)), state)  # some history first
        counter = _OpCounter()
        with counter:
            model.decode(torch.randint(0, 64, (1, n_new)), state)
    return counter.ops


@pytest.mark.parametrize("shared_qk", [True, False])
def test_prefill_op_count_does_not_grow_with_the_number_of_new_tokens(shared_qk: bool) -> None:
    torch.manual_seed(0)
    # ff_chunk_size larger than any prefill here, so the only possible per-token work would be a loop.
    config = ReformerConfig.tiny(vocab_size=64, ff_chunk_size=4096, shared_qk=shared_qk)
    model = ReformerLM(config).eval()
    short, long = _ops_for_prefill(model, 40), _ops_for_prefill(model, 400)
    assert short == long
    assert short["aten.sort"] >= 1  # the sorted LSH path ran


@pytest.mark.parametrize("shared_qk", [True, False])
def test_prefill_runs_the_same_kernels_as_forward(shared_qk: bool) -> None:
    """Prefill = forward's full-sequence path plus gathering the state: same matmul count per layer."""
    torch.manual_seed(0)
    config = ReformerConfig.tiny(vocab_size=64, ff_chunk_size=4096, shared_qk=shared_qk)
    model = ReformerLM(config).eval()
    counter = _OpCounter()
    with torch.no_grad(), counter:
        model(torch.randint(0, 64, (1, 400)))
    prefill = _ops_for_prefill(model, 400)
    for op in ("aten.bmm", "aten.addmm", "aten.mm"):
        assert prefill[op] == counter.ops[op], op
