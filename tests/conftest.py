"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch

from visattn.layers.functional import attention_backend


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fused_attention():
    """No test depends on which path the speed-based chooser picks: the fused path unless a test
    forces another (``attention_backend("chunked")``) or tests the chooser itself."""
    with attention_backend("fused"):
        yield


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (restored after it): for tests that time or train."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
