"""Load timm and torchvision Vision Transformers into visattn, exactly.

A converter reads the peer's *configuration* (widths, depth, heads, pooling, norms, tokens, ...)
from the model itself, builds the matching :class:`~visattn.VisionTransformer`, and loads the
weights under timm's parameter names with every name and shape checked. Anything the peer has
that visattn does not implement (an attention-pool head, SwiGLU, a pre-norm, ...) is refused with
an :class:`UnsupportedModelError` naming it — never a silent partial load.

Entry points:
    :func:`from_timm`, :func:`from_torchvision` — a model object or a state dict;
    :func:`load_weights_file` — a ``.safetensors`` / ``.pth`` / ``.bin`` file, read without pickle;
    :func:`pretrained_model` — what ``create_model(name, pretrained=...)`` runs;
    :func:`peer_state_dict_model` — what ``create_model(name, pretrained_file=...)`` runs for a
    timm or torchvision state dict.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention as TimmAttention
from timm.layers import LayerScale, Mlp
from timm.layers import PatchEmbed as TimmPatchEmbed
from timm.layers.activations import GELU as TimmGELU
from timm.layers.activations import GELUTanh as TimmGELUTanh
from timm.models import adapt_input_conv
from timm.models.deit import VisionTransformerDistilled as TimmVisionTransformerDistilled
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor, nn

from .._io import CheckpointError, read_torch_file
from ..models.registry import PeerLoader, create_model, register_peer_loader
from ..models.vit import VisionTransformer

__all__ = [
    "PretrainedUnavailableError",
    "TORCHVISION_VITS",
    "UnsupportedModelError",
    "VIT_ARGUMENTS",
    "adapt_input_channels",
    "build_vit",
    "from_timm",
    "from_torchvision",
    "is_convertible_name",
    "load_state_dict_exactly",
    "load_weights_file",
    "peer_state_dict_model",
    "pretrained_model",
    "read_weights_file",
    "rename_by_table",
    "reset_head",
    "timm_config",
    "torchvision_to_timm_names",
    "unwrap_state_dict",
]

StateDict = Mapping[str, Tensor]

TORCHVISION_VITS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")
_TORCHVISION_HEADS = {768: 12, 1024: 16, 1280: 16}  # width -> heads of the torchvision family
_IMAGENET = {"mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD)}


class UnsupportedModelError(ValueError):
    """The peer model uses a feature :class:`~visattn.VisionTransformer` does not implement."""


class PretrainedUnavailableError(OSError):
    """Pretrained weights could not be fetched (no network and no local cache)."""


# --- checked loading ---------------------------------------------------------------------------


def load_state_dict_exactly(model: nn.Module, state: StateDict, source: str, assign: bool = False) -> None:
    """Load ``state`` into ``model`` after checking that names and shapes match one to one
    (``assign``: take ``state``'s tensors instead of copying into the model's).

    Raises:
        ValueError: listing the missing, unexpected and mis-shaped entries, with ``source`` named.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {tuple(state[k].shape)} (model: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
        if items
    ]
    if problems:
        raise ValueError(f"the weights of {source} do not match the model; " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=assign)


def build_vit(config: dict[str, Any], state: StateDict, source: str) -> VisionTransformer:
    """A :class:`VisionTransformer` of ``config`` holding copies of ``state``'s tensors, converted to
    the default dtype; built on the meta device, so no time goes into a random initialization.
    Built as `create_model("vision_transformer", **config)`, which `visattn.save_pretrained` writes."""
    with torch.device("meta"):
        model = create_model("vision_transformer", **config)
    dtype = torch.get_default_dtype()
    copies = {k: v.detach().to(dtype=dtype if v.is_floating_point() else v.dtype, copy=True) for k, v in state.items()}
    load_state_dict_exactly(model, copies, source, assign=True)
    return model


def reset_head(model: VisionTransformer, num_classes: int | None) -> VisionTransformer:
    """A fresh head for ``num_classes`` when it differs from the weights' (timm's behaviour)."""
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model


def unwrap_state_dict(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """A bare ``{name: tensor}`` dict from common checkpoint wrappers (``model``, ``state_dict``,
    DDP's ``module.`` prefix)."""
    for key in ("model", "state_dict", "model_ema"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise ValueError(f"expected a state dict of tensors; these entries are not tensors: {not_tensors[:6]}")
    return dict(state)


def load_weights_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` (safetensors) or ``.pth`` / ``.bin`` / ``.pt``
    (``torch.load(weights_only=True)``: no pickled code runs), unwrapping ``{"model": ...}``."""
    return unwrap_state_dict(read_weights_file(path))


def read_weights_file(path: str | os.PathLike) -> Mapping[str, Any]:
    """The mapping a ``.safetensors`` file or a ``.pth`` / ``.bin`` / ``.pt`` file holds (read with
    ``torch.load(weights_only=True)``: no pickled code runs), as it is: a state dict or a wrapper."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; a folder written by save_pretrained loads with visattn.load_pretrained")
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_file {path} does not exist")
    if path.suffix == ".npz":
        raise ValueError(
            f"{path}: JAX .npz checkpoints are not read directly; load it with "
            "timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=PATH)) "
            "and convert the model with visattn.from_timm"
        )
    if path.suffix == ".safetensors":
        try:
            state = load_safetensors(path, device="cpu")
        except SafetensorError as err:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt): {err}") from err
    else:
        state = read_torch_file(path, what="weights file")
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _json_values(cfg: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k] for k in keys if cfg.get(k) is not None}


# --- timm --------------------------------------------------------------------------------------


def _activation_name(act: nn.Module) -> str | None:
    if type(act) in (nn.GELU, TimmGELU, TimmGELUTanh):
        approximate = getattr(act, "approximate", "tanh" if isinstance(act, TimmGELUTanh) else "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}[approximate]
    return None


def _is_plain(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity)


class _BlockSignature(NamedTuple):
    """What all blocks of a convertible timm ViT share: one visattn ``EncoderBlock`` config."""

    num_heads: int
    mlp_hidden: int
    qkv_bias: bool
    qk_norm: bool
    layer_scale: bool
    act_layer: str | None


#: the arguments of :class:`VisionTransformer` in their order (the order of ``timm_config``'s keys)
VIT_ARGUMENTS = tuple(inspect.signature(VisionTransformer).parameters)


def timm_config(model: nn.Module) -> dict[str, Any]:
    """The :class:`VisionTransformer` arguments equivalent to a timm ViT (on any device, meta too):
    ``VisionTransformer(**timm_config(model))`` has the same architecture and parameter names.

    Raises:
        UnsupportedModelError: naming every feature of ``model`` visattn does not implement.
    """
    if type(model) not in (TimmVisionTransformer, TimmVisionTransformerDistilled):
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
    if not _is_plain(mlp.norm):
        refused.append("scale_mlp_norm=True (norm inside the MLP)")
    act = _activation_name(mlp.act)
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


def _head_classes(state: StateDict) -> int:
    head = state.get("head.weight")
    return 0 if head is None else head.shape[0]


def adapt_input_channels(state: dict[str, Tensor], in_chans: int) -> dict[str, Tensor]:
    """Fit the patch embedding to ``in_chans`` as timm's pretrained loading does (``in_chans=1``
    sums the RGB filters; more channels repeat them, rescaled)."""
    weight = state.get("patch_embed.proj.weight")
    if weight is not None and weight.shape[1] != in_chans:
        state = {**state, "patch_embed.proj.weight": adapt_input_conv(in_chans, weight, base_chans=weight.shape[1])}
    return state


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
        peer = _timm_peer(name, num_classes=_head_classes(raw), **timm_kwargs)
        timm_config(peer)  # refuse unsupported architectures before touching the weights
        state = adapt_input_channels(checkpoint_filter_fn(raw, peer), peer.patch_embed.proj.in_channels)
        source = f"a state dict for timm's {name!r}"
    model = build_vit(timm_config(peer), state, source)
    model.pretrained_cfg = _timm_pretrained_cfg(peer)
    if isinstance(model_or_state_dict, nn.Module):
        return model.train(peer.training)
    return reset_head(model, num_classes).train()


# --- torchvision -------------------------------------------------------------------------------

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


def rename_by_table(key: str, table: Sequence[tuple[str, str]]) -> str | None:
    """``key`` renamed by the first ``(pattern, replacement)`` of ``table`` whose pattern matches it
    whole (``re.sub`` groups), or ``None`` when none does."""
    for pattern, replacement in table:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


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
    if _activation_name(act) != "gelu":
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
        num_classes=_head_classes(state),
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
    model.pretrained_cfg = _torchvision_pretrained_cfg(model)
    return model.train(training)


def _torchvision_pretrained_cfg(model: VisionTransformer) -> dict[str, Any]:
    return {**_IMAGENET, "input_size": [3, *model.img_size], "interpolation": "bilinear", "source": "torchvision"}


# --- named pretrained models (create_model) ----------------------------------------------------


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
            model.pretrained_cfg = _torchvision_pretrained_cfg(model)
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
            raise _unavailable(name, weights.url, err) from err
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
            else (cfg.url if cfg else None)
        )
        raise _unavailable(name, url, err) from err
    return from_timm(peer)


register_peer_loader(PeerLoader(knows=is_convertible_name, load=pretrained_model))
