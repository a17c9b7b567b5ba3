"""The training configuration: a typed schema with defaults, YAML files and command-line overrides.

The defaults below *are* the default job (a small ViT on scikit-learn's digits); a YAML file in
``configs/`` and ``key=value`` overrides are layered on top with OmegaConf::

    cfg = load_config("configs/cifar10_vit.yaml", ["train.epochs=20", "model.depth=4"])

Unknown keys and values of the wrong type raise :class:`ConfigError`, which names the key and
the valid choices. The ``model`` section is open: ``name`` plus any keyword arguments of
:func:`visattn.create_model` (``num_classes`` and ``in_chans`` come from the dataset).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

__all__ = [
    "AugmentConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "RunConfig",
    "TrainConfig",
    "config_to_dict",
    "load_config",
]

DATASETS = ("digits", "digits_canvas", "cifar10", "cifar100", "imagefolder", "fake")
AMP_MODES = ("auto", "bf16", "fp16", "none")
DEVICES = ("auto", "cpu", "cuda")
PROGRESS = ("auto", "bar", "lines")


class ConfigError(ValueError):
    """A config key that does not exist, a value of the wrong type, or a value out of range."""


@dataclass
class AugmentConfig:
    """Training-time augmentation (test images are only resized and normalized).

    ``hflip``, ``auto_augment`` (a timm RandAugment string such as ``"rand-m9-mstd0.5-inc1"``)
    and ``re_prob`` work on every dataset. ``affine_*`` and ``crop_padding`` (random crop after
    zero padding, CIFAR style) work on the in-memory datasets (digits, digits_canvas, cifar10/100)
    and ``fake``; an image folder is cropped by timm's training transform (random resized crop)
    instead, and a value changed from the default there is refused by `load_config`.
    """

    hflip: float = 0.0
    affine_degrees: float = 10.0
    affine_translate: float = 0.1  # fraction of the image side
    affine_scale: float = 0.1  # scale drawn from [1 - s, 1 + s]
    crop_padding: int = 0
    auto_augment: str | None = None
    re_prob: float = 0.0  # timm RandomErasing probability


@dataclass
class DataConfig:
    """Which images, and how they are prepared.

    ``name``: ``digits`` (scikit-learn's 8×8 digits upscaled to ``img_size``, 16 by default),
    ``digits_canvas`` (one digit placed among clutter on a ``canvas_size`` canvas),
    ``cifar10`` / ``cifar100`` (files under ``root``; ``download: true`` fetches them),
    ``imagefolder`` (``root/class/*.jpg``, or ``root/train`` + ``root/val``), ``fake``.
    """

    name: str = "digits"
    root: str = "data"
    download: bool = False
    img_size: int | None = None  # None: the dataset's own size (digits 16, canvas 64, CIFAR 32, else 224)
    val_fraction: float = 0.1  # imagefolder without a val/ folder: stratified held-out share
    strict: bool = False  # imagefolder: unreadable files are an error instead of a warning
    split_seed: int = 0  # seed of held-out splits and of generated data
    canvas_size: int = 64  # digits_canvas
    canvas_copies: int = 3  # digits_canvas: canvases per source digit
    fake_size: int = 512  # fake: number of training images (test: a quarter)
    fake_classes: int = 10
    workers: int = 0  # DataLoader worker processes
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TrainConfig:
    """The recipe: optimizer, schedule, regularization, precision, seed."""

    epochs: int = 55
    batch_size: int = 64  # global: split evenly over the processes of a multi-process run
    opt: str = "adamw"  # any timm optimizer name (timm.optim.create_optimizer_v2)
    lr: float = 4e-3
    weight_decay: float = 0.05  # not applied to norms, biases, positional embeddings, class token
    momentum: float = 0.9  # for SGD-style optimizers
    sched: str = "cosine"  # any timm scheduler name (timm.scheduler.create_scheduler_v2)
    warmup_epochs: int = 3
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5
    label_smoothing: float = 0.1
    mixup: float = 0.0  # timm Mixup alpha (0: off)
    cutmix: float = 0.0  # timm CutMix alpha (0: off)
    mixup_prob: float = 1.0
    clip_grad: float | None = 1.0  # max gradient norm (None: no clipping)
    # timm ModelEmaV3 decay; 0: no EMA. With EMA, the EMA weights are the result. The default job's
    # 0.995 (a horizon of about 200 of its 1,265 steps) keeps every seed above 98.5 % on AVX2 kernels
    # too (docs/results.md); runs of a few hundred steps should set 0, as the shipped configs do
    ema_decay: float = 0.995
    amp: str = "auto"  # auto (a rule: train/precision.py), bf16, fp16 (CUDA), none
    grad_checkpointing: bool = False  # recompute block activations in the backward pass: less memory, same gradients
    device: str = "auto"
    seed: int = 0
    compile: bool = False  # torch.compile the training model (inductor; the first steps compile: a minute or more)


@dataclass
class RunConfig:
    """Where the run folder goes, how progress is shown, and what the front end adds at the end."""

    name: str | None = None  # default: the config file's stem, or "default"; one plain folder name
    out_dir: str = "runs"
    progress: str = "auto"  # auto (a tqdm bar on a terminal, else lines), bar, lines
    log_every: int = 100  # steps between log lines when not showing a bar
    explorer: bool = True  # `visattn train`/train.py: end by writing RUN/explorer.html of a few held-out pictures


def _default_model() -> dict[str, Any]:
    # a convolutional stem and one of the model's four blocks: within the default job's 30 s on
    # 2 CPU cores it ends more accurate than 2 or 4 blocks on linear patches (docs/results.md)
    return {"name": "vit_digits_patch4_16", "stem": "conv", "depth": 1}


@dataclass
class Config:
    """A whole training job. ``model`` is ``{"name": ..., **create_model_kwargs}``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=_default_model)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _valid_keys(schema: type) -> list[str]:
    return [f.name for f in fields(schema)]


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    """Turn an OmegaConf error into one line that names the key and the valid choices."""
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        schema = getattr(err, "object_type", None)
        valid = _valid_keys(schema) if schema is not None and hasattr(schema, "__dataclass_fields__") else []
        close = difflib.get_close_matches(str(err.key), valid, n=1)
        hint = f"; did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}?" if close else ""
        return ConfigError(f"unknown config key {key!r} (from {source}){hint} Valid keys here: {', '.join(valid)}")
    message = str(err).splitlines()[0]
    return ConfigError(f"config key {key!r} (from {source}): {message}")


def _merge(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    # A layer that names a different model replaces the model section instead of merging into it,
    # so keyword arguments of the previous model do not leak into the new one.
    if "model" in layer and "name" in layer.model and layer.model.name != base.model.name:
        base = _merged(base, {})  # a copy
        base.model = {"name": layer.model.name}
    try:
        return _merged(base, layer)
    except OmegaConfBaseException as err:
        raise _explain(err, source) from None


def _merged(base: DictConfig, layer: DictConfig | dict[str, Any]) -> DictConfig:
    """``OmegaConf.merge`` of two dict configs, typed as the dict config it is."""
    merged = OmegaConf.merge(base, layer)
    assert isinstance(merged, DictConfig)
    return merged


def _refuse(key: str, value: Any, choices: tuple[str, ...] | list[str], listed_by: str = "") -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices`` (with a "did you mean");
    ``listed_by`` names where a long list of choices can be read instead of printing it."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        shown = f"one of the {len(choices)} names of {listed_by}" if listed_by else "one of: " + ", ".join(choices)
        raise ConfigError(f"{key}={value!r} is not valid{hint}; choose {shown}")


def _check_choices(cfg: DictConfig) -> None:
    """Names that must be one of a list: dataset, precision, device, progress, optimizer, schedule."""
    for key, value, choices in (
        ("data.name", cfg.data.name, DATASETS),
        ("train.amp", cfg.train.amp, AMP_MODES),
        ("train.device", cfg.train.device, DEVICES),
        ("run.progress", cfg.run.progress, PROGRESS),
        ("train.sched", cfg.train.sched, SCHEDULES),
    ):
        _refuse(key, value, choices)
    _refuse("train.opt", _optimizer_name(cfg.train.opt), _optimizer_names(), "timm.optim.list_optimizers()")
    if not isinstance(cfg.model.get("name"), str):
        raise ConfigError("model.name is missing; set it to a name from `visattn models` or 'torchvision:NAME'")
    for key in ("num_classes", "in_chans"):
        if key in cfg.model:
            raise ConfigError(f"model.{key} comes from the dataset; remove it from the config")


#: timm's scheduler names (timm.scheduler.create_scheduler_v2)
SCHEDULES = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "constant", "rsqrt")


def _optimizer_name(opt: str) -> str:
    """timm's optimizer name in ``opt`` (``"lookahead_adamw"`` → ``"adamw"``), lower case."""
    return str(opt).lower().split("_")[-1]


def _optimizer_names() -> list[str]:
    from timm.optim import list_optimizers

    return list(cast(list[str], list_optimizers()))  # timm: names only, unless with_description=True


def _check_ranges(cfg: DictConfig) -> None:
    """Numbers that must lie in a range; each message names the key, the value and the range."""
    t, d = cfg.train, cfg.data
    rules = [
        ("train.epochs", t.epochs, t.epochs > 0, "positive"),
        ("train.batch_size", t.batch_size, t.batch_size > 0, "positive"),
        ("train.lr", t.lr, t.lr > 0, "positive"),
        ("train.clip_grad", t.clip_grad, t.clip_grad is None or t.clip_grad > 0, "null (no clipping) or positive"),
        ("train.label_smoothing", t.label_smoothing, 0 <= t.label_smoothing < 1, "in [0, 1)"),
        ("train.warmup_epochs", t.warmup_epochs, t.warmup_epochs >= 0, ">= 0"),
        ("train.ema_decay", t.ema_decay, 0 <= t.ema_decay < 1, "in [0, 1) (0 turns EMA off)"),
        (
            "data.img_size",
            d.img_size,
            d.img_size is None or d.img_size > 0,
            "null (the dataset's own size) or positive",
        ),
        ("data.fake_classes", d.fake_classes, d.fake_classes >= 2, ">= 2 (a classifier needs two classes)"),
        ("data.workers", d.workers, d.workers >= 0, ">= 0"),
        ("data.val_fraction", d.val_fraction, 0 < d.val_fraction < 1, "in (0, 1)"),
        ("data.fake_size", d.fake_size, d.fake_size > 0, "positive"),
    ]
    for key, value, ok, valid in rules:
        if not ok:
            raise ConfigError(f"{key} must be {valid}, got {value}")


def _check_run_name(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is one plain folder name, so that the run folder
    is ``run.out_dir/name`` itself: not empty, not ``.`` or ``..``, no ``/`` or ``\\`` (so no
    absolute path either), no NUL, line break or other control character, at most 255 bytes."""
    problem = ""
    if name == "":
        problem = "it is empty"
    elif name in (".", ".."):
        problem = f"{name!r} is not a folder of its own"
    elif "/" in name or "\\" in name:
        problem = "it holds a path separator"
    elif any(ord(char) < 32 or char == "\x7f" for char in name):
        problem = "it holds a control character such as NUL, a line break or a tab"
    elif len(name.encode("utf-8", "surrogateescape")) > 255:
        problem = "it is longer than 255 bytes"
    if problem:
        raise ConfigError(
            f"run.name={name!r} is not a plain folder name ({problem}); it names one folder inside run.out_dir, "
            "e.g. run.name=my_run"
        )


def _check_typed_run_name(override: str) -> None:
    """``run.name=...`` as typed, before YAML reads it: an empty value would become null (the
    default name) and a line break a space, so both are refused here."""
    key, _, value = override.partition("=")
    if key.strip() == "run.name" and (not value.strip() or any(ord(char) < 32 for char in value.strip())):
        _check_run_name(value.strip())


def _read_yaml(path: Path) -> DictConfig:
    """A config file as a ``DictConfig``; syntax errors and a top level other than a mapping raise
    :class:`ConfigError` naming the file (and the line)."""
    try:
        layer = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"config file {path} could not be read: {str(err).splitlines()[0]}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text ({err.reason})") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(
            f"config file {path} holds a {type(layer).__name__.removesuffix('Config').lower()} at its top level; "
            "it must be a mapping of sections (data:, model:, train:, run:)"
        )
    return layer


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: DictConfig | dict | None = None,
) -> DictConfig:
    """Defaults ← ``base`` (e.g. a saved run's config) ← YAML file ``path`` ← ``key=value`` overrides.

    Raises :class:`ConfigError` for unknown keys, wrong types and invalid choices.
    """
    cfg = OmegaConf.structured(Config)
    if base is not None:
        cfg = _merge(cfg, OmegaConf.create(base), "the saved run config")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            shipped = sorted(p.name for p in Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
            raise ConfigError(
                f"config file {path} does not exist" + (f"; shipped configs: {', '.join(shipped)}" if shipped else "")
            )
        cfg = _merge(cfg, _read_yaml(path), str(path))
        if cfg.run.name is None:
            cfg.run.name = path.stem
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=20)")
        _check_typed_run_name(item)
        try:
            layer = OmegaConf.from_dotlist([item])
        except (yaml.YAMLError, OmegaConfBaseException) as err:
            raise ConfigError(f"override {item!r} is not valid YAML: {' '.join(str(err).split())}") from None
        cfg = _merge(cfg, layer, f"override {item!r}")
    if cfg.run.name is None:
        cfg.run.name = "default"
    _check_run_name(cfg.run.name)
    _check_choices(cfg)
    _check_ranges(cfg)
    _check_augmentation_applies(cfg.data)
    return cfg


#: augmentation keys only the in-memory datasets apply (batched tensor augmentation)
_IN_MEMORY_AUGMENTATION = ("affine_degrees", "affine_translate", "affine_scale", "crop_padding")


def _check_augmentation_applies(data: DictConfig) -> None:
    """Refuse an augmentation key changed from its default for a dataset that does not apply it:
    an image folder is cropped by timm's training transform (random resized crop) instead of the
    affine transform and the padded crop, so a changed ``affine_*`` or ``crop_padding`` would be
    silently ignored there."""
    if data.name != "imagefolder":
        return
    defaults = AugmentConfig()
    for key in _IN_MEMORY_AUGMENTATION:
        if data.augment[key] != getattr(defaults, key):
            raise ConfigError(
                f"data.augment.{key}={data.augment[key]} is not applied to image folders (they are cropped by "
                f"timm's random resized crop); remove it, or use an in-memory dataset (digits, cifar10, ...)"
            )


def config_to_dict(cfg: DictConfig) -> dict[str, Any]:
    """A plain, resolved ``dict`` copy of ``cfg`` (for checkpoints and JSON)."""
    # a DictConfig's container is a dict; its keys are strings (config sections and fields)
    return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
