"""Fixtures for the examples of README.md and docs/ (run by pytest-markdown-docs).

Each example runs in a fresh temporary folder that holds links to the repository's ``assets/``
and ``configs/``, so the examples read ``assets/chelsea.png`` as a reader in the repository root
would, and whatever they write (run folders, PNGs, HTML pages) is left in the temporary folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


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
