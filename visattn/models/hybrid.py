"""Hybrid CNN → Transformer (the ViT paper's "hybrid"): CNN stages make the tokens.

The first stages of a CNN turn the image into a ``C × h × w`` feature grid; a 1×1 convolution
turns each cell into a ``D``-wide token; then the :class:`~visattn.VisionTransformer`'s own
positions, encoder blocks, pooling and head follow (:class:`HybridEmbed` is its token stem).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from .._utils import check_images, dry_forward, to_pair
from .insert import hooked_blocks
from .registry import create_model, register_model
from .vit import VisionTransformer, check_vit_arguments

__all__ = ["HybridEmbed", "HybridViT", "cnn_trunk"]


class _Stages(nn.Module):
    """Chosen children of a CNN under their own names, run in order (so their keys stay).

    ``extras`` are registered too but not run: attention blocks that forward hooks on the stages
    run (see :func:`visattn.insert_attention`).
    """

    def __init__(self, stages: OrderedDict[str, nn.Module], extras: Mapping[str, nn.Module] = {}) -> None:
        super().__init__()
        for name, module in {**stages, **extras}.items():
            self.add_module(name, module)
        self.order = list(stages)

    def forward(self, x: Tensor) -> Tensor:
        for name in self.order:
            x = getattr(self, name)(x)
        return x


def _truncate(module: nn.Module, path: str) -> _Stages:
    head, _, rest = path.partition(".")
    kept: OrderedDict[str, nn.Module] = OrderedDict()
    for name, child in module.named_children():
        if name == head:
            kept[name] = _truncate(child, rest) if rest else child
            return _Stages(kept)
        kept[name] = child
    children = ", ".join(n for n, _ in module.named_children())
    raise ValueError(f"{type(module).__name__} has no child {head!r}; its children: {children}")


def cnn_trunk(model: nn.Module, out_layer: str, input_size: tuple[int, int, int]) -> nn.Module:
    """The stages of ``model`` up to and including ``out_layer``, as one module.

    Keeps the children that run before ``out_layer`` (a top-level child such as ``"layer3"``, or
    a path into a sequential one, such as ``"features.5"``) under their own names, so their
    state-dict keys stay, and the attention blocks inserted into them (``"layer2_attn"``). The
    result is checked against ``model``'s own output at ``out_layer`` on a random
    ``(1, *input_size)`` image (eval mode; on the ``meta`` device, where tensors hold no values, only
    its shape); a model whose ``forward`` does more than run its children in order gets a clear error.
    """
    trunk = _truncate(model, out_layer)
    root_names = {id(m): n for n, m in model.named_children()}
    blocks = {root_names[id(b)]: b for b in hooked_blocks(trunk) if id(b) in root_names}
    trunk = _Stages(OrderedDict((n, getattr(trunk, n)) for n in trunk.order), blocks)
    site = model.get_submodule(out_layer)
    seen: list[Tensor] = []
    handle = site.register_forward_hook(lambda module, args, output: seen.append(output))

    def run_both(x: Tensor) -> Tensor | None:
        model(x)
        try:
            return trunk(x)
        except Exception:  # the children do not chain: a forward that does more than that
            return None

    try:
        cut = dry_forward(model, input_size, run_both, random=True)
    finally:
        handle.remove()
    same = (
        cut is not None
        and seen
        and isinstance(seen[0], Tensor)
        and seen[0].shape == cut.shape
        # tolerant of nondeterministic kernels; on the meta device (a size estimate) only shapes exist
        and (cut.is_meta or torch.allclose(seen[0], cut, rtol=1e-3, atol=1e-4))
    )
    if not same:
        raise ValueError(
            f"{type(model).__name__}'s forward does not simply run its children in order up to "
            f"{out_layer!r}, so its first stages cannot be cut out by name; pick an earlier stage "
            "or pass a backbone module that returns the feature grid (with out_layer=None)"
        )
    return trunk


class HybridEmbed(nn.Module):
    """Token stem from a CNN: image → ``backbone`` → ``(B, C, h, w)`` → 1×1 conv → tokens.

    Args:
        backbone: returns a feature grid ``(B, C, h, w)`` for an image (a list, tuple or dict of
            grids is fine: the last one is used).
        in_chans: input channels of the backbone.
        embed_dim: token width ``D``.
        img_size: the size the model is made for; the feature channels and the grid come from one
            dry forward pass at it.

    Shapes:
        ``tokenize``: ``(B, in_chans, H, W)`` → tokens ``(B, h·w, D)`` and ``(h, w)``.
    """

    def __init__(self, backbone: nn.Module, in_chans: int, embed_dim: int, img_size: tuple[int, int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.in_chans = in_chans
        channels, grid_h, grid_w = self._feature_shape(*img_size)
        self.feature_channels = channels
        self.proj = nn.Conv2d(channels, embed_dim, kernel_size=1)
        self.patch_size = (max(1, img_size[0] // grid_h), max(1, img_size[1] // grid_w))

    def features(self, x: Tensor) -> Tensor:
        """Images ``(B, in_chans, H, W)`` → the backbone's grid ``(B, C, h, w)``."""
        check_images(x, self.in_chans, next(self.backbone.parameters(), None))
        out = self.backbone(x)
        if isinstance(out, Mapping):
            out = list(out.values())
        if isinstance(out, (list, tuple)):
            out = out[-1]
        if not isinstance(out, Tensor) or out.dim() != 4:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the hybrid backbone must return a (B, C, h, w) grid, got {shape}")
        return out

    def _feature_shape(self, height: int, width: int) -> tuple[int, int, int]:
        _, channels, grid_h, grid_w = dry_forward(self.backbone, (self.in_chans, height, width), self.features).shape
        return channels, grid_h, grid_w

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The token grid for an input ``height × width`` (one dry forward pass of the backbone)."""
        return self._feature_shape(height, width)[1:]

    def tokenize(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        grid = self.proj(self.features(x))
        return rearrange(grid, "b d h w -> b (h w) d"), (grid.shape[-2], grid.shape[-1])

    def forward(self, x: Tensor) -> Tensor:
        """Images ``(B, in_chans, H, W)`` → tokens ``(B, h·w, D)``."""
        return self.tokenize(x)[0]


class HybridViT(VisionTransformer):
    """A :class:`~visattn.VisionTransformer` whose tokens come from the first stages of a CNN.

    Args:
        backbone: a model name for :func:`visattn.create_model` (``"torchvision:resnet50"``,
            ``"timm:resnet26d"``, ``"resnet18_small"``) cut after ``out_layer``, or a module that
            returns the feature grid itself (then ``out_layer`` must be ``None``).
        out_layer: the last CNN stage kept (``"layer3"``, ``"features.5"``, ``"stages.2"``).
        img_size: the size the learned positions are made for (other sizes work, positions are
            resampled as in the ViT).
        in_chans: input channels.
        backbone_kwargs: more options for ``create_model`` (``pretrained=True``,
            ``attention={...}``).
        **vit_kwargs: :class:`~visattn.VisionTransformer` options (``embed_dim``, ``depth``,
            ``num_heads``, ``num_classes``, ``pool``, ``pos_embed``, …); ``patch_size`` does not
            apply.

    Shapes:
        images ``(B, in_chans, H, W)`` → logits ``(B, num_classes)``; the token grid is the
        backbone's output grid.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18_small",
        out_layer: str | None = "layer3",
        *,
        img_size: int | tuple[int, int] = 32,
        in_chans: int = 3,
        embed_dim: int = 192,
        backbone_kwargs: Mapping[str, Any] | None = None,
        **vit_kwargs: Any,
    ) -> None:
        if "patch_size" in vit_kwargs or "embed_layer" in vit_kwargs:
            raise ValueError("HybridViT takes its tokens from the backbone: drop patch_size / embed_layer")
        check_vit_arguments({"img_size": img_size, "in_chans": in_chans, "embed_dim": embed_dim, **vit_kwargs})
        size = to_pair(img_size)
        if isinstance(backbone, str):
            cnn = create_model(backbone, in_chans=in_chans, **(backbone_kwargs or {}))
            if out_layer is None:
                raise ValueError(f"name the last stage of {backbone!r} to keep: out_layer='layer3', say")
            cnn = cnn_trunk(cnn, out_layer, (in_chans, *size))
        elif out_layer is not None:
            cnn = cnn_trunk(backbone, out_layer, (in_chans, *size))
        else:
            cnn = backbone
        stem = HybridEmbed(cnn, in_chans, embed_dim, size)
        super().__init__(img_size=size, in_chans=in_chans, embed_dim=embed_dim, embed_layer=stem, **vit_kwargs)


@register_model
def hybrid_resnet18_small_vit(**kwargs: Any) -> HybridViT:
    """CIFAR-size hybrid: ``resnet18_small`` up to ``layer3`` (8×8 grid at 32×32) → 6 blocks of 192."""
    defaults = dict(
        backbone="resnet18_small", out_layer="layer3", img_size=32, num_classes=10, embed_dim=192, depth=6, num_heads=3
    )
    return HybridViT(**{**defaults, **kwargs})
