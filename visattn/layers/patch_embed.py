"""Patch embedding: an image cut into non-overlapping patches, each projected to a token."""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from .._utils import check_images, to_pair

__all__ = ["PatchEmbed"]


class PatchEmbed(nn.Module):
    """Cut an image into non-overlapping patches and project each to a token (one strided conv).

    Shapes:
        ``(B, C, H, W)`` → tokens ``(B, (H/p)·(W/p), D)``; both sides must be multiples of the
        patch size ``p``.
    """

    def __init__(self, patch_size: int | tuple[int, int] = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = to_pair(patch_size)
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def tokenize(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images → tokens ``(B, gh·gw, D)`` and their grid ``(gh, gw)`` (the token-stem interface)."""
        return self(x), self.grid_size(*x.shape[-2:])

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The token grid ``(gh, gw)`` for an input of ``height × width``; raises if it does not tile."""
        ph, pw = self.patch_size
        if height % ph or width % pw:

            def nearest(side: int, patch: int) -> str:
                lower = max(patch, side // patch * patch)
                return f"{lower} or {lower + patch}" if lower != side else str(side)

            raise ValueError(
                f"input size {height}×{width} is not a multiple of the patch size {ph}×{pw}; "
                f"nearest valid sizes: height {nearest(height, ph)}, width {nearest(width, pw)} "
                "(resize or crop the image)"
            )
        return height // ph, width // pw

    def forward(self, x: Tensor) -> Tensor:
        check_images(x, self.in_chans)
        self.grid_size(*x.shape[-2:])
        return rearrange(self.proj(x), "b d gh gw -> b (gh gw) d")
