"""Warm start: a new run's weights from a trained checkpoint whose attention layout may differ.

Why: on this project's shared CPU machine a run buys a few million tokens, and the shipped checkpoint already
spent ~70 minutes learning plain chat. Starting from it lets a new run spend its budget on what is new (long
streams, memory episodes, separate query/key projections) instead of relearning the vocabulary. Both runs
together stay within the issue's budget; training.json records the source (options.init_from).

Every tensor whose name and shape match is copied. Attention projections are mapped between layer kinds by
what they compute: a shared-QK LSH layer's `to_qk` is both the query and the key projection, a separate-QK
LSH layer has `to_q` and `to_k`, local and full layers stack query, key and value rows in `to_qkv`, and an
LSH layer can start a local or full layer of the side-by-side baselines. One exception: a shared-QK layer
gives a separate-QK LSH layer its queries but not its keys. Keys equal to the queries would start the new
layer on the symmetric score that cannot learn copying (docs/DESIGN.md), while a fresh key projection learns
it (docs/BENCHMARKS.md, "Copy task"); so that `to_k` starts fresh. Tensors with no counterpart (an LSH
layer's hash rotations when its source was local) keep their fresh initialisation too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from model.checkpoint import TOKENIZER_FILE, WEIGHTS_FILE, load_config
from model.reformer import ReformerLM

# Sizes that must agree for weights to carry over (attention kinds and hashing may differ).
_SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "d_head", "d_ff")
_PROJECTION = re.compile(r"^(blocks\.\d+\.attn\.)(to_qkv|to_qk|to_q|to_k|to_v)\.weight$")


@dataclass(frozen=True)
class WarmStart:
    source: str
    copied: int  # tensors taken as they were
    mapped: list[str]  # attention projections rebuilt from another layer kind's
    fresh: list[str]  # tensors left at their initialisation


def _query_key_value(weights: dict[str, Tensor], prefix: str) -> tuple[Tensor, Tensor, Tensor] | None:
    """A source layer's (query, key, value) projection weights, each (inner, d_model), whatever its kind."""
    if prefix + "to_qkv.weight" in weights:
        q, k, v = weights[prefix + "to_qkv.weight"].chunk(3, dim=0)  # rows: q, then k, then v
        return q, k, v
    if prefix + "to_qk.weight" in weights:
        qk = weights[prefix + "to_qk.weight"]
        return qk, qk, weights[prefix + "to_v.weight"]
    if prefix + "to_q.weight" in weights:
        q, k, v = (weights[prefix + f"to_{part}.weight"] for part in "qkv")
        return q, k, v
    return None


def warm_start(model: ReformerLM, checkpoint: Path, tokenizer_file: Path) -> WarmStart:
    """Load `checkpoint`'s weights into `model` in place, mapping attention projections between kinds.

    `tokenizer_file` (the run's) must be the checkpoint's tokenizer: the embedding rows are its pieces.
    """
    from safetensors.torch import load_file

    if (checkpoint / TOKENIZER_FILE).read_bytes() != tokenizer_file.read_bytes():
        raise ValueError(
            f"--init-from {checkpoint}: the run's tokenizer is not the checkpoint's; "
            f"pass --tokenizer {checkpoint / TOKENIZER_FILE}"
        )
    source_config = load_config(checkpoint)
    different = [
        f"{name} {getattr(source_config, name)} vs {getattr(model.config, name)}"
        for name in _SHAPE_FIELDS
        if getattr(source_config, name) != getattr(model.config, name)
    ]
    if different:
        raise ValueError(
            f"--init-from {checkpoint}: the checkpoint's sizes differ from this run's "
            f"({'; '.join(different)}): use the same preset, overrides and tokenizer"
        )
    source = load_file(str(checkpoint / WEIGHTS_FILE), device="cpu")
    target = model.state_dict()
    loaded: dict[str, Tensor] = {}
    mapped: list[str] = []
    for name, tensor in target.items():
        if name in source and source[name].shape == tensor.shape:
            loaded[name] = source[name]
            continue
        match = _PROJECTION.match(name)
        parts = _query_key_value(source, match.group(1)) if match else None
        if match is None or parts is None:
            continue
        q, k, v = parts
        kind = match.group(2)
        if kind == "to_k" and match.group(1) + "to_qk.weight" in source:
            continue  # a separate-QK layer's keys do not start as a shared-QK layer's queries (docstring)
        loaded[name] = {"to_qkv": torch.cat((q, k, v)), "to_qk": q, "to_q": q, "to_k": k, "to_v": v}[kind]
        mapped.append(name)
    model.load_state_dict(loaded, strict=False)
    fresh = [name for name in target if name not in loaded]
    return WarmStart(str(checkpoint), len(loaded) - len(mapped), mapped, fresh)
