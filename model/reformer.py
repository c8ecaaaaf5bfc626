"""ReformerLM: embedding -> reversible blocks -> norm -> head, with forward(), loss() and decode()."""

from __future__ import annotations

import contextlib
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Attention, FullAttention, LocalAttention
from .block import ReformerBlock
from .config import ReformerConfig
from .linear_cross_entropy import linear_cross_entropy
from .lsh import LSHAttention
from .precision import Precision, autocast
from .reversible import reversible_forward
from .state import DecodeState, FullLayerState, LayerState, LocalLayerState, LSHLayerState


class ReformerLM(nn.Module):
    """The language model: forward() over whole sequences, loss() for training, decode() incrementally.

    decode() with a state from init_state() gives forward()'s logits in any split of the sequence
    (docs/DESIGN.md, property 2), holding a fixed-size state for lsh and local layers.
    """

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(ReformerBlock(config, kind) for kind in config.attn_layers)
        # The two residual streams are concatenated at the top, as in trax and HF.
        self.norm = nn.LayerNorm(2 * config.d_model)
        self.head = nn.Linear(2 * config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # Inference precision (set_inference_precision): "fp32" leaves precision to the caller's autocast,
        # as training does; "bf16" holds the Linear weights in bf16 and runs every call under bf16 autocast.
        self.precision: Precision = "fp32"
        self.state_dtype: torch.dtype | None = None

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _block_list(self) -> list[ReformerBlock]:
        # nn.ModuleList is untyped (its items are nn.Module); every item is a ReformerBlock.
        return cast(list[ReformerBlock], list(self.blocks))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_inference_precision(
        self, precision: Precision, state_dtype: torch.dtype | None = None
    ) -> ReformerLM:
        """Prepare for inference in `precision`; returns self.

        bf16: the Linear weights (projections, feed-forward, head: the bytes every decoded token reads) are
        held in bf16 and forward(), loss() and decode() run under bf16 autocast wherever they are called
        from. The embedding, the norms and the hash rotations stay fp32 (read a row at a time, or not
        matrix products at all), as does the residual stream. fp32: every weight back to fp32.
        `state_dtype` is the dtype of the decode state's keys and values; None = bf16 for bf16 (the keys
        and values are bf16 products then, so a bf16 state holds the same numbers), fp32 for fp32.
        """
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.to(dtype)
        self.precision = precision
        self.state_dtype = state_dtype
        return self

    @property
    def decode_state_dtype(self) -> torch.dtype:
        """The decode state's key/value dtype: `state_dtype` if set, else bf16 for a bf16 model, else the
        residual stream's."""
        if self.state_dtype is not None:
            return self.state_dtype
        return torch.bfloat16 if self.precision == "bf16" else self.norm.weight.dtype

    def _precision(self) -> contextlib.AbstractContextManager[object]:
        """bf16 autocast for a model prepared for bf16 inference; otherwise the caller's setting rules."""
        if self.precision == "bf16":
            return autocast("bf16", self.embed.weight.device)
        return contextlib.nullcontext()

    def _embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings in the residual stream's dtype (the norms': fp32, or fp64 for a double model)."""
        x = self.embed(input_ids).to(self.norm.weight.dtype)  # (B, L, d_model)
        return F.dropout(x, self.config.dropout, self.training)

    def _logits(self, hidden: Tensor) -> Tensor:
        """(B, L, 2 * d_model) -> logits (B, L, vocab) in the residual stream's dtype, even when the head
        multiplied in bf16: sampling and greedy ties should not see bf16's 8-bit mantissa."""
        return self.head(self.norm(hidden)).to(self.norm.weight.dtype)

    # ---- full-sequence path ---------------------------------------------------------------------------
    def hidden_states(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, L) -> the concatenated streams (B, L, 2 * d_model), before the final norm."""
        _check_ids(input_ids, self.config.vocab_size)
        B, L = input_ids.shape
        positions = torch.arange(L, device=input_ids.device).expand(B, L)  # (B, L)
        x = self._embed(input_ids)  # (B, L, d_model)
        blocks = self._block_list()
        if self.config.reversible and torch.is_grad_enabled():
            x1, x2 = reversible_forward(blocks, x, x, positions)
        else:
            x1, x2 = x, x
            for block in blocks:
                x1, x2 = block(x1, x2, positions)
        return torch.cat((x1, x2), dim=-1)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, L) -> logits (B, L, vocab_size). For training use loss(): it never builds these."""
        with self._precision():
            return self._logits(self.hidden_states(input_ids))

    def loss(self, input_ids: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
        """Mean next-token cross-entropy over targets != ignore_index. The head's logits are computed
        `loss_chunk_size` positions at a time, with their gradients taken in the same pass
        (linear_cross_entropy.py), so the (L, vocab) logits never exist whole nor get recomputed."""
        if targets.shape != input_ids.shape:
            raise ValueError(
                f"targets {tuple(targets.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
            )
        with self._precision():
            normed = self.norm(self.hidden_states(input_ids)).flatten(0, 1)  # (B * L, 2 * d_model)
            total = linear_cross_entropy(
                normed, self.head.weight, targets.flatten(), self.config.loss_chunk_size, ignore_index
            )
        count = (targets != ignore_index).sum().clamp(min=1)
        return total / count

    # ---- incremental path -----------------------------------------------------------------------------
    def init_state(self, batch_size: int = 1) -> DecodeState:
        """An empty decode state; its size is fixed for lsh/local layers (only "full" layers grow)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = self.embed.weight.device
        dtype = self.decode_state_dtype
        layers = [block.attn.init_state(batch_size, device, dtype) for block in self._block_list()]
        return DecodeState(layers, torch.zeros(batch_size, dtype=torch.long, device=device))

    def decode(self, input_ids: Tensor, state: DecodeState) -> Tensor:
        """Feed (B, T) new tokens after what `state` holds; return their logits (B, T, vocab) and advance
        the state in place. Gives forward()'s logits for the same sequence, in any split."""
        _check_ids(input_ids, self.config.vocab_size)
        B, T = input_ids.shape
        if B != state.batch_size:
            raise ValueError(f"input batch {B} does not match the state's batch {state.batch_size}")
        positions = state.length[:, None] + torch.arange(T, device=input_ids.device)  # (B, T)
        with self._precision():
            x = self._embed(input_ids)
            x1, x2 = x, x
            for block, layer_state in zip(self._block_list(), state.layers, strict=True):
                # y1 = x1 + f(x2); y2 = x2 + g(y1)
                attn_out = _decode_attention(block.attn, block.attn_norm(x2), positions, layer_state)
                x1 = x1 + F.dropout(attn_out, self.config.dropout, self.training)
                x2 = x2 + block.ff(x1)
            state.length += T
            return self._logits(torch.cat((x1, x2), dim=-1))


def _decode_attention(attn: Attention, x: Tensor, positions: Tensor, state: LayerState) -> Tensor:
    """attn.decode with the state of attn's own kind (init_state pairs them layer by layer); a state of
    another kind means it was built by a model with another layer layout."""
    if isinstance(attn, LSHAttention) and isinstance(state, LSHLayerState):
        return attn.decode(x, positions, state)
    if isinstance(attn, LocalAttention) and isinstance(state, LocalLayerState):
        return attn.decode(x, positions, state)
    if isinstance(attn, FullAttention) and isinstance(state, FullLayerState):
        return attn.decode(x, positions, state)
    raise TypeError(
        f"a {type(state).__name__} cannot feed a {type(attn).__name__} layer: the decode state was built "
        "by a model with another layer layout; build it with this model's init_state()"
    )


def _check_ids(input_ids: Tensor, vocab_size: int) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape (batch, length >= 1), got {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if input_ids.is_cuda:
        return  # a range check would synchronise with the GPU at every step; callers pass tokenizer ids
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got values in [{low}, {high}]")
