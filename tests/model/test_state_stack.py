"""DecodeState.stack / FullLayerState.cat / DecodeState.to: states of several sessions batch together only
when they can, each row decoding as it would alone; misuse is refused with what to do instead.

Found by mutation testing: the "full"-layer path and the refusals could be broken without a failing test.
"""

from __future__ import annotations

import pytest
import torch

from model import DecodeState, ReformerConfig, ReformerLM

VOCAB = 53


def _model(layout: tuple[str, ...], seed: int = 0) -> ReformerLM:
    torch.manual_seed(seed)
    return ReformerLM(ReformerConfig.tiny(vocab_size=VOCAB, n_layers=len(layout), attn_layers=layout)).eval()


def _fed(model: ReformerLM, length: int, seed: int) -> DecodeState:
    state = model.init_state(1)
    model.decode(torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed)), state)
    return state


@torch.no_grad()
def test_full_states_of_one_length_stack_and_each_row_decodes_as_alone() -> None:
    model = _model(("local", "full"))
    alone = [_fed(model, 12, seed) for seed in (1, 2)]
    stacked = DecodeState.stack([s.clone() for s in alone])
    assert stacked.batch_size == 2 and stacked.nbytes() == sum(s.nbytes() for s in alone)
    batched = model.decode(torch.tensor([[7], [9]]), stacked)[:, -1, :]
    for row, (state, token) in enumerate(zip(alone, (7, 9), strict=True)):
        expected = model.decode(torch.tensor([[token]]), state)[:, -1, :]
        torch.testing.assert_close(batched[row : row + 1], expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_full_states_of_different_lengths_are_refused_with_the_fix() -> None:
    model = _model(("local", "full"))
    with pytest.raises(
        ValueError, match=r"different lengths \[12, 13\]: decode such sequences one at a time"
    ):
        DecodeState.stack([_fed(model, 12, 1), _fed(model, 13, 2)])


@torch.no_grad()
def test_stack_refuses_nothing_and_mixed_depths() -> None:
    with pytest.raises(ValueError, match=r"stack\(\) needs at least one state"):
        DecodeState.stack([])
    shallow, deep = _model(("local", "lsh")), _model(("local", "lsh", "lsh"))
    with pytest.raises(ValueError, match=r"states come from models with different depths: \[2, 3\]"):
        DecodeState.stack([_fed(shallow, 5, 1), _fed(deep, 5, 2)])


@torch.no_grad()
@pytest.mark.parametrize("layout", [("local", "lsh"), ("local", "full")])
def test_to_moves_every_tensor(layout: tuple[str, ...]) -> None:
    state = _fed(_model(layout), 9, 3)
    moved = state.to("meta")  # a device with no data: shows where every tensor went, at no cost
    tensors = [moved.length, *(t for layer in moved.layers for t in layer.tensors())]
    assert all(t.device.type == "meta" for t in tensors)
    assert [t.shape for t in tensors[1:]] == [t.shape for layer in state.layers for t in layer.tensors()]
