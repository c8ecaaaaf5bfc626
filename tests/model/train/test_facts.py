"""Facts for memory episodes: the train/eval split of values and phrasings is disjoint and respected."""

from __future__ import annotations

import numpy as np
import pytest

from model.train.facts import KINDS, SIDES, make_fact, reply_has_value, side_of, values_of

POOLS = sorted({kind.pool for kind in KINDS})


@pytest.mark.parametrize("pool", POOLS)
def test_value_sides_partition_the_pool_and_both_are_used(pool: str) -> None:
    train, held_out = set(values_of(pool, "train")), set(values_of(pool, "eval"))
    assert train and held_out
    assert not train & held_out
    assert all(side_of(value) == "train" for value in train)
    assert all(side_of(value) == "eval" for value in held_out)


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.key)
def test_phrasing_sides_are_disjoint_and_every_template_has_the_value(kind) -> None:
    for templates in (kind.statements, kind.questions):
        assert templates["train"] and templates["eval"]
        assert not set(templates["train"]) & set(templates["eval"])
    for template in (*kind.statements["train"], *kind.statements["eval"], *kind.answers):
        assert "{v}" in template


@pytest.mark.parametrize(("value_side", "phrasing_side"), [(v, p) for v in SIDES for p in SIDES])
def test_a_fact_takes_its_value_and_its_phrasing_from_the_sides_asked(value_side, phrasing_side) -> None:
    rng = np.random.default_rng(0)
    by_key = {kind.key: kind for kind in KINDS}
    for _ in range(300):
        fact = make_fact(rng, value_side, phrasing_side)
        kind = by_key[fact.kind]
        assert side_of(fact.value) == value_side
        statements = [t.format(v=fact.value) for t in kind.statements[phrasing_side]]
        assert fact.statement.lower() in [s.lower() for s in statements]
        assert fact.question in kind.questions[phrasing_side]
        assert reply_has_value(fact.answer, fact.value)
        assert reply_has_value(fact.statement, fact.value)


def test_the_recall_criterion_matches_whole_words_ignoring_case() -> None:
    assert reply_has_value("your dog is called biscuit!", "Biscuit")
    assert reply_has_value("It's March 14.", "March 14")
    assert not reply_has_value("I like bananas", "Ana")
    assert not reply_has_value("It's 1234", "123")
    assert not reply_has_value("It's March 1", "March 14")


def test_a_training_answer_repeats_the_words_that_led_to_the_value() -> None:
    """The induction cue: in training, the word before the value in the answer is the one before it in the
    statement ("I have a dog called X" -> "You have a dog called X")."""
    rng = np.random.default_rng(1)
    for _ in range(300):
        fact = make_fact(rng, "train", "train")
        before = [
            text.lower().split(fact.value.lower())[0].split()[-1:] for text in (fact.statement, fact.answer)
        ]
        if before[0] and before[0][0] not in ("i'm", "am", "i"):  # "I'm X" -> "You're X": the person changes
            assert before[0] == before[1], (fact.statement, fact.answer)
