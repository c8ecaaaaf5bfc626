"""Pytest fixtures shared by tests/app and tests/e2e (each conftest imports them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from model.checkpoint import load_checkpoint
from model.reformer import ReformerLM
from model.tokenizer import ChatTokenizer
from tests.app.support import (
    TEST_REDIS_URL,
    build_tiny_checkpoint,
    delete_prefix,
    new_prefix,
    redis_reachable,
)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny checkpoint directory per test session, shared by the app and e2e suites."""
    return build_tiny_checkpoint(tmp_path_factory.getbasetemp() / "service-checkpoint")


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path) -> tuple[ReformerLM, ChatTokenizer]:
    return load_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def tokenizer(tiny_model: tuple[ReformerLM, ChatTokenizer]) -> ChatTokenizer:
    return tiny_model[1]


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A fresh key prefix on CI's Redis, whose keys are deleted afterwards."""
    if not redis_reachable():
        pytest.skip(
            f"no Redis answering at TEST_REDIS_URL={TEST_REDIS_URL}: start one (redis-server) to run this"
        )
    prefix = new_prefix()
    yield prefix
    delete_prefix(prefix)
