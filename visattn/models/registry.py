"""Named models: ``create_model(name, **kwargs)`` and the registry behind it.

Plain names (``"vit_tiny_patch16_224"``) are visattn's own factories. A name with a prefix
(``"torchvision:resnet18"``, ``"timm:convnext_atto"``) goes to the source registered for that
prefix with :func:`register_source`.
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = [
    "PeerLoader",
    "create_model",
    "list_models",
    "model_builder",
    "register_model",
    "register_peer_loader",
    "register_source",
]

ModelFactory = Callable[..., nn.Module]
SourceFactory = Callable[..., nn.Module]  # (name without prefix, **kwargs) -> model
_MODELS: dict[str, ModelFactory] = {}
_SOURCES: dict[str, SourceFactory] = {}
_PEERS: list[PeerLoader] = []


@dataclass(frozen=True)
class PeerLoader:
    """How names of another library's models are built and converted (registered by
    `visattn.weights.peer_names` for timm and torchvision ViTs)."""

    knows: Callable[[str], bool]  # whether a name is one of its models
    load: Callable[..., nn.Module]  # (name, *, pretrained, pretrained_file, **kwargs) -> model


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


def register_peer_loader(loader: PeerLoader) -> None:
    """Let :func:`create_model` build names that ``loader.knows`` (after visattn's own names)."""
    _PEERS.append(loader)


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    pretrained_file: str | os.PathLike | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered model by name; ``kwargs`` override its defaults.

    Example: ``create_model("vit_tiny_patch4_32", num_classes=100, drop_path_rate=0.1)``.

    A timm name (tags too: ``"vit_small_patch16_224.dino"``) or a torchvision ViT name
    (``"vit_b_16"``) that visattn does not register, or any such name with ``pretrained=True``
    (fetched by timm/torchvision: network or local cache) or ``pretrained_file=PATH`` (a local
    ``.safetensors``/``.pth``/``.bin`` state dict), builds the peer and converts it exactly
    (`visattn.weights.peer_names.pretrained_model`, registered with
    :func:`register_peer_loader`; ``kwargs`` are then the peer's arguments, and a
    ``num_classes`` other than the weights' gets a fresh head).
    """
    if ":" in name:
        if pretrained:
            kwargs["pretrained"] = True
        if pretrained_file is not None:
            kwargs["pretrained_file"] = pretrained_file
        return model_builder(name)(**kwargs)
    if pretrained or pretrained_file is not None:
        peer = _peer(name)
        if peer is not None:
            return peer.load(name, pretrained=pretrained, pretrained_file=pretrained_file, **kwargs)
        if name in _MODELS:
            raise ValueError(
                f"{name!r} is visattn's own model with no published weights (not a timm or "
                "torchvision name); load a visattn checkpoint with visattn.weights.model_from_checkpoint"
            )
    return model_builder(name)(**kwargs)


def model_builder(name: str) -> Callable[..., nn.Module]:
    """The function `create_model(name, **kwargs)` hands `kwargs` to when no pretrained weights
    are asked for: visattn's own factory, the source's factory for `"prefix:NAME"` (with
    `NAME` bound) or the peer loader's `load` (with `name` bound). Its signature says which
    keyword arguments it takes itself.
    """
    if ":" in name:
        prefix, rest = name.split(":", 1)
        if prefix not in _SOURCES:
            known = ", ".join(f"{p}:" for p in sorted(_SOURCES)) or "none"
            raise ValueError(f"unknown model source {prefix!r} in {name!r}; known sources: {known}")
        return functools.partial(_SOURCES[prefix], rest)
    if name in _MODELS:
        return _MODELS[name]
    peer = _peer(name)
    if peer is not None:
        return functools.partial(peer.load, name)
    close = difflib.get_close_matches(name, _MODELS, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}{hint} Known models: {', '.join(list_models())}")


def _peer(name: str) -> PeerLoader | None:
    return next((loader for loader in _PEERS if loader.knows(name)), None)
