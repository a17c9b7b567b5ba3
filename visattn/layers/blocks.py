"""The Transformer encoder block (pre- or post-norm) around :class:`MultiHeadAttention`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from timm.layers import DropPath, LayerScale, Mlp
from torch import Tensor, nn

from .._utils import check_probabilities, check_range
from .attention import MultiHeadAttention

__all__ = ["EncoderBlock"]


class EncoderBlock(nn.Module):
    """Multi-head self-attention → residual → LayerNorm → MLP → residual → LayerNorm.

    ``norm="post"`` is exactly that order (Vaswani et al. 2017)::

        x = norm1(x + drop_path(ls1(attn(x))))
        x = norm2(x + drop_path(ls2(mlp(x))))

    ``norm="pre"`` puts each LayerNorm before its sub-layer (ViT, timm ``Block``)::

        x = x + drop_path(ls1(attn(norm1(x))))
        x = x + drop_path(ls2(mlp(norm2(x))))

    Parameter names follow timm's ``Block`` (``norm1``, ``attn``, ``ls1``, ``norm2``, ``mlp``,
    ``ls2``).

    Args:
        dim: token width ``D``.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP is ``mlp_ratio · D``.
        norm: ``"pre"`` or ``"post"``.
        qkv_bias, qk_norm: see :class:`MultiHeadAttention`.
        proj_drop: dropout after the attention projection and inside the MLP.
        attn_drop: dropout on the attention weights.
        drop_path: stochastic-depth probability of each residual branch (timm ``DropPath``).
        layer_scale: initial value of a learnable per-channel scale on each branch (CaiT);
            ``None`` for none.
        act_layer: activation of the MLP.
        norm_layer: normalization layer.

    Shapes:
        ``(B, N, D)`` → ``(B, N, D)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        norm: Literal["pre", "post"] = "pre",
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {norm!r}")
        check_range("mlp_ratio", mlp_ratio, above=0)
        check_probabilities(drop_path=drop_path)
        self.norm = norm
        self.norm1 = norm_layer(dim)
        self.attn = MultiHeadAttention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            norm_layer=norm_layer,
        )
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        # timm annotates act_layer as a class, but only calls it: a factory (a partial) works as well
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)  # type: ignore[arg-type]
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """`x` `(B, N, D)`; `attn_mask` as in `MultiHeadAttention.forward` (timm's signature)."""
        if self.norm == "pre":
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        x = self.norm1(x + self.drop_path1(self.ls1(self.attn(x, attn_mask=attn_mask))))
        return self.norm2(x + self.drop_path2(self.ls2(self.mlp(x))))
