"""Token stems: an image cut into non-overlapping patches, each projected to a token
(:class:`PatchEmbed`), or a small stack of strided convolutions with the same token grid
(:class:`ConvStem`)."""

from __future__ import annotations

from typing import Protocol

from einops import rearrange
from torch import Tensor, nn

from .._utils import check_images, to_pair

__all__ = ["ConvStem", "PatchEmbed", "TokenStem"]


class TokenStem(Protocol):
    """What a `VisionTransformer` asks of its token stem (a module): `PatchEmbed`, `ConvStem`,
    a `HybridViT`'s CNN, or any ``embed_layer`` with these members.

    Attributes:
        in_chans: image channels it takes.
        patch_size: ``(ph, pw)``, the input pixels per token along each side.
    """

    in_chans: int
    patch_size: tuple[int, int]

    def tokenize(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images ``(B, C, H, W)`` → tokens ``(B, gh·gw, D)`` and their grid ``(gh, gw)``."""
        ...

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The token grid ``(gh, gw)`` for an input of ``height × width``."""
        ...


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
        self.proj: nn.Module = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

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
        check_images(x, self.in_chans, next(self.proj.parameters()))
        self.grid_size(*x.shape[-2:])
        return rearrange(self.proj(x), "b d gh gw -> b (gh gw) d")


class ConvStem(PatchEmbed):
    """A convolutional stem after Xiao et al. 2021 ("Early Convolutions Help Transformers See
    Better"): ``log2(p)`` stride-2 convolutions, each followed by BatchNorm and ReLU, then a 1×1
    convolution to the token width. Same token grid as ``PatchEmbed(p)`` — so the same maps,
    positions and checks —, but each token sees an overlapping neighbourhood of its patch through
    a non-linear filter bank instead of one linear projection of the patch alone.

    The kernels are 4×4 with padding 1 (Xiao et al. use 3×3): an even kernel at stride 2 is
    centred on the 2×2 block it reduces, so every token's window (``3p - 2`` pixels wide) is
    centred on its patch, and a map drawn on the patch grid lies where the token looked. Widths
    double towards ``embed_dim``: for ``p = 8``, ``D = 64``: 16, 32, 64 channels (at least 8).

    Shapes:
        ``(B, C, H, W)`` → tokens ``(B, (H/p)·(W/p), D)``; ``p`` a power of two, both sides
        multiples of it.
    """

    def __init__(self, patch_size: int | tuple[int, int] = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__(patch_size, in_chans, embed_dim)
        side = self.patch_size[0]
        if self.patch_size[1] != side or side < 2 or side & (side - 1):
            raise ValueError(f"a convolutional stem needs a square power-of-two patch (2, 4, 8, 16), got {patch_size}")
        layers = side.bit_length() - 1
        widths = [max(8, embed_dim >> (layers - 1 - i)) for i in range(layers)]
        convs: list[nn.Module] = []
        for before, width in zip([in_chans, *widths[:-1]], widths, strict=True):
            convs += [nn.Conv2d(before, width, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        self.proj = nn.Sequential(*convs, nn.Conv2d(widths[-1], embed_dim, 1))
