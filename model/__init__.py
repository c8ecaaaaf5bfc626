"""The Reformer language model; knows nothing of HTTP or Redis.

Public face: ReformerConfig, ReformerLM, DecodeState, load_checkpoint (-> model, tokenizer).
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ReformerConfig
from .reformer import ReformerLM
from .state import DecodeState

__all__ = [
    "CheckpointError",
    "DecodeState",
    "ReformerConfig",
    "ReformerLM",
    "load_checkpoint",
    "save_checkpoint",
]
