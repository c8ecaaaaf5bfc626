"""The Reformer language model; knows nothing of HTTP or Redis.

Public face: ReformerConfig, ReformerLM, DecodeState (and load_checkpoint, once checkpoints exist).
"""

from .config import ReformerConfig
from .reformer import ReformerLM
from .state import DecodeState

__all__ = ["DecodeState", "ReformerConfig", "ReformerLM"]
