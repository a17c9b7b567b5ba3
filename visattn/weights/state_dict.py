"""State dicts as converters read them: from files and wrappers, renamed, fitted, loaded with every name checked.

What the timm, torchvision and Hugging Face converters share: `load_weights_file` (a
`.safetensors` / `.pth` / `.bin` file read without pickle), `read_weights_file` (the mapping such
a file holds, wrapper and all), `unwrap_state_dict` (common checkpoint wrappers),
`rename_by_table` (a peer's names to visattn's), `adapt_input_channels` (the patch embedding
fitted to other input channels), `head_classes` and `load_state_dict_exactly` (a load that refuses
any missing, unexpected or mis-shaped entry, naming it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from timm.models import adapt_input_conv
from torch import Tensor, nn

from .._io import CheckpointError, read_torch_file

__all__ = [
    "StateDict",
    "adapt_input_channels",
    "head_classes",
    "load_state_dict_exactly",
    "load_weights_file",
    "read_weights_file",
    "rename_by_table",
    "unwrap_state_dict",
]

StateDict = Mapping[str, Tensor]


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


def rename_by_table(key: str, table: Sequence[tuple[str, str]]) -> str | None:
    """``key`` renamed by the first ``(pattern, replacement)`` of ``table`` whose pattern matches it
    whole (``re.sub`` groups), or ``None`` when none does."""
    for pattern, replacement in table:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def head_classes(state: StateDict) -> int:
    """The number of classes of the head weight `head.weight` `(classes, width)` in `state`; 0 without a head."""
    head = state.get("head.weight")
    return 0 if head is None else head.shape[0]


def adapt_input_channels(state: dict[str, Tensor], in_chans: int) -> dict[str, Tensor]:
    """Fit the patch embedding to ``in_chans`` as timm's pretrained loading does (``in_chans=1``
    sums the RGB filters; more channels repeat them, rescaled)."""
    weight = state.get("patch_embed.proj.weight")
    if weight is not None and weight.shape[1] != in_chans:
        state = {**state, "patch_embed.proj.weight": adapt_input_conv(in_chans, weight, base_chans=weight.shape[1])}
    return state
