"""Images held in memory as one tensor, served and augmented a whole batch at a time.

`TensorImageDataset` holds `(N, C, H, W)` images and their labels and gives normalized,
augmented batches `(x (B, C, H, W), y (B,))`; `tensor_augmentation` makes its augmentation
steps from a config's `augment` section. The digits, the digit canvases and CIFAR are held
this way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image

from .augment import BatchAugment

__all__ = ["TensorImageDataset", "tensor_augmentation"]


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
