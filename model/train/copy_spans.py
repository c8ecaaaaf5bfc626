"""Copy spans: a run of ordinary words said once and said again later, the plainest test of in-context recall.

The words are the corpus's own frequent words (the train split's, alphabetic, three letters or more), drawn
independently, so a span reads like chat vocabulary but cannot be predicted from language alone the first
time: only a model that looks back at the first occurrence predicts the second one better. Training mixes such
spans into its windows (model/train/memory.py); bench/recall.py measures the perplexity ratio second / first.
"""

from __future__ import annotations

import collections
import functools
import re

import numpy as np

from model.train import corpus

# Enough distinct words that a 16-word span repeats by chance with negligible probability, few enough that
# every word is a common one (the 2,000th most frequent word of the train split still appears ~60 times).
VOCABULARY_SIZE = 2000
_WORD = re.compile(r"[a-z]{3,}")


@functools.cache
def ordinary_words(size: int = VOCABULARY_SIZE) -> tuple[str, ...]:
    """The `size` most frequent lowercase words of the train split, most frequent first (ties by spelling)."""
    counts: collections.Counter[str] = collections.Counter()
    for text in corpus.texts("train"):
        counts.update(_WORD.findall(text.lower()))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return tuple(word for word, _ in ranked[:size])


def draw_span(rng: np.random.Generator, n_words: int, words: tuple[str, ...] | None = None) -> str:
    """`n_words` words drawn uniformly (with replacement) from `words`, joined by spaces."""
    if n_words < 1:
        raise ValueError(f"a copy span needs at least one word, got {n_words}")
    vocabulary = words if words is not None else ordinary_words()
    picks = rng.integers(len(vocabulary), size=n_words)
    return " ".join(vocabulary[int(i)] for i in picks)
