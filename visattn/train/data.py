"""Datasets and transforms for training: digits, digits on a cluttered canvas, CIFAR, image folders, fake.

:func:`build_datasets` turns the ``data`` section of a config into a training set, a held-out
test set and a ``data_config`` dict — ``{"name", "img_size": [H, W], "in_chans", "mean", "std",
"num_classes", "class_names"}`` — that is stored in checkpoints so that inference rebuilds the
same preprocessing (resize to ``img_size``, grayscale when ``in_chans == 1``, normalize).
Every dataset yields ``(image (C, H, W) float tensor, label int)``. Image folders are indexed,
checked and read in :mod:`visattn.train.imagefolder`.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import math
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image

from .augment import BatchAugment
from .imagefolder import CheckedImageFolder, build_image_folders

__all__ = [
    "DigitsCanvas",
    "TensorImageDataset",
    "build_datasets",
    "build_transform",
    "digits_images",
    "digits_split",
    "held_out_pictures",
]

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


CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
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


# --- in-memory tensor datasets -------------------------------------------------------------


class TensorImageDataset(Dataset):
    """Images held in memory, served and augmented a whole batch at a time.

    Args:
        images: ``(N, C, H, W)``, float in ``[0, 1]`` or uint8.
        labels: ``(N,)`` class indices.
        mean, std: per-channel normalization applied to every batch.
        augment: a :class:`~visattn.train.augment.BatchAugment` for training sets (``None``: none).
        per_image: an optional per-image transform on PIL images applied before ``augment``
            (timm's RandAugment); the only step that loops over images.
        erasing: an optional batch transform applied after normalization (timm's
            ``RandomErasing``, which takes batches).
        class_names: the class names, in label order.

    ``dataset[indices]`` (:meth:`batch`) returns a batch ``(x (B, C, H, W), y (B,))``; the
    training loop feeds it whole index batches (a ``BatchSampler`` with ``batch_size=None``).
    A ``DataLoader`` that batches by itself gets the same batch through :meth:`__getitems__` as a
    list of samples (views, which its collate function stacks back at the cost of one copy);
    ``dataset[i]`` returns one ``(x (C, H, W), y int)``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        augment: BatchAugment | None = None,
        per_image: Callable | None = None,
        erasing: Callable | None = None,
        class_names: Sequence[str] = (),
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment, self.per_image, self.erasing = augment, per_image, erasing
        self.classes = list(class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def raw_image(self, index: int) -> Tensor:
        """The un-normalized image ``(C, H, W)``, float in ``[0, 1]``."""
        return self.raw_images(torch.tensor([index]))[0]

    def raw_images(self, indices: Tensor | Sequence[int]) -> Tensor:
        """Un-normalized images ``(B, C, H, W)``, float in ``[0, 1]``."""
        images = self.images[torch.as_tensor(indices, dtype=torch.long)]
        return images.float() / 255 if images.dtype == torch.uint8 else images.float()

    def batch(self, indices: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """A batch ``(x (B, C, H, W), y (B,))``: augmented (if set), normalized, erased (if set)."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        x = self.raw_images(indices)
        if self.per_image is not None:
            x = torch.stack([pil_to_tensor(self.per_image(to_pil_image(image))) for image in x]).float() / 255
        if self.augment is not None:
            x = self.augment(x)
        x = (x - self.mean) / self.std
        if self.erasing is not None:
            x = self.erasing(x)
        return x, self.labels[indices]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        x, y = self.batch(indices)
        return list(zip(x.unbind(0), y.tolist(), strict=True))

    def __getitem__(self, index: int | Sequence[int]) -> tuple[Tensor, int] | tuple[Tensor, Tensor]:
        """``dataset[i]`` → ``(x (C, H, W), y int)``; ``dataset[[i, j, ...]]`` → a :meth:`batch`."""
        if isinstance(index, int | np.integer):
            return self.__getitems__([int(index)])[0]
        return self.batch(index)


def tensor_augmentation(
    augment: Any, mean: Sequence[float]
) -> tuple[BatchAugment | None, Callable | None, Callable | None]:
    """``(batch augment, per-image RandAugment, random erasing)`` for an ``augment`` config section."""
    batch = BatchAugment(
        hflip=augment.hflip,
        degrees=augment.affine_degrees,
        translate=augment.affine_translate,
        scale=augment.affine_scale,
        crop_padding=augment.crop_padding,
    )
    per_image = None
    if augment.auto_augment:
        per_image = rand_augment_transform(augment.auto_augment, {"img_mean": tuple(round(255 * m) for m in mean)})
    erasing = RandomErasing(augment.re_prob, mode="pixel", device="cpu") if augment.re_prob else None
    return (batch if batch.active else None), per_image, erasing


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits: images ``(N, 8, 8)`` in ``[0, 1]`` and labels ``(N,)``.

    Read with numpy from the CSV file scikit-learn ships (what ``load_digits`` reads), because
    importing scikit-learn costs 1.5 s of the default job's start-up; ``load_digits`` is the
    fallback should the file move (a test holds the two equal).
    """
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    return (table[:, :-1].reshape(-1, 8, 8) / 16.0).astype(np.float32), table[:, -1].astype(np.int64)


@functools.lru_cache(maxsize=4)
def digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)`` of scikit-learn's 1,797 digits: a stratified, seeded held-out split.

    The test split holds ``ceil(test_fraction × N)`` images (scikit-learn's count), shared out
    over the classes in proportion to their sizes (largest remainders first); each class's share
    is drawn by a seeded permutation.
    """
    _, labels = _digits_arrays()
    classes, sizes = np.unique(labels, return_counts=True)
    exact = test_fraction * sizes
    quota = np.floor(exact).astype(int)
    extra = math.ceil(test_fraction * len(labels)) - quota.sum()
    quota[np.argsort(quota - exact, kind="stable")[:extra]] += 1
    rng = np.random.default_rng(seed)
    test = [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in zip(classes, quota, strict=True)]
    test_index = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(len(labels)), test_index), test_index


def digits_images(split: str, size: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The digits of one split as images ``(N, 1, size, size)`` in ``[0, 1]`` (bilinear upscale) and labels ``(N,)``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = _digits_arrays()
    index = digits_split(seed)[0 if split == "train" else 1]
    x = torch.from_numpy(images[index])[:, None]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.from_numpy(labels[index])


# --- digits on a cluttered canvas ----------------------------------------------------------


class DigitsCanvas(TensorImageDataset):
    """One real digit at a random place on a larger canvas, among fragments of *other* digits.

    Each canvas (``canvas_size``², 1 channel, black background) holds a scikit-learn digit
    (upscaled 2× or 3×: 16 or 24 px) and clutter: random crops of digits of other classes, pasted
    where they do not touch the digit's box, until the clutter carries at least as much ink as the
    digit. The label is the digit's class. The train and test splits are built from the held-out
    split of :func:`digits_split`, so test digits are never seen in training. Deterministic given
    ``seed``; built with numpy and cached in memory.

    Attributes:
        boxes: LongTensor ``(N, 4)``: the digit's ink box ``(x0, y0, x1, y1)`` in canvas pixels
            (``x1``, ``y1`` exclusive).
        images: uint8 ``(N, 1, S, S)`` un-normalized canvases; :meth:`raw_image` ``(i)`` gives one
            as float in ``[0, 1]``, ``dataset[i]`` gives ``(normalized image, label)``.
        MEAN, STD: the normalization (measured on the default train split).
    """

    MEAN = (0.067,)
    STD = (0.20,)

    def __init__(
        self,
        split: str = "train",
        canvas_size: int = 64,
        seed: int = 0,
        copies: int = 3,
        **augmentation: Any,
    ) -> None:
        if canvas_size < 32:
            raise ValueError(f"canvas_size must be at least 32 (a digit is up to 24 px), got {canvas_size}")
        images, labels, boxes = _build_canvases(split, canvas_size, seed, copies)
        super().__init__(images, labels, self.MEAN, self.STD, class_names=[str(d) for d in range(10)], **augmentation)
        self.boxes = boxes


@functools.lru_cache(maxsize=4)
def _build_canvases(split: str, size: int, seed: int, copies: int) -> tuple[Tensor, Tensor, Tensor]:
    digits, labels = digits_images(split, size=8)
    digits, labels = digits[:, 0].numpy(), labels.numpy()
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, size])
    scaled = {
        s: F.interpolate(torch.from_numpy(digits)[:, None], scale_factor=s, mode="bilinear").clamp(0, 1)[:, 0].numpy()
        for s in (2, 3)
    }
    n = len(labels) * copies
    canvases = np.zeros((n, size, size), np.float32)
    boxes = np.zeros((n, 4), np.int64)
    for i in range(n):
        src = i % len(labels)
        digit = scaled[int(rng.integers(2, 4))][src]
        rows, cols = np.nonzero(digit > 0.05)
        digit = digit[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]  # tight ink box
        h, w = digit.shape
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        canvases[i, y : y + h, x : x + w] = digit
        boxes[i] = (x, y, x + w, y + h)
        _add_clutter(canvases[i], boxes[i], digit.sum(), scaled, labels, labels[src], rng)
    return (
        torch.from_numpy(np.round(canvases * 255).astype(np.uint8))[:, None],
        torch.from_numpy(np.repeat(labels[None], copies, 0).reshape(-1)),
        torch.from_numpy(boxes),
    )


def _add_clutter(
    canvas: np.ndarray,
    box: np.ndarray,
    ink: float,
    scaled: dict,
    labels: np.ndarray,
    label: int,
    rng: np.random.Generator,
    max_pieces: int = 12,
) -> None:
    """Paste crops of other-class digits outside ``box`` (with a 2 px margin) until they hold ``ink``."""
    size = canvas.shape[0]
    others = np.flatnonzero(labels != label)
    x0, y0, x1, y1 = (int(v) for v in box)
    added, tries = 0.0, 0
    while added < ink and tries < 20 * max_pieces:
        tries += 1
        piece_src = scaled[int(rng.integers(2, 4))][others[rng.integers(len(others))]]
        longest = int(0.6 * piece_src.shape[0])  # a fragment, never a whole digit
        ph, pw = (int(rng.integers(5, longest + 1)) for _ in range(2))
        sy, sx = int(rng.integers(0, piece_src.shape[0] - ph + 1)), int(rng.integers(0, piece_src.shape[1] - pw + 1))
        piece = piece_src[sy : sy + ph, sx : sx + pw]
        if piece.sum() < 4.0:  # mostly background: not a stroke
            continue
        y, x = int(rng.integers(0, size - ph + 1)), int(rng.integers(0, size - pw + 1))
        if x < x1 + 2 and x + pw > x0 - 2 and y < y1 + 2 and y + ph > y0 - 2:
            continue
        region = canvas[y : y + ph, x : x + pw]
        added += float(np.maximum(region, piece).sum() - region.sum())
        np.maximum(region, piece, out=region)


# --- CIFAR, fake ---------------------------------------------------------------------------


#: the only globals a CIFAR batch may name: numpy arrays and dtypes (both numpy module layouts)
#: and the codec Python 2 pickles use for byte strings; everything else is refused unrun
_CIFAR_GLOBALS = frozenset(
    {
        *((module, "_reconstruct") for module in ("numpy.core.multiarray", "numpy._core.multiarray")),
        *((module, "scalar") for module in ("numpy.core.multiarray", "numpy._core.multiarray")),
        *((module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, dicts, lists, strings and numbers and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: CIFAR batches hold only numpy arrays, lists, dicts and strings"
            )
        return super().find_class(module, name)


def read_cifar_batch(path: str | Path) -> dict[str, Any]:
    """One CIFAR batch or meta file (Python pickle) read without running code from it.

    Only numpy arrays/dtypes and builtin containers, strings and numbers are admitted, so a
    tampered file fails with a ``ValueError`` naming it instead of executing its payload.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            entry = _CifarUnpickler(handle, encoding="latin1").load()
    except FileNotFoundError:
        raise FileNotFoundError(f"CIFAR file {path} is missing; extract the archive again") from None
    except Exception as err:  # any unpickling failure means a bad or unsafe copy
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"CIFAR file {path} could not be read safely ({reason}); delete it and extract the archive again"
        ) from err
    if not isinstance(entry, dict):
        raise ValueError(f"CIFAR file {path} holds a {type(entry).__name__}, not a dict; extract the archive again")
    return entry


def _cifar(name: str, root: str, train: bool, download: bool) -> tuple[Tensor, Tensor, list[str]]:
    """One CIFAR split as uint8 images ``(N, 3, 32, 32)``, labels ``(N,)`` and class names.

    torchvision's dataset class gives the layout (folder, file names, meta key); the batches are
    read with :func:`read_cifar_batch`, which never runs code stored in them.
    """
    base = {"cifar10": tv_datasets.CIFAR10, "cifar100": tv_datasets.CIFAR100}[name]
    folder = Path(root) / base.base_folder
    if download and not folder.is_dir():  # the archive's md5 is verified by torchvision
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(base.url, root, filename=base.filename, md5=base.tgz_md5)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{name} not found: expected the Python-version batches in {folder} (extract "
            f"{base.filename} from https://www.cs.toronto.edu/~kriz/cifar.html into {root}), "
            "or set data.download=true when online"
        )
    images, labels = [], []
    for file_name, _ in base.train_list if train else base.test_list:
        entry = read_cifar_batch(folder / file_name)
        try:
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(label) for label in entry["labels" if "labels" in entry else "fine_labels"])
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(
                f"CIFAR file {folder / file_name} is not a CIFAR batch ({err!r}); extract it again"
            ) from None
    classes = read_cifar_batch(folder / base.meta["filename"]).get(base.meta["key"])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"CIFAR file {folder / base.meta['filename']} has no list of {base.meta['key']!r}")
    data = np.concatenate(images)
    if len(data) != len(labels):
        raise ValueError(f"{name} files in {folder} hold {len(data)} images but {len(labels)} labels")
    return torch.from_numpy(np.ascontiguousarray(data)), torch.tensor(labels, dtype=torch.long), classes


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
        _cifar(cfg.name, cfg.root, train, cfg.download) for train in (True, False)
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


def build_datasets(cfg: Any) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """``(train_set, test_set, data_config)`` for the ``data`` section of a config."""
    if cfg.name not in _BUILDERS:
        raise ValueError(f"unknown dataset {cfg.name!r}; choose one of: {', '.join(_BUILDERS)}")
    splits = _BUILDERS[cfg.name](cfg)
    if len(splits.classes) < 2:
        raise ValueError(f"data.name={cfg.name} has {len(splits.classes)} class(es); a classifier needs at least 2")
    data_config = {
        "name": cfg.name,
        "img_size": list(splits.size),
        "in_chans": splits.in_chans,
        "mean": [float(m) for m in splits.mean],
        "std": [float(s) for s in splits.std],
        "num_classes": len(splits.classes),
        "class_names": list(splits.classes),
    }
    return splits.train, splits.test, data_config


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
