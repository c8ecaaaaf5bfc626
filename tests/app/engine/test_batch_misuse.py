"""Decode batches refuse misuse with a ValueError that says what was wrong, rather than decoding the wrong
rows: the engine relies on that to fail loudly, not to stream one conversation's tokens into another.

SoloBatch (models with "full" layers, whose states cannot stack) holds exactly one row; its one decode step
is the model's own. Found by mutation testing: its guards could be removed without any test noticing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from app.engine.batching import SlotBatch, SoloBatch
from model import DecodeState, ReformerConfig, ReformerLM

VOCAB = 61


@pytest.fixture(scope="module")
def full_model() -> Iterator[ReformerLM]:
    torch.manual_seed(3)
    yield ReformerLM(ReformerConfig.tiny(vocab_size=VOCAB, attn_layers=("local", "full"))).eval()


def fed(model: ReformerLM, length: int, seed: int, batch: int = 1) -> DecodeState:
    state = model.init_state(batch)
    model.decode(
        torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed)), state
    )
    return state


@torch.inference_mode()
def test_a_solo_batch_steps_its_one_row_exactly_as_the_model(full_model: ReformerLM) -> None:
    solo: SoloBatch[str] = SoloBatch(full_model)
    state = fed(full_model, 12, seed=1)
    alone = state.clone()
    solo.add("x", state)
    expected = full_model.decode(torch.tensor([[5]]), alone)[:, -1, :]
    torch.testing.assert_close(solo.decode(torch.tensor([5])), expected, rtol=0, atol=0)
    (back,) = solo.remove(["x"])
    assert back is state and int(back.length[0]) == 13


@torch.inference_mode()
def test_a_solo_batch_refuses_misuse(full_model: ReformerLM) -> None:
    solo: SoloBatch[str] = SoloBatch(full_model)
    with pytest.raises(ValueError, match=r"need one token for the one row, got tokens of shape \(1,\)"):
        solo.decode(torch.tensor([1]))  # nothing added yet
    with pytest.raises(ValueError, match="a SoloBatch removes its one row"):
        solo.remove(["x"])
    solo.add("x", fed(full_model, 4, seed=2))
    with pytest.raises(ValueError, match="a SoloBatch holds one row: start another"):
        solo.add("y", fed(full_model, 4, seed=3))
    assert solo.members == ["x"]
    with pytest.raises(ValueError, match=r"need one token for the one row, got tokens of shape \(2,\)"):
        solo.decode(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="a SoloBatch removes its one row"):
        solo.remove(["y"])
    with pytest.raises(ValueError, match="a SoloBatch removes its one row"):
        solo.remove(["x", "x"])
    assert len(solo) == 1


@torch.inference_mode()
def test_a_slot_batch_takes_only_single_rows() -> None:
    torch.manual_seed(4)
    model = ReformerLM(ReformerConfig.tiny(vocab_size=VOCAB)).eval()
    batch: SlotBatch[str] = SlotBatch(model, max_rows=4)
    with pytest.raises(ValueError, match="a row joins with a batch-size-1 state, got batch size 2"):
        batch.add("pair", fed(model, 4, seed=5, batch=2))
    assert len(batch) == 0
