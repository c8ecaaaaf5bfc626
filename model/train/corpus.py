"""The Chit-Chat Challenge corpus as chat conversations, with a deterministic train/valid/test split.

The corpus (7,168 conversations, ~258 K utterances, MIT licence) ships as JSON inside the PyPI package
`chitchat-dataset`, so nothing is downloaded at run time. In the raw data a conversation is a list of
"messages", each a burst of short utterances typed by one sender. A chat model sees a conversation as
alternating turns, so each burst becomes one turn whose utterances are joined with newlines (the way
they appeared on screen), the first speaker is the "user" and the other the "assistant".

About 3,150 conversations have only one speaker (the partner never answered). They are kept as
single-turn conversations, so that the corpus count stays the published one and a user message with no
reply is still text the model learns from; training code that needs a reply can skip them.

Everything is loaded lazily and cached: importing this module reads nothing.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from typing import Literal, TypedDict

Role = Literal["system", "user", "assistant"]
Split = Literal["train", "valid", "test"]

SPLITS: tuple[Split, ...] = ("train", "valid", "test")

# A conversation's split is decided by its id alone, so the split never changes when the corpus is
# reordered or grows. 1 of 20 hash slots goes to valid and 1 to test: 90 / 5 / 5. Valid and test at
# ~360 conversations each (~13 K utterances) are large enough for a stable perplexity estimate, and
# the corpus is small enough that training wants every conversation it can get.
_HASH_SLOTS = 20
_VALID_SLOT = 0
_TEST_SLOT = 1

_SWAPPED_ROLE: dict[str, Role] = {"user": "assistant", "assistant": "user", "system": "system"}


class Message(TypedDict):
    """One chat turn: the same shape as the OpenAI chat API and the tokenizer's chat template."""

    role: Role
    content: str


# The cached form is immutable (tuples of (role, content)), so callers get fresh dicts they may mutate
# without corrupting what the next caller sees.
_FrozenConversation = tuple[tuple[Role, str], ...]


def split_of(conversation_id: str) -> Split:
    """Assign a conversation to a split from a stable hash of its id.

    hashlib rather than hash(): Python salts str hashes per process (PYTHONHASHSEED), which would move
    conversations between train and test from one run to the next.
    """
    digest = hashlib.sha256(conversation_id.encode("utf-8")).digest()
    slot = int.from_bytes(digest[:8], "big") % _HASH_SLOTS
    if slot == _VALID_SLOT:
        return "valid"
    if slot == _TEST_SLOT:
        return "test"
    return "train"


def to_messages(raw_messages: list[list[dict]]) -> list[Message]:
    """Turn one raw corpus conversation into alternating user/assistant turns.

    Utterances are stripped and empty ones dropped *before* grouping, so that a burst made only of
    empty utterances does not leave two bursts of the same speaker side by side: consecutive
    utterances of one speaker always end up in one turn, and roles strictly alternate.
    """
    turns: list[Message] = []
    last_sender: str | None = None
    for burst in raw_messages:
        for utterance in burst:
            text = utterance["text"].strip()
            if not text:
                continue
            sender = utterance["sender"]
            if turns and sender == last_sender:
                turns[-1]["content"] += "\n" + text
                continue
            role: Role = "user" if len(turns) % 2 == 0 else "assistant"
            turns.append({"role": role, "content": text})
            last_sender = sender
    return turns


@functools.cache
def _corpus() -> dict[str, _FrozenConversation]:
    """Read and convert the whole corpus once per process (~1 s), keyed and ordered by id."""
    # Imported here so that importing model.train.corpus never touches the package's 40 MB JSON file.
    from chitchat_dataset import Dataset

    raw = Dataset()
    corpus: dict[str, _FrozenConversation] = {}
    for conversation_id in sorted(raw):
        turns = to_messages(raw[conversation_id]["messages"])
        corpus[conversation_id] = tuple((turn["role"], turn["content"]) for turn in turns)
    return corpus


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


def iter_conversations(split: Split) -> Iterator[tuple[str, list[Message]]]:
    """Yield (conversation id, turns) for one split, in id order so every run sees the same order."""
    _check_split(split)
    for conversation_id, frozen in _corpus().items():
        if split_of(conversation_id) == split:
            yield conversation_id, [{"role": role, "content": content} for role, content in frozen]


def conversation_ids(split: Split) -> list[str]:
    """The ids of one split, sorted."""
    _check_split(split)
    return [conversation_id for conversation_id in _corpus() if split_of(conversation_id) == split]


def conversations(split: Split) -> list[list[Message]]:
    """All conversations of one split, whole (long ones stay long), sorted by id."""
    return [turns for _, turns in iter_conversations(split)]


def texts(split: Split) -> Iterator[str]:
    """Every turn's content in one split, both roles: the text a tokenizer for this corpus learns from."""
    for _, turns in iter_conversations(split):
        for turn in turns:
            yield turn["content"]


def swap_roles(conversation: list[Message]) -> list[Message]:
    """The same conversation with user and assistant exchanged (system turns kept).

    Training on both orientations makes every utterance of the corpus a reply the model learns to
    write, not only those of whoever happened to speak second.
    """
    swapped: list[Message] = []
    for turn in conversation:
        role = turn["role"]
        if role not in _SWAPPED_ROLE:
            raise ValueError(f"unknown role {role!r}: roles are system, user and assistant")
        swapped.append({"role": _SWAPPED_ROLE[role], "content": turn["content"]})
    return swapped
