"""Precision: the float format the model's matrix products run in, fp32 or bf16, chosen once per process.

bf16 pays only where the hardware multiplies it natively: on CUDA (Ampere and later) and on CPUs with
Intel AMX or AVX-512 BF16, where a bf16 matrix product runs several times faster than fp32 and reads half
the bytes. Elsewhere bf16 is emulated and slower than fp32, so `auto` picks fp32 there and says so.

bf16 means torch.autocast with bf16: weights (training's master copy) stay fp32 unless the model is
prepared for inference with ReformerLM.set_inference_precision(), and what must stay exact stays fp32
inside the model whatever the autocast (hashing, the hash rounds' logsumexp, softmax statistics, the
loss's reductions; see sorted_attention.py, lsh.py, linear_cross_entropy.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
Precision = Literal["fp32", "bf16"]

# /proc/cpuinfo flags of CPUs that multiply bf16 natively: Intel AMX tiles, or AVX-512 BF16 dot products.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
_CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where there is no such file."""
    try:
        text = _CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def native_bf16(device: torch.device) -> str | None:
    """Why `device` multiplies bf16 natively (a short reason), or None if it does not."""
    if device.type == "cuda":
        return "CUDA with bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else None
    if device.type == "cpu":
        found = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags()]
        return f"CPU with {' and '.join(found)}" if found else None
    return None


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """`auto`, `fp32` or `bf16` -> the precision to use on `device`; `auto` logs its choice (once per call:
    callers resolve once, at start)."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    if requested == "fp32":
        return "fp32"
    reason = native_bf16(device)
    if requested == "bf16":
        if reason is None:
            logger.warning("precision bf16 on %s, which has no native bf16: slower than fp32", device)
        return "bf16"
    if reason is None:
        logger.info(
            "precision auto -> fp32: %s has no native bf16 (needs CUDA, or a CPU with %s)",
            device,
            " or ".join(BF16_CPU_FLAGS),
        )
        return "fp32"
    logger.info("precision auto -> bf16 (%s)", reason)
    return "bf16"


def autocast(precision: Precision, device: torch.device) -> torch.autocast:
    """The autocast context of `precision` on `device` (disabled for fp32: then it changes nothing)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
