"""ReformerConfig: every architectural choice of the model in one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ATTENTION_KINDS = ("lsh", "local", "full")

# Fields added after checkpoints were first written, with the value a config.json without them meant.
LEGACY_DEFAULTS: dict[str, Any] = {"shared_qk": True}


@dataclass(frozen=True)
class ReformerConfig:
    # 8000 pieces: enough for English chat with byte fallback for everything else, small enough that the
    # embedding and head stay a minority of a small model's parameters.
    vocab_size: int = 8000
    # Width of the residual stream (each of the two reversible streams has this width).
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    # Per-head width; 64 is what the Reformer paper, trax and HF use, and what hashing was tuned for.
    d_head: int = 64
    # 4 x d_model, the usual transformer ratio.
    d_ff: int = 1024
    # One entry per layer. Alternating local and LSH layers: local layers give exact short-range order
    # (with rotary positions), LSH layers reach back through the whole conversation by content.
    attn_layers: tuple[str, ...] = ("local", "lsh", "local", "lsh")
    # Keys a query sees per hash round (LSH: the most recent same-bucket keys; local: the previous tokens).
    # 64 is the paper's chunk length; attention cost is O(L * 2 * bucket_size).
    bucket_size: int = 64
    # Buckets per hash round. bucket_size * n_buckets is an LSH layer's memory capacity per head and round:
    # the number of past tokens its decode state holds. Must be even (hashing uses argmax over [xR; -xR]).
    n_buckets: int = 32
    # Independent hash rounds; more rounds lower the chance that similar tokens never share a bucket.
    n_hashes: int = 2
    dropout: float = 0.0
    # Execution mode only: recompute activations in the backward pass instead of storing them, so training
    # memory does not grow with depth. The same state_dict loads either way.
    reversible: bool = True
    # Positions per feed-forward chunk, so the (L, d_ff) activation never exists for the whole sequence.
    ff_chunk_size: int = 1024
    # Positions per chunk of the training loss, so the (L, vocab) logits never exist for the whole sequence.
    loss_chunk_size: int = 1024
    # Rotary base for local and full layers. Local windows are bounded, so rotary angles there never
    # leave the trained range, whatever the conversation length.
    rotary_base: float = 10000.0
    # LSH layers: keys are the normalised queries (the Reformer paper's rule) when True; separate query and
    # key projections, hashed with the same rotations, when False. Shared QK cannot learn in-context
    # copying (its score is symmetric, so a query prefers the earlier twin of its own context, which cannot
    # hold the next token; docs/BENCHMARKS.md, copy task), so new models use separate Q/K. Configs written
    # before this field existed meant True (LEGACY_DEFAULTS).
    shared_qk: bool = False
    # Shared QK only: the score of a query's own key, low enough to lose to any real key, so a token attends
    # to itself only when it has nothing else. With separate Q/K the own key scores q.k like any other.
    self_attn_score: float = -1e5
    # Longest sequence the model was trained on; informational (the model runs at any length).
    max_train_len: int = 1024

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "d_head",
            "d_ff",
            "bucket_size",
            "n_hashes",
            "ff_chunk_size",
            "loss_chunk_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.attn_layers, tuple):
            object.__setattr__(self, "attn_layers", tuple(self.attn_layers))
        if len(self.attn_layers) != self.n_layers:
            raise ValueError(
                f"attn_layers has {len(self.attn_layers)} entries but n_layers is {self.n_layers}: "
                f"give one entry per layer, e.g. attn_layers={('local', 'lsh') * (self.n_layers // 2)!r}"
            )
        unknown = [kind for kind in self.attn_layers if kind not in ATTENTION_KINDS]
        if unknown:
            raise ValueError(f"unknown attention kind(s) {unknown}: use one of {ATTENTION_KINDS}")
        if self.n_buckets < 2 or self.n_buckets % 2:
            raise ValueError(
                f"n_buckets must be an even number >= 2 (hashing takes argmax over [xR; -xR]), "
                f"got {self.n_buckets}: use {max(2, self.n_buckets + self.n_buckets % 2)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.d_head % 2:
            raise ValueError(
                f"d_head must be even for rotary positions, got {self.d_head}: use {self.d_head + 1}"
            )
        if self.rotary_base <= 1.0:
            raise ValueError(f"rotary_base must be > 1, got {self.rotary_base}")
        if not isinstance(self.shared_qk, bool):
            raise ValueError(f"shared_qk must be true or false, got {self.shared_qk!r}")
        if self.self_attn_score >= -1e3:
            raise ValueError(
                f"self_attn_score {self.self_attn_score} is too high to lose to real keys: use -1e5"
            )

    # ---- derived ------------------------------------------------------------------------------------
    @property
    def lsh_capacity(self) -> int:
        """Past tokens an LSH layer remembers per head and hash round."""
        return self.bucket_size * self.n_buckets

    @property
    def has_full_layers(self) -> bool:
        return "full" in self.attn_layers

    # ---- (de)serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["attn_layers"] = list(self.attn_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReformerConfig:
        """The config to_dict() wrote. A field in LEGACY_DEFAULTS that the dict lacks takes the value it
        had before the field existed, so older checkpoints load as what they were trained as."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ReformerConfig field(s) {unknown}; known fields: {sorted(known)}")
        values = LEGACY_DEFAULTS | dict(data)
        if "attn_layers" in values:
            values["attn_layers"] = tuple(values["attn_layers"])
        return cls(**values)

    def replace(self, **changes: Any) -> ReformerConfig:
        return dataclasses.replace(self, **changes)

    # ---- presets ------------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, vocab_size: int = 512, **overrides: Any) -> ReformerConfig:
        """For tests: two layers (one local, one LSH), small buckets so capacity is reached quickly."""
        values: dict[str, Any] = dict(
            vocab_size=vocab_size,
            d_model=32,
            n_layers=2,
            n_heads=2,
            d_head=16,
            d_ff=64,
            attn_layers=("local", "lsh"),
            bucket_size=8,
            n_buckets=4,
            n_hashes=2,
            ff_chunk_size=128,
            loss_chunk_size=128,
            max_train_len=64,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def small(cls, vocab_size: int = 4096, **overrides: Any) -> ReformerConfig:
        """The size of the shipped CPU-trained chat model (about 2.3 M parameters; that checkpoint predates
        `shared_qk` and is a shared-QK model).

        Sized for its training budget on a CPU: at a fixed time a smaller model that sees more tokens reaches
        a lower loss than a wider one that sees fewer (the budget and the measurement: docs/MODEL.md).
        Capacity: 64 x 32 = 2,048 past tokens per LSH head and round.
        """
        values: dict[str, Any] = dict(
            vocab_size=vocab_size,
            d_model=128,
            n_layers=4,
            n_heads=2,
            d_head=64,
            d_ff=512,
            attn_layers=("local", "lsh", "local", "lsh"),
            bucket_size=64,
            n_buckets=32,
            n_hashes=2,
            dropout=0.0,
            max_train_len=512,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def base(cls, vocab_size: int = 8000, **overrides: Any) -> ReformerConfig:
        """A GPU-sized configuration (about 40 M parameters); the same command trains it."""
        values: dict[str, Any] = dict(
            vocab_size=vocab_size,
            d_model=512,
            n_layers=8,
            n_heads=8,
            d_head=64,
            d_ff=2048,
            attn_layers=("local", "lsh") * 4,
            bucket_size=64,
            n_buckets=64,
            n_hashes=4,
            dropout=0.05,
            max_train_len=4096,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ReformerConfig:
        presets = {"tiny": cls.tiny, "small": cls.small, "base": cls.base}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}: use one of {sorted(presets)}")
        return presets[name](**overrides)
