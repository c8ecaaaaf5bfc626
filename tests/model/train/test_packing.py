"""Sequence packing: each token is a target once per epoch, and a batch depends only on (seed, step)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.train.packing import (
    CORPUS_CACHE_VERSION,
    PackedEpochs,
    PackedWindows,
    TokenizedCorpus,
    epoch_permutation,
)

conversations_strategy = st.lists(
    st.lists(st.integers(0, 999), min_size=0, max_size=12), min_size=1, max_size=15
)


def _corpus(n_conversations: int = 7, seed: int = 0) -> TokenizedCorpus:
    """Conversations whose tokens encode (conversation, position), so a window says where it came from."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 20, size=n_conversations)
    return TokenizedCorpus.from_token_lists([[1000 * c + i for i in range(n)] for c, n in enumerate(lengths)])


@given(conversations_strategy, st.randoms(use_true_random=False))
def test_stream_is_the_conversations_concatenated_in_the_given_order(
    conversations: list[list[int]], rnd: object
) -> None:
    corpus = TokenizedCorpus.from_token_lists(conversations)
    kept = [c for c in conversations if c]  # empty conversations carry nothing and are dropped
    assert corpus.num_conversations == len(kept)
    assert corpus.stream().tolist() == [t for c in kept for t in c]
    order = list(range(len(kept)))
    rnd.shuffle(order)  # type: ignore[attr-defined]
    assert corpus.stream(np.array(order, dtype=np.int64)).tolist() == [t for i in order for t in kept[i]]


@given(st.lists(st.integers(0, 50), min_size=2, max_size=200), st.integers(1, 17))
def test_windows_cover_every_target_once_and_share_one_token_with_the_next(
    stream: list[int], seq_len: int
) -> None:
    windows = PackedWindows(np.array(stream, dtype=np.int32), seq_len)
    n = len(windows)
    assert n == (len(stream) - 1) // seq_len
    if n == 0:
        return
    rows = windows.windows(np.arange(n))
    assert rows.shape == (n, seq_len + 1) and rows.dtype == torch.int64
    # Targets (each row minus its first token) tile the stream from position 1 without gaps or repeats.
    assert rows[:, 1:].flatten().tolist() == stream[1 : 1 + n * seq_len]
    # The last token of window i is the first input of window i + 1.
    assert torch.equal(rows[:-1, -1], rows[1:, 0])


def test_each_epoch_is_a_permutation_of_all_windows_and_epochs_differ() -> None:
    corpus = _corpus()
    data = PackedEpochs(corpus, seq_len=4, seed=3)
    per_epoch = data.windows_per_epoch
    first, second = data.batch(0, per_epoch), data.batch(per_epoch, per_epoch)
    # Every token of _corpus() is distinct, so "no target twice" is "distinct targets"; only the epoch
    # stream's first token and its tail shorter than a window may go untrained.
    for epoch in (first, second):
        targets = epoch[:, 1:].flatten().tolist()
        assert len(set(targets)) == len(targets) == per_epoch * 4
        assert set(targets) <= set(corpus.tokens.tolist())
        assert corpus.num_tokens - len(targets) <= 4
    assert not torch.equal(first, second), "each epoch must be shuffled differently"


def test_batches_depend_only_on_seed_and_position_and_may_span_epochs() -> None:
    corpus = _corpus()
    a, b = PackedEpochs(corpus, 4, seed=11), PackedEpochs(corpus, 4, seed=11)
    per_epoch = a.windows_per_epoch
    start = per_epoch - 2  # a batch that straddles the end of epoch 0
    spanning = a.batch(start, 5)
    one_by_one = torch.cat([b.batch(start + i, 1) for i in range(5)])
    assert torch.equal(spanning, one_by_one)
    assert not torch.equal(PackedEpochs(corpus, 4, seed=12).batch(0, per_epoch), a.batch(0, per_epoch))


def test_epoch_permutation_is_reproducible_and_stream_ids_are_independent() -> None:
    p = epoch_permutation(50, seed=1, epoch=2, stream_id=0)
    assert sorted(p.tolist()) == list(range(50))
    assert np.array_equal(p, epoch_permutation(50, seed=1, epoch=2, stream_id=0))
    assert not np.array_equal(p, epoch_permutation(50, seed=1, epoch=2, stream_id=1))
    assert not np.array_equal(p, epoch_permutation(50, seed=1, epoch=3, stream_id=0))


def test_cache_round_trip_and_version_check(tmp_path: Path) -> None:
    corpus = _corpus()
    path = tmp_path / "cache" / "train.npz"
    corpus.save(path)
    loaded = TokenizedCorpus.load(path)
    assert np.array_equal(loaded.tokens, corpus.tokens) and np.array_equal(loaded.offsets, corpus.offsets)
    assert [p.name for p in path.parent.iterdir()] == ["train.npz"], "no temporary file may be left behind"
    np.savez(path, tokens=corpus.tokens, offsets=corpus.offsets, version=np.int64(CORPUS_CACHE_VERSION + 1))
    with pytest.raises(ValueError, match="delete it"):
        TokenizedCorpus.load(path)


def test_invalid_layouts_are_refused_with_a_fix() -> None:
    with pytest.raises(ValueError, match="from_token_lists"):
        TokenizedCorpus(tokens=np.arange(5, dtype=np.int32), offsets=np.array([0, 3], dtype=np.int64))
    with pytest.raises(ValueError, match="permutation"):
        _corpus().stream(np.array([0, 1]))
    tiny = TokenizedCorpus.from_token_lists([[1, 2, 3]])
    with pytest.raises(ValueError, match="--seq-len"):
        PackedEpochs(tiny, seq_len=8, seed=0)
    with pytest.raises(ValueError, match="out of range"):
        PackedWindows(np.arange(10, dtype=np.int32), 3).windows(np.array([3]))


@settings(max_examples=25)
@given(st.integers(1, 30), st.integers(0, 40))
def test_batch_rows_are_windows_of_the_epoch_stream(count: int, first: int) -> None:
    corpus = _corpus(5)
    data = PackedEpochs(corpus, 3, seed=0)
    rows = data.batch(first, count)
    assert rows.shape == (count, 4)
    # Tokens inside one window that come from one conversation are consecutive positions of it.
    for row in rows.tolist():
        for left, right in itertools.pairwise(row):
            if left // 1000 == right // 1000:
                assert right == left + 1
