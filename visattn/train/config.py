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
from typing import Any

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

    ``affine_*`` and ``hflip`` work on every dataset; ``crop_padding`` (random crop after zero
    padding, CIFAR style) and ``auto_augment`` (a timm RandAugment string such as
    ``"rand-m9-mstd0.5-inc1"``) need datasets of PIL images (cifar10/100, imagefolder, fake).
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

    epochs: int = 80
    batch_size: int = 64  # global: split evenly over the processes of a multi-process run
    opt: str = "adamw"  # any timm optimizer name (timm.optim.create_optimizer_v2)
    lr: float = 2e-3
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
    ema_decay: float = 0.0  # timm ModelEmaV3 decay; 0: no EMA. With EMA, the EMA weights are the result
    amp: str = "auto"  # auto (bf16 on CUDA and on CPUs with bf16 instructions, else fp32), bf16, fp16 (CUDA), none
    device: str = "auto"
    seed: int = 0


@dataclass
class RunConfig:
    """Where the run folder goes and how progress is shown."""

    name: str | None = None  # default: the config file's stem, or "default"
    out_dir: str = "runs"
    progress: str = "auto"  # auto (a tqdm bar on a terminal, else lines), bar, lines
    log_every: int = 100  # steps between log lines when not showing a bar


def _default_model() -> dict[str, Any]:
    return {"name": "vit_digits_patch4_16"}


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
        base = OmegaConf.merge(base, {})  # a copy
        base.model = {"name": layer.model.name}
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as err:
        raise _explain(err, source) from None


def _check_choices(cfg: DictConfig) -> None:
    for key, value, choices in (
        ("data.name", cfg.data.name, DATASETS),
        ("train.amp", cfg.train.amp, AMP_MODES),
        ("train.device", cfg.train.device, DEVICES),
        ("run.progress", cfg.run.progress, PROGRESS),
    ):
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}={value!r} is not valid{hint}; choose one of: {', '.join(choices)}")
    if not isinstance(cfg.model.get("name"), str):
        raise ConfigError("model.name is missing; set it to a name from `visattn models` or 'torchvision:NAME'")
    for key in ("num_classes", "in_chans"):
        if key in cfg.model:
            raise ConfigError(f"model.{key} comes from the dataset; remove it from the config")
    positive = {"train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size, "train.lr": cfg.train.lr}
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1) (0 turns EMA off), got {cfg.train.ema_decay}")


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
        cfg = _merge(cfg, OmegaConf.load(path), str(path))
        if cfg.run.name is None:
            cfg.run.name = path.stem
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=20)")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override {item!r}")
    if cfg.run.name is None:
        cfg.run.name = "default"
    _check_choices(cfg)
    return cfg


def config_to_dict(cfg: DictConfig) -> dict[str, Any]:
    """A plain, resolved ``dict`` copy of ``cfg`` (for checkpoints and JSON)."""
    return OmegaConf.to_container(cfg, resolve=True)
