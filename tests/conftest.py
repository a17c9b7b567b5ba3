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
