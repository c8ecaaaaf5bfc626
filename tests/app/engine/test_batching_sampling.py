"""Batched sampling: each row of a continuous batch draws what it would draw alone.

The engine samples every active conversation's next token in one call (`sample_rows`), each row with its
own temperature, top-k, top-p, repetition penalty, logit bias and seeded generator. The property that
matters to users: a seeded reply does not depend on who else the server is talking to.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import SamplingParams, sample, sample_rows

VOCAB = 97

row_params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.5, 1.0, 1.7]),
    top_k=st.sampled_from([0, 1, 5, 40, VOCAB, VOCAB + 3]),
    top_p=st.sampled_from([1.0, 0.95, 0.5, 0.01]),
    repetition_penalty=st.sampled_from([1.0, 1.3, 0.8]),
    seed=st.integers(0, 2**31 - 1),
    logit_bias=st.dictionaries(st.integers(0, VOCAB - 1), st.sampled_from([-100.0, 2.5, 100.0]), max_size=2),
)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(row_params, st.lists(st.integers(0, VOCAB - 1), max_size=6)), min_size=1, max_size=6
    ),
    logits_seed=st.integers(0, 10_000),
    steps=st.integers(1, 3),
)
def test_each_row_draws_what_sample_draws_for_it_alone(
    rows: list[tuple[SamplingParams, list[int]]], logits_seed: int, steps: int
) -> None:
    params = [p for p, _ in rows]
    history = [h for _, h in rows]
    batched_generators = [p.make_generator() for p in params]
    alone_generators = [p.make_generator() for p in params]
    source = torch.Generator().manual_seed(logits_seed)
    for _ in range(steps):  # several draws: the generators must advance alike, not just start alike
        logits = torch.randn(len(rows), VOCAB, generator=source) * 3
        together = sample_rows(logits, params, batched_generators, history)
        alone = [
            int(sample(logits[i : i + 1], params[i], alone_generators[i], [history[i]]).item())
            for i in range(len(rows))
        ]
        assert together == alone


def test_a_seeded_row_ignores_its_companions() -> None:
    """The same row (logits, params, seed) in two different batches gets the same tokens."""
    torch.manual_seed(3)
    mine = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    others = [SamplingParams(temperature=1.3, top_k=7), SamplingParams(temperature=0)]
    my_logits = torch.randn(5, 1, VOCAB)
    first, second = mine.make_generator(), mine.make_generator()
    alone, crowded = [], []
    for step in range(5):
        alone += sample_rows(my_logits[step], [mine], [first], [alone])
        noise = torch.randn(2, VOCAB)
        batch = torch.cat((noise[:1], my_logits[step], noise[1:]))
        pick = sample_rows(batch, [others[0], mine, others[1]], [None, second, None], [[], crowded, []])
        crowded.append(pick[1])
    assert crowded == alone
    assert len(set(alone)) > 1, "five draws at temperature 1 should not all be one token"


def test_mismatched_rows_are_refused_with_the_counts() -> None:
    with pytest.raises(ValueError, match="one params, generator and history per row: 2 rows, 1 params"):
        sample_rows(torch.zeros(2, VOCAB), [SamplingParams()], [None, None], [[], []])
