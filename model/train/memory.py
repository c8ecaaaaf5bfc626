"""Memory episodes mixed into real training windows: facts stated and asked turns later, and copy spans.

Chit-Chat conversations are a few hundred tokens long and nothing in them rewards looking far back, so a
model trained on them alone never learns to use its long context. This module edits the training windows
(real conversations packed back to back, model/train/packing.py) so that some of them do reward it, while
staying real chat everywhere else:

- **Facts.** A user turn starts with a statement ("I have a dog called Biscuit."), the conversation goes on as
  it happened, and at a user-turn boundary at least `gap` tokens later a question and its answer are inserted
  as one user turn and one assistant turn ("What's my dog called?" / "You have a dog called Biscuit.": the
  statement said back, model/train/facts.py). Only the value in the answer can be predicted, and only from
  the statement. Values and phrasings come from the train side of
  model/train/facts.py; the benchmark asks with the eval side.
- **Copy spans.** A run of ordinary words (model/train/copy_spans.py) opens one user turn and opens another
  one at least `gap` tokens later: the induction-head signal of Olsson et al. 2022, which synthetic copy
  snippets in the mix make appear earlier (Bi-Induct, 2025).

Why these defaults (TrainOptions): a window carries facts with probability `fact_rate` and copy spans (1 to
`max_copies`) with probability `copy_rate`; each episode adds ~30 tokens to a window of thousands, so even a
window that carries three facts is >95 % real chat, and the held-out loss (which is measured on unedited test
windows) barely
moves. The gap is drawn log-uniform between `min_gap` and a maximum that grows with training (the curriculum):
short gaps first, where the answer's credit reaches the statement easily and the format is learnt, then gaps
up to the whole window, which local attention cannot bridge and LSH layers must.

Why `max_copies`: one span per window makes ~2 % of a window's targets predictable only by copying, while the
copy task (every second-half token a copy) forms the copying circuit in ~600 steps; up to 16 spans a window
make copying dense for a phase of training (the Bi-Induct idea), at the price of less real chat per window.

Every edit is a pure function of (seed, global window index), like the windows themselves: resume stays exact
and data-parallel ranks agree without talking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from model.tokenizer import ChatTokenizer
from model.train.copy_spans import draw_span
from model.train.facts import KINDS, make_fact
from model.train.packing import PackedEpochs, TokenizedCorpus

# Seeds the per-window episode RNG apart from the packing shuffles (streams 0 and 1 in model.packing).
_EPISODE_STREAM = 2
# Copy spans of 8 to 24 words: long enough that a copy is unmistakable, short against any gap.
_SPAN_WORDS = (8, 24)
# Up to 16 spans per window: at ~25 tokens a span, 16 pairs are ~800 tokens, most of a 1,024-token window.
_MAX_COPIES = 16


@dataclass(frozen=True)
class MemoryMix:
    """How many windows carry episodes and how far apart an episode's two ends are."""

    fact_rate: float = 0.0  # probability that a window carries facts
    max_facts: int = 3  # such a window carries 1..max_facts facts, each of a different kind
    copy_rate: float = 0.0  # probability that a window carries copy spans (independent of facts)
    max_copies: int = 1  # such a window carries 1..max_copies spans, each its own words and gap
    min_gap: int = 16  # fewest tokens between a statement and its question
    start_gap: int = 128  # the largest gap at the start of the curriculum
    curriculum_windows: int = 0  # windows over which the largest gap grows to the window length; 0: at once

    def __post_init__(self) -> None:
        for name in ("fact_rate", "copy_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if not 1 <= self.max_copies <= _MAX_COPIES:
            raise ValueError(f"--max-copies must be in [1, {_MAX_COPIES}], got {self.max_copies}")
        if not 1 <= self.max_facts <= len(KINDS):
            raise ValueError(f"--max-facts must be in [1, {len(KINDS)}] (one per kind), got {self.max_facts}")
        if not 1 <= self.min_gap <= self.start_gap:
            raise ValueError(
                f"need 1 <= --memory-min-gap ({self.min_gap}) <= --memory-start-gap ({self.start_gap})"
            )
        if self.curriculum_windows < 0:
            raise ValueError(f"the curriculum length must be >= 0, got {self.curriculum_windows}")

    @property
    def enabled(self) -> bool:
        return self.fact_rate > 0.0 or self.copy_rate > 0.0

    def max_gap(self, window_index: int, seq_len: int) -> int:
        """The largest gap for this global window: from start_gap, geometrically, to seq_len."""
        done = self.curriculum_windows == 0 or window_index >= self.curriculum_windows
        if done or seq_len <= self.start_gap:
            return seq_len
        progress = window_index / self.curriculum_windows
        return int(self.start_gap * (seq_len / self.start_gap) ** progress)


@dataclass
class _Episode:
    """Insertions that belong together: (position in the unedited window, token ids) pairs, in order."""

    inserts: list[tuple[int, list[int]]] = field(default_factory=list)


class MemoryEpochs:
    """PackedEpochs whose windows carry memory episodes; the same interface, so the trainer is unchanged."""

    def __init__(self, base: PackedEpochs, tokenizer: ChatTokenizer, mix: MemoryMix, seed: int) -> None:
        self.base = base
        self.tokenizer = tokenizer
        self.mix = mix
        self.seed = seed

    @property
    def corpus(self) -> TokenizedCorpus:
        return self.base.corpus

    @property
    def seq_len(self) -> int:
        return self.base.seq_len

    @property
    def windows_per_epoch(self) -> int:
        return self.base.windows_per_epoch

    def epoch_of(self, global_window: int) -> float:
        return self.base.epoch_of(global_window)

    def batch(self, first: int, count: int) -> torch.Tensor:
        """Global windows [first, first + count), edited, as a (count, seq_len + 1) int64 tensor."""
        rows = self.base.batch(first, count).numpy()
        edited = [self.edit(rows[i], first + i) for i in range(count)]
        return torch.from_numpy(np.stack(edited)) if edited else torch.from_numpy(rows)

    def edit(self, row: np.ndarray, window_index: int) -> np.ndarray:
        """The window with its episodes inserted, cut back to its length; a function of (seed, index, row)."""
        rng = np.random.Generator(np.random.PCG64([self.seed, window_index, _EPISODE_STREAM]))
        max_gap = max(self.mix.min_gap, self.mix.max_gap(window_index, self.seq_len))
        # Both draws always happen, so whether a window gets facts never shifts its copy span's randomness.
        wants_facts, wants_copy = rng.random() < self.mix.fact_rate, rng.random() < self.mix.copy_rate
        starts = np.flatnonzero(row == self.tokenizer.user_id)
        episodes: list[_Episode] = []
        if wants_facts:
            n_facts = int(rng.integers(1, self.mix.max_facts + 1))
            for kind in rng.choice(len(KINDS), size=n_facts, replace=False):
                fact = make_fact(rng, "train", "train", KINDS[int(kind)])
                question = self._turn("user", fact.question) + self._turn("assistant", fact.answer)
                episode = self._place(rng, starts, len(row), max_gap, self._line(fact.statement),
                                      question, before_turn=True)  # fmt: skip
                if episode is not None:
                    episodes.append(episode)
        if wants_copy:
            # One span unless asked for more: the count is drawn only then, so max_copies=1 windows are the
            # ones this module made before the option existed.
            n_copies = 1 if self.mix.max_copies == 1 else int(rng.integers(1, self.mix.max_copies + 1))
            for _ in range(n_copies):
                n_words = int(rng.integers(_SPAN_WORDS[0], _SPAN_WORDS[1] + 1))
                span = self._line(draw_span(rng, n_words))
                episode = self._place(rng, starts, len(row), max_gap, span, span, before_turn=False)
                if episode is not None:
                    episodes.append(episode)
        return _apply(row, episodes)

    def _line(self, text: str) -> list[int]:
        """`text` as the first line of a user turn: the corpus joins a turn's utterances with newlines, and
        encode(line + "\n") + encode(rest) tokenises exactly as encode(line + "\n" + rest) does."""
        return self.tokenizer.encode(text + "\n")

    def _turn(self, role: str, text: str) -> list[int]:
        return self.tokenizer.encode_turn(role, text)

    def _place(
        self,
        rng: np.random.Generator,
        starts: np.ndarray,
        length: int,
        max_gap: int,
        first: list[int],
        second: list[int],
        before_turn: bool,
    ) -> _Episode | None:
        """Put `first` at the head of a user turn and `second` at a user turn >= gap tokens later.

        `second` goes before that turn's role token when it is whole turns (a question and its answer), or
        after it when it opens the turn's text (a copy span). None when the window has no two user turns
        that far apart.
        """
        # User-turn starts after which both insertions still fit in the window.
        usable = starts[starts + 1 + len(first) + len(second) < length]
        if len(usable) < 2 or usable[-1] - usable[0] - 1 < self.mix.min_gap:
            return None
        # A gap the window can hold (a drawn gap that cannot fit would waste the episode).
        widest = min(max_gap, int(usable[-1] - usable[0] - 1))
        gap = int(math.exp(rng.uniform(math.log(self.mix.min_gap), math.log(widest))))
        candidates = usable[usable + 1 + gap <= usable[-1]]
        start = int(candidates[rng.integers(len(candidates))])
        later = usable[usable >= start + 1 + gap]
        second_at = int(later[0]) + (0 if before_turn else 1)
        return _Episode([(start + 1, first), (second_at, second)])


def _apply(row: np.ndarray, episodes: list[_Episode]) -> np.ndarray:
    """Insert every episode that still ends inside the window; cut the result back to len(row).

    An episode whose last insertion would be pushed past the end (by its own or earlier insertions) is
    dropped whole: a statement without its question is harmless, but a question cut off before its answer,
    or the answer without its statement, would teach the wrong thing. Dropping an episode only moves the
    others left, so one pass of dropping suffices.
    """
    length = len(row)
    fits = [True] * len(episodes)
    shift = 0
    for position, owner, ids in _in_order(episodes):
        shift += len(ids)
        if position + shift > length:
            fits[owner] = False
    kept = [episode for episode, ok in zip(episodes, fits, strict=True) if ok]
    pieces: list[np.ndarray] = []
    previous = 0
    for position, _, ids in _in_order(kept):
        pieces.append(row[previous:position])
        pieces.append(np.asarray(ids, dtype=row.dtype))
        previous = position
    pieces.append(row[previous:])
    return np.concatenate(pieces)[:length]


def _in_order(episodes: list[_Episode]) -> list[tuple[int, int, list[int]]]:
    """Every insertion as (position, episode index, ids), by position; ties keep the episodes' order."""
    inserts = [(position, owner, ids) for owner, e in enumerate(episodes) for position, ids in e.inserts]
    return sorted(inserts, key=lambda item: (item[0], item[1]))
