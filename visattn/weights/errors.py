"""What converting a peer's model can refuse, and what fetching its weights can fail with."""

from __future__ import annotations

__all__ = ["PretrainedUnavailableError", "UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The peer model uses a feature :class:`~visattn.VisionTransformer` does not implement."""


class PretrainedUnavailableError(OSError):
    """Pretrained weights could not be fetched (no network and no local cache)."""
