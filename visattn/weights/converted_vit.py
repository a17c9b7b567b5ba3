"""The `VisionTransformer` a converter builds from a peer's configuration and weights.

`VIT_ARGUMENTS` (its arguments, in order), `activation_name` (the `act_layer` name of a peer's
activation module), `build_vit` (the model holding the converted weights, built on the meta
device as `create_model("vision_transformer", ...)`) and `reset_head` (a fresh head for another
number of classes, as timm does).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from timm.layers.activations import GELU as TimmGELU
from timm.layers.activations import GELUTanh as TimmGELUTanh
from torch import nn

from ..models.registry import create_model
from ..models.vit import VisionTransformer
from .state_dict import StateDict, load_state_dict_exactly

__all__ = ["VIT_ARGUMENTS", "activation_name", "build_vit", "reset_head"]

#: the arguments of :class:`VisionTransformer` in their order (the order of ``timm_config``'s keys)
VIT_ARGUMENTS = tuple(inspect.signature(VisionTransformer).parameters)


def activation_name(act: nn.Module) -> str | None:
    """The `act_layer` name of a peer's activation module (`"gelu"`, `"gelu_tanh"`), or `None` for
    an activation `VisionTransformer` does not implement."""
    if type(act) in (nn.GELU, TimmGELU, TimmGELUTanh):
        approximate = getattr(act, "approximate", "tanh" if isinstance(act, TimmGELUTanh) else "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}[approximate]
    return None


def build_vit(config: dict[str, Any], state: StateDict, source: str) -> VisionTransformer:
    """A :class:`VisionTransformer` of ``config`` holding copies of ``state``'s tensors, converted to
    the default dtype; built on the meta device, so no time goes into a random initialization.
    Built as `create_model("vision_transformer", **config)`, which `visattn.save_pretrained` writes."""
    with torch.device("meta"):
        model = create_model("vision_transformer", **config)
    assert isinstance(model, VisionTransformer)  # the registered builder of that name
    dtype = torch.get_default_dtype()
    copies = {k: v.detach().to(dtype=dtype if v.is_floating_point() else v.dtype, copy=True) for k, v in state.items()}
    load_state_dict_exactly(model, copies, source, assign=True)
    return model


def reset_head(model: VisionTransformer, num_classes: int | None) -> VisionTransformer:
    """A fresh head for ``num_classes`` when it differs from the weights' (timm's behaviour)."""
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model
