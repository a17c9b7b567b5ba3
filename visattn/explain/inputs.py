"""What a model is shown: a picture file, its preprocessing, and the data configs that describe it.

`Preprocess` is the model's view of a picture (resize to `img_size`, gray if `in_chans == 1`,
normalize), built from a `visattn.data_spec.DataSpec` (a checkpoint's `data_config`);
`Preprocess.box` says which part of the original picture the model input covers, so that a map
made on the input can be put back on it. `default_data_config` and `pretrained_data_config` make
a `DataSpec` for a model that has none (the latter with a timm model's published statistics and
ImageNet's class names).

Pictures are read by `visattn._io.load_image` and turned into RGB by `visattn._io.to_rgb`, the
loader that training and evaluation use too, so the model sees a file the same way everywhere.
"""

from __future__ import annotations

import dataclasses
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
from .._utils import to_pair
from ..data_spec import DataSpec
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


@dataclass(frozen=True)
class Preprocess:
    """The model's view of a picture: resize to ``img_size``, gray if ``in_chans == 1``, normalize.

    Built from a :class:`~visattn.data_spec.DataSpec` with :meth:`from_spec` (from its stored
    dict, a checkpoint's ``data_config``, with :meth:`from_data_config`); :meth:`box` says which
    part of the original the model input covers, so maps can be put back on it.
    """

    img_size: tuple[int, int]
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_spec(cls, spec: DataSpec) -> Preprocess:
        """The preprocessing ``spec`` describes; its ``in_chans`` must be 1 (gray) or 3 (RGB)."""
        if spec.in_chans not in (1, 3):
            raise ValueError(f"Preprocess needs in_chans 1 (gray) or 3 (RGB) pictures; the spec has {spec.in_chans}")
        return cls(spec.img_size, spec.in_chans, spec.mean, spec.std)

    @classmethod
    def from_data_config(cls, config: Mapping[str, Any]) -> Preprocess:
        """From a spec's stored dict, ``{"img_size": [H, W], "in_chans", "mean", "std", ...}``
        (`DataSpec.from_dict`: an unknown key or a broken rule raises its `DataSpecError`)."""
        return cls.from_spec(DataSpec.from_dict(config))

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


def default_data_config(model: nn.Module, img_size: tuple[int, int] | None = None) -> DataSpec:
    """The spec of a model without one: its own ``img_size`` and channels, ImageNet statistics
    for RGB and ``0.5`` for gray."""
    size = img_size or getattr(model, "img_size", None) or (224, 224)
    in_chans = getattr(getattr(model, "patch_embed", None), "in_chans", 3)
    mean, std = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if in_chans == 3 else ((0.5,), (0.5,))
    return DataSpec(img_size=to_pair(size), in_chans=in_chans, mean=tuple(mean), std=tuple(std))


def _num_classes(model: nn.Module) -> int | None:
    classes = getattr(model, "num_classes", None)
    if classes is None:
        heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
        classes = heads[-1].out_features if heads else None
    return classes


def pretrained_data_config(model: nn.Module, img_size: tuple[int, int] | None = None) -> DataSpec:
    """:func:`default_data_config` for a model with published weights: the mean, std and input size
    of its ``pretrained_cfg`` (timm's record of how the weights were trained), and its class names:
    the ``label_names`` of a folder `visattn.load_pretrained` read, else ImageNet's (timm's
    ``ImageNetInfo``, shipped with timm) when its head has ImageNet's classes."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    spec = default_data_config(model, img_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if len(cfg.get("mean") or ()) == spec.in_chans == len(cfg.get("std") or ()):
        spec = dataclasses.replace(spec, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    if img_size is None and cfg.get("input_size"):
        spec = dataclasses.replace(spec, img_size=to_pair(cfg["input_size"][-2:]))
    if cfg.get("label_names") and len(cfg["label_names"]) == _num_classes(model):
        return dataclasses.replace(spec, class_names=tuple(cfg["label_names"]))
    subset = infer_imagenet_subset(model) if cfg else None
    if subset is None and _num_classes(model) == 1000:
        subset = "imagenet-1k"
    if subset is not None:
        info = ImageNetInfo(subset)
        names = tuple(info.index_to_description(i) for i in range(info.num_classes()))
        spec = dataclasses.replace(spec, class_names=names)
    return spec


def picture_file(image: Image.Image | str | os.PathLike) -> str | os.PathLike | None:
    """The file a picture comes from: the path itself, or the file a PIL image was opened from."""
    return getattr(image, "filename", None) or None if isinstance(image, Image.Image) else image
