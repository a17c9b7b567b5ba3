"""Load Hugging Face ``transformers`` Vision Transformers into visattn, exactly.

Converts ViT, DeiT (with or without its distillation head), DINOv2 and DINOv2 with registers,
as a base model (``*Model``: ``last_hidden_state`` equals ``forward_features``) or with their
classification head (logits equal). The architecture is read from the Hugging Face config, the
weights from the state dict under either naming transformers uses (the files' ``encoder.layer.N
.attention.attention.query`` or the in-memory ``layers.N.attention.q_proj`` of transformers 5).
What visattn does not implement (SwiGLU, a dropout it would place differently, another
activation, ...) is refused with an :class:`UnsupportedModelError` naming it.

How the layouts meet:

- query/key/value projections are concatenated into timm's fused ``qkv`` (same head order);
- DeiT's distillation token is visattn's ``dist_token`` (with ``head_dist`` for the "with
  teacher" head), or — for ``DeiTForImageClassification``, whose head ignores it — a register
  token; either way it is a prefix token, kept apart from the patch grid;
- DINOv2's register tokens are ``reg_token``; they carry no position, and the class token's
  position is added to the class token once (``no_embed_class=True``), as timm converts them;
- DINOv2's classifier reads the class token and the mean of the patch tokens
  (``pool="cls_mean"``);
- positions are resampled for other input sizes as the peer does: bicubic, antialiased only for
  DINOv2 with registers (``pos_embed_antialias``). ViT and DeiT match the peer called with
  ``interpolate_pos_encoding=True``;
- the ``pooler`` of ``ViTModel`` / ``DeiTModel`` (dense + tanh on the class token, not part of
  ``last_hidden_state``) and the masked-image-modelling ``mask_token`` are not converted.

``transformers`` is needed only here and imported when a conversion runs
(``pip install visattn[hf]``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from ..models.vit import VisionTransformer
from .converted_vit import VIT_ARGUMENTS, build_vit
from .errors import UnsupportedModelError
from .state_dict import adapt_input_channels, rename_by_table, unwrap_state_dict

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "HFArchitecture",
    "MissingExtraError",
    "convert_parts",
    "from_transformers",
    "hf_config",
    "hf_to_visattn_names",
    "import_transformers",
]

StateDict = Mapping[str, Tensor]


@dataclass(frozen=True)
class HFArchitecture:
    """A convertible transformers class: its config's ``model_type`` and what its head reads."""

    name: str
    model_type: str
    head: str | None  # None (base model), "cls", "distilled" or "cls_mean"

    @property
    def prefix(self) -> str:
        """The key prefix of the base model's weights inside a model with a head."""
        return "" if self.head is None else f"{self.model_type}."


SUPPORTED_ARCHITECTURES = {
    arch.name: arch
    for arch in (
        HFArchitecture("ViTModel", "vit", None),
        HFArchitecture("ViTForImageClassification", "vit", "cls"),
        HFArchitecture("DeiTModel", "deit", None),
        HFArchitecture("DeiTForImageClassification", "deit", "cls"),
        HFArchitecture("DeiTForImageClassificationWithTeacher", "deit", "distilled"),
        HFArchitecture("Dinov2Model", "dinov2", None),
        HFArchitecture("Dinov2ForImageClassification", "dinov2", "cls_mean"),
        HFArchitecture("Dinov2WithRegistersModel", "dinov2_with_registers", None),
        HFArchitecture("Dinov2WithRegistersForImageClassification", "dinov2_with_registers", "cls_mean"),
    )
}
#: transformers' activation names → visattn's (timm's)
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_DINOV2 = ("dinov2", "dinov2_with_registers")


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says how to install it."""


def import_transformers() -> ModuleType:
    """The ``transformers`` module, or a `MissingExtraError` saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise MissingExtraError(
            "Hugging Face models need the transformers package: pip install 'visattn[hf]' "
            "(in a checkout: pip install -e '.[hf]')"
        ) from None
    return transformers


def _supported_list() -> str:
    return ", ".join(SUPPORTED_ARCHITECTURES)


# --- the architecture ------------------------------------------------------------------------


def _architecture_of_model(model: nn.Module) -> HFArchitecture:
    name = type(model).__name__
    if not type(model).__module__.startswith("transformers.") or name not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{name} is not a convertible transformers model; visattn converts {_supported_list()}"
        )
    return SUPPORTED_ARCHITECTURES[name]


def _architecture_of_state(config: Any, state: StateDict) -> HFArchitecture:
    """Which class a state dict belongs to: the config's ``model_type`` and the head's keys (a head
    without classes has no keys: then the config's ``architectures`` tell which one)."""
    model_type = config.model_type
    head = None
    if "cls_classifier.weight" in state or "distillation_classifier.weight" in state:
        head = "distilled"
    elif "classifier.weight" in state or any(k.startswith(f"{model_type}.") for k in state):
        head = "cls_mean" if model_type in _DINOV2 else "cls"
        named = SUPPORTED_ARCHITECTURES.get((getattr(config, "architectures", None) or [""])[0])
        if "classifier.weight" not in state and named is not None and named.model_type == model_type and named.head:
            head = named.head
    for arch in SUPPORTED_ARCHITECTURES.values():
        if arch.model_type == model_type and arch.head == head:
            return arch
    raise UnsupportedModelError(f"model_type {model_type!r} is not convertible; visattn converts {_supported_list()}")


def _as_config(config: Any) -> Any:
    """A transformers config from a config object or a ``config.json`` mapping (defaults filled in)."""
    if isinstance(config, Mapping):
        if "model_type" not in config:
            raise ValueError("the config mapping has no 'model_type'; pass the contents of the model's config.json")
        values = dict(config)
        return import_transformers().AutoConfig.for_model(values.pop("model_type"), **values)
    if not hasattr(config, "model_type"):
        raise TypeError(f"config must be a transformers config or a config.json mapping, got {type(config).__name__}")
    return config


def _refused(config: Any) -> list[str]:
    """The features of ``config`` visattn's VisionTransformer does not implement."""
    refused = []
    act = config.hidden_act
    if act not in _ACTIVATIONS:
        refused.append(f"hidden_act={act!r} (only {', '.join(_ACTIVATIONS)})")
    width, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None)
    if width % heads or (head_dim is not None and head_dim * heads != width):
        refused.append(f"head_dim {head_dim or width / heads} other than hidden_size / num_attention_heads")
    if config.model_type in _DINOV2:
        if config.use_swiglu_ffn:
            refused.append("use_swiglu_ffn=True (a SwiGLU MLP; visattn's blocks have the GELU MLP)")
        if config.drop_path_rate > 0:
            refused.append(
                f"drop_path_rate={config.drop_path_rate} (DINOv2 drops every block at the same rate, visattn "
                "at a rate rising over the blocks); set it to 0 and choose visattn's drop_path_rate"
            )
    else:
        if config.hidden_dropout_prob > 0:
            refused.append(
                f"hidden_dropout_prob={config.hidden_dropout_prob} (transformers drops after the MLP, "
                "visattn also inside it); set it to 0 and choose visattn's dropout"
            )
        if int(width * (config.intermediate_size / width)) != config.intermediate_size:
            refused.append(f"intermediate_size={config.intermediate_size} is not int(hidden_size * ratio)")
    return refused


def hf_config(config: Any, arch: HFArchitecture, num_classes: int) -> dict[str, Any]:
    """The :class:`VisionTransformer` arguments equivalent to a transformers ``config`` of ``arch``.

    Raises:
        UnsupportedModelError: naming every feature of ``config`` visattn does not implement.
    """
    if config.model_type != arch.model_type:
        raise UnsupportedModelError(f"{arch.name} needs a {arch.model_type!r} config, got {config.model_type!r}")
    refused = _refused(config)
    if refused:
        raise UnsupportedModelError(
            f"this transformers {arch.name} uses features visattn's VisionTransformer does not implement: "
            + "; ".join(refused)
        )
    dinov2 = arch.model_type in _DINOV2
    registers = getattr(config, "num_register_tokens", 0) if arch.model_type == "dinov2_with_registers" else 0
    deit_dist = arch.model_type == "deit" and arch.head != "cls"
    args = dict(
        img_size=_pair(config.image_size),
        patch_size=_pair(config.patch_size),
        in_chans=config.num_channels,
        num_classes=num_classes,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.mlp_ratio if dinov2 else config.intermediate_size / config.hidden_size,
        qkv_bias=config.qkv_bias,
        pool="cls_mean" if arch.head == "cls_mean" else "cls",
        class_token=True,
        dist_token=deit_dist,
        reg_tokens=registers + int(arch.model_type == "deit" and not deit_dist),
        pos_embed_antialias=arch.model_type == "dinov2_with_registers",
        no_embed_class=registers > 0,
        layer_scale=config.layerscale_value if dinov2 else None,
        pos_drop_rate=config.hidden_dropout_prob,
        attn_drop_rate=config.attention_probs_dropout_prob,
        act_layer=_ACTIVATIONS[config.hidden_act],
        norm_eps=config.layer_norm_eps,
    )
    return {name: args[name] for name in VIT_ARGUMENTS if name in args}


def _pair(value: int | list[int] | tuple[int, int]) -> list[int]:
    return [int(value), int(value)] if isinstance(value, int) else [int(v) for v in value]


# --- the weights -----------------------------------------------------------------------------

_LAYER = r"(?:encoder\.layer|layers)\.(\d+)\."
#: (pattern, visattn name) on keys without the base-model prefix; q/k/v go to a placeholder
_NAMES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.register_tokens", "reg_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (_LAYER + r"attention\.(?:q_proj|attention\.query)\.(weight|bias)", r"blocks.\1.attn.qkv.q.\2"),
    (_LAYER + r"attention\.(?:k_proj|attention\.key)\.(weight|bias)", r"blocks.\1.attn.qkv.k.\2"),
    (_LAYER + r"attention\.(?:v_proj|attention\.value)\.(weight|bias)", r"blocks.\1.attn.qkv.v.\2"),
    (_LAYER + r"attention\.(?:o_proj|output\.dense)\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_LAYER + r"(?:layernorm_before|norm1)\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (_LAYER + r"(?:layernorm_after|norm2)\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (_LAYER + r"(?:mlp\.fc1|intermediate\.dense)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (_LAYER + r"(?:mlp\.fc2|output\.dense)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (_LAYER + r"layer_scale1\.lambda1", r"blocks.\1.ls1.gamma"),
    (_LAYER + r"layer_scale2\.lambda1", r"blocks.\1.ls2.gamma"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"(?:classifier|cls_classifier)\.(weight|bias)", r"head.\1"),
    (r"distillation_classifier\.(weight|bias)", r"head_dist.\1"),
]
#: entries with no counterpart by design (see the module docstring)
_DROPPED = re.compile(r"embeddings\.mask_token|pooler\.dense\.(weight|bias)")
_QKV = re.compile(r"(blocks\.\d+\.attn\.qkv)\.([qkv])\.(weight|bias)")


def hf_to_visattn_names(state: StateDict, arch: HFArchitecture, dist_token: bool) -> dict[str, Tensor]:
    """Rename a transformers state dict of ``arch`` to visattn's names; q/k/v are concatenated.

    DeiT's ``distillation_token`` becomes ``dist_token`` (or ``reg_token`` without ``dist_token``).

    Raises:
        UnsupportedModelError: entries with no visattn counterpart (listed).
    """
    renamed, unmapped = {}, []
    for key, value in state.items():
        base = key.removeprefix(arch.prefix)
        if _DROPPED.fullmatch(base):
            continue
        if base == "embeddings.distillation_token":
            renamed["dist_token" if dist_token else "reg_token"] = value
            continue
        name = rename_by_table(base, _NAMES)
        if name is None:
            unmapped.append(key)
        else:
            renamed[name] = value
    if unmapped:
        raise UnsupportedModelError(f"transformers entries with no visattn counterpart: {unmapped[:6]}")
    return _fuse_qkv(renamed)


def _fuse_qkv(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``blocks.N.attn.qkv.{q,k,v}.*`` → ``blocks.N.attn.qkv.*`` = ``[q; k; v]`` (timm's layout)."""
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    fused = {}
    for key, value in state.items():
        match = _QKV.fullmatch(key)
        if match is None:
            fused[key] = value
        else:
            parts.setdefault((match[1], match[3]), {})[match[2]] = value
    for (module, kind), qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            raise ValueError(f"{module}: the state dict has the {kind} of {sorted(qkv)} only, not of q, k and v")
        fused[f"{module}.{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return fused


def _fold_class_position(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """DINOv2 with registers: the class token's position added to it once, so that the remaining
    positions are the patches' (``no_embed_class=True``; registers have none)."""
    pos = state["pos_embed"]
    return {**state, "cls_token": state["cls_token"] + pos[:, :1], "pos_embed": pos[:, 1:]}


# --- entry points ----------------------------------------------------------------------------


def from_transformers(model_or_state_dict: nn.Module | StateDict, config: Any = None) -> VisionTransformer:
    """Convert a Hugging Face ``transformers`` ViT, DeiT or DINOv2 (or its state dict) into a
    visattn :class:`VisionTransformer`, exactly.

    Args:
        model_or_state_dict: one of :data:`SUPPORTED_ARCHITECTURES` (``ViTModel``,
            ``ViTForImageClassification``, ``DeiTModel``, ``DeiTForImageClassification``,
            ``DeiTForImageClassificationWithTeacher``, ``Dinov2Model``,
            ``Dinov2ForImageClassification``, ``Dinov2WithRegistersModel``,
            ``Dinov2WithRegistersForImageClassification``), or its state dict (the keys of its
            ``model.safetensors`` or of ``model.state_dict()``).
        config: for a state dict only: the transformers config (``AutoConfig.from_pretrained``)
            or the contents of ``config.json``. The head is read from the state dict's keys.

    Returns:
        A :class:`VisionTransformer` whose ``forward`` equals the peer's logits (a head), or
        whose ``forward_features`` equals ``last_hidden_state`` (a base model, ``num_classes=0``),
        at any input size the peer accepts; in the peer's train/eval mode (train for a state
        dict). Register and distillation tokens are prefix tokens: maps see only the patches.

    Raises:
        UnsupportedModelError: another architecture, or a feature visattn lacks (named).
        MissingExtraError: a config mapping without ``transformers`` installed (``pip install visattn[hf]``).
    """
    if isinstance(model_or_state_dict, nn.Module):
        if config is not None:
            raise ValueError("a transformers model carries its config; pass config only with a state dict")
        arch = _architecture_of_model(model_or_state_dict)
        config = model_or_state_dict.config
        state: StateDict = model_or_state_dict.state_dict()
        training = model_or_state_dict.training
    else:
        if config is None:
            raise ValueError(
                "a state dict does not record the architecture (e.g. the number of heads); pass its "
                "config: from_transformers(state, config=AutoConfig.from_pretrained(FOLDER)) or the config.json dict"
            )
        config = _as_config(config)
        state = unwrap_state_dict(model_or_state_dict)
        arch = _architecture_of_state(config, state)
        training = True
    return convert_parts(config, state, arch).train(training)


def convert_parts(
    config: Any, state: StateDict, arch: HFArchitecture, in_chans: int | None = None
) -> VisionTransformer:
    """The conversion itself: ``config`` and ``state`` of ``arch`` → a :class:`VisionTransformer`
    (``in_chans`` other than the weights' adapts the patch filters as timm does)."""
    head = state.get(f"{'cls_' if arch.head == 'distilled' else ''}classifier.weight")
    args = hf_config(config, arch, 0 if head is None else head.shape[0])
    renamed = hf_to_visattn_names(state, arch, args["dist_token"])
    if args["no_embed_class"]:
        renamed = _fold_class_position(renamed)
    if in_chans is not None and in_chans != args["in_chans"]:
        renamed = adapt_input_channels(renamed, in_chans)
        args["in_chans"] = in_chans
    model = build_vit(args, renamed, f"the transformers {arch.name}")
    model.pretrained_cfg = {"input_size": [args["in_chans"], *args["img_size"]], "source": f"transformers:{arch.name}"}
    return model
