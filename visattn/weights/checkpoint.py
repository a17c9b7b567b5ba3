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

Training (:mod:`visattn.engine`) writes ``data_config`` = ``{"name", "img_size": [H, W],
"in_chans", "mean", "std", "num_classes", "class_names"}`` and ``config`` (the resolved training
config) into ``best.pt`` (plus ``epoch``, ``acc1``) and ``last.pt``; ``last.pt`` also holds the
training state: ``optimizer``, ``scheduler``, ``ema`` (or ``None``), ``scaler`` (or ``None``),
``epoch`` (epochs completed), ``step`` (updates done), ``best_acc1`` and ``best_epoch`` (the
epoch whose weights ``best.pt`` holds; each epoch writes ``last.pt`` first). No random-generator
state is stored because none is needed: training re-seeds every generator at the start of each
epoch from ``(seed, epoch, rank)``, so ``epoch`` fixes it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .._io import CheckpointError, atomic_torch_save, read_torch_file
from ..models.registry import create_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
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
    """Read a visattn checkpoint with ``weights_only=True``; clear errors for anything else."""
    state = read_torch_file(path, map_location, what="visattn checkpoint")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a visattn checkpoint (no 'format': '{CHECKPOINT_FORMAT}' entry); "
            "pretrained timm/torchvision weights load with visattn.from_timm / from_torchvision"
        )
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} was written by a newer visattn (version {state['version']})")
    return state


def model_from_checkpoint(
    path_or_state: str | os.PathLike | dict[str, Any],
    map_location: str | torch.device = "cpu",
    source: str | os.PathLike | None = None,
) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (in eval mode).

    A checkpoint without ``model_config``, or whose weights do not fit the model it describes,
    raises :class:`CheckpointError` naming the file (``source``: the file a given state came from).
    """
    state = path_or_state if isinstance(path_or_state, dict) else load_checkpoint(path_or_state, map_location)
    if source is None:
        source = "the checkpoint" if isinstance(path_or_state, dict) else path_or_state
    if not isinstance(state.get("model_config"), dict) or "name" not in state["model_config"]:
        raise CheckpointError(
            f"{source} has no model_config (the create_model arguments that rebuild its model); "
            "add one with visattn.save_checkpoint, or build the model yourself and load state['model']"
        )
    if not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{source} holds no model weights ('model' entry)")
    config = dict(state["model_config"])
    # the weights come from the checkpoint: do not fetch or read the run's starting weights again
    for key in ("pretrained", "pretrained_file"):
        config.pop(key, None)
    model = create_model(config.pop("name"), **config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        reason = " ".join(str(err).split())
        raise CheckpointError(
            f"{source}: the weights do not fit the model of its model_config: {reason[:300]}"
        ) from err
    return model.eval()
