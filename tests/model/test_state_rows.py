"""The row operations a serving batch needs from DecodeState, as properties of model/, not of the app.

A batch that rows join and leave keeps one state and decodes a view of its live rows in place
(app/engine/batching.py). That is only correct if (a) copy_rows_ moves a row's whole state, length
included, and (b) a one-token decode updates a state in place, so decoding a view of some rows leaves
the big state exactly as decoding each row on its own would (property 6, batch rows never mix, on a view
of a larger state), and the rows outside the view untouched.
"""

import pytest
import torch

from model import DecodeState, ReformerConfig, ReformerLM

# Local and LSH layers: both kinds must shift or write their one-token updates into the given tensors.
CONFIG = ReformerConfig.tiny(vocab_size=50)
HISTORIES = (5, 17, 40, 70)  # below and past the local window, so every row's state differs


def _model(shared_qk: bool = False) -> ReformerLM:
    torch.manual_seed(0)
    return ReformerLM(CONFIG.replace(shared_qk=shared_qk)).eval()


def _fed(model: ReformerLM, n_tokens: int) -> DecodeState:
    state = model.init_state(1)
    ids = torch.randint(0, 50, (1, n_tokens), generator=torch.Generator().manual_seed(n_tokens))
    model.decode(ids, state)
    return state


def _assert_same(a: DecodeState, b: DecodeState) -> None:
    assert torch.equal(a.length, b.length)
    for layer_a, layer_b in zip(a.layers, b.layers, strict=True):
        for x, y in zip(layer_a.tensors(), layer_b.tensors(), strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shared_qk", [True, False])
@torch.inference_mode()
def test_copy_rows_moves_each_row_whole_and_leaves_the_others(shared_qk: bool) -> None:
    model = _model(shared_qk)
    singles = [_fed(model, n) for n in HISTORIES]
    pool = model.init_state(len(HISTORIES) + 1)
    for row, single in enumerate(singles):
        pool.copy_rows_(slice(row, row + 1), single)
    for row, single in enumerate(singles):
        _assert_same(pool.rows(slice(row, row + 1)), single)
        assert pool.rows(slice(row, row + 1)).seen_tokens() == HISTORIES[row]
    _assert_same(pool.rows(slice(4, 5)), model.init_state(1))  # never written: still empty
    # Moving the last row into a hole (a row leaving the batch) copies it, length and all.
    pool.copy_rows_(slice(0, 1), pool.rows(slice(3, 4)))
    _assert_same(pool.rows(slice(0, 1)), singles[3])


@pytest.mark.parametrize("shared_qk", [True, False])
@torch.inference_mode()
def test_a_one_token_decode_of_a_row_view_updates_the_parent_state_in_place(shared_qk: bool) -> None:
    model = _model(shared_qk)
    singles = [_fed(model, n) for n in HISTORIES]
    pool = model.init_state(len(HISTORIES))
    for row, single in enumerate(singles):
        pool.copy_rows_(slice(row, row + 1), single)
    outside = pool.rows(slice(3, 4)).clone()
    live = slice(0, 3)
    for step in range(CONFIG.bucket_size + 3):  # past a local window, so its tensors get replaced
        tokens = torch.tensor([[step % 50], [(step * 7) % 50], [(step * 11) % 50]])  # (3, 1)
        batched = model.decode(tokens, pool.rows(live))[:, -1, :]  # (3, V); the view is thrown away
        for row in range(3):
            alone = model.decode(tokens[row : row + 1], singles[row])[:, -1, :]  # (1, V)
            torch.testing.assert_close(batched[row : row + 1], alone, rtol=1e-4, atol=1e-5)
    for row in range(3):
        _assert_same(pool.rows(slice(row, row + 1)), singles[row])
    _assert_same(pool.rows(slice(3, 4)), outside)


@torch.inference_mode()
def test_copy_rows_refuses_a_mismatched_row_count() -> None:
    model = _model()
    pool = model.init_state(3)
    with pytest.raises(ValueError, match="1 rows"):
        pool.copy_rows_(slice(0, 2), model.init_state(1))
