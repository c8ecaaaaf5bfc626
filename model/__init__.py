"""The Reformer language model; knows nothing of HTTP or Redis.

Public face: ReformerConfig, ReformerLM, DecodeState, load_checkpoint (-> model, tokenizer), and the
generation steps (SamplingParams, sample, sample_rows, prefill, decode_step, generate) the service builds on.
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ReformerConfig
from .generate import (
    DEFAULT_PREFILL_CHUNK,
    FinishReason,
    SamplingParams,
    StopStringMatcher,
    decode_step,
    generate,
    prefill,
    sample,
    sample_rows,
)
from .reformer import ReformerLM
from .state import DecodeState
from .tokenizer import ChatTokenizer, StreamDecoder

__all__ = [
    "DEFAULT_PREFILL_CHUNK",
    "ChatTokenizer",
    "CheckpointError",
    "DecodeState",
    "FinishReason",
    "ReformerConfig",
    "ReformerLM",
    "SamplingParams",
    "StopStringMatcher",
    "StreamDecoder",
    "decode_step",
    "generate",
    "load_checkpoint",
    "prefill",
    "sample",
    "sample_rows",
    "save_checkpoint",
]
