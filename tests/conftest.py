"""Suite-wide settings and the fixtures every service suite shares; their helpers are in tests/support.py.

Fixtures here are real parts: a tiny checkpoint saved and loaded like production, CI's Redis under a
test-owned key prefix, and `live_server(**settings)`, a real uvicorn on a free loopback port.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.reformer import ReformerLM
from model.tokenizer import ChatTokenizer
from tests import support
from tests.support import TEST_REDIS_URL, LiveServerFactory, build_tiny_checkpoint, delete_prefix, new_prefix


def pytest_configure(config: pytest.Config) -> None:
    # One intra-op thread: test tensors are tiny, and on a shared 2-core machine a thread pool per process
    # spends more time spinning than computing.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny checkpoint directory per test session, shared by every service suite."""
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
    if not support.redis_reachable():
        pytest.skip(
            f"no Redis answering at TEST_REDIS_URL={TEST_REDIS_URL}: start one (redis-server) to run this"
        )
    prefix = new_prefix()
    yield prefix
    delete_prefix(prefix)


@pytest.fixture(scope="session")
def live_server(tiny_checkpoint: Path) -> LiveServerFactory:
    """`with live_server(**settings) as live:` a real server on the tiny checkpoint, CI's Redis and the
    test settings of support.make_settings with these overrides; `live.url`, `live.prefix`. A context
    manager, so a module fixture can hold one server for its tests and a test can start its own."""
    return partial(support.live_server, tiny_checkpoint)
