"""Decode batches with the real tiny model: rows that join, step together and leave stay their own.

SlotBatch keeps its rows in one preallocated state and moves single rows in and out; these tests check
that no row ever sees another's state, whatever the join/leave order and history lengths.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from app.engine.batching import SlotBatch, SoloBatch
from model import DecodeState, ReformerConfig, ReformerLM

VOCAB = 61


@pytest.fixture(scope="module")
def model() -> Iterator[ReformerLM]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(7)
    yield ReformerLM(ReformerConfig.tiny(vocab_size=VOCAB)).eval()
    torch.set_num_threads(threads)


def fed(model: ReformerLM, length: int, seed: int) -> DecodeState:
    """A batch-size-1 state that has seen `length` random tokens (past the tiny model's capacity of 32)."""
    state = model.init_state(1)
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))
    model.decode(ids, state)
    return state


def step_alone(model: ReformerLM, state: DecodeState, token: int) -> torch.Tensor:
    return model.decode(torch.tensor([[token]]), state)[:, -1, :]  # (1, V)


@torch.inference_mode()
def test_rows_joining_and_leaving_decode_like_separate_sessions(model: ReformerLM) -> None:
    lengths = {"a": 3, "b": 40, "c": 95, "d": 17}
    alone = {name: fed(model, n, seed=i) for i, (name, n) in enumerate(lengths.items())}
    batch: SlotBatch[str] = SlotBatch(model, max_rows=4)
    tokens = torch.Generator().manual_seed(1)

    def step() -> None:
        picks = torch.randint(0, VOCAB, (len(batch),), generator=tokens)
        together = batch.decode(picks)  # (B, V)
        for row, name in enumerate(batch.members):
            expected = step_alone(model, alone[name], int(picks[row]))
            torch.testing.assert_close(together[row : row + 1], expected, rtol=0, atol=1e-5)

    batch.add("a", alone["a"].clone())
    step()
    batch.add("b", alone["b"].clone())
    batch.add("c", alone["c"].clone())  # grows the pool past its first capacity
    step()
    step()
    (b_state,) = batch.remove(["b"])  # a middle row: the last row moves into its place
    assert batch.members == ["a", "c"]
    batch.add("d", alone["d"].clone())
    step()
    finished = batch.remove(["d", "a"])
    step()
    # The states that left carry on exactly where the separately decoded ones are.
    for name, state in zip(["b", "d", "a"], [b_state, *finished], strict=True):
        assert state.batch_size == 1 and int(state.length[0]) == int(alone[name].length[0])
        torch.testing.assert_close(
            step_alone(model, state, 5), step_alone(model, alone[name], 5), atol=1e-5, rtol=0
        )


@torch.inference_mode()
def test_an_emptied_batch_holds_no_memory_and_refills(model: ReformerLM) -> None:
    batch: SlotBatch[int] = SlotBatch(model, max_rows=2)
    batch.add(1, fed(model, 10, seed=3))
    batch.add(2, fed(model, 20, seed=4))
    assert batch.capacity == 2
    with pytest.raises(ValueError, match="full"):
        batch.add(3, fed(model, 5, seed=5))
    batch.remove([1, 2])
    assert batch.capacity == 0 and len(batch) == 0
    again = fed(model, 7, seed=6)
    batch.add(9, again.clone())
    torch.testing.assert_close(
        batch.decode(torch.tensor([4])), step_alone(model, again, 4), atol=1e-5, rtol=0
    )


def test_full_attention_states_go_to_solo_batches() -> None:
    full = ReformerLM(ReformerConfig.tiny(vocab_size=VOCAB, attn_layers=("local", "full"))).eval()
    with pytest.raises(ValueError, match="SoloBatch"):
        SlotBatch(full, max_rows=4)
    with torch.inference_mode():
        solo: SoloBatch[str] = SoloBatch(full)
        state = fed(full, 12, seed=8)
        assert solo.accepts(state)
        solo.add("x", state)
        assert not solo.accepts(fed(full, 12, seed=9))
        assert solo.decode(torch.tensor([3])).shape == (1, VOCAB)
        (back,) = solo.remove(["x"])
        assert int(back.length[0]) == 13 and len(solo) == 0
