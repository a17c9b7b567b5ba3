"""Named models: ``create_model(name, **kwargs)`` and the registry behind it.

One route from a name to a model, as timm's: plain names (``"vit_tiny_patch16_224"``) are
visattn's own factories, or else timm and torchvision ViT names that a registered peer loader
converts (the peer also gives `pretrained=True` weights to an own name it knows); a name with a
prefix (``"torchvision:resnet18"``, ``"timm:convnext_atto"``, ``"hf:..."``) goes to the source
registered for that prefix with `register_source`. Every name takes `pretrained_file` (read by
the reader `visattn.weights.hub` registers) and `pretrained`.

The model `create_model` returns carries the call that rebuilds it, `model.model_config` =
`{"name": name, **kwargs}`, which `visattn.save_pretrained` writes.
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "PeerLoader",
    "create_model",
    "list_models",
    "model_builder",
    "register_model",
    "register_peer_loader",
    "register_source",
    "register_weights_reader",
    "update_model_config",
]

ModelFactory = Callable[..., nn.Module]
SourceFactory = Callable[..., nn.Module]  # (name without prefix, **kwargs) -> model
WeightsReader = Callable[[str, "str | os.PathLike", dict[str, Any]], nn.Module]  # (name, path, kwargs) -> model
_MODELS: dict[str, ModelFactory] = {}
_SOURCES: dict[str, SourceFactory] = {}
_PEERS: list[PeerLoader] = []
_WEIGHTS_READERS: list[WeightsReader] = []


@dataclass(frozen=True)
class PeerLoader:
    """How names of another library's models are built and converted (registered by
    `visattn.weights.peer_names` for timm and torchvision ViTs)."""

    knows: Callable[[str], bool]  # whether a name is one of its models
    load: Callable[..., nn.Module]  # (name, *, pretrained, **kwargs) -> model


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


def register_weights_reader(reader: WeightsReader) -> None:
    """Let `create_model(name, pretrained_file=PATH, **kwargs)` call `reader(name, PATH, kwargs)`
    (one reader: `visattn.weights.hub.model_from_pretrained_file`)."""
    if _WEIGHTS_READERS:
        raise ValueError("a weights reader is registered twice")
    _WEIGHTS_READERS.append(reader)


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    pretrained_file: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name; ``kwargs`` override its defaults.

    Example: ``create_model("vit_tiny_patch4_32", num_classes=100, drop_path_rate=0.1)``.

    Args:
        name: one of `list_models()`; a timm name (tags too: `"vit_small_patch16_224.dino"`)
            or torchvision ViT name (`"vit_b_16"`), built by the peer and converted exactly
            (`kwargs` are then the peer's arguments); or `"timm:NAME"`, `"torchvision:NAME"`,
            `"hf:NAME"`.
        pretrained: the published weights, fetched by timm, torchvision or transformers (network
            or their local cache). visattn's own names have none: one `ValueError` says so.
        pretrained_file: weights on disk, for every name: a folder written by
            `visattn.save_pretrained` or by training (its stored arguments are the defaults of
            `kwargs`), a visattn checkpoint (`best.pt`), or a `.safetensors` / `.pth` / `.bin`
            state dict (timm and torchvision ViT names convert theirs). Wins over `pretrained`.

    Returns:
        The model, whose `model_config` attribute holds `{"name": ...,
        **kwargs}`: the call that rebuilds its architecture, `pretrained` and `pretrained_file`
        left out. A model built by an inner `create_model` call keeps that call's record
        (converted ViTs are `create_model("vision_transformer", **arguments)`).
    """
    if pretrained_file is not None:
        if not _WEIGHTS_READERS:
            raise RuntimeError("no weights reader is registered; import visattn (not only visattn.models)")
        return _WEIGHTS_READERS[0](name, pretrained_file, kwargs)
    model = _with_published_weights(name, kwargs) if pretrained else model_builder(name)(**kwargs)
    if getattr(model, "model_config", None) is None:
        # torch's stubs type Module attribute assignment for tensors and modules only; any value works
        model.model_config = {"name": name, **kwargs}  # type: ignore[assignment]
    return model


def update_model_config(model: nn.Module, **changes: Any) -> None:
    """Record that `model`'s architecture changed in a way `create_model` arguments express (a
    new head: `num_classes=3`): `create_model(**model.model_config)` rebuilds it as it is now.
    A model not from `create_model` has no record and is left alone."""
    config = getattr(model, "model_config", None)
    if config is not None:
        # torch's stubs type Module attribute assignment for tensors and modules only; any value works
        model.model_config = {**config, **changes}  # type: ignore[assignment]


def _with_published_weights(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """`create_model(name, pretrained=True, **kwargs)`: a source's or a peer's published weights."""
    if ":" in name:
        return model_builder(name)(pretrained=True, **kwargs)
    peer = _peer(name)
    if peer is not None:
        return peer.load(name, pretrained=True, **kwargs)
    if name in _MODELS:
        raise ValueError(
            f"{name!r} is visattn's own model and has no published weights (nothing is downloaded); "
            f"load your own with create_model({name!r}, pretrained_file=PATH): a folder written by "
            "save_pretrained or by training, a checkpoint (best.pt) or a .safetensors file"
        )
    return model_builder(name)(pretrained=True, **kwargs)  # unknown: the error with suggestions


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
