"""A model config read from a checkpoint or a model folder is data: checked before anything is built.

A visattn checkpoint, and a folder written by `visattn.save_pretrained`, names the model its
weights belong to: `model_config` = `{"name": ..., **create_model keyword arguments}`. Building
a model runs code that those values steer (timm's `checkpoint_path` reads a file,
`pretrained=True` reaches the network, an edited `embed_dim` allocates gigabytes), so a stored
config is checked first, in three steps:

1. **The name** must build without files or the network: visattn's own names, `timm:NAME` and
   `torchvision:NAME`, and the timm and torchvision ViT names visattn converts. `hf:` names read
   a folder or the Hugging Face hub and are refused.
2. **Every key** must be a keyword argument the model takes: one its builder names
   (`visattn.models.registry.model_builder`) or, when the builder passes `**kwargs` on, one of
   the constructor of the class it builds (found by building the model with its defaults on the
   `meta` device); never one of `WEIGHT_LOADING_KEYS` or `PLACEMENT_KEYS`. **Every value** must be
   plain data: `None`, booleans, numbers, text that is not a path or an address, and lists and
   dicts of them. The keys training writes for its starting weights (`STARTING_WEIGHTS`) are
   dropped unread: the checkpoint's own tensors replace those weights.
3. **The size** (`check_against_weights`): the model is built on the `meta` device, which
   allocates nothing, and stopped as soon as it registers many more tensors than the file holds;
   its state dict must then match the stored tensors name by name and shape by shape, with at
   most as many numbers again in buffers that are not saved, and no tensor computed while it is
   built (a dry forward pass at a stored input size) may be larger than `MAX_BUILD_TENSOR`. Only
   then may it be built for real.

Every refusal is one `CheckpointError` naming the file and the key.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks
from torch.overrides import TorchFunctionMode

from .._io import CheckpointError
from ..models.registry import create_model, list_models, model_builder
from .torchvision_vit import TORCHVISION_VITS

__all__ = [
    "MAX_BUILD_TENSOR",
    "PLACEMENT_KEYS",
    "STARTING_WEIGHTS",
    "WEIGHT_LOADING_KEYS",
    "check_against_weights",
    "checked_model_config",
    "config_for_weights",
    "keyword_arguments",
]

#: keys training writes for the weights a run started from, with the types it writes; a stored
#: config's values are checked and then dropped unread, since the checkpoint holds its own weights
STARTING_WEIGHTS: dict[str, tuple[type, ...]] = {"pretrained": (bool,), "pretrained_file": (str, type(None))}
#: keyword arguments of timm and torchvision that read weights from a file or the network
WEIGHT_LOADING_KEYS = (
    "checkpoint_path",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "cache_dir",
    "weights",
    "weights_backbone",
)
#: keyword arguments (timm's) that choose where a model is allocated: the size check builds it on the meta device
PLACEMENT_KEYS = ("device", "dtype")
#: keys whose value names another model, and the key holding that model's arguments (`HybridViT`)
NESTED_MODELS = {"backbone": "backbone_kwargs"}
#: the model sources whose names build from code alone (`hf:` reads a folder or the hub)
OFFLINE_SOURCES = ("timm", "torchvision")
#: limits of a plain value: characters of a text, items of a list or dict, levels of nesting
MAX_TEXT, MAX_ITEMS, MAX_DEPTH = 200, 256, 4
#: the most numbers one tensor computed while a model is built may hold (256 MB in float32) unless a
#: stored tensor is larger: a dry forward pass at a stored `input_size` or `img_size` is bounded too
MAX_BUILD_TENSOR = 2**26


def config_for_weights(config: Any, weights: Any, source: str | os.PathLike) -> dict[str, Any]:
    """All three steps: the `create_model` arguments (`{"name": ..., **kwargs}`) of a stored
    `config` whose model matches the stored `weights`, starting-weight keys dropped.

    Raises:
        CheckpointError: no weights, or a refusal of `checked_model_config` or
            `check_against_weights`, naming `source`.
    """
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{source} holds no model weights ('model' entry)")
    checked = checked_model_config(config, source)
    check_against_weights(checked, weights, source)
    return checked


def checked_model_config(config: Any, source: str | os.PathLike) -> dict[str, Any]:
    """A stored `model_config` checked by steps 1 and 2 of the module's rules: the arguments
    `create_model` may be called with (`{"name": ..., **kwargs}`), starting-weight keys dropped.

    Raises:
        CheckpointError: a name, key or value that is refused, naming `source` and the key.
    """
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{source}: model_config is a {type(config).__name__}, not a dict of create_model arguments"
        )
    name = _checked_name(config.get("name"), "model_config['name']", source)
    arguments = {key: value for key, value in config.items() if key != "name"}
    return {"name": name, **_checked_arguments(arguments, name, "model_config", source)}


def check_against_weights(config: dict[str, Any], weights: Mapping[str, Tensor], source: str | os.PathLike) -> None:
    """Step 3: build the model of a checked `config` on the `meta` device and compare it with
    the stored `weights`, before a single number of it is allocated.

    The build stops once it registers more than `16 × len(weights) + 1024` tensors and modules
    (a legitimate build registers a few per stored tensor: a converted peer builds two models), and
    no tensor it computes (dry forward passes included) may hold more than `MAX_BUILD_TENSOR`
    numbers or the largest stored tensor's.

    Raises:
        CheckpointError: the config does not build, builds more than the file can hold, or builds
            tensors other than the stored ones (names the file and the first differences).
    """
    name = config["name"]
    arguments = {key: value for key, value in config.items() if key != "name"}
    limit = 16 * len(weights) + 1024

    def too_large() -> CheckpointError:
        return CheckpointError(
            f"{source}: its model_config asks for a model far larger than its weights ({name!r} registered "
            f"over {limit} tensors and modules while built on the meta device, for {len(weights)} stored "
            "tensors); refused before building it"
        )

    with _registration_limit(limit, too_large), _LargestTensor() as largest:
        skeleton = _build_on_meta(lambda: create_model(name, **arguments), name, source)
    _compare(skeleton, weights, source)
    bound = max([MAX_BUILD_TENSOR, *(t.numel() for t in weights.values())])
    if largest.numel > bound:
        raise CheckpointError(
            f"{source}: building the model of its model_config computes a tensor of {largest.numel:,} numbers "
            f"(a dry forward pass at a stored input size?), over the {bound:,} allowed; refused before building it"
        )


def keyword_arguments(name: str, source: str | os.PathLike) -> frozenset[str]:
    """The keyword arguments `create_model(name, ...)` takes: those its builder names and, when the
    builder passes `**kwargs` on, those of the constructors of the class it builds (up the class
    hierarchy while each constructor passes `**kwargs` on to its parent)."""
    names, passes_on = _named_parameters(model_builder(name))
    if passes_on:
        for cls in _built_class(name, source).__mro__:
            if cls is nn.Module or not issubclass(cls, nn.Module):
                break
            if "__init__" in vars(cls):
                more, passes_on = _named_parameters(cls.__init__)
                names |= more - {"self"}
                if not passes_on:
                    break
    return frozenset(names - set(WEIGHT_LOADING_KEYS) - set(PLACEMENT_KEYS))


# --- steps 1 and 2: names, keys, values -----------------------------------------------------


def _checked_name(value: Any, key: str, source: str | os.PathLike) -> str:
    """A model name that builds from code alone (see the module's rules), or a refusal naming `key`."""
    if not (isinstance(value, str) and value and len(value) <= MAX_TEXT and value.isprintable()):
        raise CheckpointError(f"{source}: {key} must be a model name, got {_shown(value)}")
    prefix = value.split(":", 1)[0] if ":" in value else None
    if prefix == "hf":
        raise CheckpointError(
            f"{source}: {key} {value!r} is refused: hf: names read a folder or the Hugging Face hub, and a checkpoint "
            "rebuilds its model from its own tensors; if you trust it, build the model with create_model and load "
            "the checkpoint's 'model' entry yourself"
        )
    if prefix is not None and prefix not in OFFLINE_SOURCES:
        raise CheckpointError(
            f"{source}: {key} {value!r} is refused: a checkpoint's model is one of visattn's names, "
            f"{', '.join(p + ':NAME' for p in OFFLINE_SOURCES)}, or a timm or torchvision ViT name"
        )
    if _looks_like_a_path(value.split(":", 1)[-1]):
        raise CheckpointError(f"{source}: {key} {value!r} is a path or an address, not a model name")
    try:
        model_builder(value)
    except ValueError as err:
        raise CheckpointError(f"{source}: {key}: {err}") from None
    return value


def _checked_arguments(arguments: dict[Any, Any], name: str, where: str, source: str | os.PathLike) -> dict[str, Any]:
    """The keyword `arguments` of model `name` (stored under `where`) that may be passed to it."""
    allowed = keyword_arguments(name, source)
    checked: dict[str, Any] = {}
    for key, value in arguments.items():
        label = f"{where}[{key!r}]"
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: {where} has a key {_shown(key)} that is not a name")
        if key in STARTING_WEIGHTS:
            if not isinstance(value, STARTING_WEIGHTS[key]):
                raise CheckpointError(
                    f"{source}: {label} must be {_type_names(STARTING_WEIGHTS[key])}, got {_shown(value)}"
                )
            continue  # where training started: the checkpoint's own tensors replace it
        if key in WEIGHT_LOADING_KEYS:
            raise CheckpointError(
                f"{source}: {label} is refused: it loads weights from a file or the network, and a checkpoint "
                "rebuilds its model from its own tensors"
            )
        if key in PLACEMENT_KEYS:
            raise CheckpointError(
                f"{source}: {label} is refused: it chooses where the model is allocated, and a checkpoint's model is "
                "first built on the meta device to check its size"
            )
        if key not in allowed:
            raise CheckpointError(
                f"{source}: {label} is not an argument of model {name!r}; it takes {', '.join(sorted(allowed))}"
            )
        if key in NESTED_MODELS:
            checked[key] = _checked_name(value, label, source)
        else:
            _check_plain(value, label, source)
            checked[key] = value
    for model_key, arguments_key in NESTED_MODELS.items():
        if isinstance(checked.get(arguments_key), dict):
            inner_name = checked.get(model_key) or _default(name, model_key, source)
            inner = f"{where}[{arguments_key!r}]"
            checked[arguments_key] = _checked_arguments(checked[arguments_key], inner_name, inner, source)
    return checked


def _default(name: str, key: str, source: str | os.PathLike) -> str:
    """The model name the constructor of `name`'s class takes for `key` when none is given."""
    parameter = inspect.signature(_built_class(name, source)).parameters.get(key)
    if parameter is None or not isinstance(parameter.default, str):
        raise CheckpointError(f"{source}: model {name!r} takes no model name {key!r}")
    return parameter.default


def _check_plain(value: Any, key: str, source: str | os.PathLike, depth: int = 0) -> None:
    """Refuse anything but plain data: `None`, booleans, numbers, text that is not a path or an
    address, and lists, tuples and string-keyed dicts of them (at most `MAX_ITEMS` items and
    `MAX_DEPTH` levels)."""
    if value is None or isinstance(value, bool | int | float):
        return
    if isinstance(value, str):
        if len(value) > MAX_TEXT or not value.isprintable() or _looks_like_a_path(value):
            raise CheckpointError(
                f"{source}: {key} is refused: {_shown(value)} is not plain text (a path or an address?)"
            )
        return
    if isinstance(value, list | tuple | dict) and len(value) <= MAX_ITEMS and depth < MAX_DEPTH:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for inner, item in items:
            if isinstance(value, dict) and not isinstance(inner, str):
                raise CheckpointError(f"{source}: {key} has a key {_shown(inner)} that is not a name")
            _check_plain(item, f"{key}[{inner!r}]", source, depth + 1)
        return
    raise CheckpointError(
        f"{source}: {key} is refused: {_shown(value)} is not plain data (None, a boolean, a number, text, "
        f"or a list or dict of them, at most {MAX_ITEMS} items and {MAX_DEPTH} levels deep)"
    )


def _looks_like_a_path(text: str) -> bool:
    """Whether `text` could name a file or an address: a separator, a colon, or a leading `.` or `~`."""
    return any(mark in text for mark in "/\\:") or text.startswith((".", "~"))


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join("None" if t is type(None) else t.__name__ for t in types)


def _named_parameters(function: Callable[..., Any]) -> tuple[set[str], bool]:
    """`(names of the parameters function takes by keyword, whether it takes **kwargs)`."""
    parameters = inspect.signature(function).parameters.values()
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind is p.VAR_KEYWORD for p in parameters)


def _built_class(name: str, source: str | os.PathLike) -> type:
    """The class `create_model(name)` builds, or for a converted timm or torchvision ViT the peer's
    own class (its keyword arguments are the peer's): built with its defaults on the meta device."""
    if ":" not in name and name not in list_models():
        name = f"torchvision:{name}" if name in TORCHVISION_VITS else f"timm:{name}"
    return type(_build_on_meta(lambda: create_model(name), name, source))


# --- step 3: the size, on the meta device ----------------------------------------------------


def _build_on_meta(build: Callable[[], nn.Module], name: str, source: str | os.PathLike) -> nn.Module:
    """`build()` on the `meta` device (no memory, no values), its warnings silenced (the real
    build shows them); any failure is the config's fault: one `CheckpointError`."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return build()
    except CheckpointError:
        raise
    except Exception as err:  # anything a stored config makes a constructor raise
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise CheckpointError(
            f"{source}: its model_config does not build model {name!r} ({type(err).__name__}: {reason})"
        ) from err


class _LargestTensor(TorchFunctionMode):
    """While active, `numel` is the most numbers any tensor a torch function returned holds."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if isinstance(tensor, Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


@contextmanager
def _registration_limit(limit: int, stop: Callable[[], Exception]) -> Iterator[None]:
    """While open, count the parameters, buffers and submodules any module registers, and raise
    `stop()` from the constructor that registers one more than `limit`."""
    count = 0

    def counted(*_: Any) -> None:
        nonlocal count
        count += 1
        if count > limit:
            raise stop()

    handles = [
        module_hooks.register_module_parameter_registration_hook(counted),
        module_hooks.register_module_buffer_registration_hook(counted),
        module_hooks.register_module_module_registration_hook(counted),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _compare(skeleton: nn.Module, weights: Mapping[str, Tensor], source: str | os.PathLike) -> None:
    """Refuse a model whose state dict differs from the stored `weights` in a name or a shape, or
    whose parameters and buffers hold more than twice the stored numbers (plus 2**20)."""
    expected = {key: tuple(tensor.shape) for key, tensor in skeleton.state_dict().items()}
    stored = {key: tuple(tensor.shape) for key, tensor in weights.items()}
    built = sum(t.numel() for t in skeleton.parameters()) + sum(t.numel() for t in skeleton.buffers())
    held = sum(t.numel() for t in weights.values())
    differences = [f"missing {key!r}" for key in expected if key not in stored]
    differences += [f"unexpected {key!r}" for key in stored if key not in expected]
    differences += [
        f"{key!r} is {list(shape)} in the model, {list(stored[key])} in the file"
        for key, shape in expected.items()
        if key in stored and stored[key] != shape
    ]
    if differences or built > 2 * held + 2**20:
        shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
        raise CheckpointError(
            f"{source}: the weights do not fit the model of its model_config, refused before building it: the model "
            f"holds {built:,} numbers, the file {held:,}" + (f" ({shown})" if shown else "")
        )
