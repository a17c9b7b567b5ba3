"""Helpers shared by the tests."""

from __future__ import annotations

import contextlib
import shutil

import torch

from visattn.layers.attention import RecordableAttention, RecordingRequest


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
