"""Shared fixtures for the model tests: built once per session, because training costs seconds."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from model.tokenizer import ChatTokenizer
from model.train.corpus import texts

# A small vocabulary keeps the tokenizer (and any model built on it) tiny; the default 8000 is for real
# training. 20 K turns of the train split are enough text to learn that many pieces in about a second.
TEST_VOCAB_SIZE = 1000
_TEST_TRAIN_TEXTS = 20_000


@pytest.fixture(scope="session")
def chat_tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tokenizer trained on the first turns of the train split, written to a session temp dir."""
    path = tmp_path_factory.mktemp("tokenizer") / "chat.model"
    ChatTokenizer.train(itertools.islice(texts("train"), _TEST_TRAIN_TEXTS), path, vocab_size=TEST_VOCAB_SIZE)
    return path


@pytest.fixture(scope="session")
def chat_tokenizer(chat_tokenizer_path: Path) -> ChatTokenizer:
    """The session's tokenizer, loaded from its file as the service would load it."""
    return ChatTokenizer.load(chat_tokenizer_path)
