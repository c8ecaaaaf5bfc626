"""train_state.pt: an exact round trip of what a resumed run needs, every failure named, RNGs restored."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from model.checkpoint import CheckpointError
from model.config import ReformerConfig
from model.reformer import ReformerLM
from model.train.resume import (
    TRAIN_STATE_FILE,
    capture_rng_state,
    load_training_state,
    restore_rng_state,
    save_training_state,
)


def _tiny_model(vocab_size: int, seed: int = 0, **overrides: object) -> ReformerLM:
    torch.manual_seed(seed)
    return ReformerLM(ReformerConfig.tiny(vocab_size=vocab_size, **overrides)).eval()


def _ids(vocab_size: int, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))


def test_training_state_round_trip_and_failures(tmp_path: Path) -> None:
    model = _tiny_model(64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    model.loss(_ids(64, 16), _ids(64, 16, seed=2)).backward()
    optimizer.step()
    state = {"step": 3, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "note": ("a", 1.5)}
    save_training_state(tmp_path, state)
    loaded = load_training_state(tmp_path)
    assert loaded["step"] == 3 and loaded["note"] == ("a", 1.5)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded["model"][name], tensor)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    assert torch.equal(
        fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [TRAIN_STATE_FILE]

    (tmp_path / TRAIN_STATE_FILE).write_bytes((tmp_path / TRAIN_STATE_FILE).read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{TRAIN_STATE_FILE}: unreadable"):
        load_training_state(tmp_path)
    with pytest.raises(CheckpointError, match="drop --resume"):
        load_training_state(tmp_path / "empty")


def test_rng_state_restores_every_generator(tmp_path: Path) -> None:
    device = torch.device("cpu")
    torch.manual_seed(5)
    random.seed(5)
    save_training_state(tmp_path, {"rng": capture_rng_state(device)})
    expected = (torch.rand(4), random.random())
    torch.manual_seed(99)
    random.seed(99)
    restore_rng_state(load_training_state(tmp_path)["rng"], device)
    again = (torch.rand(4), random.random())
    assert torch.equal(again[0], expected[0]) and again[1] == expected[1]
