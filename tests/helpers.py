"""Helpers shared by the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from visattn.layers.attention import RecordableAttention, RecordingRequest

BROWSER_INSTALL = (
    "install Chromium and its driver (Debian/Ubuntu: apt-get install -y chromium chromium-driver) "
    "and selenium (pip install selenium)"
)


@contextlib.contextmanager
def explicit_attention(model: torch.nn.Module):
    """Make every visattn attention module in ``model`` take the explicit-weights path."""
    modules = [m for m in model.modules() if isinstance(m, RecordableAttention)]
    assert modules, "model has no visattn attention modules"
    for m in modules:
        m.recording = RecordingRequest(lambda module, record: None)
    try:
        yield
    finally:
        for m in modules:
            m.recording = None


def assert_every_parameter_gets_gradient(model: torch.nn.Module) -> None:
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not missing, f"parameters without gradient: {missing}"


def browser_missing() -> str | None:
    """Why a headless-Chromium test cannot run here (no selenium, no Chromium, no chromedriver), or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    if not any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")):
        return "no Chromium browser on PATH"
    if not shutil.which("chromedriver"):
        return "no chromedriver on PATH"
    return None


def headless_chromium(width: int = 1200, height: int = 800) -> Iterator[Any]:
    """A headless Chromium session (a selenium driver, its browser log kept) while the generator
    runs: the body of each test module's `browser` fixture. Skipped without Chromium, or failed
    under VISATTN_REQUIRE_BROWSER=1 (CI installs it)."""
    missing = browser_missing()
    if missing:
        message = f"browser tests need Chromium: {missing}; {BROWSER_INSTALL}"
        if os.environ.get("VISATTN_REQUIRE_BROWSER") == "1":
            pytest.fail(message + " (VISATTN_REQUIRE_BROWSER=1 makes this a failure)")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.binary_location = next(
        shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)
    )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()
