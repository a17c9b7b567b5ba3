"""Fixtures for the examples of README.md and docs/ (run by pytest-markdown-docs).

Each example runs in a fresh temporary folder that holds links to the repository's ``assets/``
and ``configs/``, so the examples read ``assets/chelsea.png`` as a reader in the repository root
would, and whatever they write (run folders, PNGs, HTML pages) is left in the temporary folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker computes on one thread (and so do the processes it starts):
    two workers with torch's default of one thread per core would oversubscribe the cores and spin
    against each other. No test depends on the thread count."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _example_folder(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if request.node.get_closest_marker("markdown-docs") is None:
        yield
        return
    import torch

    for name in ("assets", "configs"):
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    yield
