"""Datasets and transforms for training: digits, digits on a cluttered canvas, CIFAR, image folders, fake.

:func:`build_datasets` turns the ``data`` section of a config into a training set, a held-out
test set and a `visattn.data_spec.DataSpec` (name, ``img_size``, ``in_chans``, mean, std, the
classes and their names) that checkpoints store (as ``data_config``) so that inference rebuilds
the same preprocessing (resize to ``img_size``, grayscale when ``in_chans == 1``, normalize).
Every dataset yields ``(image (C, H, W) float tensor, label int)``. The datasets themselves
come from `visattn.train.digits` (digits and digit canvases), `visattn.train.cifar` and
`visattn.train.imagefolder` (indexed, checked and read there); those held in memory are
`visattn.train.tensor_dataset.TensorImageDataset`s. :func:`held_out_pictures` gives a few of a
test set's pictures as they are stored, one class after another (the run's explorer page).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import to_pil_image

from ..data_spec import DataSpec
from .cifar import CIFAR_STATS, cifar_images
from .digits import DigitsCanvas, digits_images
from .imagefolder import CheckedImageFolder, build_image_folders
from .tensor_dataset import TensorImageDataset, tensor_augmentation

__all__ = ["DataSplits", "build_datasets", "build_transform", "held_out_pictures", "input_shape"]

#: what each dataset gives a model when the config does not say otherwise: (channels, classes,
#: side); ``None`` classes: read from the data (image folders) or from ``data.fake_classes``
DATASET_DEFAULTS: dict[str, tuple[int, int | None, int]] = {
    "digits": (1, 10, 16),
    "digits_canvas": (1, 10, 64),
    "cifar10": (3, 10, 32),
    "cifar100": (3, 100, 32),
    "imagefolder": (3, None, 224),
    "fake": (3, None, 32),
}


def input_shape(cfg: Any) -> tuple[int, int | None, int]:
    """``(channels, classes, side)`` the ``data`` section ``cfg`` gives a model, without loading
    any data (``classes`` is ``None`` for image folders, whose classes come from the folders)."""
    chans, classes, side = DATASET_DEFAULTS[cfg.name]
    if cfg.name == "digits_canvas":
        return chans, classes, cfg.canvas_size
    return chans, classes or (cfg.fake_classes if cfg.name == "fake" else None), cfg.img_size or side


IMAGENET_STATS = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


# --- transforms ---------------------------------------------------------------------------


def build_transform(
    train: bool,
    augment: Any,
    mean: Sequence[float],
    std: Sequence[float],
    size: tuple[int, int],
) -> Callable:
    """Per-image transform of PIL images (datasets that are not held in memory as tensors).

    Augment (when ``train``) → float tensor → normalize → random erasing (when ``train``).

    Args:
        train: add the augmentations of ``augment`` (an :class:`~visattn.train.config.AugmentConfig`).
        mean, std: per-channel normalization.
        size: the output ``(H, W)``.
    """
    steps: list[Callable] = []
    if train:
        if augment.crop_padding:
            steps.append(v2.RandomCrop(list(size), padding=augment.crop_padding))
        if augment.hflip:
            steps.append(v2.RandomHorizontalFlip(augment.hflip))
        if augment.affine_degrees or augment.affine_translate or augment.affine_scale:
            steps.append(
                v2.RandomAffine(
                    degrees=augment.affine_degrees,
                    translate=(augment.affine_translate,) * 2 if augment.affine_translate else None,
                    scale=(1 - augment.affine_scale, 1 + augment.affine_scale) if augment.affine_scale else None,
                    interpolation=v2.InterpolationMode.BILINEAR,
                )
            )
        if augment.auto_augment:
            steps.append(
                rand_augment_transform(augment.auto_augment, {"img_mean": tuple(round(255 * m) for m in mean)})
            )
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if train and augment.re_prob:
        steps.append(RandomErasing(augment.re_prob, mode="pixel", device="cpu"))
    return v2.Compose(steps)


@dataclass
class DataSplits:
    """What a dataset builder returns: the two splits and what inference needs to know."""

    train: Dataset
    test: Dataset
    size: tuple[int, int]
    in_chans: int
    mean: Sequence[float]
    std: Sequence[float]
    classes: list[str]


def _digits(cfg: Any) -> DataSplits:
    size = cfg.img_size or DATASET_DEFAULTS["digits"][2]
    (train_x, train_y), (test_x, test_y) = (digits_images(s, size, cfg.split_seed) for s in ("train", "test"))
    mean, std = (float(train_x.mean()),), (float(train_x.std()),)
    classes = [str(d) for d in range(10)]
    augment, per_image, erasing = tensor_augmentation(cfg.augment, mean)
    train = TensorImageDataset(train_x, train_y, mean, std, augment, per_image, erasing, classes)
    test = TensorImageDataset(test_x, test_y, mean, std, class_names=classes)
    return DataSplits(train, test, (size, size), 1, mean, std, classes)


def _digits_canvas(cfg: Any) -> DataSplits:
    size = cfg.canvas_size
    if cfg.img_size not in (None, size):
        raise ValueError("digits_canvas: set data.canvas_size instead of data.img_size")
    augment, per_image, erasing = tensor_augmentation(cfg.augment, DigitsCanvas.MEAN)
    train = DigitsCanvas(
        "train", size, cfg.split_seed, cfg.canvas_copies, augment=augment, per_image=per_image, erasing=erasing
    )
    test = DigitsCanvas("test", size, cfg.split_seed, cfg.canvas_copies)
    return DataSplits(train, test, (size, size), 1, DigitsCanvas.MEAN, DigitsCanvas.STD, train.classes)


def _cifar_splits(cfg: Any) -> DataSplits:
    size = cfg.img_size or DATASET_DEFAULTS[cfg.name][2]
    mean, std = CIFAR_STATS[cfg.name]
    (train_x, train_y, classes), (test_x, test_y, _) = (
        cifar_images(cfg.name, cfg.root, train, cfg.download) for train in (True, False)
    )
    if size != 32:  # resized once, as a batch, when loaded
        train_x, test_x = (v2.functional.resize(x, [size, size], antialias=True) for x in (train_x, test_x))
    augment, per_image, erasing = tensor_augmentation(cfg.augment, mean)
    train = TensorImageDataset(train_x, train_y, mean, std, augment, per_image, erasing, classes)
    test = TensorImageDataset(test_x, test_y, mean, std, class_names=classes)
    return DataSplits(train, test, (size, size), 3, mean, std, classes)


def _imagefolder_splits(cfg: Any) -> DataSplits:
    size = cfg.img_size or DATASET_DEFAULTS["imagefolder"][2]
    train, test, classes = build_image_folders(cfg, (size, size))
    return DataSplits(train, test, (size, size), 3, *IMAGENET_STATS, classes)


def _fake(cfg: Any) -> DataSplits:
    size, aug = cfg.img_size or DATASET_DEFAULTS["fake"][2], cfg.augment
    mean, std = (0.5,) * 3, (0.5,) * 3
    make = functools.partial(tv_datasets.FakeData, image_size=(3, size, size), num_classes=cfg.fake_classes)
    train = make(
        cfg.fake_size, transform=build_transform(True, aug, mean, std, (size, size)), random_offset=cfg.split_seed
    )
    test = make(
        max(1, cfg.fake_size // 4),
        transform=build_transform(False, aug, mean, std, (size, size)),
        random_offset=cfg.split_seed + 10**6,
    )
    return DataSplits(train, test, (size, size), 3, mean, std, [str(c) for c in range(cfg.fake_classes)])


_BUILDERS: dict[str, Callable[[Any], DataSplits]] = {
    "digits": _digits,
    "digits_canvas": _digits_canvas,
    "cifar10": _cifar_splits,
    "cifar100": _cifar_splits,
    "imagefolder": _imagefolder_splits,
    "fake": _fake,
}


def build_datasets(cfg: Any) -> tuple[Dataset, Dataset, DataSpec]:
    """``(train_set, test_set, data_spec)`` for the ``data`` section of a config; the spec has
    every field (the dataset's name, its classes and their names)."""
    if cfg.name not in _BUILDERS:
        raise ValueError(f"unknown dataset {cfg.name!r}; choose one of: {', '.join(_BUILDERS)}")
    splits = _BUILDERS[cfg.name](cfg)
    if len(splits.classes) < 2:
        raise ValueError(f"data.name={cfg.name} has {len(splits.classes)} class(es); a classifier needs at least 2")
    spec = DataSpec(
        img_size=splits.size,
        in_chans=splits.in_chans,
        mean=tuple(splits.mean),
        std=tuple(splits.std),
        name=cfg.name,
        num_classes=len(splits.classes),
        class_names=tuple(splits.classes),
    )
    return splits.train, splits.test, spec


def held_out_pictures(dataset: Dataset, count: int = 8) -> list[Image.Image | str]:
    """Up to ``count`` pictures of ``dataset`` as they are stored (before normalization): PIL
    images of an in-memory dataset, the files of an image folder, none of generated noise
    (``fake``). One of each class in turn (the first of every class, then the second ...), so
    that a few pictures show many classes; the same ones every time."""
    if isinstance(dataset, TensorImageDataset):
        chosen = _classes_in_turn(dataset.labels.tolist(), count)
        return [to_pil_image((dataset.raw_image(i) * 255).round().to(torch.uint8)) for i in chosen]
    if isinstance(dataset, CheckedImageFolder):
        return [dataset.samples[i][0] for i in _classes_in_turn(dataset.targets, count)]
    return []


def _classes_in_turn(labels: Sequence[int], count: int) -> list[int]:
    """The first ``count`` indices ordered by (how many of its class come before it, label)."""
    before: collections.Counter[int] = collections.Counter()
    ranked = []
    for index, label in enumerate(labels):
        ranked.append((before[label], label, index))
        before[label] += 1
    return [index for _, _, index in sorted(ranked)[:count]]
