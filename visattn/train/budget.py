"""What a training config asks of the machine, checked before anything is built or loaded.

:func:`check_training_config` lays the model out on the ``meta`` device (shapes without memory),
so that an argument out of range names its config key (``model.num_heads=0 is not valid: ...``)
instead of failing half-way through the run's setup, and estimates the memory training needs:

- parameters: float32 weights, gradients and AdamW's two moments, :data:`BYTES_PER_PARAMETER`
  bytes per parameter;
- activations: the bytes autograd saves for the backward pass of one image, counted during a
  forward pass on fake tensors of the training device's type (so the attention kernel chosen is
  the one training would run), times the batch of one process.

A model whose config sets ``depth`` above 2 is laid out with 1 and 2 blocks and extrapolated
linearly (exact for the ViTs, whose blocks are alike), so that ``model.depth=10000`` is refused
in a second. Training is refused when the estimate exceeds the memory of the training device
(:func:`device_memory`): the one-line error names the config key whose default (or the dataset's
own image size) brings the estimate down the most, with its value.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from .._utils import ArgumentError, human_bytes
from ..models.registry import create_model
from .config import ConfigError, DataConfig, TrainConfig, config_to_dict
from .data import input_shape

__all__ = ["BYTES_PER_PARAMETER", "Footprint", "check_training_config", "device_memory", "model_footprint"]

#: training bytes per parameter: float32 weight and gradient and AdamW's two moments
BYTES_PER_PARAMETER = 16
#: images in the forward pass that counts activations (2: BatchNorm refuses one image at 1×1)
_COUNTED_IMAGES = 2
#: bytes of one input value (float32)
_VALUE_BYTES = 4


@dataclass(frozen=True)
class Footprint:
    """A model's training memory, estimated.

    Attributes:
        parameters: the number of parameters.
        activation_bytes: bytes saved for the backward pass per image.
    """

    parameters: int
    activation_bytes: float

    def total_bytes(self, batch: int) -> float:
        """Parameters with gradients and optimizer state, and the activations of ``batch`` images."""
        return self.parameters * BYTES_PER_PARAMETER + batch * self.activation_bytes


class _SkipInPlace(TorchDispatchMode):
    """Returns the first argument of every in-place operator without running it: weight
    initialization (``trunc_normal_`` …) does nothing on the meta device, but its decomposition
    there takes milliseconds per tensor."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func._schema.is_mutable and args and isinstance(args[0], torch.Tensor):
            return args[0]
        return func(*args, **(kwargs or {}))


def _meta_model(model_config: dict[str, Any]) -> nn.Module:
    """``create_model(**model_config)`` on the meta device, uninitialized, without pretrained weights."""
    config = dict(model_config)
    if config.get("pretrained"):
        config["pretrained"] = False  # the same architecture, nothing downloaded
    with torch.device("meta"), _SkipInPlace():
        return create_model(config.pop("name"), **config)


@contextmanager
def _counting_saved_bytes(model: nn.Module) -> Iterator[list[int]]:
    """A one-element list that adds up the bytes autograd saves (views of parameters excluded)."""
    parameters = {id(p) for p in model.parameters()}
    total = [0]

    def pack(saved: torch.Tensor) -> torch.Tensor:
        base = saved if saved._base is None else saved._base
        if id(base) not in parameters:
            total[0] += saved.numel() * saved.element_size()
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        yield total


def _measure(
    model_config: dict[str, Any], input_size: tuple[int, int, int], device: str, checkpointing: bool
) -> Footprint:
    """The :class:`Footprint` of the model as configured, from one fake forward pass."""
    model = _meta_model(model_config)
    parameters = sum(p.numel() for p in model.parameters())
    set_checkpointing = getattr(model, "set_grad_checkpointing", None)
    if checkpointing and callable(set_checkpointing):
        set_checkpointing(True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device=device).train()
        with _counting_saved_bytes(model) as saved:
            model(torch.zeros(_COUNTED_IMAGES, *input_size, device=device))
    return Footprint(parameters, saved[0] / _COUNTED_IMAGES)


def model_footprint(
    model_config: dict[str, Any], input_size: tuple[int, int, int], device: str = "cpu", checkpointing: bool = False
) -> Footprint:
    """The training :class:`Footprint` of ``create_model(**model_config)`` on ``(C, H, W)`` images.

    A config whose ``depth`` is an integer above 2 is measured at depths 1 and 2 and extrapolated
    linearly. Raises what building the model raises (an ``ArgumentError`` for an argument out of
    range).
    """
    depth = model_config.get("depth")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth <= 2:
        return _measure(model_config, input_size, device, checkpointing)
    one, two = (_measure({**model_config, "depth": d}, input_size, device, checkpointing) for d in (1, 2))
    return Footprint(
        one.parameters + (depth - 1) * (two.parameters - one.parameters),
        one.activation_bytes + (depth - 1) * (two.activation_bytes - one.activation_bytes),
    )


def device_memory(device: torch.device) -> int:
    """Bytes of memory of the training device: a GPU's total memory, or for the CPU the machine's
    physical memory, lowered to the cgroup limit of a container."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        text = Path(limit).read_text().strip() if Path(limit).is_file() else ""
        if text.isdigit():
            memory = min(memory, int(text))
    return memory


# --- the config-level check -------------------------------------------------------------------


@dataclass(frozen=True)
class _Estimate:
    """A config's estimate: a :class:`Footprint` and the images per process, or ``why`` it is too
    large to lay out at all."""

    footprint: Footprint | None
    batch: int
    why: str = ""

    @property
    def total_bytes(self) -> float:
        return math.inf if self.footprint is None else self.footprint.total_bytes(self.batch)


def _estimate(tree: dict[str, Any], processes: int, device: torch.device, limit: float) -> _Estimate:
    """The training memory of the plain config ``tree`` (raises what building the model raises,
    except that sizes too large to lay out give an estimate without footprint)."""
    chans, classes, side = input_shape(OmegaConf.create(tree["data"]))
    batch = max(1, tree["train"]["batch_size"] // processes)
    image_bytes = chans * side * side * _VALUE_BYTES
    if image_bytes > limit:
        why = f"one {chans}×{side}×{side} input image alone is {human_bytes(image_bytes)}"
        return _Estimate(None, batch, why)
    model_config = {**tree["model"], "num_classes": classes or 2, "in_chans": chans}
    checkpointing = tree["train"]["grad_checkpointing"]
    try:
        footprint = model_footprint(model_config, (chans, side, side), device.type, checkpointing)
    except RuntimeError as err:  # shapes whose sizes overflow even on the meta device
        return _Estimate(None, batch, f"its tensors cannot even be laid out ({str(err).splitlines()[0]})")
    return _Estimate(footprint, batch)


def _numeric_leaves(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``("depth", 4)``, ``("attention.num_heads", 2)``: the numbers in a nested config section."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _numeric_leaves(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


def _changed(tree: dict[str, Any], key: str, value: Any = None, remove: bool = False) -> dict[str, Any]:
    """A copy of the config ``tree`` with the dotted ``key`` set to ``value``, or removed."""
    changed = copy.deepcopy(tree)
    *parents, leaf = key.split(".")
    node = changed
    for parent in parents:
        node = node[parent]
    if remove:
        del node[leaf]
    else:
        node[leaf] = value
    return changed


def _candidates(tree: dict[str, Any]) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """``(key, value, the config with that key at its default)`` for each key that sizes training:
    the numbers of the model section (default: the model's own), the image side (the dataset's)
    and a batch above the default."""
    for path, value in _numeric_leaves(tree["model"]):
        yield f"model.{path}", value, _changed(tree, f"model.{path}", remove=True)
    side = "canvas_size" if tree["data"]["name"] == "digits_canvas" else "img_size"
    default_side = getattr(DataConfig(), side)
    if tree["data"][side] != default_side:
        yield f"data.{side}", tree["data"][side], _changed(tree, f"data.{side}", default_side)
    default_batch = TrainConfig().batch_size
    if tree["train"]["batch_size"] > default_batch:
        yield "train.batch_size", tree["train"]["batch_size"], _changed(tree, "train.batch_size", default_batch)


def _culprit(tree: dict[str, Any], processes: int, device: torch.device, limit: float, total: float) -> tuple[str, Any]:
    """The key whose default lowers the estimate ``total`` the most (``model.name`` if none does)."""
    culprit = ("model.name", tree["model"]["name"])
    for key, value, changed in _candidates(tree):
        try:
            lowered = _estimate(changed, processes, device, limit).total_bytes
        except Exception:  # that default does not build, so it is not the way out
            continue
        if lowered < total:
            culprit, total = (key, value), lowered
    return culprit


def _refusal(key: str, value: Any, estimate: _Estimate, limit: float, device: torch.device) -> ConfigError:
    """The one-line error for a config over the memory ``limit``."""
    footprint = estimate.footprint
    if footprint is None:
        need = estimate.why
    else:
        need = (
            f"training needs about {human_bytes(estimate.total_bytes)} ({footprint.parameters:,} parameters "
            f"with gradients and AdamW state {human_bytes(footprint.parameters * BYTES_PER_PARAMETER)}, "
            f"activations of {estimate.batch:,} images {human_bytes(estimate.batch * footprint.activation_bytes)})"
        )
    return ConfigError(
        f"{key}={value} is too large: {need}, more than the {human_bytes(limit)} of memory of the training "
        f"device ({device.type}); lower {key}"
    )


def _find_key(section: dict[str, Any], argument: str, prefix: str = "") -> str | None:
    """The dotted path of ``argument`` in a nested config section, or ``None``."""
    for key, value in section.items():
        if key == argument:
            return prefix + key
        if isinstance(value, dict) and (found := _find_key(value, argument, f"{prefix}{key}.")):
            return found
    return None


def _argument_error(model: dict[str, Any], err: ArgumentError) -> ConfigError:
    """``num_heads=0 is not valid: ...`` as ``model.num_heads=0 is not valid: ...``."""
    path, text = _find_key(model, err.argument), str(err)
    if path is None:
        return ConfigError(f"model: {text}")
    if text.startswith(f"{err.argument}="):
        return ConfigError(f"model.{path}{text[len(err.argument) :]}")
    return ConfigError(f"model.{path}: {text}")


def check_training_config(
    cfg: DictConfig, device: torch.device, processes: int = 1, limit: float | None = None
) -> None:
    """Raise :class:`~visattn.train.config.ConfigError` naming the config key at fault when the
    model of ``cfg`` gets an argument out of range, or when training it on ``device`` (with the
    batch split over ``processes``) would need more than ``limit`` bytes (default: the device's
    memory, :func:`device_memory`). Nothing is allocated or loaded; a model that cannot be laid
    out for another reason (an unknown name or argument) passes, and building it reports that."""
    tree = config_to_dict(cfg)
    limit = device_memory(device) if limit is None else limit
    try:
        estimate = _estimate(tree, processes, device, limit)
    except ArgumentError as err:
        raise _argument_error(tree["model"], err) from None
    except Exception:
        return
    if estimate.total_bytes > limit:
        key, value = _culprit(tree, processes, device, limit, estimate.total_bytes)
        raise _refusal(key, value, estimate, limit, device)
