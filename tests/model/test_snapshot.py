"""Decode-state snapshots (model/snapshot.py): the bytes read back into the very same state, a resumed
state continues exactly as the warm one (property 2 across a save and a load), and anything else is
refused with the reason the service counts."""

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import DecodeState, ReformerConfig, ReformerLM
from model.snapshot import (
    FORMAT_VERSION,
    SnapshotError,
    checkpoint_identity,
    read_header,
    state_from_bytes,
    state_to_bytes,
)

LAYOUTS = [("local", "lsh"), ("lsh", "lsh"), ("local", "lsh", "full")]
VOCAB = 97


def _model(layout: tuple[str, ...], seed: int = 0, shared_qk: bool = False) -> ReformerLM:
    torch.manual_seed(seed)
    config = ReformerConfig.tiny(
        vocab_size=VOCAB, n_layers=len(layout), attn_layers=layout, shared_qk=shared_qk
    )
    return ReformerLM(config).eval()


def _ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))  # (1, L)


def _fed(model: ReformerLM, ids: torch.Tensor) -> DecodeState:
    state = model.init_state(1)
    if ids.shape[1]:
        with torch.no_grad():
            model.decode(ids, state)
    return state


def _bf16(state: DecodeState) -> DecodeState:
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16) if t.is_floating_point() else t

    return DecodeState([layer._map(cast) for layer in state.layers], state.length)


def _assert_same(a: DecodeState, b: DecodeState) -> None:
    assert torch.equal(a.length, b.length)
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert type(la) is type(lb)
        for ta, tb in zip(la.tensors(), lb.tensors(), strict=True):
            assert ta.dtype == tb.dtype and ta.shape == tb.shape
            assert torch.equal(ta, tb)


@settings(max_examples=20, deadline=None)
@given(layout=st.sampled_from(LAYOUTS), length=st.integers(0, 300), seed=st.integers(0, 3))
def test_round_trip_is_exact(layout: tuple[str, ...], length: int, seed: int) -> None:
    model = _model(layout, seed)
    identity = checkpoint_identity(model)
    state = _fed(model, _ids(length, seed))
    data = state_to_bytes(state, identity)
    assert read_header(data).tokens == length
    _assert_same(state_from_bytes(data, identity, like=model.init_state(1)), state)


def test_round_trip_keeps_a_bf16_state_bit_for_bit() -> None:
    model = _model(("local", "lsh"))
    state = _fed(model, _ids(150, 0))
    half, like = _bf16(state), _bf16(model.init_state(1))
    _assert_same(state_from_bytes(state_to_bytes(half, "x"), "x", like=like), half)
    with pytest.raises(SnapshotError, match="float32") as refused:  # a bf16 state for an fp32 model
        state_from_bytes(state_to_bytes(half, "x"), "x", like=model.init_state(1))
    assert refused.value.reason == "corrupt"


@settings(max_examples=20, deadline=None)
@given(
    layout=st.sampled_from(LAYOUTS),
    prefix=st.integers(0, 200),
    tail=st.integers(1, 80),
    seed=st.integers(0, 3),
    shared_qk=st.booleans(),
)
def test_a_resumed_state_plus_the_tail_equals_the_warm_state_and_forward(
    layout: tuple[str, ...], prefix: int, tail: int, seed: int, shared_qk: bool
) -> None:
    """Property 2 across a restart: the snapshot of the first `prefix` tokens, loaded by a fresh copy of
    the model, fed the tail, gives the warm state's logits (bit for bit) and forward()'s."""
    model = _model(layout, seed, shared_qk)
    ids = _ids(prefix + tail, seed + 7)
    warm = _fed(model, ids[:, :prefix])
    data = state_to_bytes(warm, checkpoint_identity(model))
    restarted = _model(layout, seed, shared_qk)  # another process: the same checkpoint, loaded anew
    resumed = state_from_bytes(data, checkpoint_identity(restarted), like=restarted.init_state(1))
    with torch.no_grad():
        expected = model(ids)[:, prefix:]
        warm_logits = model.decode(ids[:, prefix:], warm)
        resumed_logits = restarted.decode(ids[:, prefix:], resumed)
    assert torch.equal(resumed_logits, warm_logits)
    torch.testing.assert_close(resumed_logits, expected, rtol=0, atol=1e-4)
    _assert_same(resumed, warm)


def test_identity_names_weights_config_and_dtype() -> None:
    a = _model(("local", "lsh"), seed=0)
    assert checkpoint_identity(a) == checkpoint_identity(_model(("local", "lsh"), seed=0))
    assert checkpoint_identity(a) != checkpoint_identity(_model(("local", "lsh"), seed=1))  # weights
    with torch.no_grad():
        b = _model(("local", "lsh"), seed=0)
        b.head.weight[0, 0] += 1e-3  # one weight
    assert checkpoint_identity(a) != checkpoint_identity(b)
    config = ReformerConfig.tiny(vocab_size=VOCAB, n_layers=2, attn_layers=("local", "lsh"), n_hashes=1)
    c = ReformerLM(config)
    assert checkpoint_identity(a) != checkpoint_identity(c)  # config
    assert checkpoint_identity(a) != checkpoint_identity(_model(("local", "lsh")).to(torch.bfloat16))  # dtype


@pytest.fixture(scope="module")
def snapshot() -> tuple[ReformerLM, str, bytes]:
    model = _model(("local", "lsh", "full"))
    identity = checkpoint_identity(model)
    return model, identity, state_to_bytes(_fed(model, _ids(120, 3)), identity)


def test_another_checkpoints_snapshot_is_refused_as_foreign(snapshot: tuple[ReformerLM, str, bytes]) -> None:
    model, _, data = snapshot
    other = checkpoint_identity(_model(("local", "lsh", "full"), seed=1))
    with pytest.raises(SnapshotError, match="taken by checkpoint") as refused:
        state_from_bytes(data, other, like=model.init_state(1))
    assert refused.value.reason == "foreign"


def test_another_format_version_is_refused_by_name(snapshot: tuple[ReformerLM, str, bytes]) -> None:
    model, identity, data = snapshot
    newer = data[:8] + struct.pack("<I", FORMAT_VERSION + 1) + data[12:]
    with pytest.raises(SnapshotError, match=f"format version {FORMAT_VERSION + 1}") as refused:
        state_from_bytes(newer, identity, like=model.init_state(1))
    assert refused.value.reason == "version"


@settings(max_examples=40, deadline=None)
@given(cut=st.floats(0, 1, exclude_max=True))
def test_every_truncation_is_refused(snapshot: tuple[ReformerLM, str, bytes], cut: float) -> None:
    model, identity, data = snapshot
    with pytest.raises(SnapshotError) as refused:
        state_from_bytes(data[: int(cut * len(data))], identity, like=model.init_state(1))
    assert refused.value.reason in ("truncated", "corrupt")  # a cut inside the JSON header is unreadable


@settings(max_examples=40, deadline=None)
@given(where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_every_flipped_bit_is_refused(
    snapshot: tuple[ReformerLM, str, bytes], where: float, bit: int
) -> None:
    model, identity, data = snapshot
    corrupt = bytearray(data)
    corrupt[int(where * len(data))] ^= 1 << bit
    with pytest.raises(SnapshotError):
        state_from_bytes(bytes(corrupt), identity, like=model.init_state(1))


def test_a_state_of_another_layout_is_refused(snapshot: tuple[ReformerLM, str, bytes]) -> None:
    _, identity, data = snapshot
    with pytest.raises(SnapshotError, match="layer layout") as refused:
        state_from_bytes(data, identity, like=_model(("local", "lsh")).init_state(1))
    assert refused.value.reason == "corrupt"
    with pytest.raises(SnapshotError, match="its header says"):
        state_from_bytes(data + b"\0", identity, like=_model(("local", "lsh", "full")).init_state(1))


def test_a_batch_of_several_rows_is_not_a_snapshot() -> None:
    model = _model(("local", "lsh"))
    with pytest.raises(ValueError, match="one row"):
        state_to_bytes(model.init_state(2), "x")
