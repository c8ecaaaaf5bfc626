"""Training-resume state: `<run dir>/train_state.pt` and the random generators it carries.

What a resumed run needs besides the weights (optimizer moments, step, elapsed time, every rank's RNG
state, data position) is large, useful only to the trainer, and needs torch.save; it lives apart from the
checkpoint directory (model/checkpoint.py), so a shipped checkpoint stays small and safe to load.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import CheckpointError

TRAIN_STATE_FILE = "train_state.pt"


def save_training_state(run_dir: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Write `<run_dir>/train_state.pt` atomically (temp file + rename).

    The state must hold only tensors, numbers, strings, lists, tuples and dicts, so that loading can use
    torch.load(weights_only=True) and never unpickle arbitrary objects.
    """
    directory = Path(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / TRAIN_STATE_FILE
    tmp = directory / (TRAIN_STATE_FILE + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(dict(state), handle)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(target)
    return target


def load_training_state(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read `<run_dir>/train_state.pt`; CheckpointError if it is missing or unreadable."""
    file = Path(run_dir) / TRAIN_STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; nothing to resume (drop --resume to start a new run)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{file}: unreadable training state ({exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a dict, got {type(state).__name__}")
    return state


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random generators (CPU, the training GPU's, Python's), in a weights_only-safe form.

    Restoring them on resume replays exactly the dropout masks the uninterrupted run would have drawn.
    """
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
    }


def restore_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Undo capture_rng_state: put every generator back where it was."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])
