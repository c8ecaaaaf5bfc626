"""The Reformer language model; knows nothing of HTTP or Redis.

Public face, what the service builds on: ReformerConfig, ReformerLM, DecodeState; checkpoints
(load_checkpoint -> (model, tokenizer), save_checkpoint, CheckpointError); the tokenizer (ChatTokenizer,
StreamDecoder); and generation in steps (SamplingParams, FinishReason, StopStringMatcher, sample,
sample_rows, prefill, decode_step, generate, DEFAULT_PREFILL_CHUNK); decode-state snapshots
(checkpoint_identity, state_to_bytes, state_from_bytes, SnapshotError). Training is model.train, which nothing
here imports. The design and the properties the tests check: docs/DESIGN.md.
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
from .snapshot import SnapshotError, checkpoint_identity, state_from_bytes, state_to_bytes
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
    "SnapshotError",
    "StopStringMatcher",
    "StreamDecoder",
    "checkpoint_identity",
    "decode_step",
    "generate",
    "load_checkpoint",
    "prefill",
    "sample",
    "sample_rows",
    "save_checkpoint",
    "state_from_bytes",
    "state_to_bytes",
]
