"""Suite-wide settings."""

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # One intra-op thread: test tensors are tiny, and on a shared 2-core machine a thread pool per process
    # spends more time spinning than computing.
    torch.set_num_threads(1)
