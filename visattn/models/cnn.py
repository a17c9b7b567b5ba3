"""CNNs from torchvision and timm by name, with attention inserted, and a small-image ResNet.

``create_model("torchvision:resnet18", num_classes=10, in_chans=1, attention={"at": ["layer3"],
"num_heads": 4})`` and ``create_model("timm:convnext_atto", ...)`` go through the sources
registered here; ``create_model("resnet18_small", ...)`` is the CIFAR-style ResNet-18.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import timm
import torch
import torchvision
from timm.models import adapt_input_conv
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from .._utils import check_range
from .insert import insert_attention
from .registry import register_model, register_source

__all__ = ["apply_attention_config", "resnet18_small", "timm_model", "torchvision_model"]


def apply_attention_config(
    model: nn.Module, attention: Mapping[str, Any] | None, input_size: tuple[int, int, int]
) -> nn.Module:
    """Insert the blocks an ``attention`` config asks for: ``{"at": [...], "preset": ..., **block_kwargs}``.

    Accepts a plain dict or an OmegaConf ``DictConfig``; an ``input_size`` entry overrides the
    dry run's ``(C, H, W)`` (for models that need larger inputs). Returns ``model`` (changed in
    place).
    """
    if not attention:
        return model
    options = {str(k): v for k, v in attention.items()}
    if "at" not in options:
        raise ValueError(
            f"attention config needs 'at' (the module paths), got keys {sorted(options)}; "
            "e.g. attention={'at': ['layer3', 'layer4'], 'num_heads': 4}"
        )
    at = options.pop("at")
    at = [at] if isinstance(at, str) else [str(p) for p in at]
    input_size = tuple(options.pop("input_size", input_size))  # the dry run's (C, H, W)
    insert_attention(model, at, input_size=input_size, **options)
    return model


def _check_head_and_input(num_classes: int, in_chans: int, least_classes: int = 1) -> None:
    """``num_classes >= least_classes`` (0 is timm's "no head") and ``in_chans >= 1``, as integers."""
    check_range("num_classes", num_classes, at_least=least_classes, integer=True)
    check_range("in_chans", in_chans, at_least=1, integer=True)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _adapt_first_conv(model: nn.Module, in_chans: int) -> None:
    """Give the first convolution ``in_chans`` inputs; its kernel is adapted as timm does.

    ``timm.models.adapt_input_conv``: one channel sums the RGB kernel; more channels repeat it
    and rescale by ``3 / in_chans``.
    """
    path, conv = next(((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d)), ("", None))
    if conv is None or conv.groups != 1:
        raise ValueError(f"cannot set in_chans on {type(model).__name__}: no plain first Conv2d found")
    if conv.in_channels == in_chans:
        return
    new = nn.Conv2d(
        in_chans,
        conv.out_channels,
        _pair(conv.kernel_size),
        _pair(conv.stride),
        conv.padding if isinstance(conv.padding, str) else _pair(conv.padding),
        _pair(conv.dilation),
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(adapt_input_conv(in_chans, conv.weight))
        if conv.bias is not None and new.bias is not None:  # new has a bias exactly when conv has
            new.bias.copy_(conv.bias)
    _set_submodule(model, path, new)


def _pair(size: tuple[int, ...]) -> tuple[int, int]:
    """A ``Conv2d``'s kernel size, stride, padding or dilation: two numbers (typed ``tuple[int, ...]``)."""
    height, width = size
    return height, width


def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    """A fresh last ``nn.Linear`` with ``num_classes`` outputs (torchvision heads end in one)."""
    path, head = next(
        ((p, m) for p, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear)), ("", None)
    )
    if head is None:
        raise ValueError(f"cannot set num_classes on {type(model).__name__}: it has no nn.Linear head")
    if head.out_features != num_classes:
        _set_submodule(model, path, nn.Linear(head.in_features, num_classes, device=head.weight.device))


def _pretrained_error(source: str, name: str, error: Exception, hint: str) -> OSError:
    return OSError(
        f"could not load the pretrained weights of {source}:{name} ({type(error).__name__}: {error}). Offline? {hint}"
    )


def torchvision_model(
    name: str,
    *,
    num_classes: int = 1000,
    in_chans: int = 3,
    pretrained: bool = False,
    attention: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A torchvision classification model by name (``"resnet50"``), optionally with attention.

    Args:
        name: a name from ``torchvision.models.list_models()``.
        num_classes: classes of the head; with ``pretrained`` the head is replaced by a fresh one.
        in_chans: input channels; the first convolution is adapted (``adapt_input_conv``).
        pretrained: the model's ``DEFAULT`` weights, through torchvision's own cache.
        attention: ``{"at": [...], "preset": ..., **SelfAttention2d kwargs}`` or ``None``.
        **kwargs: passed to the torchvision builder.
    """
    _check_head_and_input(num_classes, in_chans)
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown torchvision classification model {name!r}; see torchvision.models.list_models()")
    if pretrained:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        try:
            model = torchvision.models.get_model(name, weights=weights, **kwargs)
        except Exception as error:  # the download's many failure types
            raise _pretrained_error(
                "torchvision",
                name,
                error,
                f"Put the file {weights.url.rsplit('/', 1)[-1]} (from {weights.url}) into "
                f"{torch.hub.get_dir()}/checkpoints/, where torchvision looks before downloading.",
            ) from error
        _replace_classifier(model, num_classes)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    _adapt_first_conv(model, in_chans)
    return apply_attention_config(model, attention, (in_chans, 64, 64))


def timm_model(
    name: str,
    *,
    num_classes: int = 1000,
    in_chans: int = 3,
    pretrained: bool = False,
    attention: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A timm model by name (``"convnext_atto"``), optionally with attention; see :func:`torchvision_model`
    (``num_classes=0``: no head, as in timm)."""
    _check_head_and_input(num_classes, in_chans, least_classes=0)
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise ValueError(f"unknown timm model {name!r}; see timm.list_models()") from error
        raise
    except Exception as error:
        if not pretrained:
            raise
        raise _pretrained_error(
            "timm",
            name,
            error,
            "Download the weights file elsewhere and pass "
            "pretrained_cfg_overlay={'file': '/path/to/weights.safetensors'} with pretrained=True.",
        ) from error
    return apply_attention_config(model, attention, (in_chans, 64, 64))


register_source("torchvision", torchvision_model)
register_source("timm", timm_model)


@register_model
def resnet18_small(
    num_classes: int = 10,
    in_chans: int = 3,
    attention: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> ResNet:
    """ResNet-18 for small images (CIFAR, 32×32): 3×3 stride-1 stem, no max-pool.

    torchvision's ``ResNet`` with its stem changed (state-dict keys are torchvision's), so a
    32×32 image gives 32/16/8/4 grids at ``layer1``–``layer4`` instead of 8/4/2/1.

    Args:
        num_classes, in_chans: head classes and input channels.
        attention: ``{"at": ["layer3", ...], **SelfAttention2d kwargs}`` or ``None``.
        **kwargs: passed to torchvision's ``ResNet`` (``zero_init_residual``, ``norm_layer`` …).
    """
    _check_head_and_input(num_classes, in_chans)
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, **kwargs)
    model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return apply_attention_config(model, attention, (in_chans, 32, 32))
