"""The models the benchmarks compare, each built from a config only (no downloads), at one common size.

Why one module: every benchmark must build the same peers the same way, or its ratios compare different
models. The shared size is the issue's: d_model 256, 4 heads x 64, d_ff 1024, bucket/chunk 64, 2 hash
rounds, dropout 0 everywhere (dropout costs differ between implementations and are not what is compared).

Subjects (``SUBJECTS``):
- ``ours-lsh`` / ``ours-local-lsh`` / ``ours-full``: our ``ReformerLM`` with all-LSH, alternating
  local/LSH, or exact SDPA layers, reversible; ``-std`` suffix: the same with ``reversible=False``.
- ``hf``: Hugging Face ``ReformerModelWithLMHead`` with LSH layers (it is always reversible in training).
- ``rp`` / ``rp-std``: ``reformer_pytorch.ReformerLM``, reversible or not (``reverse_thres``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

D_MODEL = 256
N_HEADS = 4
D_HEAD = 64
D_FF = 1024
BUCKET = 64
N_HASHES = 2
# Our LSH layers keep, per head and round, the last BUCKET keys of each of OUR_N_BUCKETS buckets: a memory
# capacity of 64 x 64 = 4096 past tokens. Compute per token does not depend on it (each query sees at most
# 2 x BUCKET sorted keys), so one value serves every length.
OUR_N_BUCKETS = 64
# Tokens per feed-forward chunk, the same for all three implementations.
FF_CHUNK = 1024

SUBJECTS = ("ours-lsh", "ours-local-lsh", "ours-full", "ours-lsh-std", "ours-full-std", "hf", "rp", "rp-std")


@dataclass(frozen=True)
class Subject:
    """A built model plus the two things the benchmarks time on it, behind one signature for all peers."""

    name: str
    module: nn.Module
    # (ids (B, L), targets (B, L)) -> scalar mean cross-entropy, ready for backward().
    train_loss: Callable[[Tensor, Tensor], Tensor]
    # ids (B, L) -> logits (B, L, vocab); called under eval() + no_grad().
    forward: Callable[[Tensor], Tensor]
    # The settings that differ per subject/length, recorded in the JSON next to each result.
    settings: dict[str, Any]


def _layer_kinds(name: str, depth: int) -> tuple[str, ...]:
    if "local-lsh" in name:
        if depth % 2:
            raise ValueError(f"{name} alternates local and LSH layers: use an even depth, not {depth}")
        return ("local", "lsh") * (depth // 2)
    if "full" in name:
        return ("full",) * depth
    return ("lsh",) * depth


def build_ours(name: str, depth: int, vocab: int) -> Subject:
    """Our ReformerLM; the training step uses ``model.loss`` so full logits are never materialised."""
    from model import ReformerConfig, ReformerLM

    config = ReformerConfig(
        vocab_size=vocab,
        d_model=D_MODEL,
        n_layers=depth,
        n_heads=N_HEADS,
        d_head=D_HEAD,
        d_ff=D_FF,
        attn_layers=_layer_kinds(name, depth),
        bucket_size=BUCKET,
        n_buckets=OUR_N_BUCKETS,
        n_hashes=N_HASHES,
        dropout=0.0,
        reversible=not name.endswith("-std"),
        ff_chunk_size=FF_CHUNK,
        # The peers' rule (keys = normalised queries), and the one docs/BENCHMARKS.md's figures were measured
        # with; separate Q/K's cost is measured by bench/copy_task.py.
        shared_qk=True,
    )
    model = ReformerLM(config)
    return Subject(
        name=name,
        module=model,
        train_loss=model.loss,
        forward=model,
        settings={
            "attn_layers": list(config.attn_layers),
            "n_buckets": config.n_buckets,
            "reversible": config.reversible,
            "shared_qk": config.shared_qk,
        },
    )


def hf_num_buckets(length: int) -> int | list[int]:
    """HF's own recommendation (what it picks when ``num_buckets`` is None): about 2 * L / chunk buckets,
    factorised into two rounds of hashing once that exceeds its limit, so the bucket count scales with L."""
    power = (2 * (length // BUCKET)).bit_length() - 1
    limit = 2 * max(int((length // BUCKET) ** 0.5), BUCKET)
    if 2**power > limit:
        return [2 ** (power // 2), 2 ** (power - power // 2)]
    return 2**power


def hf_axial_shape(length: int) -> tuple[int, int]:
    """Axial position shape whose product is ``length`` (HF requires equality in training)."""
    if length % BUCKET:
        raise ValueError(f"HF Reformer needs a length that is a multiple of {BUCKET}, got {length}")
    return (BUCKET, length // BUCKET)


def hf_config(depth: int, vocab: int, length: int, ff_chunk: int | None = None) -> Any:
    """HF ReformerConfig at our size; ``length`` sets the axial positions and the bucket count.

    HF's chunked feed-forward refuses a sequence that is not a multiple of its chunk, which includes the
    single tokens of cached generation: pass ``ff_chunk=0`` (no chunking) there.
    """
    from transformers import ReformerConfig as HFConfig

    if ff_chunk is None:
        ff_chunk = FF_CHUNK if length % FF_CHUNK == 0 else 0

    axial = hf_axial_shape(length)
    return HFConfig(
        vocab_size=vocab,
        hidden_size=D_MODEL,
        num_attention_heads=N_HEADS,
        attention_head_size=D_HEAD,
        feed_forward_size=D_FF,
        attn_layers=["lsh"] * depth,
        is_decoder=True,
        lsh_attn_chunk_length=BUCKET,
        local_attn_chunk_length=BUCKET,
        num_hashes=N_HASHES,
        num_buckets=hf_num_buckets(length),
        axial_pos_shape=axial,
        axial_pos_embds_dim=(64, 192),
        max_position_embeddings=math.prod(axial),
        chunk_size_feed_forward=ff_chunk,
        hidden_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=2,
    )


def build_hf(depth: int, vocab: int, length: int) -> Subject:
    """HF ReformerModelWithLMHead; its training loss runs on full (B, L, vocab) logits, as HF computes it."""
    from transformers import ReformerModelWithLMHead

    config = hf_config(depth, vocab, length)
    model = ReformerModelWithLMHead(config)

    def train_loss(ids: Tensor, targets: Tensor) -> Tensor:
        # HF shifts labels internally; passing the targets keeps the work identical to the others.
        return model(input_ids=ids, labels=targets, use_cache=False).loss

    def forward(ids: Tensor) -> Tensor:
        return model(input_ids=ids, use_cache=False).logits

    return Subject(
        name="hf",
        module=model,
        train_loss=train_loss,
        forward=forward,
        settings={
            "attn_layers": list(config.attn_layers),
            "num_buckets": config.num_buckets,
            "axial_pos_shape": list(config.axial_pos_shape),
            "reversible": True,
        },
    )


def build_rp(name: str, depth: int, vocab: int, length: int) -> Subject:
    """reformer-pytorch's ReformerLM; ``rp-std`` turns its reversible execution off via reverse_thres."""
    from reformer_pytorch import ReformerLM as RPReformerLM

    reversible = not name.endswith("-std")
    model = RPReformerLM(
        num_tokens=vocab,
        dim=D_MODEL,
        depth=depth,
        heads=N_HEADS,
        dim_head=D_HEAD,
        bucket_size=BUCKET,
        n_hashes=N_HASHES,
        causal=True,
        max_seq_len=length,
        ff_chunks=max(1, length // FF_CHUNK),
        # reversible when seq_len > reverse_thres
        reverse_thres=0 if reversible else 1 << 40,
    )

    def train_loss(ids: Tensor, targets: Tensor) -> Tensor:
        logits = model(ids)  # (B, L, vocab)
        return F.cross_entropy(logits.transpose(1, 2), targets)

    return Subject(
        name=name,
        module=model,
        train_loss=train_loss,
        forward=model,
        settings={
            "n_buckets": length // BUCKET,
            "ff_chunks": max(1, length // FF_CHUNK),
            "reversible": reversible,
        },
    )


def build(name: str, depth: int, vocab: int, length: int) -> Subject:
    """Build one subject by name, on the CPU (move ``subject.module`` afterwards)."""
    if name not in SUBJECTS:
        raise ValueError(f"unknown subject {name!r}: use one of {SUBJECTS}")
    if name.startswith("ours"):
        return build_ours(name, depth, vocab)
    if name == "hf":
        return build_hf(depth, vocab, length)
    return build_rp(name, depth, vocab, length)
