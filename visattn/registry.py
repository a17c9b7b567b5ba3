"""Named models: ``create_model(name, **kwargs)`` and the registry behind it.

Plain names (``"vit_tiny_patch16_224"``) are visattn's own factories. A name with a prefix
(``"torchvision:resnet18"``, ``"timm:convnext_atto"``) goes to the source registered for that
prefix with :func:`register_source`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

__all__ = ["create_model", "list_models", "register_model", "register_source"]

ModelFactory = Callable[..., nn.Module]
SourceFactory = Callable[..., nn.Module]  # (name without prefix, **kwargs) -> model
_MODELS: dict[str, ModelFactory] = {}
_SOURCES: dict[str, SourceFactory] = {}


def register_model(fn: ModelFactory) -> ModelFactory:
    """Decorator: make ``fn`` available to :func:`create_model` under its own name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def register_source(prefix: str, factory: SourceFactory) -> None:
    """Route names ``"{prefix}:NAME"`` to ``factory(NAME, **kwargs)``."""
    if prefix in _SOURCES:
        raise ValueError(f"model source {prefix!r} is registered twice")
    _SOURCES[prefix] = factory


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name; ``kwargs`` override its defaults.

    Example: ``create_model("vit_tiny_patch4_32", num_classes=100, drop_path_rate=0.1)``.
    """
    if ":" in name:
        prefix, rest = name.split(":", 1)
        if prefix not in _SOURCES:
            known = ", ".join(f"{p}:" for p in sorted(_SOURCES)) or "none"
            raise ValueError(f"unknown model source {prefix!r} in {name!r}; known sources: {known}")
        return _SOURCES[prefix](rest, **kwargs)
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} Known models: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)
