"""Property 3: the decode state stops growing at capacity, and a decode step costs the same at any history."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import DecodeState, ReformerConfig, ReformerLM

CONFIG = ReformerConfig.tiny(vocab_size=50)


def _model(config: ReformerConfig = CONFIG) -> ReformerLM:
    torch.manual_seed(0)
    return ReformerLM(config).eval()


def _feed(model: ReformerLM, state: DecodeState, n_tokens: int, chunk: int = 65_536) -> None:
    generator = torch.Generator().manual_seed(n_tokens)
    fed = 0
    while fed < n_tokens:
        size = min(chunk, n_tokens - fed)
        model.decode(torch.randint(0, 50, (1, size), generator=generator), state)
        fed += size


@pytest.mark.parametrize("shared_qk", [True, False])
def test_state_bytes_after_a_million_tokens_equal_bytes_at_capacity(shared_qk: bool) -> None:
    model = _model(CONFIG.replace(shared_qk=shared_qk))
    capacity = CONFIG.bucket_size * CONFIG.n_buckets  # per LSH head and round; local layers hold bucket_size
    with torch.no_grad():
        state = model.init_state(1)
        _feed(model, state, capacity)
        at_capacity = state.nbytes()
        _feed(model, state, 1_000_000 - capacity)
    assert int(state.length[0]) == 1_000_000
    assert state.nbytes() == at_capacity
    # Every slot is in use and the newest entries are the most recent tokens.
    lsh = state.layers[1]
    assert bool((lsh.positions >= 0).all())
    assert int(lsh.positions.max()) == 999_999
    local = state.layers[0]
    assert local.positions[0].tolist() == list(range(1_000_000 - CONFIG.bucket_size, 1_000_000))


def test_full_attention_state_grows_with_history() -> None:
    """The baseline's state is not bounded, which is the point of comparing against it."""
    model = _model(ReformerConfig.tiny(vocab_size=50, attn_layers=("local", "full")))
    with torch.no_grad():
        state = model.init_state(1)
        _feed(model, state, 100)
        small = state.nbytes()
        _feed(model, state, 1000)
    assert state.nbytes() > 5 * small


def _step_cost(model: ReformerLM, history: int) -> tuple[int, list[tuple[int, ...]]]:
    with torch.no_grad():
        state = model.init_state(1)
        _feed(model, state, history)
        counter = FlopCounterMode(display=False)
        with counter:
            model.decode(torch.tensor([[7]]), state)
    return counter.get_total_flops(), [tuple(t.shape) for t in state.layers[1].keys.unsqueeze(0)]


@pytest.mark.parametrize("shared_qk", [True, False])
def test_one_decode_step_costs_the_same_at_any_history_length(shared_qk: bool) -> None:
    model = _model(CONFIG.replace(shared_qk=shared_qk))
    short_flops, short_shapes = _step_cost(model, 10)
    long_flops, long_shapes = _step_cost(model, 100_000)
    assert short_flops > 0
    assert short_flops == long_flops
    assert short_shapes == long_shapes


def test_stack_and_unstack_round_trip() -> None:
    model = _model()
    with torch.no_grad():
        states = []
        for n in (3, 40):
            state = model.init_state(1)
            _feed(model, state, n)
            states.append(state)
    stacked = DecodeState.stack(states)
    assert stacked.batch_size == 2
    assert stacked.nbytes() == sum(s.nbytes() for s in states)
    for original, back in zip(states, stacked.unstack(), strict=True):
        for a, b in zip(original.layers, back.layers, strict=True):
            for ta, tb in zip(a.tensors(), b.tensors(), strict=True):
                assert torch.equal(ta, tb)
