"""The corpus as conversations: counts, the split, turn merging and role alternation, on the real data."""

from __future__ import annotations

import pytest

from model.train.corpus import (
    SPLITS,
    conversation_ids,
    conversations,
    iter_conversations,
    split_of,
    swap_roles,
    texts,
    to_messages,
)

CORPUS_SIZE = 7168  # conversations in the published Chit-Chat Challenge corpus


def _utterance(sender: str, text: str) -> dict:
    return {"text": text, "sender": sender, "timestamp": "2018-05-02T19:38:15Z"}


def test_the_splits_hold_every_conversation_once() -> None:
    ids = {split: conversation_ids(split) for split in SPLITS}
    all_ids = [i for split in SPLITS for i in ids[split]]
    assert len(all_ids) == CORPUS_SIZE
    assert len(set(all_ids)) == CORPUS_SIZE, "a conversation is in two splits"
    for split in SPLITS:
        assert all(split_of(i) == split for i in ids[split])


def test_split_proportions_are_about_90_5_5() -> None:
    fractions = {split: len(conversation_ids(split)) / CORPUS_SIZE for split in SPLITS}
    assert fractions["train"] == pytest.approx(0.90, abs=0.02)
    assert fractions["valid"] == pytest.approx(0.05, abs=0.015)
    assert fractions["test"] == pytest.approx(0.05, abs=0.015)


def test_split_of_is_pinned() -> None:
    """Changing the hash would silently move test conversations into train: pin some assignments."""
    assert split_of("a07edb12-6b91-4138-b11e-02421888d699") == "train"
    assert split_of("003911cb-0c11-4332-9e17-b2770da717e6") == "valid"
    assert split_of("008d0390-a60d-4c5b-9c88-c1331b92d499") == "test"
    assert [split_of(str(i)) for i in range(15)] == (
        ["valid"] + ["train"] * 8 + ["valid", "valid"] + ["train"] * 3 + ["test"]
    )


def test_conversations_are_sorted_by_id_and_repeatable() -> None:
    ids = conversation_ids("valid")
    assert ids == sorted(ids)
    pairs = list(iter_conversations("valid"))
    assert [i for i, _ in pairs] == ids
    assert [c for _, c in pairs] == conversations("valid")


def test_callers_get_their_own_copies() -> None:
    first = conversations("test")
    first[0][0]["content"] = "changed"
    first[0].clear()
    assert conversations("test")[0] != []
    assert conversations("test")[0][0]["content"] != "changed"


def test_every_conversation_alternates_roles_from_user_with_clean_turns() -> None:
    turns_total = 0
    for split in SPLITS:
        for conversation in conversations(split):
            assert conversation, "a conversation with no turns"
            for index, turn in enumerate(conversation):
                assert turn["role"] == ("user" if index % 2 == 0 else "assistant")
                assert turn["content"], "an empty turn"
                assert turn["content"] == turn["content"].strip()
            turns_total += len(conversation)
    # Bursts of one speaker, not the 258,145 utterances, are the turns.
    assert turns_total == 138_716


def test_a_real_conversation_is_merged_per_speaker() -> None:
    conversation = dict(iter_conversations("train"))["a07edb12-6b91-4138-b11e-02421888d699"]
    assert conversation[0] == {"role": "user", "content": "Hello\nHow are you doing today?"}
    assert conversation[1] == {
        "role": "assistant",
        "content": "whats up MD\nim doing good\nhow are you doing?",
    }
    assert conversation[2]["role"] == "user"
    assert conversation[2]["content"].startswith("Im alright, I just took a nap.")


def test_to_messages_merges_strips_and_drops_empty() -> None:
    raw = [
        [_utterance("a", "  hi "), _utterance("a", "there\t")],
        [_utterance("b", "   ")],  # only empty utterances: this burst vanishes...
        [_utterance("a", "anyone?")],  # ...so this one joins the first
        [_utterance("b", "yes"), _utterance("b", ""), _utterance("b", "me")],
        [_utterance("a", "cool")],
    ]
    assert to_messages(raw) == [
        {"role": "user", "content": "hi\nthere\nanyone?"},
        {"role": "assistant", "content": "yes\nme"},
        {"role": "user", "content": "cool"},
    ]


def test_to_messages_gives_user_to_whoever_speaks_first() -> None:
    raw = [[_utterance("b", "")], [_utterance("a", "first")], [_utterance("b", "second")]]
    assert to_messages(raw) == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "second"},
    ]


def test_texts_yields_each_turn_of_both_roles() -> None:
    valid = conversations("valid")
    assert list(texts("valid")) == [turn["content"] for c in valid for turn in c]


def test_swap_roles_exchanges_user_and_assistant() -> None:
    conversation = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    swapped = swap_roles(conversation)
    assert [t["role"] for t in swapped] == ["system", "assistant", "user"]
    assert [t["content"] for t in swapped] == ["be nice", "hi", "hello"]
    assert swap_roles(swapped) == conversation
    assert conversation[1]["role"] == "user", "the input was modified"


def test_swap_roles_refuses_unknown_roles() -> None:
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        swap_roles([{"role": "bot", "content": "hi"}])


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="use one of train, valid, test"):
        conversations("validation")  # type: ignore[arg-type]
