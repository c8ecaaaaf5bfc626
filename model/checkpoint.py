"""Checkpoint directories: everything needed to serve a model, and nothing needed only to keep training.

A checkpoint is a directory that the service can load on its own:

    model.safetensors   weights (safetensors: no pickle, so loading a checkpoint cannot run code)
    config.json         ReformerConfig.to_dict() plus "format_version"
    tokenizer.model     the SentencePiece model the weights were trained with
    training.json       optional: how it was made (command, step, data, metrics)

Training-resume state (optimizer moments, scheduler step, RNG states, data position) is large, only useful to
the trainer, and needs pickle-ish torch.save; it lives apart in `<run dir>/train_state.pt`
(model/train/resume.py), so a shipped checkpoint stays small and safe to load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from model.config import LEGACY_DEFAULTS, ReformerConfig
from model.precision import resolve_precision
from model.reformer import ReformerLM
from model.tokenizer import ChatTokenizer

logger = logging.getLogger(__name__)

# Bumped whenever the directory layout or config.json's meaning changes; load refuses other versions
# instead of guessing.
FORMAT_VERSION = 1

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
TRAINING_FILE = "training.json"

# Config fields that change how the model runs, not what its weights are: a checkpoint may be loaded with
# these overridden (e.g. reversible=False or a different ff_chunk_size for serving).
EXECUTION_FIELDS = frozenset({"reversible", "dropout", "ff_chunk_size", "loss_chunk_size"})


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or inconsistent; the message names the file."""


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' means the GPU when there is one, else the CPU; anything else is taken literally."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _tokenizer_bytes(tokenizer: str | os.PathLike[str] | ChatTokenizer) -> bytes:
    """The serialised SentencePiece model, given either its file or a loaded ChatTokenizer."""
    if isinstance(tokenizer, ChatTokenizer):
        return tokenizer.to_bytes()
    file = Path(tokenizer)
    if not file.is_file():
        raise ValueError(f"tokenizer file {file} does not exist: pass the .model file or a ChatTokenizer")
    return file.read_bytes()


# ---- save ---------------------------------------------------------------------------------------------
def save_checkpoint(
    path: str | os.PathLike[str],
    model: ReformerLM,
    tokenizer: str | os.PathLike[str] | ChatTokenizer,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically and return its path.

    Everything is written into a temporary sibling directory first and renamed into place, so a crash at
    any point leaves either the previous checkpoint or the new one, never a mix. (Replacing an existing
    directory takes two renames; a crash between them leaves the old one complete at `<path>.old`.)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer_data = _tokenizer_bytes(tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        # save_model (not save_file) so tied weights, if the model shares any, are stored once.
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
        config = {"format_version": FORMAT_VERSION, **model.config.to_dict()}
        _write_json(tmp / CONFIG_FILE, config)
        (tmp / TOKENIZER_FILE).write_bytes(tokenizer_data)
        if extra is not None:
            _write_json(tmp / TRAINING_FILE, dict(extra))
        _fsync_dir_files(tmp)
        # mkdtemp makes the directory private (0700); a checkpoint is meant to be read by the service user.
        tmp.chmod(0o755)
        for file in tmp.iterdir():
            file.chmod(0o644)
        old = target.with_name(target.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _fsync_dir_files(directory: Path) -> None:
    """Flush file contents to disk before the rename makes them visible as a finished checkpoint."""
    for file in directory.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


# ---- load ---------------------------------------------------------------------------------------------
def load_config(path: str | os.PathLike[str]) -> ReformerConfig:
    """Read and validate a checkpoint's config.json (without loading the weights)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; a checkpoint directory needs {CONFIG_FILE}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc}); re-save the checkpoint") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    version = data.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: format_version is {version!r}, this code reads version {FORMAT_VERSION}; "
            "re-save the checkpoint with this version of model/checkpoint.py"
        )
    known = {field.name for field in dataclasses.fields(ReformerConfig)}
    unknown, missing = sorted(set(data) - known), sorted(known - set(data) - set(LEGACY_DEFAULTS))
    if unknown or missing:
        raise CheckpointError(
            f"{file}: unknown field(s) {unknown}, missing field(s) {missing}; the checkpoint was written by "
            "another version of ReformerConfig: re-save it with the current code"
        )
    try:
        return ReformerConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: invalid config: {exc}") from exc


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; a checkpoint directory needs {WEIGHTS_FILE}")
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{file}: unreadable safetensors file ({exc}); it is truncated or corrupt"
        ) from exc


def _check_weights(file: Path, tensors: Mapping[str, torch.Tensor], model: ReformerLM) -> None:
    """Every tensor must match the config's model by name and shape, and every parameter must be present.

    A name missing from the file is accepted only when the model ties it to a tensor that is present
    (save_model stores shared tensors once).
    """
    expected = model.state_dict()
    problems: list[str] = []
    for name, tensor in tensors.items():
        if name not in expected:
            problems.append(f"unexpected tensor {name!r}")
        elif tuple(tensor.shape) != tuple(expected[name].shape):
            problems.append(
                f"{name!r} has shape {tuple(tensor.shape)} but the config needs {tuple(expected[name].shape)}"
            )
    stored_ptrs = {expected[name].data_ptr() for name in tensors if name in expected}
    for name, tensor in expected.items():
        if name not in tensors and tensor.data_ptr() not in stored_ptrs:
            problems.append(f"missing tensor {name!r}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{file}: does not match {CONFIG_FILE}: {shown}")


def _load_tokenizer(file: Path, config: ReformerConfig) -> ChatTokenizer:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; a checkpoint directory needs {TOKENIZER_FILE}")
    try:
        tokenizer = ChatTokenizer.load(file)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: unreadable tokenizer model ({exc})") from exc
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"{file}: tokenizer has {tokenizer.vocab_size} pieces but {CONFIG_FILE} says vocab_size="
            f"{config.vocab_size}; the tokenizer does not belong to these weights"
        )
    return tokenizer


def load_checkpoint(
    path: str | os.PathLike[str],
    device: str | torch.device = "auto",
    *,
    precision: str = "fp32",
    state_dtype: torch.dtype | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[ReformerLM, ChatTokenizer]:
    """Load a checkpoint directory as (model in eval mode on `device`, tokenizer).

    `precision` is "fp32", "bf16" or "auto" (model/precision.py): in bf16 the weights that decoding
    multiplies are held in bf16 and every call runs under bf16 autocast (ReformerLM.set_inference_precision,
    which also says what `state_dtype` does); the chosen one is `model.precision`.

    `overrides` may change execution-only config fields (EXECUTION_FIELDS, e.g. reversible=False for
    serving); fields that shape the weights cannot be overridden, since the weights would not fit.
    Every inconsistency raises CheckpointError naming the offending file.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory (it does not exist or is a file)")
    config = load_config(directory)
    if overrides:
        not_allowed = sorted(set(overrides) - EXECUTION_FIELDS)
        if not_allowed:
            raise ValueError(
                f"cannot override {not_allowed}: they change the weights' shapes; only "
                f"{sorted(EXECUTION_FIELDS)} may be overridden when loading"
            )
        config = dataclasses.replace(config, **overrides)
    tokenizer = _load_tokenizer(directory / TOKENIZER_FILE, config)
    weights_file = directory / WEIGHTS_FILE
    tensors = _read_weights(weights_file)
    model = ReformerLM(config)
    _check_weights(weights_file, tensors, model)
    model.load_state_dict(tensors, strict=False)
    target = resolve_device(device)
    model.to(target)
    model.set_inference_precision(resolve_precision(precision, target), state_dtype)
    model.eval()
    return model, tokenizer


def read_training_info(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The optional training.json of a checkpoint, or None when it has none."""
    file = Path(path) / TRAINING_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from exc


def update_training_info(path: str | os.PathLike[str], updates: Mapping[str, Any]) -> None:
    """Merge `updates` into a checkpoint's training.json (atomically), e.g. test metrics known only later."""
    file = Path(path) / TRAINING_FILE
    info = read_training_info(path) or {}
    info.update(updates)
    tmp = file.with_name(file.name + ".tmp")
    _write_json(tmp, info)
    tmp.replace(file)
