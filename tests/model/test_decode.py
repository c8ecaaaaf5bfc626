"""Property 2 (decode equals forward, any split) and property 6 (batch rows never mix)."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import DecodeState, ReformerConfig, ReformerLM

LAYOUTS = [("local", "lsh"), ("lsh", "lsh"), ("local", "lsh", "full")]


def _model(layout: tuple[str, ...], shared_qk: bool, seed: int = 0) -> ReformerLM:
    torch.manual_seed(seed)
    config = ReformerConfig.tiny(vocab_size=97, n_layers=len(layout), attn_layers=layout, shared_qk=shared_qk)
    return ReformerLM(config).eval()


def _decode_in_pieces(model: ReformerLM, ids: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    state = model.init_state(ids.shape[0])
    outputs, start = [], 0
    for size in pieces:
        outputs.append(model.decode(ids[:, start : start + size], state))
        start += size
    assert int(state.length[0]) == ids.shape[1]
    return torch.cat(outputs, dim=1)


def _split(length: int, cuts: list[int]) -> list[int]:
    points = sorted({c % length for c in cuts} - {0})
    bounds = [0, *points, length]
    return [b - a for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("shared_qk", [True, False])
@settings(max_examples=30, deadline=None)
@given(
    layout=st.sampled_from(LAYOUTS),
    batch=st.integers(1, 3),
    length=st.integers(1, 100),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
    seed=st.integers(0, 3),
)
def test_decode_in_any_split_equals_forward(
    shared_qk: bool, layout: tuple[str, ...], batch: int, length: int, cuts: list[int], seed: int
) -> None:
    model = _model(layout, shared_qk, seed)
    ids = torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed + length))
    with torch.no_grad():
        expected = model(ids)
        got = _decode_in_pieces(model, ids, _split(length, cuts))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("shared_qk", [True, False])
def test_single_tokens_and_one_prefill_both_match_forward_past_capacity(shared_qk: bool) -> None:
    model = _model(("local", "lsh"), shared_qk)
    capacity = model.config.lsh_capacity
    ids = torch.randint(0, 97, (2, 3 * capacity + 5))  # not a multiple of bucket_size, several times capacity
    with torch.no_grad():
        expected = model(ids)
        one_by_one = _decode_in_pieces(model, ids, [1] * ids.shape[1])
        prefill_then_steps = _decode_in_pieces(model, ids, [ids.shape[1] - 7] + [1] * 7)
    torch.testing.assert_close(one_by_one, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(prefill_then_steps, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("shared_qk", [True, False])
def test_batch_rows_do_not_mix_forward_and_decode(shared_qk: bool) -> None:
    model = _model(("local", "lsh", "full"), shared_qk)
    ids = torch.randint(0, 97, (3, 45))
    with torch.no_grad():
        batched = model(ids)
        state = model.init_state(3)
        batched_decode = torch.cat([model.decode(ids[:, :20], state), model.decode(ids[:, 20:], state)], 1)
        for row in range(3):
            alone = model(ids[row : row + 1])
            torch.testing.assert_close(batched[row : row + 1], alone, rtol=0, atol=1e-5)
            torch.testing.assert_close(batched_decode[row : row + 1], alone, rtol=0, atol=1e-4)


@pytest.mark.parametrize("shared_qk", [True, False])
def test_stacked_states_of_different_lengths_decode_like_separate_sessions(shared_qk: bool) -> None:
    """Continuous batching stacks sessions with different histories; each row must stay its own."""
    model = _model(("local", "lsh"), shared_qk)
    histories = [torch.randint(0, 97, (1, n)) for n in (5, 33, 71)]
    next_tokens = torch.randint(0, 97, (3, 1))
    with torch.no_grad():
        states = []
        for history in histories:
            state = model.init_state(1)
            model.decode(history, state)
            states.append(state)
        alone = [model.decode(next_tokens[i : i + 1], s.clone()) for i, s in enumerate(states)]
        batched_state = DecodeState.stack(states)
        together = model.decode(next_tokens, batched_state)
        for i in range(3):
            torch.testing.assert_close(together[i : i + 1], alone[i], rtol=0, atol=1e-5)
            expected = model(torch.cat([histories[i], next_tokens[i : i + 1]], dim=1))[:, -1:]
            torch.testing.assert_close(together[i : i + 1], expected, rtol=0, atol=1e-4)
    lengths = [int(s.length[0]) for s in batched_state.unstack()]
    assert lengths == [6, 34, 72]


def test_a_state_from_another_layer_layout_is_refused_by_name() -> None:
    """decode() pairs each layer with its own kind of state; a state built by another layout is an error."""
    model = _model(("local", "lsh"), shared_qk=False)
    other = _model(("lsh", "local"), shared_qk=False)
    with torch.no_grad(), pytest.raises(TypeError, match="another layer layout"):
        model.decode(torch.tensor([[1, 2]]), other.init_state(1))
