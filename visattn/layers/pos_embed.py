"""Positional embeddings for token grids: fixed 2D sin-cos, and resampling of learned ones."""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor

__all__ = ["resample_pos_embed", "sincos_2d"]


def sincos_2d(
    height: int,
    width: int,
    dim: int,
    *,
    temperature: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Fixed 2D sin-cos positional embedding (MoCo v3 / MAE / "Simple ViT" form).

    The first half of the channels encodes the row ``y``, the second half the column ``x``;
    each half is ``[sin(p·ω), cos(p·ω)]`` over ``dim/4`` frequencies
    ``ω_i = temperature^(-i / (dim/4))``. ``dim`` that is not a multiple of 4 is zero-padded.

    Returns:
        ``(height·width, dim)``, row-major over the grid (token ``y·width + x``).
    """
    quarter = dim // 4
    if quarter == 0:
        return torch.zeros(height * width, dim, device=device, dtype=dtype)
    omega = torch.arange(quarter, device=device, dtype=torch.float64) / quarter
    omega = 1.0 / temperature**omega
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float64),
        torch.arange(width, device=device, dtype=torch.float64),
        indexing="ij",
    )
    y_angles = ys.flatten()[:, None] * omega[None]
    x_angles = xs.flatten()[:, None] * omega[None]
    emb = torch.cat([y_angles.sin(), y_angles.cos(), x_angles.sin(), x_angles.cos()], dim=1)
    if emb.shape[1] < dim:
        emb = torch.nn.functional.pad(emb, (0, dim - emb.shape[1]))
    return emb.to(dtype)


def resample_pos_embed(
    pos_embed: Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int],
    num_prefix_tokens: int = 0,
    antialias: bool = True,
) -> Tensor:
    """Resample a learned embedding ``(1, prefix + gh·gw, D)`` to another grid.

    Bicubic, computed in float32 (timm's ``resample_abs_pos_embed``), with PyTorch's antialiased
    kernel or, with ``antialias=False``, its plain one (what Hugging Face's ViT, DeiT and DINOv2
    use); the prefix (class/register) tokens are kept apart and unchanged. Returns
    ``(1, prefix + new_h·new_w, D)``; the input itself when the grid is unchanged.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    return resample_abs_pos_embed(
        pos_embed,
        new_size=list(new_grid),
        old_size=list(old_grid),
        num_prefix_tokens=num_prefix_tokens,
        interpolation="bicubic",
        antialias=antialias,
    )
