"""Warm start: same layout gives the source model exactly; other layer kinds get the projections mapped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import ChatTokenizer, ReformerLM, load_checkpoint
from model.checkpoint import TOKENIZER_FILE, save_checkpoint
from model.train.trainer import main
from model.train.warm_start import warm_start


def _qkv(model: ReformerLM, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's query, key and value projection weights, whatever its kind."""
    attn = model.blocks[layer].attn.state_dict()
    weights = {name.removesuffix(".weight"): t for name, t in attn.items() if name.startswith("to_")}
    if "to_qkv" in weights:
        q, k, v = weights["to_qkv"].chunk(3)
        return q, k, v
    if "to_qk" in weights:
        return weights["to_qk"], weights["to_qk"], weights["to_v"]
    return weights["to_q"], weights["to_k"], weights["to_v"]


@pytest.fixture(scope="module")
def source(tiny_checkpoint: Path) -> tuple[ReformerLM, ChatTokenizer]:
    return load_checkpoint(tiny_checkpoint, device="cpu")


def test_the_same_layout_starts_as_the_source_model(tiny_checkpoint: Path, source) -> None:
    model, _ = source
    torch.manual_seed(1)
    fresh = ReformerLM(model.config)
    started = warm_start(fresh, tiny_checkpoint, tiny_checkpoint / TOKENIZER_FILE)
    assert started.mapped == [] and started.fresh == []
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("kinds", [("full", "full"), ("local", "local"), ("lsh", "lsh")])
def test_other_layer_kinds_get_the_same_query_key_and_value_projections(
    tiny_checkpoint: Path,
    source,
    kinds: tuple[str, str],
) -> None:
    model, _ = source
    torch.manual_seed(1)
    target = ReformerLM(model.config.replace(attn_layers=kinds))
    started = warm_start(target, tiny_checkpoint, tiny_checkpoint / TOKENIZER_FILE)
    for layer in range(2):
        (q, k, v), (source_q, source_k, source_v) = _qkv(target, layer), _qkv(model, layer)
        torch.testing.assert_close(q, source_q, rtol=0, atol=0)
        torch.testing.assert_close(v, source_v, rtol=0, atol=0)
        # A shared-QK layer has one projection for both: the source's query.
        has_own_keys = "to_qk.weight" not in target.blocks[layer].attn.state_dict()
        torch.testing.assert_close(k, source_k if has_own_keys else source_q, rtol=0, atol=0)
    torch.testing.assert_close(target.embed.weight, model.embed.weight, rtol=0, atol=0)
    assert all(".attn." in name for name in started.mapped)


def test_a_shared_qk_source_gives_separate_qk_layers_its_queries_and_fresh_keys(
    tiny_checkpoint: Path, source, tmp_path: Path
) -> None:
    """Keys equal to the queries would start on the symmetric score that cannot learn copying: to_k stays at
    its own initialisation while everything else comes from the checkpoint."""
    model, tokenizer = source
    torch.manual_seed(2)
    shared = ReformerLM(model.config.replace(shared_qk=True))
    save_checkpoint(tmp_path / "shared", shared, tokenizer)
    torch.manual_seed(1)
    target = ReformerLM(model.config.replace(shared_qk=False))
    fresh_keys = {i: block.attn.to_k.weight.detach().clone() for i, block in enumerate(target.blocks)
                  if block.kind == "lsh"}  # fmt: skip
    started = warm_start(target, tmp_path / "shared", tiny_checkpoint / TOKENIZER_FILE)
    assert fresh_keys
    for layer, keys in fresh_keys.items():
        attn, source_attn = target.blocks[layer].attn, shared.blocks[layer].attn
        torch.testing.assert_close(attn.to_q.weight, source_attn.to_qk.weight, rtol=0, atol=0)
        torch.testing.assert_close(attn.to_k.weight, keys, rtol=0, atol=0)
        assert not torch.equal(attn.to_k.weight, source_attn.to_qk.weight)
        assert f"blocks.{layer}.attn.to_k.weight" in started.fresh
    torch.testing.assert_close(target.embed.weight, shared.embed.weight, rtol=0, atol=0)


def test_a_different_size_or_tokenizer_is_refused(tiny_checkpoint: Path, source, tmp_path: Path) -> None:
    model, _ = source
    wider = ReformerLM(model.config.replace(d_model=48))
    with pytest.raises(ValueError, match="d_model 32 vs 48"):
        warm_start(wider, tiny_checkpoint, tiny_checkpoint / TOKENIZER_FILE)
    other = tmp_path / "other.model"
    other.write_bytes(b"not the same tokenizer")
    with pytest.raises(ValueError, match="--tokenizer"):
        warm_start(ReformerLM(model.config), tiny_checkpoint, other)


def test_a_warm_started_run_begins_from_the_checkpoint(tiny_checkpoint: Path, source, tmp_path: Path) -> None:
    """With a learning rate of 1e-30 the weights move by ~1e-30 at most (only zeros, such as biases, can even
    show it), while a fresh initialisation differs by ~1e-2 (seed 1: the tiny checkpoint is seed 0's): the run
    must ship the source's weights."""
    model, _ = source
    out = tmp_path / "run"
    args = [
        "--out", str(out), "--init-from", str(tiny_checkpoint),
        "--tokenizer", str(tiny_checkpoint / TOKENIZER_FILE), "--preset", "tiny", "--data-limit", "12",
        "--seq-len", "32", "--batch-size", "4", "--eval-batches", "1", "--test-batches", "1",
        "--steps", "2", "--eval-every", "1", "--lr", "1e-30", "--seed", "1",
        "--threads", "1", "--device", "cpu",
    ]  # fmt: skip
    assert main(args) == 0
    shipped, _ = load_checkpoint(out / "checkpoint", device="cpu")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(shipped.state_dict()[name], tensor, rtol=0, atol=1e-20, msg=name)
