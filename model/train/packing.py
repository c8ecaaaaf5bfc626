"""Sequence packing: whole conversations back to back in one token stream, cut into fixed-length windows.

Why pack instead of padding one conversation per row: chit-chat conversations are short and vary a lot in
length, so padding would spend much of every batch on pad tokens, and the model would never see a
conversation boundary (an end-of-turn followed by a fresh conversation) that serving does not produce
either. Packing keeps every position a real token, so the loss needs no mask.

The layout, for sequence length L:

    stream:   c7 c2 c5 c0 ...            conversations in this epoch's shuffled order, concatenated
    window i: stream[i*L : i*L + L + 1]  L + 1 tokens: inputs are the first L, targets the last L

Windows overlap by one token, so every stream token after the first is a target exactly once per epoch; the
tail shorter than a full window is dropped. Both the conversation order and the window order are shuffled
per epoch from (seed, epoch) alone, so any step's batch can be rebuilt from the step number: that is what
makes resume exact and what lets every data-parallel rank agree on the global batch without communication.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Bumped when the on-disk layout of a cached corpus changes, so old caches are rebuilt, never misread.
CORPUS_CACHE_VERSION = 1


@dataclass(frozen=True)
class TokenizedCorpus:
    """Every conversation of one split, tokenised once: a flat token array plus conversation offsets.

    Stored flat (not as a list of lists) so that a cached split loads as two arrays in milliseconds and an
    epoch's shuffled stream is one gather, whatever the number of conversations.
    """

    tokens: np.ndarray  # (N,) int32: all conversations back to back
    offsets: np.ndarray  # (C + 1,) int64: conversation c is tokens[offsets[c] : offsets[c + 1]]

    def __post_init__(self) -> None:
        if self.tokens.ndim != 1 or self.offsets.ndim != 1 or len(self.offsets) < 1:
            raise ValueError("tokens and offsets must be 1-D and offsets must start with 0")
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.tokens):
            raise ValueError(
                f"offsets must run from 0 to len(tokens)={len(self.tokens)}, "
                f"got {self.offsets[0]}..{self.offsets[-1]}: build the corpus with from_token_lists()"
            )
        if np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must be non-decreasing: build the corpus with from_token_lists()")

    @classmethod
    def from_token_lists(cls, conversations: Iterable[Sequence[int]]) -> TokenizedCorpus:
        """Flatten per-conversation token id lists (empty conversations are dropped: they add nothing)."""
        parts = [np.asarray(ids, dtype=np.int32) for ids in conversations if len(ids) > 0]
        lengths = np.array([len(p) for p in parts], dtype=np.int64)
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        return cls(tokens=tokens, offsets=offsets)

    @property
    def num_conversations(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def stream(self, order: np.ndarray | None = None) -> np.ndarray:
        """The conversations concatenated in `order`, a permutation of their indices (None: as stored)."""
        if order is None:
            return self.tokens
        if len(order) != self.num_conversations:
            raise ValueError(
                f"order has {len(order)} entries but the corpus has {self.num_conversations} conversations: "
                "pass a permutation of range(num_conversations)"
            )
        starts, ends = self.offsets[:-1][order], self.offsets[1:][order]
        lengths = ends - starts
        # Gather index for every output token: its conversation's start plus its offset inside it.
        #   index[j] = starts[conv(j)] + (j - out_start[conv(j)])
        out_starts = np.cumsum(lengths) - lengths
        index = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - out_starts, lengths)
        return self.tokens[index]

    def save(self, path: Path) -> None:
        """Write atomically (temp file + rename), so an interrupted run never leaves a half cache behind."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, tokens=self.tokens, offsets=self.offsets, version=np.int64(CORPUS_CACHE_VERSION))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> TokenizedCorpus:
        with np.load(path) as data:
            version = int(data["version"])
            if version != CORPUS_CACHE_VERSION:
                raise ValueError(
                    f"{path} is a version {version} corpus cache, expected {CORPUS_CACHE_VERSION}: delete it "
                    "and it will be rebuilt"
                )
            return cls(tokens=data["tokens"], offsets=data["offsets"])


def epoch_permutation(n: int, seed: int, epoch: int, stream_id: int) -> np.ndarray:
    """A permutation of range(n) that depends only on (seed, epoch, stream_id).

    `stream_id` separates the independent shuffles of one epoch (conversation order, window order) so they
    are not the same permutation applied twice.
    """
    rng = np.random.Generator(np.random.PCG64([seed, epoch, stream_id]))
    return rng.permutation(n)


class PackedWindows:
    """A token stream seen as `len(self)` windows of `seq_len + 1` tokens with stride `seq_len`."""

    def __init__(self, stream: np.ndarray, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.stream = stream
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.stream) - 1) // self.seq_len)

    def windows(self, indices: np.ndarray) -> torch.Tensor:
        """Rows `stream[i*L : i*L + L + 1]` for each index i, as a (len(indices), L + 1) int64 tensor."""
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise ValueError(f"window index out of range [0, {len(self)}): {indices.min()}..{indices.max()}")
        starts = np.asarray(indices, dtype=np.int64) * self.seq_len
        gather = starts[:, None] + np.arange(self.seq_len + 1, dtype=np.int64)[None, :]  # (n, L + 1)
        return torch.from_numpy(self.stream[gather].astype(np.int64))


class PackedEpochs:
    """Training windows over an endless sequence of epochs, each with its own shuffle.

    Global window g (counted from the start of training) lives in epoch g // windows_per_epoch, so the
    batch of any optimizer step is a pure function of (seed, step): resume needs only the step number.
    The corpus's token count is the same every epoch, so every epoch has the same number of windows.
    """

    # Stream ids for epoch_permutation: one per independent shuffle.
    _CONVERSATION_ORDER = 0
    _WINDOW_ORDER = 1

    def __init__(self, corpus: TokenizedCorpus, seq_len: int, seed: int) -> None:
        self.corpus = corpus
        self.seq_len = seq_len
        self.seed = seed
        self.windows_per_epoch = max(0, (corpus.num_tokens - 1) // seq_len)
        if self.windows_per_epoch == 0:
            raise ValueError(
                f"the training split has {corpus.num_tokens} tokens, fewer than one window of "
                f"seq_len + 1 = {seq_len + 1}: use more data (--data-limit) or a shorter --seq-len"
            )
        self._cached_epoch: int | None = None
        self._cached: tuple[PackedWindows, np.ndarray] | None = None

    def _epoch(self, epoch: int) -> tuple[PackedWindows, np.ndarray]:
        """This epoch's windows and window order; the last epoch is kept since batches walk forward."""
        if self._cached_epoch != epoch or self._cached is None:
            conv_order = epoch_permutation(
                self.corpus.num_conversations, self.seed, epoch, self._CONVERSATION_ORDER
            )
            windows = PackedWindows(self.corpus.stream(conv_order), self.seq_len)
            window_order = epoch_permutation(len(windows), self.seed, epoch, self._WINDOW_ORDER)
            self._cached_epoch, self._cached = epoch, (windows, window_order)
        return self._cached

    def batch(self, first: int, count: int) -> torch.Tensor:
        """Global windows [first, first + count) as a (count, seq_len + 1) int64 tensor."""
        rows: list[torch.Tensor] = []
        position = first
        end = first + count
        while position < end:
            epoch, offset = divmod(position, self.windows_per_epoch)
            take = min(end - position, self.windows_per_epoch - offset)
            windows, order = self._epoch(epoch)
            rows.append(windows.windows(order[offset : offset + take]))
            position += take
        return torch.cat(rows) if rows else torch.zeros(0, self.seq_len + 1, dtype=torch.int64)

    def epoch_of(self, global_window: int) -> float:
        """Fractional epoch reached after `global_window` windows, for logs."""
        return global_window / self.windows_per_epoch
