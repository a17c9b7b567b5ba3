"""Save and load a :class:`~visattn.VisionTransformer` as a folder: weights + JSON, no pickle.

Layout of ``DIR``::

    DIR/config.json          {"format": "visattn-pretrained", "version": 1,
                              "architecture": "VisionTransformer",
                              "config": {...VisionTransformer arguments...},
                              "pretrained_cfg": {...mean, std, input_size, source...} or null}
    DIR/model.safetensors    the state dict under visattn's (= timm's) names

Each file is written to a temporary name and renamed, so a crash leaves the old file or the new
one. Loading rebuilds the model from the JSON and checks every tensor name and shape.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from .._io import CheckpointError, atomic_write_json, save_safetensors
from ..models.vit import VisionTransformer
from .state_dict import load_state_dict_exactly

__all__ = ["CONFIG_NAME", "PRETRAINED_FORMAT", "WEIGHTS_NAME", "load_pretrained", "save_pretrained"]

PRETRAINED_FORMAT = "visattn-pretrained"
PRETRAINED_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_pretrained(model: VisionTransformer, directory: str | os.PathLike) -> None:
    """Write ``model`` to ``directory`` (created if needed) as ``config.json`` + ``model.safetensors``.

    Raises:
        TypeError: ``model`` is not a :class:`VisionTransformer`.
        ValueError: a constructor argument cannot be written to JSON (a custom ``act_layer`` or
            ``norm_layer`` callable); the message names it and the by-name alternative.
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"save_pretrained writes a visattn VisionTransformer, got {type(model).__name__}")
    for key, value in model.config.items():
        try:
            json.dumps(value)
        except TypeError:
            raise ValueError(
                f"{key}={value!r} cannot be written to JSON; build the model with {key} by name "
                "(act_layer='gelu' or 'gelu_tanh', norm_layer=None with norm_eps) to save it"
            ) from None
    meta = {
        "format": PRETRAINED_FORMAT,
        "version": PRETRAINED_VERSION,
        "architecture": "VisionTransformer",
        "config": model.config,
        "pretrained_cfg": model.pretrained_cfg,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(model, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_json(directory / CONFIG_NAME, meta)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist; a folder written by save_pretrained has {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != PRETRAINED_FORMAT:
        raise CheckpointError(f"{path} is not a visattn pretrained config (no 'format': '{PRETRAINED_FORMAT}')")
    version = meta.get("version")
    if not isinstance(version, int) or version > PRETRAINED_VERSION or version < 1:
        raise CheckpointError(f"{path} has format version {version!r}; this visattn reads version {PRETRAINED_VERSION}")
    if meta.get("architecture") != "VisionTransformer":
        raise CheckpointError(
            f"{path} describes architecture {meta.get('architecture')!r}; visattn loads 'VisionTransformer'"
        )
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path} has no 'config' object")
    return meta


def load_pretrained(directory: str | os.PathLike, device: str = "cpu") -> VisionTransformer:
    """Rebuild the :class:`VisionTransformer` saved in ``directory``; returned in eval mode.

    Raises:
        CheckpointError: missing files, a foreign or newer format, an unknown argument in the
            config, or weights whose names/shapes do not match the config (tampered files).
    """
    directory = Path(directory)
    if directory.is_file():
        raise CheckpointError(
            f"{directory} is a file; load_pretrained reads the folder written by save_pretrained "
            "(timm/torchvision weight files load with create_model(NAME, pretrained_file=PATH))"
        )
    meta = _read_config(directory / CONFIG_NAME)
    try:
        model = VisionTransformer(**meta["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{directory / CONFIG_NAME}: the config does not build a VisionTransformer: {err}"
        ) from err
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights} does not exist")
    try:
        state = load_file(weights, device=device)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights} is not a readable safetensors file (truncated or corrupt): {err}") from err
    try:
        load_state_dict_exactly(model, state, str(weights))
    except ValueError as err:
        raise CheckpointError(f"{err} (the files in {directory} do not belong together)") from err
    model.pretrained_cfg = meta.get("pretrained_cfg")
    return model.to(device).eval()
