"""Augmentation of a whole batch at once, for datasets that live in memory as tensors.

:class:`BatchAugment` draws an independent random crop offset, flip, rotation, scale and
translation for every image of a batch, composes them into one affine map per image and
resamples the batch with a single ``affine_grid`` / ``grid_sample`` call: no Python loop over
images, no PIL. The geometry is torchvision's: for the same parameters the result equals
``torchvision.transforms.v2.functional.affine`` (bilinear, zero fill) after ``horizontal_flip``
(tested), and a crop equals a zero-padded crop. Because crop, flip and affine are one resampling,
an image that is both cropped and rotated reads its corners from the picture where a sequential
pipeline would read the padding's zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AffineParams", "BatchAugment"]


@dataclass
class AffineParams:
    """Per-image parameters ``(B,)`` / ``(B, 2)`` of one draw of :class:`BatchAugment`.

    Attributes:
        angle: rotation in degrees, counter-clockwise (torchvision's convention).
        scale: zoom factor (``> 1`` enlarges the content).
        translate: ``(B, 2)`` shift ``(dx, dy)`` of the content in pixels.
        flip: horizontal flip (applied before the rotation, as in torchvision pipelines).
        crop: ``(B, 2)`` offset ``(x, y)`` of a zero-padded random crop relative to the centred
            one, in pixels (applied first).
    """

    angle: Tensor
    scale: Tensor
    translate: Tensor
    flip: Tensor
    crop: Tensor


@dataclass
class BatchAugment:
    """Random flip, crop and affine transform of a batch ``(B, C, H, W)`` → ``(B, C, H, W)``.

    Args:
        hflip: probability of a horizontal flip.
        degrees: rotation drawn uniformly from ``[-degrees, degrees]``.
        translate: shift drawn uniformly from ``[-translate, translate]`` × the image side.
        scale: zoom drawn uniformly from ``[1 - scale, 1 + scale]``.
        crop_padding: CIFAR-style random crop after zero padding by this many pixels (an
            integer shift in ``[-crop_padding, crop_padding]`` on each axis).
    """

    hflip: float = 0.0
    degrees: float = 0.0
    translate: float = 0.0
    scale: float = 0.0
    crop_padding: int = 0

    @property
    def active(self) -> bool:
        """Whether any transform is switched on (otherwise :meth:`__call__` returns its input)."""
        return bool(self.hflip or self.degrees or self.translate or self.scale or self.crop_padding)

    def sample(self, batch: int, height: int, width: int, generator: torch.Generator | None = None) -> AffineParams:
        """Draw the parameters of ``batch`` images of ``height × width`` (global RNG by default)."""

        def uniform(bound: float, *shape: int) -> Tensor:
            return (torch.rand(batch, *shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound

        side = torch.tensor([width, height], dtype=torch.float64)
        crop = torch.randint(-self.crop_padding, self.crop_padding + 1, (batch, 2), generator=generator)
        return AffineParams(
            angle=uniform(self.degrees),
            scale=1 + uniform(self.scale),
            translate=uniform(self.translate, 2) * side,
            flip=torch.rand(batch, generator=generator) < self.hflip,
            crop=crop.double(),
        )

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment ``images`` (float ``(B, C, H, W)``); each image gets its own parameters."""
        if not self.active:
            return images
        height, width = images.shape[-2:]
        params = self.sample(images.shape[0], height, width, generator)
        return apply_affine(images, params)


def sampling_matrices(params: AffineParams, height: int, width: int) -> Tensor:
    """The ``(B, 2, 3)`` matrices for :func:`torch.nn.functional.affine_grid` (``align_corners=False``).

    Each maps an output pixel to the input pixel it is read from, in coordinates centred on the
    image and normalized to ``[-1, 1]``: crop ∘ flip ∘ affine⁻¹, torchvision's inverse affine.
    """
    rad = torch.deg2rad(params.angle)
    cos, sin = torch.cos(rad) / params.scale, torch.sin(rad) / params.scale
    inverse = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # (B, 2, 2)
    offset = -(inverse @ params.translate.unsqueeze(-1)).squeeze(-1)
    mirror = torch.where(params.flip, -1.0, 1.0).to(inverse.dtype)
    inverse = inverse * torch.stack([mirror, torch.ones_like(mirror)], -1).unsqueeze(-1)
    offset = offset * torch.stack([mirror, torch.ones_like(mirror)], -1) + params.crop
    # pixels (centred) → normalized: divide by half the side on input, multiply on output
    half = torch.tensor([width / 2, height / 2], dtype=inverse.dtype)
    linear = inverse * half[None, None, :] / half[None, :, None]
    return torch.cat([linear, (offset / half).unsqueeze(-1)], dim=-1)


def apply_affine(images: Tensor, params: AffineParams) -> Tensor:
    """Resample ``images`` ``(B, C, H, W)`` with the draw ``params`` (bilinear, zeros outside)."""
    height, width = images.shape[-2:]
    theta = sampling_matrices(params, height, width).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
