"""DecodeState: the bounded per-sequence memory that ReformerLM.decode() reads and extends.

One entry per layer. LSH and local layer states are preallocated at their full, fixed size, so a
conversation's state has the same shape and byte count at 10 tokens as at 10 million, and states of different
sessions stack into one batch without padding. Only "full" layers (the exact-attention baseline) grow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

_S = TypeVar("_S", bound="_BatchedTensors")


@dataclass
class _BatchedTensors:
    """A bundle of tensors that all have the batch as their first dimension."""

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def _map(self: _S, fn: Callable[[Tensor], Tensor]) -> _S:
        return type(self)(*[fn(t) for t in self.tensors()])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def clone(self: _S) -> _S:
        return self._map(torch.clone)

    def to(self: _S, device: torch.device | str) -> _S:
        return self._map(lambda t: t.to(device))

    def rows(self: _S, index: Tensor | slice) -> _S:
        return self._map(lambda t: t[index])

    @classmethod
    def cat(cls: type[_S], parts: list[_S]) -> _S:
        fields = dataclasses.fields(cls)
        return cls(*[torch.cat([getattr(p, f.name) for p in parts], dim=0) for f in fields])


@dataclass
class LSHLayerState(_BatchedTensors):
    # Per head, hash round and key bucket, the last `bucket_size` keys that hashed to that bucket (all a
    # future query of that bucket can see), oldest first and right-aligned: slot S-1 is the newest; empty
    # slots have position -1.
    keys: Tensor  # (B, H, R, NB, S, D); with shared QK, unit-length shared query/key vectors
    values: Tensor  # (B, H, R, NB, S, D)
    positions: Tensor  # (B, H, R, NB, S) int64


@dataclass
class LocalLayerState(_BatchedTensors):
    # The last `bucket_size` tokens' keys (already rotated by their positions) and values, oldest first.
    keys: Tensor  # (B, H, S, D)
    values: Tensor  # (B, H, S, D)
    positions: Tensor  # (B, S) int64, -1 = empty


@dataclass
class FullLayerState(_BatchedTensors):
    # Every past key and value: grows with the history. Exists for the exact-attention baseline.
    keys: Tensor  # (B, H, N, D)
    values: Tensor  # (B, H, N, D)

    @classmethod
    def cat(cls, parts: list[FullLayerState]) -> FullLayerState:
        lengths = {p.keys.shape[2] for p in parts}
        if len(lengths) > 1:
            raise ValueError(
                f"cannot batch 'full' attention states of different lengths {sorted(lengths)}: "
                "decode such sequences one at a time, or use lsh/local layers (fixed-size states)"
            )
        return cls(torch.cat([p.keys for p in parts]), torch.cat([p.values for p in parts]))


LayerState = LSHLayerState | LocalLayerState | FullLayerState


@dataclass
class DecodeState:
    layers: list[LayerState]
    length: Tensor  # (B,) int64: tokens seen so far by each row

    @property
    def batch_size(self) -> int:
        return int(self.length.shape[0])

    def nbytes(self) -> int:
        """Bytes held by this state's tensors."""
        return sum(layer.nbytes() for layer in self.layers) + self.length.numel() * self.length.element_size()

    def clone(self) -> DecodeState:
        return DecodeState([layer.clone() for layer in self.layers], self.length.clone())

    def to(self, device: torch.device | str) -> DecodeState:
        return DecodeState([layer.to(device) for layer in self.layers], self.length.to(device))

    def rows(self, index: Tensor | slice) -> DecodeState:
        """The sub-batch of the given rows (a copy when index is a tensor).

        With a slice the rows are views, and decode() of one token per row updates a state in place: so
        decoding `rows(slice(0, n))` advances rows 0..n-1 of this state and leaves the others alone (a
        property tests/model/test_state_rows.py holds; the serving batch relies on it).
        """
        return DecodeState([layer.rows(index) for layer in self.layers], self.length[index])

    def seen_tokens(self) -> int:
        """Tokens a batch-size-1 state has seen, as a Python int (one read from the device)."""
        if self.batch_size != 1:
            raise ValueError(f"seen_tokens() is for one row; this state has {self.batch_size}")
        return int(self.length[0])

    def copy_rows_(self, index: slice, src: DecodeState) -> None:
        """Write `src`'s rows into this state's rows `index`, in place (same model, same row count).

        A batch that rows join and leave uses it to copy a joining row in, to move its last row into a
        leaving row's place, and to carry the live rows over when it grows.
        """
        rows = len(range(*index.indices(self.batch_size)))
        if src.batch_size != rows or len(src.layers) != len(self.layers):
            raise ValueError(
                f"cannot copy a state of {src.batch_size} rows and {len(src.layers)} layers into rows "
                f"{index.start}:{index.stop} of one with {len(self.layers)} layers"
            )
        for dst_layer, src_layer in zip(self.layers, src.layers, strict=True):
            for d, s in zip(dst_layer.tensors(), src_layer.tensors(), strict=True):
                d[index].copy_(s)
        self.length[index].copy_(src.length)

    def unstack(self) -> list[DecodeState]:
        """Split into batch-size-1 states (copies), e.g. to hand each session its own state back."""
        return [self.rows(torch.tensor([i], device=self.length.device)) for i in range(self.batch_size)]

    @staticmethod
    def stack(states: list[DecodeState]) -> DecodeState:
        """Concatenate states along the batch: the decode step of several sessions runs as one batch."""
        if not states:
            raise ValueError("stack() needs at least one state")
        n_layers = {len(s.layers) for s in states}
        if len(n_layers) > 1:
            raise ValueError(f"states come from models with different depths: {sorted(n_layers)}")
        layers = [type(group[0]).cat(list(group)) for group in zip(*(s.layers for s in states), strict=True)]
        return DecodeState(layers, torch.cat([s.length for s in states]))
