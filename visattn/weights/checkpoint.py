"""Checkpoints: written atomically, loaded without running pickled code.

A visattn checkpoint is a ``dict`` saved with :func:`torch.save` holding only tensors and plain
Python values (so ``torch.load(weights_only=True)`` reads it)::

    {
        "format": "visattn-checkpoint",
        "version": 1,
        "model_config": {"name": "vit_digits_patch4_16", "num_classes": 10, ...},  # create_model(**)
        "model": state_dict,
        "data_config": {...},      # optional: how inputs were prepared (size, mean, std, channels)
        ...                        # optional training state (optimizer, scheduler, epoch, RNG, ...)
    }

Training (:mod:`visattn.train.engine`) writes ``data_config`` (the stored form of a
`visattn.data_spec.DataSpec`: ``{"name", "img_size": [H, W], "in_chans", "mean", "std",
"num_classes", "class_names"}``) and ``config`` (the resolved training config) into ``best.pt``
(plus ``epoch``, ``acc1``) and ``last.pt``; ``last.pt`` also holds the training state:
``optimizer``, ``scheduler``, ``ema`` (or ``None``), ``scaler`` (or ``None``), ``epoch`` (epochs
completed), ``step`` (updates done), ``best_acc1`` and ``best_epoch`` (the epoch whose weights
``best.pt`` holds; each epoch writes ``last.pt`` first). No random-generator state is stored
because none is needed: training re-seeds every generator at the start of each epoch from
``(seed, epoch, rank)``, so ``epoch`` fixes it.

A checkpoint is untrusted data. `load_checkpoint` checks the type of every field visattn
reads (`model`, `model_config`, `config`, `data_config` and its class names), and
`model_from_checkpoint` rebuilds the model only from a `model_config` that passes
`visattn.weights.stored_config`: no key that reads files or the network, and no model larger
than the tensors stored with it. Each refusal is one `CheckpointError` naming the file and
the field.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from .._io import CheckpointError, atomic_torch_save, read_torch_file
from ..data_spec import DataSpecError, check_data_dict
from ..models.registry import create_model
from .stored_config import config_for_weights

__all__ = [
    "CHECKPOINT_FORMAT",
    "check_checkpoint",
    "check_fields",
    "load_checkpoint",
    "model_from_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "visattn-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    model_config: dict[str, Any],
    **extra: Any,
) -> None:
    """Write a visattn checkpoint atomically. ``model_config`` rebuilds the model through
    :func:`visattn.create_model` (``{"name": ..., **kwargs}``); ``extra`` adds fields."""
    if "name" not in model_config:
        raise ValueError("model_config needs a 'name' for create_model")
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": dict(model_config),
        "model": model.state_dict(),
        **extra,
    }
    atomic_torch_save(state, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a visattn checkpoint with `weights_only=True`; clear errors for anything else,
    including fields of the wrong type (see `check_fields`)."""
    state = read_torch_file(path, map_location, what="visattn checkpoint")
    check_checkpoint(state, path)
    return state


def check_checkpoint(state: Any, path: str | os.PathLike) -> None:
    """Refuse what `torch.load` read from `path` unless it is a visattn checkpoint of a version this
    visattn reads, with every field visattn reads of the right type (`check_fields`)."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a visattn checkpoint (no 'format': '{CHECKPOINT_FORMAT}' entry); "
            "pretrained timm/torchvision weights load with visattn.from_timm / from_torchvision"
        )
    version = state.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: field 'version' must be a whole number, got {type(version).__name__}")
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} was written by a newer visattn (version {version})")
    check_fields(state, path)


def check_fields(state: dict[str, Any], source: str | os.PathLike) -> None:
    """Refuse a checkpoint whose fields visattn reads have the wrong type: `model` (names →
    tensors), `model_config` and `config` (dicts) and `data_config` (`_check_data_config`).
    Absent fields are left to the code that needs them."""
    weights = state.get("model")
    if weights is not None and not (
        isinstance(weights, dict) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in weights.items())
    ):
        raise CheckpointError(f"{source}: field 'model' must map parameter names to tensors")
    for field in ("model_config", "config", "data_config"):
        if state.get(field) is not None and not isinstance(state[field], dict):
            raise CheckpointError(f"{source}: field {field!r} must be a dict, got {type(state[field]).__name__}")
    if state.get("data_config") is not None:
        _check_data_config(state["data_config"], (state.get("model_config") or {}).get("num_classes"), source)


def _check_data_config(config: dict[str, Any], head: Any, source: str | os.PathLike) -> None:
    """A stored `data_config` by the rules of `visattn.data_spec.DataSpec` (any of its keys: older
    files may lack the input keys), and one class name per class of the model's head (`head`:
    `model_config['num_classes']`, when it is a number)."""
    try:
        check_data_dict(config, source)
    except DataSpecError as err:
        raise CheckpointError(str(err)) from err
    names = config.get("class_names")
    if names is not None and type(head) is int and head > 0 and len(names) != head:  # not a bool: a number
        raise CheckpointError(
            f"{source}: field data_config['class_names'] holds {len(names)} names but the model's head has "
            f"{head} classes"
        )


def model_from_checkpoint(
    path_or_state: str | os.PathLike | dict[str, Any],
    map_location: str | torch.device = "cpu",
    source: str | os.PathLike | None = None,
) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (in eval mode).

    The stored `model_config` is data: it is checked by `visattn.weights.stored_config`
    (no key that reads files or the network; `pretrained` and `pretrained_file`, where training
    started, are ignored) and its model built on the `meta` device and compared with the stored
    tensors before it is built for real. A checkpoint without `model_config`, with a refused key
    or value, or whose weights do not fit the model it describes, raises `CheckpointError`
    naming the file (`source`: the file a given state came from).
    """
    state = path_or_state if isinstance(path_or_state, dict) else load_checkpoint(path_or_state, map_location)
    if source is None:
        source = "the checkpoint" if isinstance(path_or_state, dict) else path_or_state
    check_fields(state, source)
    if not isinstance(state.get("model_config"), dict) or "name" not in state["model_config"]:
        raise CheckpointError(
            f"{source} has no model_config (the create_model arguments that rebuild its model); add one with "
            "visattn.weights.checkpoint.save_checkpoint, or build the model yourself and load state['model']"
        )
    config = config_for_weights(state["model_config"], state.get("model"), source)
    model = create_model(config.pop("name"), **config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        reason = " ".join(str(err).split())
        raise CheckpointError(
            f"{source}: the weights do not fit the model of its model_config: {reason[:300]}"
        ) from err
    return model.eval()
