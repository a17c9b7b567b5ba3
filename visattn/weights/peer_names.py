"""timm and torchvision ViT names for `create_model`: the peer built (or its weights fetched or read) and converted.

`pretrained_model` is what `create_model(name, pretrained=...)` runs for a timm name (tags too:
`"vit_small_patch16_224.dino"`) or a torchvision ViT name (`"vit_b_16"`); this module registers it
with the registry (`visattn.models.registry.register_peer_loader`) when it is imported, which
`visattn.weights` does, so every import of the weights layer registers it.
`peer_state_dict_model` is what `create_model(name, pretrained_file=...)` runs for a timm or
torchvision state dict (read by `visattn.weights.hub`).
"""

from __future__ import annotations

from typing import Any

import timm
import torchvision

from ..models.registry import PeerLoader, register_peer_loader
from ..models.vit import VisionTransformer
from .converted_vit import reset_head
from .errors import PretrainedUnavailableError
from .state_dict import StateDict
from .timm_vit import from_timm
from .torchvision_vit import TORCHVISION_VITS, from_torchvision, is_torchvision_state_dict, torchvision_pretrained_cfg

__all__ = ["is_convertible_name", "peer_state_dict_model", "pretrained_model"]


def is_convertible_name(name: str) -> bool:
    """Whether ``name`` is a timm model name (tags allowed) or a torchvision ViT name."""
    return name in TORCHVISION_VITS or timm.is_model(name)


def _unavailable(name: str, url: str | None, err: Exception) -> PretrainedUnavailableError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    where = f" — e.g. from {url} —" if url else ""
    return PretrainedUnavailableError(
        f"could not fetch pretrained weights for {name!r} (no network and not in the local cache: "
        f"{reason}). Download the weights file on a machine with network access{where} and pass it: "
        f"visattn.create_model({name!r}, pretrained_file='path/to/file') "
        "(.safetensors, .pth or .bin; a timm or torchvision state dict)"
    )


def peer_state_dict_model(name: str, state: StateDict, source: str, **kwargs: Any) -> VisionTransformer:
    """The timm or torchvision ViT `name` with the weights `state` (read from `source`), converted:
    a torchvision state dict is renamed, and `kwargs` are the peer's arguments (a torchvision
    state dict takes only `num_classes`; one other than the weights' gets a fresh head)."""
    if name in TORCHVISION_VITS:
        num_classes = kwargs.pop("num_classes", None)
        if kwargs:
            raise ValueError(f"a torchvision weights file takes only num_classes, not {sorted(kwargs)}")
        model = reset_head(from_torchvision(state), num_classes)
    else:
        model = from_timm(state, name=name, **kwargs)
        if is_torchvision_state_dict(state):
            model.pretrained_cfg = torchvision_pretrained_cfg(model)
    if model.pretrained_cfg is not None:
        model.pretrained_cfg["file"] = source
    return model


def pretrained_model(
    name: str,
    *,
    pretrained: bool = False,
    **kwargs: Any,
) -> VisionTransformer:
    """A timm or torchvision ViT by name, converted to visattn (what ``create_model`` runs).

    Args:
        name: a timm name, with or without a pretrained tag (``"vit_small_patch16_224.dino"``,
            ``"deit_tiny_patch16_224"``), or a torchvision name (``"vit_b_16"``).
        pretrained: fetch the weights through timm's (or torchvision's) own machinery: the
            network or the local cache.
        kwargs: the peer's constructor arguments (timm: ``img_size``, ``drop_path_rate``, ...).
            ``num_classes`` different from the weights' replaces the head with a fresh one,
            as timm does.

    Raises:
        PretrainedUnavailableError: offline without a cached copy; says how to pass a file.
    """
    if name in TORCHVISION_VITS:
        num_classes = kwargs.pop("num_classes", None)
        weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
        try:
            peer = torchvision.models.get_model(name, weights=weights, **kwargs)
        except OSError as err:
            raise _unavailable(name, weights.url if weights is not None else None, err) from err
        return reset_head(from_torchvision(peer), num_classes)
    if not pretrained:
        return from_timm(timm.create_model(name, pretrained=False, **kwargs))
    try:
        peer = timm.create_model(name, pretrained=True, **kwargs)
    except OSError as err:
        cfg = timm.models.get_pretrained_cfg(name)
        url = (
            f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors"
            if cfg and cfg.hf_hub_id
            else (cfg.url if cfg and isinstance(cfg.url, str) else None)  # timm allows a (url, url) pair
        )
        raise _unavailable(name, url, err) from err
    return from_timm(peer)


register_peer_loader(PeerLoader(knows=is_convertible_name, load=pretrained_model))
