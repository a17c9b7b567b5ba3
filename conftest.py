"""The whole run's settings under pytest-xdist, and the fixture of the examples of README.md and
docs/ (run by pytest-markdown-docs).

Each example runs in a fresh temporary folder that holds links to the repository's ``assets/``
and ``configs/``, so the examples read ``assets/chelsea.png`` as a reader in the repository root
would, and whatever they write (run folders, PNGs, HTML pages) is left in the temporary folder.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist the workers share the cores: each computes on its share of them (one
    thread each for two workers on two cores), and so do the processes it starts, unless
    ``OMP_NUM_THREADS`` says otherwise. Workers with torch's default of a thread per core would
    oversubscribe the cores and spin against each other. No test depends on the thread count."""
    if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist the workers take one test module (or page) at a time in the order
    collected: the modules with the most ``slow`` tests go first, then the others by their number
    of tests, so the last ones handed out, which decide when the run ends, are short."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return

    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    slow = Counter(module(item) for item in items if item.get_closest_marker("slow"))
    size = Counter(module(item) for item in items)
    items.sort(key=lambda item: (-slow[module(item)], -size[module(item)]))  # stable: a module keeps its order


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
