"""Named models: ``create_model(name, **kwargs)`` and the registry behind it."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

__all__ = ["create_model", "list_models", "register_model"]

ModelFactory = Callable[..., nn.Module]
_MODELS: dict[str, ModelFactory] = {}


def register_model(fn: ModelFactory) -> ModelFactory:
    """Decorator: make ``fn`` available to :func:`create_model` under its own name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name; ``kwargs`` override its defaults.

    Example: ``create_model("vit_tiny_patch4_32", num_classes=100, drop_path_rate=0.1)``.
    """
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} Known models: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)
