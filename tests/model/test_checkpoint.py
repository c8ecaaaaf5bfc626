"""Checkpoint directories: exact round trips, and every broken file reported by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    TRAINING_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    read_training_info,
    save_checkpoint,
    update_training_info,
)
from model.config import ReformerConfig
from model.reformer import ReformerLM
from model.tokenizer import ChatTokenizer


def _tiny_model(vocab_size: int, seed: int = 0, **overrides: object) -> ReformerLM:
    torch.manual_seed(seed)
    return ReformerLM(ReformerConfig.tiny(vocab_size=vocab_size, **overrides)).eval()


def _ids(vocab_size: int, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def saved(tmp_path: Path, chat_tokenizer: ChatTokenizer) -> tuple[Path, ReformerLM]:
    """A freshly saved tiny checkpoint and the model it came from."""
    model = _tiny_model(chat_tokenizer.vocab_size)
    path = save_checkpoint(tmp_path / "ckpt", model, chat_tokenizer, extra={"step": 7})
    return path, model


@torch.no_grad()
def test_round_trip_gives_identical_logits_and_files(
    saved: tuple[Path, ReformerLM], chat_tokenizer: ChatTokenizer
) -> None:
    path, model = saved
    assert sorted(p.name for p in path.iterdir()) == [
        CONFIG_FILE,
        WEIGHTS_FILE,
        TOKENIZER_FILE,
        TRAINING_FILE,
    ]
    loaded, tokenizer = load_checkpoint(path, device="cpu")
    assert not loaded.training, "load_checkpoint must return the model in eval mode"
    assert loaded.config == model.config
    ids = _ids(model.config.vocab_size)
    assert torch.equal(loaded(ids), model(ids))
    assert tokenizer.to_bytes() == chat_tokenizer.to_bytes()
    assert read_training_info(path) == {"step": 7}
    assert json.loads((path / CONFIG_FILE).read_text())["format_version"] == 1


def test_save_accepts_a_tokenizer_file_and_replaces_an_old_checkpoint_whole(
    tmp_path: Path, chat_tokenizer_path: Path
) -> None:
    vocab = ChatTokenizer.load(chat_tokenizer_path).vocab_size
    target = tmp_path / "ckpt"
    save_checkpoint(target, _tiny_model(vocab, seed=0), chat_tokenizer_path, extra={"step": 1})
    second = _tiny_model(vocab, seed=1)
    save_checkpoint(target, second, chat_tokenizer_path)  # no extra: training.json must not survive
    loaded, _ = load_checkpoint(target, device="cpu")
    ids = _ids(vocab)
    with torch.no_grad():
        assert torch.equal(loaded(ids), second(ids))
    assert read_training_info(target) is None
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "no temporary or .old directory may remain"


def test_a_failed_save_leaves_the_previous_checkpoint_untouched(
    saved: tuple[Path, ReformerLM], tmp_path: Path
) -> None:
    path, _ = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(ValueError, match="does not exist"):
        save_checkpoint(path, _tiny_model(10), tmp_path / "no-such-tokenizer.model")
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@torch.no_grad()
def test_reversible_is_an_execution_mode_the_same_weights_load_either_way(
    tmp_path: Path, chat_tokenizer: ChatTokenizer
) -> None:
    vocab = chat_tokenizer.vocab_size
    ids = _ids(vocab)
    for reversible in (True, False):
        model = _tiny_model(vocab, reversible=reversible)
        path = save_checkpoint(tmp_path / f"rev-{reversible}", model, chat_tokenizer)
        as_saved, _ = load_checkpoint(path, device="cpu")
        flipped, _ = load_checkpoint(path, device="cpu", overrides={"reversible": not reversible})
        assert as_saved.config.reversible is reversible and flipped.config.reversible is not reversible
        assert torch.equal(flipped(ids), as_saved(ids))
        # Same tensors, not just same logits: the state dict is the same in both modes.
        for name, tensor in as_saved.state_dict().items():
            assert torch.equal(flipped.state_dict()[name], tensor), name


def test_overriding_a_field_that_shapes_the_weights_is_refused(saved: tuple[Path, ReformerLM]) -> None:
    path, _ = saved
    with pytest.raises(ValueError, match="d_model"):
        load_checkpoint(path, device="cpu", overrides={"d_model": 64})


@pytest.mark.parametrize("missing", [WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE])
def test_a_missing_file_is_named(saved: tuple[Path, ReformerLM], missing: str) -> None:
    path, _ = saved
    (path / missing).unlink()
    with pytest.raises(CheckpointError, match=f"{missing}: missing"):
        load_checkpoint(path, device="cpu")


def test_a_missing_directory_is_reported(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere", device="cpu")


def test_a_truncated_weights_file_is_named(saved: tuple[Path, ReformerLM]) -> None:
    path, _ = saved
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_FILE}: unreadable safetensors"):
        load_checkpoint(path, device="cpu")


def _edit_config(path: Path, edit: dict[str, object], remove: tuple[str, ...] = ()) -> None:
    config = json.loads((path / CONFIG_FILE).read_text())
    config.update(edit)
    for key in remove:
        del config[key]
    (path / CONFIG_FILE).write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("edit", "remove", "message"),
    [
        ({"colour": "blue"}, (), r"unknown field\(s\) \['colour'\]"),
        ({}, ("n_hashes",), r"missing field\(s\) \['n_hashes'\]"),
        ({"format_version": 99}, (), "format_version is 99"),
        ({"n_buckets": 3}, (), "invalid config: n_buckets"),
        (
            {"d_model": 48},
            (),
            (
                rf"{WEIGHTS_FILE}: does not match {CONFIG_FILE}: "
                r"'[\w.]+' has shape \(32,\) but the config needs \(48,\)"
            ),
        ),
        (
            {"vocab_size": 512},
            (),
            rf"{TOKENIZER_FILE}: tokenizer has \d+ pieces but {CONFIG_FILE} says vocab_size=512",
        ),
    ],
    ids=["unknown-field", "missing-field", "version", "invalid-value", "shape-mismatch", "vocab-mismatch"],
)
def test_a_bad_config_is_named_with_what_is_wrong(
    saved: tuple[Path, ReformerLM], edit: dict[str, object], remove: tuple[str, ...], message: str
) -> None:
    path, _ = saved
    _edit_config(path, edit, remove)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path, device="cpu")
    assert str(path) in str(info.value)


@torch.no_grad()
def test_a_config_written_before_shared_qk_existed_loads_as_shared_qk(
    tmp_path: Path, chat_tokenizer: ChatTokenizer
) -> None:
    """Checkpoints saved before the field (the shipped one among them) were shared-QK models."""
    model = _tiny_model(chat_tokenizer.vocab_size, shared_qk=True)
    path = save_checkpoint(tmp_path / "old", model, chat_tokenizer)
    _edit_config(path, {}, remove=("shared_qk",))
    loaded, _ = load_checkpoint(path, device="cpu")
    assert loaded.config.shared_qk is True
    torch.testing.assert_close(loaded(_ids(model.config.vocab_size)), model(_ids(model.config.vocab_size)))


def test_the_shipped_checkpoint_loads_as_its_config_says() -> None:
    shipped = Path(__file__).resolve().parents[2] / "checkpoints" / "reformer-chat-small"
    written = json.loads((shipped / CONFIG_FILE).read_text())
    model, _ = load_checkpoint(shipped, device="cpu")
    assert model.config.shared_qk is written.get("shared_qk", True)


def test_config_that_is_not_json_is_named(saved: tuple[Path, ReformerLM]) -> None:
    path, _ = saved
    (path / CONFIG_FILE).write_text('{"vocab_size": 1000,')
    with pytest.raises(CheckpointError, match=f"{CONFIG_FILE}: not valid JSON"):
        load_checkpoint(path, device="cpu")


def test_weights_of_another_architecture_are_named(
    saved: tuple[Path, ReformerLM], tmp_path: Path, chat_tokenizer: ChatTokenizer
) -> None:
    path, _ = saved
    # Three layers' weights under a two-layer config: extra tensors, each reported by name.
    other = save_checkpoint(
        tmp_path / "other", _tiny_model(chat_tokenizer.vocab_size, n_layers=3, attn_layers=("local",) * 3),
        chat_tokenizer,
    )  # fmt: skip
    (path / WEIGHTS_FILE).write_bytes((other / WEIGHTS_FILE).read_bytes())
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'blocks\.2\."):
        load_checkpoint(path, device="cpu")


def test_a_corrupt_tokenizer_is_named(saved: tuple[Path, ReformerLM]) -> None:
    path, _ = saved
    (path / TOKENIZER_FILE).write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match=f"{TOKENIZER_FILE}: unreadable tokenizer model"):
        load_checkpoint(path, device="cpu")


def test_training_info_updates_merge(saved: tuple[Path, ReformerLM]) -> None:
    path, _ = saved
    update_training_info(path, {"test_ppl": 12.5})
    assert read_training_info(path) == {"step": 7, "test_ppl": 12.5}
