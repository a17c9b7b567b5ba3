"""torchvision's Vision Transformers (`vit_b_16` ... `vit_h_14`) converted to visattn, exactly.

torchvision's parameter names are renamed to timm's (which are visattn's) by `torchvision_to_timm_names`;
`from_torchvision` reads the architecture from the model, or from a state dict's shapes, and loads
the weights with every name and shape checked.
"""

from __future__ import annotations

from typing import Any

import torchvision
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from ..models.vit import VisionTransformer
from .converted_vit import activation_name, build_vit
from .errors import UnsupportedModelError
from .state_dict import StateDict, head_classes, rename_by_table, unwrap_state_dict

__all__ = [
    "TORCHVISION_VITS",
    "from_torchvision",
    "is_torchvision_state_dict",
    "torchvision_pretrained_cfg",
    "torchvision_to_timm_names",
]

TORCHVISION_VITS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")
_TORCHVISION_HEADS = {768: 12, 1024: 16, 1280: 16}  # width -> heads of the torchvision family
_IMAGENET = {"mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD)}

_BLOCK = r"encoder\.layers\.encoder_layer_(\d+)\."
_TORCHVISION_NAMES = [
    (r"class_token", "cls_token"),
    (r"conv_proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.pos_embedding", "pos_embed"),
    (_BLOCK + r"ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (_BLOCK + r"self_attention\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (_BLOCK + r"self_attention\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_BLOCK + r"ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (_BLOCK + r"mlp\.0\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (_BLOCK + r"mlp\.3\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"encoder\.ln\.(weight|bias)", r"norm.\1"),
    (r"heads\.head\.(weight|bias)", r"head.\1"),
]


def is_torchvision_state_dict(state: StateDict) -> bool:
    """Whether ``state`` uses torchvision's ViT names (``conv_proj``, ``encoder.pos_embedding``)."""
    return "encoder.pos_embedding" in state and "class_token" in state


def torchvision_to_timm_names(state: StateDict) -> dict[str, Tensor]:
    """Rename a torchvision ViT state dict to timm's (= visattn's) names; tensors are shared.

    torchvision's fused ``in_proj`` is ordered ``[q; k; v]`` with heads contiguous inside each,
    which is timm's ``qkv`` layout, so no tensor is reordered.

    Raises:
        UnsupportedModelError: for entries with no visattn counterpart (``heads.pre_logits`` of
            ``representation_size``, convolutional stems).
    """
    renamed, unmapped = {}, []
    for key, value in state.items():
        name = rename_by_table(key, _TORCHVISION_NAMES)
        if name is None:
            unmapped.append(key)
        else:
            renamed[name] = value
    if unmapped:
        raise UnsupportedModelError(
            f"torchvision entries with no visattn counterpart: {unmapped[:6]} (representation_size "
            "pre-logits layers and convolutional stems are not supported)"
        )
    return renamed


def _torchvision_config(model: nn.Module) -> dict[str, Any]:
    if not isinstance(model, torchvision.models.VisionTransformer):
        raise UnsupportedModelError(f"{type(model).__name__} is not torchvision's VisionTransformer")
    refused = []
    if not isinstance(model.conv_proj, nn.Conv2d):
        refused.append("conv_stem_configs (a convolutional stem)")
    if model.representation_size is not None:
        refused.append("representation_size (a pre-logits layer)")
    act = model.encoder.layers[0].mlp[1]
    if activation_name(act) != "gelu":
        refused.append(f"activation {act!r}")
    if refused:
        raise UnsupportedModelError(
            "this torchvision ViT uses features visattn does not implement: " + "; ".join(refused)
        )
    return dict(
        img_size=model.image_size,
        patch_size=model.patch_size,
        in_chans=model.conv_proj.in_channels,
        num_classes=model.num_classes,
        embed_dim=model.hidden_dim,
        depth=len(model.encoder.layers),
        num_heads=model.encoder.layers[0].num_heads,
        mlp_ratio=model.mlp_dim / model.hidden_dim,
        pos_drop_rate=model.dropout,
        proj_drop_rate=model.dropout,
        attn_drop_rate=model.attention_dropout,
        norm_eps=model.encoder.ln.eps,
    )


def _torchvision_config_from_state(state: StateDict) -> dict[str, Any]:
    """The configuration of a torchvision ViT from its (timm-named) weights' shapes."""
    required = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"not a complete torchvision ViT state dict: no {missing}")
    width, _, patch, _ = state["patch_embed.proj.weight"].shape
    if width not in _TORCHVISION_HEADS:
        raise ValueError(
            f"width {width} is not one of torchvision's ViT widths {sorted(_TORCHVISION_HEADS)}, so the "
            "number of heads is unknown; convert the model object instead: from_torchvision(model)"
        )
    tokens = state["pos_embed"].shape[1] - 1
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise ValueError(f"{tokens} position embeddings do not form a square grid")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return dict(
        img_size=side * patch,
        patch_size=patch,
        in_chans=state["patch_embed.proj.weight"].shape[1],
        num_classes=head_classes(state),
        embed_dim=width,
        depth=depth,
        num_heads=_TORCHVISION_HEADS[width],
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / width,
    )


def from_torchvision(model_or_state_dict: nn.Module | StateDict) -> VisionTransformer:
    """Convert a torchvision ``VisionTransformer`` (``vit_b_16`` / ``vit_b_32`` / ``vit_l_16`` /
    ``vit_l_32`` / ``vit_h_14``), or its state dict, into a visattn one, exactly.

    A state dict's architecture is read from its shapes (heads from the family's width).
    LayerNorm eps is torchvision's 1e-6. ``pretrained_cfg`` gets ImageNet's mean and std, which
    all torchvision ViT weights use.
    """
    if isinstance(model_or_state_dict, nn.Module):
        config = _torchvision_config(model_or_state_dict)
        state = torchvision_to_timm_names(model_or_state_dict.state_dict())
        training = model_or_state_dict.training
    else:
        state = torchvision_to_timm_names(unwrap_state_dict(model_or_state_dict))
        config = _torchvision_config_from_state(state)
        training = True
    model = build_vit(config, state, "the torchvision ViT")
    model.pretrained_cfg = torchvision_pretrained_cfg(model)
    return model.train(training)


def torchvision_pretrained_cfg(model: VisionTransformer) -> dict[str, Any]:
    """The `pretrained_cfg` of converted torchvision weights: ImageNet's mean and std, the input size."""
    return {**_IMAGENET, "input_size": [3, *model.img_size], "interpolation": "bilinear", "source": "torchvision"}
