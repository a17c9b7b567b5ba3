"""Helpers shared by the tests."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from visattn.layers.attention import GridAttention, RecordableAttention, RecordingRequest

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


def conv1x1(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 1×1 convolution as an einsum (float64 reference)."""
    y = torch.einsum("bchw,oc->bohw", x, conv.weight[:, :, 0, 0])
    return y if conv.bias is None else y + conv.bias[None, :, None, None]


def randomize(block: nn.Module) -> nn.Module:
    """Every parameter drawn from a normal (std 0.3; the gates std 1), so a block is far from the identity."""
    for name, p in block.named_parameters():
        nn.init.normal_(p, std=0.3 if "gamma" not in name else 1.0)
    return block


def masked_dense_attention(
    block: GridAttention,
    x: torch.Tensor,
    allowed: torch.Tensor,
    bias: torch.Tensor | None = None,
    pad: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """A grid block's output and weights written out densely: every query cell against every key
    cell, ``-inf`` where ``allowed`` is False (float64 in, float64 out).

    Args:
        block: its ``query``, ``key``, ``value``, ``out`` convolutions, heads, scale and ``gamma``.
        x: ``(B, C, H, W)``.
        allowed: ``(H·W, Nk)`` bool: which keys each query sees, keys row-major on the key canvas.
        bias: added to the scaled logits, broadcastable to ``(B, heads, H·W, Nk)``.
        pad: ``(top, bottom, left, right)`` zero cells around the keys and values (the key canvas
            is ``(H + top + bottom) × (W + left + right)``, ``Nk`` its cells).

    Returns:
        ``x + γ·out(attention)`` ``(B, C, H, W)`` and the weights ``(B, heads, H·W, Nk)``.
    """
    b, _, h, w = x.shape
    heads = block.num_heads
    top, bottom, left, right = pad
    q = conv1x1(x, block.query).reshape(b, heads, -1, h * w)
    k, v = (
        torch.nn.functional.pad(conv1x1(x, conv), (left, right, top, bottom)).reshape(b, heads, -1, allowed.shape[1])
        for conv in (block.key, block.value)
    )
    scale = 1 / math.sqrt(q.shape[2]) if block.scale is None else block.scale
    scores = torch.einsum("bhdq,bhdk->bhqk", q, k) * scale
    if bias is not None:
        scores = scores + bias
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    y = torch.einsum("bhqk,bhdk->bhdq", weights, v).reshape(b, -1, h, w)
    gamma = block.gamma.view(1, -1, 1, 1)
    return x + gamma * conv1x1(y, block.out), weights
