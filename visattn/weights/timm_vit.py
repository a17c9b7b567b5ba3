"""timm's Vision Transformers converted to visattn, exactly.

`timm_config` reads the peer's *configuration* (widths, depth, heads, pooling, norms, tokens, ...)
from the model itself; `from_timm` builds the matching `visattn.VisionTransformer` and loads the
weights under timm's parameter names with every name and shape checked. Anything the peer has
that visattn does not implement (an attention-pool head, SwiGLU, a pre-norm, ...) is refused with
an `UnsupportedModelError` naming it — never a silent partial load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, TypeGuard

import timm
import torch
from timm.layers import Attention as TimmAttention
from timm.layers import LayerScale, Mlp
from timm.layers import PatchEmbed as TimmPatchEmbed
from timm.models.deit import VisionTransformerDistilled as TimmVisionTransformerDistilled
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from ..models.vit import VisionTransformer
from .converted_vit import VIT_ARGUMENTS, activation_name, build_vit, reset_head
from .errors import UnsupportedModelError
from .state_dict import StateDict, adapt_input_channels, head_classes, unwrap_state_dict
from .torchvision_vit import is_torchvision_state_dict, torchvision_to_timm_names

__all__ = ["from_timm", "timm_config"]


def _json_values(cfg: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k] for k in keys if cfg.get(k) is not None}


def _is_plain(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity)


def _is_timm_vit(model: nn.Module) -> TypeGuard[TimmVisionTransformer]:
    """``model`` is timm's ViT or DeiT class itself (not a subclass, which may change what it computes)."""
    return type(model) in (TimmVisionTransformer, TimmVisionTransformerDistilled)


class _BlockSignature(NamedTuple):
    """What all blocks of a convertible timm ViT share: one visattn ``EncoderBlock`` config."""

    num_heads: int
    mlp_hidden: int
    qkv_bias: bool
    qk_norm: bool
    layer_scale: bool
    act_layer: str | None


def timm_config(model: nn.Module) -> dict[str, Any]:
    """The :class:`VisionTransformer` arguments equivalent to a timm ViT (on any device, meta too):
    ``VisionTransformer(**timm_config(model))`` has the same architecture and parameter names.

    Raises:
        UnsupportedModelError: naming every feature of ``model`` visattn does not implement.
    """
    if not _is_timm_vit(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not timm's VisionTransformer; visattn converts timm "
            "VisionTransformer models (ViT, DeiT with or without distillation token, DINO, AugReg, ...)"
        )
    refused = _refused_layout(model)
    signatures: set[_BlockSignature] = set()
    for block in model.blocks:
        signature = _check_block(block, model.embed_dim, refused)
        if signature is not None:
            signatures.add(signature)
    eps_values = _check_norms(model, refused)
    if len(signatures) > 1:
        refused.append("blocks that differ from each other")
    if refused:
        raise UnsupportedModelError(
            "this timm model uses features visattn's VisionTransformer does not implement: "
            + "; ".join(dict.fromkeys(refused))
        )
    config = {
        **_block_arguments(signatures.pop(), model.embed_dim),
        **_layout_arguments(model),
        **_dropout_arguments(model),
        "norm_eps": eps_values.pop() if eps_values else 1e-6,
    }
    return {name: config[name] for name in VIT_ARGUMENTS if name in config}


def _refused_layout(model: TimmVisionTransformer) -> list[str]:
    """The unsupported features of ``model``'s pooling, tokens, patch embedding and head."""
    refused: list[str] = []
    if model.attn_pool is not None:
        refused.append(f"global_pool={model.global_pool!r} (attention-pool head)")
    elif model.global_pool not in ("token", "avg"):
        refused.append(f"global_pool={model.global_pool!r} (only 'token' and 'avg')")
    if model.pool_include_prefix:
        refused.append("pool_include_prefix=True")
    if getattr(model, "distilled_training", False):
        refused.append("distilled_training=True (the two heads' logits returned apart while training)")
    if model.pos_embed is None:
        refused.append("pos_embed='none' (no positional embedding)")
    if not _is_plain(model.patch_drop):
        refused.append("patch_drop_rate > 0 (PatchDropout)")
    if not _is_plain(model.norm_pre):
        refused.append("pre_norm=True (a norm before the blocks)")
    embed = model.patch_embed
    if type(embed) is not TimmPatchEmbed:
        refused.append(f"patch embedding {type(embed).__name__} (only a single strided conv)")
    else:
        if embed.dynamic_img_pad:
            refused.append("dynamic_img_pad=True")
        if not _is_plain(embed.norm):
            refused.append("embed_norm_layer (a norm in the patch embedding)")
        if embed.proj.bias is None:
            refused.append("a patch embedding without bias")
    if model.num_classes > 0 and not isinstance(model.head, nn.Linear):
        refused.append(f"head {type(model.head).__name__} (only a linear head)")
    return refused


def _check_block(block: nn.Module, embed_dim: int, refused: list[str]) -> _BlockSignature | None:
    """Add to ``refused`` what ``block`` uses that visattn lacks; its signature, if it has one."""
    if type(block) is not TimmBlock:
        refused.append(f"block type {type(block).__name__} (only timm's Block)")
        return None
    attn, mlp = block.attn, block.mlp
    if type(attn) is not TimmAttention:
        refused.append(f"attention {type(attn).__name__} (only timm's Attention)")
        return None
    if not _is_plain(attn.norm):
        refused.append("scale_attn_norm=True (norm before the attention projection)")
    if getattr(attn, "gate", None) is not None:
        refused.append("gated attention")
    if attn.proj.bias is None:
        refused.append("proj_bias=False")
    if attn.num_heads * attn.head_dim != embed_dim:
        refused.append("attn_head_dim other than embed_dim / num_heads")
    if type(mlp) is not Mlp:
        refused.append(f"MLP {type(mlp).__name__} (only the GELU Mlp, not SwiGLU or gated MLPs)")
        return None
    if not isinstance(mlp.fc1, nn.Linear) or mlp.fc1.bias is None or mlp.fc2.bias is None:
        refused.append("a convolutional or bias-free MLP")
    if not isinstance(mlp.fc1, nn.Linear):  # a 1×1 convolution: no MLP width to read
        return None
    if not _is_plain(mlp.norm):
        refused.append("scale_mlp_norm=True (norm inside the MLP)")
    act = activation_name(mlp.act)
    if act is None:
        refused.append(f"activation {mlp.act!r} (only GELU, exact or tanh)")
    return _BlockSignature(
        attn.num_heads,
        mlp.fc1.out_features,
        attn.qkv.bias is not None,
        not _is_plain(attn.q_norm),
        isinstance(block.ls1, LayerScale),
        act,
    )


def _check_norms(model: TimmVisionTransformer, refused: list[str]) -> set[float]:
    """Add to ``refused`` norms other than one LayerNorm kind; the eps values of the LayerNorms."""
    norms = [model.norm, model.fc_norm] + [
        m
        for block in model.blocks
        if type(block) is TimmBlock and type(block.attn) is TimmAttention
        for m in (block.norm1, block.norm2, block.attn.q_norm, block.attn.k_norm)
    ]
    norms = [m for m in norms if not _is_plain(m)]
    not_layer_norm = {type(m).__name__ for m in norms if not (isinstance(m, nn.LayerNorm) and m.bias is not None)}
    if not_layer_norm:
        names = ", ".join(sorted(not_layer_norm))
        refused.append(f"norm layer {names} (only LayerNorm with weight and bias)")
    eps_values = {m.eps for m in norms if isinstance(m, nn.LayerNorm)}
    if len(eps_values) > 1:
        refused.append(f"LayerNorms with different eps {sorted(eps_values)}")
    return eps_values


def _block_arguments(signature: _BlockSignature, embed_dim: int) -> dict[str, Any]:
    """The block hyper-parameters (heads, MLP ratio, biases, norms, layer scale, activation)."""
    mlp_ratio = signature.mlp_hidden / embed_dim
    if int(embed_dim * mlp_ratio) != signature.mlp_hidden:
        raise UnsupportedModelError(f"MLP width {signature.mlp_hidden} is not int(embed_dim * mlp_ratio) for any ratio")
    return dict(
        num_heads=signature.num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=signature.qkv_bias,
        qk_norm=signature.qk_norm,
        # the value is overwritten by the weights
        layer_scale=1e-5 if signature.layer_scale else None,
        act_layer=signature.act_layer,
    )


def _layout_arguments(model: TimmVisionTransformer) -> dict[str, Any]:
    """The input size, patches, width, depth, prefix tokens, pooling and final norms."""
    embed = model.patch_embed
    return dict(
        img_size=list(embed.img_size),
        patch_size=list(embed.patch_size),
        in_chans=embed.proj.in_channels,
        num_classes=model.num_classes,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        pool="cls" if model.global_pool == "token" else "mean",
        class_token=model.cls_token is not None,
        dist_token=getattr(model, "dist_token", None) is not None,
        reg_tokens=model.num_reg_tokens,
        no_embed_class=model.no_embed_class,
        final_norm=not (_is_plain(model.norm) and _is_plain(model.fc_norm)),
        fc_norm=not _is_plain(model.fc_norm),
    )


def _dropout_arguments(model: TimmVisionTransformer) -> dict[str, Any]:
    """The dropout rates, and stochastic depth as the last block's (it rises linearly to it)."""
    last = model.blocks[-1]
    # timm_config refused any other block or attention before
    assert isinstance(last, TimmBlock) and isinstance(last.attn, TimmAttention)
    return dict(
        drop_rate=model.head_drop.p,
        pos_drop_rate=model.pos_drop.p,
        proj_drop_rate=last.attn.proj_drop.p,
        attn_drop_rate=last.attn.attn_drop.p,
        drop_path_rate=getattr(last.drop_path1, "drop_prob", 0.0),
    )


def _timm_pretrained_cfg(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg:
        return None
    keys = ("mean", "std", "input_size", "interpolation", "crop_pct", "crop_mode")
    source = cfg.get("architecture", "")
    if cfg.get("tag"):
        source = f"{source}.{cfg['tag']}"
    return {**_json_values(cfg, keys), "source": f"timm:{source}"}


def _timm_peer(name: str, **kwargs: Any) -> nn.Module:
    """A timm model of ``name`` on the meta device: its configuration without allocating weights."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


def from_timm(
    model_or_state_dict: nn.Module | StateDict, name: str | None = None, **timm_kwargs: Any
) -> VisionTransformer:
    """Convert a timm ``VisionTransformer`` (or its state dict) into a visattn one, exactly.

    Args:
        model_or_state_dict: a timm model (its configuration is read from it), or a state dict
            under timm's names (``{"model": ...}`` wrappers are accepted; torchvision names are
            renamed; other layouts timm knows, e.g. DINOv2's, go through timm's
            ``checkpoint_filter_fn``).
        name: the timm name the state dict belongs to (``"vit_small_patch16_224.dino"``); needed
            for a state dict, which does not record e.g. the number of heads.
        timm_kwargs: for a state dict, extra arguments of the timm model (``img_size=384``
            resamples the learned positions and ``patch_size=8`` the patch filters as timm
            does, ``in_chans=1`` sums the RGB filters; ``num_classes`` other than the weights'
            puts a fresh head on the converted backbone).

    Returns:
        A :class:`VisionTransformer` whose logits and ``forward_features`` equal the peer's, in
        the peer's train/eval mode (train for a state dict); ``pretrained_cfg`` carries the
        peer's input normalization when known.

    Raises:
        UnsupportedModelError: the peer uses something visattn does not implement (named).
        ValueError: a state dict without ``name``, or weights that do not match.
    """
    if isinstance(model_or_state_dict, nn.Module):
        if name is not None or timm_kwargs:
            raise ValueError("name and timm arguments apply to a state dict; a model describes itself")
        peer = model_or_state_dict
        state: StateDict = peer.state_dict()
        source = f"timm model {type(peer).__name__}"
    else:
        if name is None:
            raise ValueError(
                "a state dict does not record the architecture (e.g. the number of heads); "
                "pass the timm name it was trained as, e.g. from_timm(state, name='vit_small_patch16_224')"
            )
        raw = unwrap_state_dict(model_or_state_dict)
        if is_torchvision_state_dict(raw):
            raw = torchvision_to_timm_names(raw)
        num_classes = timm_kwargs.pop("num_classes", None)
        peer = _timm_peer(name, num_classes=head_classes(raw), **timm_kwargs)
        timm_config(peer)  # refuse unsupported architectures before touching the weights
        assert _is_timm_vit(peer)  # timm_config refused anything else
        state = adapt_input_channels(checkpoint_filter_fn(raw, peer), peer.patch_embed.proj.in_channels)
        source = f"a state dict for timm's {name!r}"
    model = build_vit(timm_config(peer), state, source)
    model.pretrained_cfg = _timm_pretrained_cfg(peer)
    if isinstance(model_or_state_dict, nn.Module):
        return model.train(peer.training)
    return reset_head(model, num_classes).train()
