"""ReformerLM: embedding -> reversible blocks -> norm -> head, with forward(), loss() and decode()."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Attention, FullAttention, LocalAttention
from .block import ReformerBlock
from .config import ReformerConfig
from .linear_cross_entropy import linear_cross_entropy
from .lsh import LSHAttention
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

    # ---- full-sequence path ---------------------------------------------------------------------------
    def hidden_states(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, L) -> the concatenated streams (B, L, 2 * d_model), before the final norm."""
        _check_ids(input_ids, self.config.vocab_size)
        B, L = input_ids.shape
        positions = torch.arange(L, device=input_ids.device).expand(B, L)  # (B, L)
        x = F.dropout(self.embed(input_ids), self.config.dropout, self.training)  # (B, L, d_model)
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
        return self.head(self.norm(self.hidden_states(input_ids)))

    def loss(self, input_ids: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
        """Mean next-token cross-entropy over targets != ignore_index. The head's logits are computed
        `loss_chunk_size` positions at a time, with their gradients taken in the same pass
        (linear_cross_entropy.py), so the (L, vocab) logits never exist whole nor get recomputed."""
        if targets.shape != input_ids.shape:
            raise ValueError(
                f"targets {tuple(targets.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
            )
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
        weight = self.embed.weight
        layers = [
            block.attn.init_state(batch_size, weight.device, weight.dtype) for block in self._block_list()
        ]
        return DecodeState(layers, torch.zeros(batch_size, dtype=torch.long, device=weight.device))

    def decode(self, input_ids: Tensor, state: DecodeState) -> Tensor:
        """Feed (B, T) new tokens after what `state` holds; return their logits (B, T, vocab) and advance
        the state in place. Gives forward()'s logits for the same sequence, in any split."""
        _check_ids(input_ids, self.config.vocab_size)
        B, T = input_ids.shape
        if B != state.batch_size:
            raise ValueError(f"input batch {B} does not match the state's batch {state.batch_size}")
        positions = state.length[:, None] + torch.arange(T, device=input_ids.device)  # (B, T)
        x = F.dropout(self.embed(input_ids), self.config.dropout, self.training)
        x1, x2 = x, x
        for block, layer_state in zip(self._block_list(), state.layers, strict=True):
            # y1 = x1 + f(x2); y2 = x2 + g(y1)
            attn_out = _decode_attention(block.attn, block.attn_norm(x2), positions, layer_state)
            x1 = x1 + F.dropout(attn_out, self.config.dropout, self.training)
            x2 = x2 + block.ff(x1)
        state.length += T
        return self.head(self.norm(torch.cat((x1, x2), dim=-1)))


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
