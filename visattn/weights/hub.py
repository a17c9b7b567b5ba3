"""The one model format: a folder with the `create_model` call that builds a model, how its
inputs are prepared, and its weights; no pickle.

Layout of `DIR` (`save_pretrained` writes it; training writes one into each run folder)::

    DIR/config.json        {"format": "visattn-pretrained", "version": 2,
                            "model_config": {"name": "vit_digits_patch4_16", "embed_dim": 32, ...},
                            "data_config": {"name": "digits", "img_size": [16, 16], "in_chans": 1, "mean": [...],
                                            "std": [...], "num_classes": 10, "class_names": [...]}}
    DIR/model.safetensors  the state dict of `create_model(**model_config)`

`model_config` is the record `create_model` leaves on every model it builds (`model.model_config`)
and the field of that name in a training checkpoint; `data_config` is the checkpoint's field too:
the stored form of a `visattn.data_spec.DataSpec` (`DataSpec.to_dict`), or `null` (folders written
before `DataSpec` may hold any of its keys). Version 1 folders (`"config"`: a `VisionTransformer`'s
arguments, `"pretrained_cfg"`) are read as `create_model("vision_transformer", **config)`.

A folder is untrusted data. `load_pretrained` and `create_model(name, pretrained_file=DIR)` check
its `model_config` with `visattn.weights.stored_config` (allowed keys, plain values, a model no
larger than the stored tensors, built on the meta device first), its `data_config` (`DataSpec`'s
rules), and every tensor name and shape; each refusal is one `CheckpointError` naming the file. The
same reader serves `create_model(name, pretrained_file=...)` for checkpoints and bare state dicts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .._io import CheckpointError, atomic_write_json, save_safetensors
from .._utils import to_pair
from ..data_spec import DataSpec
from ..models.registry import create_model, register_weights_reader
from .checkpoint import CHECKPOINT_FORMAT, check_checkpoint, check_fields
from .peer_names import is_convertible_name, peer_state_dict_model
from .state_dict import load_state_dict_exactly, read_weights_file, unwrap_state_dict
from .stored_config import config_for_weights

__all__ = [
    "CONFIG_NAME",
    "PRETRAINED_FORMAT",
    "PRETRAINED_VERSION",
    "WEIGHTS_NAME",
    "StoredModel",
    "load_pretrained",
    "model_from_pretrained_file",
    "read_stored_model",
    "save_pretrained",
]

PRETRAINED_FORMAT = "visattn-pretrained"
PRETRAINED_VERSION = 2
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class StoredModel:
    """Weights read from disk and what describes their model, not checked yet: `model_config`
    (`{"name": ..., **kwargs}`; `None` for a bare state dict) and `data_config`. `source` is
    the file that holds the description, named by every refusal."""

    weights: Mapping[str, Tensor]
    model_config: Any
    data_config: Any
    source: str


def save_pretrained(
    model: nn.Module, directory: str | os.PathLike, *, data_config: DataSpec | Mapping[str, Any] | None = None
) -> None:
    """Write `model` to `directory` (created if needed) as `config.json` + `model.safetensors`.

    Args:
        model: a model from `visattn.create_model`, which recorded the call that rebuilds it
            (`model.model_config`); any name it builds, converted ViTs included.
        directory: the folder; files of the same names in it are replaced atomically.
        data_config: how the model's inputs are prepared: a `DataSpec`, or its stored dict
            (`DataSpec.from_dict`). Default: the mean, std and input size of the model's
            `pretrained_cfg`, if it has all three.

    Raises:
        ValueError: `model` was not built by `create_model`, or was changed since in a way its
            arguments do not say (attention inserted by hand, a new head on a torchvision model),
            or an argument is not JSON; one line that names it and the fix. Nothing is written
            then: `load_pretrained` would refuse the folder.
        DataSpecError: `data_config` (a dict) or the `pretrained_cfg` breaks a rule of `DataSpec`.
    """
    config = _recorded_config(model)
    if data_config is None:
        stored = _data_config_of(getattr(model, "pretrained_cfg", None))
        spec = None if stored is None else DataSpec.from_dict(stored, "the model's pretrained_cfg")
    else:
        spec = data_config if isinstance(data_config, DataSpec) else DataSpec.from_dict(data_config, "save_pretrained")
    data = None if spec is None else spec.to_dict()
    try:
        checked = config_for_weights(config, model.state_dict(), "save_pretrained")
        check_fields({"model_config": checked, "data_config": data}, "save_pretrained")
    except CheckpointError as err:
        raise ValueError(
            f"{err}. model.model_config, which create_model recorded, must rebuild the model: build it with "
            "create_model and every change as an argument (attention={...} rather than insert_attention afterwards)"
        ) from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(model, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    meta = {"format": PRETRAINED_FORMAT, "version": PRETRAINED_VERSION, "model_config": checked, "data_config": data}
    atomic_write_json(directory / CONFIG_NAME, meta)


def load_pretrained(directory: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """The model saved in `directory` (by `save_pretrained` or by training), in eval mode, its
    `pretrained_cfg` holding the folder's data config in timm's terms (`input_size`, `mean`,
    `std`, `num_classes`, `label_names`).

    Raises:
        CheckpointError: missing files, a foreign or newer format, a refused model config (a
            key that reads files, a model larger than its weights, ...), a data config of the
            wrong types, or weights whose names or shapes do not fit the config.
    """
    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file" if directory.exists() else "does not exist"
        raise CheckpointError(
            f"{directory} {what}; load_pretrained reads a folder written by save_pretrained or by training "
            "(a checkpoint or a weights file loads with create_model(NAME, pretrained_file=PATH))"
        )
    return _stored_model(read_stored_model(directory), {}).to(device).eval()


def model_from_pretrained_file(name: str, pretrained_file: str | os.PathLike, kwargs: dict[str, Any]) -> nn.Module:
    """What `create_model(name, pretrained_file=PATH, **kwargs)` runs (registered with it).

    A folder or a visattn checkpoint that describes a model of this `name` gives its stored,
    checked arguments as the defaults of `kwargs`. Any other file, or one describing a model of
    another name (a converted ViT is saved as `vision_transformer`), is a state dict: timm and
    torchvision ViT names convert it, other names are built from `kwargs` and load it with every
    tensor name and shape checked.

    Raises:
        CheckpointError: an unreadable, unsafe or refused file (see `load_pretrained`).
        ValueError: weights that do not fit the architecture, naming the file and the mismatch.
    """
    if name.startswith("hf:"):
        raise ValueError(f"{name} names a checkpoint and loads its own weights; drop pretrained_file")
    path = Path(pretrained_file)
    stored = read_stored_model(path)
    held = stored_name(stored)
    if stored.model_config is not None and held in (name, None):  # described (a config without a name is refused)
        return _stored_model(stored, kwargs)
    try:
        if ":" not in name and is_convertible_name(name):
            return peer_state_dict_model(name, stored.weights, str(path), **kwargs)
        model = create_model(name, **kwargs)
        load_state_dict_exactly(model, stored.weights, source=str(path))
        return model
    except CheckpointError:
        raise
    except ValueError as err:
        hint = f" ({path} describes a model {held!r}, not {name!r})" if held else ""
        raise ValueError(f"pretrained_file {path} does not fit the architecture {name!r}: {err}{hint}") from err


def read_stored_model(path: str | os.PathLike) -> StoredModel:
    """A saved folder, a visattn checkpoint, or a `.safetensors` / `.pth` / `.bin` state dict
    (read without running pickled code), unchecked."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    raw = read_weights_file(path)
    if raw.get("format") != CHECKPOINT_FORMAT:
        return StoredModel(unwrap_state_dict(raw), None, None, str(path))
    check_checkpoint(raw, path)
    if not isinstance(raw.get("model"), Mapping):
        raise CheckpointError(f"{path} holds no model weights ('model' entry)")
    return StoredModel(raw["model"], raw.get("model_config"), raw.get("data_config"), str(path))


def stored_name(stored: StoredModel) -> str | None:
    """The model name a stored model config gives (unchecked), or `None`."""
    name = stored.model_config.get("name") if isinstance(stored.model_config, Mapping) else None
    return name if isinstance(name, str) else None


# --- writing -----------------------------------------------------------------------------------


def _recorded_config(model: nn.Module) -> dict[str, Any]:
    """The `create_model` call recorded on `model`, as JSON values (tuples become lists)."""
    config = getattr(model, "model_config", None)
    if not isinstance(config, Mapping) or "name" not in config:
        raise ValueError(
            f"save_pretrained writes the create_model call that rebuilds a model, and this {type(model).__name__} "
            "was not built by visattn.create_model: build it with create_model(NAME, **kwargs) (any "
            "VisionTransformer: create_model('vision_transformer', ...)) and load its weights with load_state_dict"
        )
    return _plain(dict(config))


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """A model config as JSON values, or one `ValueError` naming the first key that is not JSON."""
    for key, value in config.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError(
                f"save_pretrained: model_config[{key!r}] = {value!r} cannot be written to JSON; pass it to "
                "create_model by name (act_layer='gelu', backbone='resnet18_small', ...) to save the model"
            ) from None
    return json.loads(json.dumps(config))


def _data_config_of(cfg: Any) -> dict[str, Any] | None:
    """The stored data config of a timm-style `pretrained_cfg` that has a mean, a std and an
    input size (`(C, H, W)`), unchecked; `None` for one without all three."""
    if not isinstance(cfg, Mapping):
        return None
    mean, std, size = cfg.get("mean"), cfg.get("std"), cfg.get("input_size")
    if not (isinstance(mean, list | tuple) and isinstance(std, list | tuple)):
        return None
    if not (isinstance(size, list | tuple) and len(size) == 3):
        return None
    return {"img_size": list(size[1:]), "in_chans": size[0], "mean": list(mean), "std": list(std)}


# --- reading -----------------------------------------------------------------------------------


def _read_folder(directory: Path) -> StoredModel:
    """`config.json` (version 1 or 2) and `model.safetensors` of a saved folder, unchecked."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        old_run = (directory / "best.pt").is_file()
        fix = (
            f"; this run folder is older: write one with visattn.save_pretrained(visattn.weights."
            f"model_from_checkpoint('{directory / 'best.pt'}'), '{directory}')"
            if old_run
            else f"; a folder written by save_pretrained or by training has {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
        raise CheckpointError(f"{path} does not exist{fix}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != PRETRAINED_FORMAT:
        transformers = isinstance(meta, dict) and "model_type" in meta
        hint = f"; a transformers folder loads with create_model('hf:{directory}')" if transformers else ""
        raise CheckpointError(f"{path} is not a visattn pretrained config (no 'format': '{PRETRAINED_FORMAT}'){hint}")
    version = meta.get("version")
    model_config: Any  # as read: check_fields checks it
    if version == 1:  # a VisionTransformer's arguments and its pretrained_cfg
        if meta.get("architecture") != "VisionTransformer" or not isinstance(meta.get("config"), dict):
            raise CheckpointError(f"{path}: a version 1 config needs 'architecture': 'VisionTransformer' and 'config'")
        model_config = {**meta["config"], "name": "vision_transformer"}
        data_config = _data_config_of(meta.get("pretrained_cfg"))
    elif version == PRETRAINED_VERSION:
        model_config, data_config = meta.get("model_config"), meta.get("data_config")
    else:
        raise CheckpointError(f"{path} has format version {version!r}; this visattn reads versions 1 and 2")
    return StoredModel(_read_weights(directory / WEIGHTS_NAME), model_config, data_config, str(path))


def _read_weights(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt): {err}") from err


def _stored_model(stored: StoredModel, kwargs: dict[str, Any]) -> nn.Module:
    """The model `stored` describes, checked, with `kwargs` over its stored arguments and its weights."""
    fields = {"model": stored.weights, "model_config": stored.model_config, "data_config": stored.data_config}
    check_fields(fields, stored.source)
    config = config_for_weights(stored.model_config, stored.weights, stored.source)
    model = create_model(config.pop("name"), **{**config, **kwargs})
    try:  # the stored config fits the weights (checked above): only `kwargs` can make them differ
        load_state_dict_exactly(model, stored.weights, stored.source)
    except ValueError as err:
        raise ValueError(
            f"{err}: the arguments {', '.join(kwargs)} change the model {stored.source} describes (for another "
            "number of classes, load it as saved and call model.reset_classifier(N))"
        ) from err
    if stored.data_config:
        # torch's stubs type Module attribute assignment for tensors and modules only; any value works
        model.pretrained_cfg = {  # type: ignore[assignment]
            **(getattr(model, "pretrained_cfg", None) or {}),
            **_timm_terms(stored.data_config),
        }
    return model


def _timm_terms(data_config: Mapping[str, Any]) -> dict[str, Any]:
    """A checked stored data config (any of `DataSpec`'s keys: older folders may lack some) as timm's
    `pretrained_cfg` keys (`resolve_model_data_config` reads them)."""
    cfg = {key: list(data_config[key]) for key in ("mean", "std") if key in data_config}
    if "img_size" in data_config:
        channels = data_config.get("in_chans", len(cfg.get("mean", ())) or 3)
        cfg["input_size"] = [channels, *to_pair(data_config["img_size"])]
    if "num_classes" in data_config:
        cfg["num_classes"] = data_config["num_classes"]
    if "class_names" in data_config:
        cfg["label_names"] = list(data_config["class_names"])
    return cfg


register_weights_reader(model_from_pretrained_file)
