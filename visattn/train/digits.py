"""scikit-learn's digits: a seeded, stratified held-out split, and digits on a cluttered canvas.

`digits_split` and `digits_images` give the 1,797 digits' train and test splits as images;
`DigitsCanvas` puts one held-out-split digit at a random place on a larger canvas among fragments
of other digits, with the digit's box, for checking where a model looks.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .tensor_dataset import TensorImageDataset

__all__ = ["DigitsCanvas", "digits_images", "digits_split"]


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
    digit_images, digit_labels = digits_images(split, size=8)
    digits, labels = digit_images[:, 0].numpy(), digit_labels.numpy()
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
