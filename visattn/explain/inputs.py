"""What a model is shown: a picture file, its preprocessing, and the data configs that describe it.

`Preprocess` is the model's view of a picture (resize to `img_size`, gray if `in_chans == 1`,
normalize), built from a checkpoint's `data_config`; `Preprocess.box` says which part of the
original picture the model input covers, so that a map made on the input can be put back on it.
`default_data_config` and `pretrained_data_config` make a `data_config` for a model that has
none (the latter with a timm model's published statistics and ImageNet's class names).

Pictures are read by `visattn._io.load_image` and turned into RGB by `visattn._io.to_rgb`, the
loader that training and evaluation use too, so the model sees a file the same way everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from .._io import to_rgb
from .recording import Point

__all__ = [
    "Box",
    "Preprocess",
    "default_data_config",
    "picture_file",
    "pretrained_data_config",
]

#: `(left, top, right, bottom)` of a picture, in its pixels
Box = tuple[float, float, float, float]
DATA_CONFIG_KEYS = ("img_size", "in_chans", "mean", "std")


@dataclass(frozen=True)
class Preprocess:
    """The model's view of a picture: resize to ``img_size``, gray if ``in_chans == 1``, normalize.

    Built from a checkpoint's ``data_config`` with :meth:`from_data_config`; :meth:`box` says
    which part of the original the model input covers, so maps can be put back on it.
    """

    img_size: tuple[int, int]
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_data_config(cls, config: Mapping[str, Any]) -> Preprocess:
        """From ``{"img_size": [H, W], "in_chans", "mean", "std", ...}`` (other keys ignored)."""
        missing = [k for k in DATA_CONFIG_KEYS if k not in config]
        if missing:
            raise ValueError(f"data_config lacks {', '.join(missing)}; it needs {', '.join(DATA_CONFIG_KEYS)}")
        size = config["img_size"]
        size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        in_chans = int(config["in_chans"])
        if in_chans not in (1, 3):
            raise ValueError(f"data_config in_chans must be 1 (gray) or 3 (RGB), got {in_chans}")
        mean, std = tuple(float(m) for m in config["mean"]), tuple(float(s) for s in config["std"])
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"data_config mean {mean} and std {std} need {in_chans} value(s) each (in_chans)")
        return cls(size, in_chans, mean, std)

    def __call__(self, image: Image.Image) -> Tensor:
        """PIL picture (any size and mode) → model input ``(in_chans, H, W)``, float32, normalized."""
        image = to_rgb(image)
        if self.in_chans == 1:
            image = image.convert("L")
        x = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)
        x = TF.resize(x, list(self.img_size), antialias=True)
        return TF.normalize(x, list(self.mean), list(self.std))

    def box(self, image_size: tuple[int, int]) -> Box:
        """``(left, top, right, bottom)`` of the original ``(W, H)`` picture the input covers."""
        return (0.0, 0.0, float(image_size[0]), float(image_size[1]))

    def to_input(self, point: Point, image_size: tuple[int, int]) -> Point:
        """An ``(x, y)`` pixel of the original ``(W, H)`` picture → the same point of the model input."""
        left, top, right, bottom = self.box(image_size)
        x, y = float(point[0]), float(point[1])
        if not (left <= x < right and top <= y < bottom):
            raise ValueError(
                f"point (x={x:g}, y={y:g}) lies outside the {image_size[0]}×{image_size[1]} (W×H) picture; "
                f"x must be in [0, {image_size[0]}), y in [0, {image_size[1]})"
            )
        height, width = self.img_size
        return (x - left) * width / (right - left), (y - top) * height / (bottom - top)


def default_data_config(model: nn.Module, img_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """A data_config for a model without one: its own ``img_size`` and channels, ImageNet
    statistics for RGB and ``0.5`` for gray."""
    size = img_size or getattr(model, "img_size", None) or (224, 224)
    in_chans = getattr(getattr(model, "patch_embed", None), "in_chans", 3)
    mean, std = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if in_chans == 3 else ((0.5,), (0.5,))
    return {"img_size": list(size), "in_chans": in_chans, "mean": list(mean), "std": list(std)}


def _num_classes(model: nn.Module) -> int | None:
    classes = getattr(model, "num_classes", None)
    if classes is None:
        heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
        classes = heads[-1].out_features if heads else None
    return classes


def pretrained_data_config(model: nn.Module, img_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """:func:`default_data_config` for a model with published weights: the mean, std and input size
    of its ``pretrained_cfg`` (timm's record of how the weights were trained), and its class names:
    the ``label_names`` of a folder `visattn.load_pretrained` read, else ImageNet's (timm's
    ``ImageNetInfo``, shipped with timm) when its head has ImageNet's classes."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    config = default_data_config(model, img_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if len(cfg.get("mean") or ()) == config["in_chans"] == len(cfg.get("std") or ()):
        config.update(mean=list(cfg["mean"]), std=list(cfg["std"]))
    if img_size is None and cfg.get("input_size"):
        config["img_size"] = list(cfg["input_size"][-2:])
    if cfg.get("label_names") and len(cfg["label_names"]) == _num_classes(model):
        return {**config, "class_names": list(cfg["label_names"])}
    subset = infer_imagenet_subset(model) if cfg else None
    if subset is None and _num_classes(model) == 1000:
        subset = "imagenet-1k"
    if subset is not None:
        info = ImageNetInfo(subset)
        config["class_names"] = [info.index_to_description(i) for i in range(info.num_classes())]
    return config


def picture_file(image: Image.Image | str | os.PathLike) -> str | os.PathLike | None:
    """The file a picture comes from: the path itself, or the file a PIL image was opened from."""
    return getattr(image, "filename", None) or None if isinstance(image, Image.Image) else image
