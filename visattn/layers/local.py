"""Local attention over a CNN feature map: windows (Swin), neighbourhoods (NATTEN) and halo blocks (HaloNet).

Each family is a :class:`~visattn.layers.attention.GridAttention` (1×1 query/key/value
convolutions, 1×1 output convolution ``out``, residual gate ``gamma`` that starts at zero, so the
block is exactly the identity when it is created) whose queries see only a local set of keys,
separable per axis. All three run the one kernel of :mod:`visattn.layers.local_kernel`: tiles of
queries attend the union of their keys in one call of
:func:`visattn.layers.functional.attention`, with a mask (and a relative-position bias). While
:func:`visattn.record_attention` is open they record their weights as full rows over the
``H×W`` key grid (zero outside each query's key set), for all query cells or those of
``queries=``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from .._utils import ArgumentError, check_range
from .attention import AttentionRecord, GateKind, GridAttention, GridAttentionCost
from .local_kernel import AxisPattern, BiasFn, TileGrid, axis_cost, tiled_attention

__all__ = [
    "BlockAxis",
    "HaloAttention2d",
    "HaloRelPos",
    "NeighborhoodAttention2d",
    "NeighborhoodAxis",
    "WindowAttention2d",
    "WindowAxis",
]


# --- the three key patterns, one axis each ------------------------------------------------------


@dataclass(frozen=True)
class WindowAxis(AxisPattern):
    """Windows of ``size`` cells from the start of the axis, moved on by ``shift`` cells: with
    ``shift > 0`` the first window holds cells ``[0, shift)``, then ``[shift, shift + size)``, …,
    the last what is left. A query sees the cells of its window; the windows are the tiles."""

    size: int
    shift: int = 0

    def tiles(self, length: int) -> list[list[int]]:
        starts = [0, *range(self.shift or self.size, length, self.size)]
        return [list(range(a, b)) for a, b in zip(starts, [*starts[1:], length], strict=True)]

    def keys(self, length: int, query: int) -> list[int]:
        start = query - (query - self.shift) % self.size  # negative for the first window when shifted
        return list(range(max(start, 0), min(start + self.size, length)))


@dataclass(frozen=True)
class NeighborhoodAxis(AxisPattern):
    """NATTEN's neighbourhood on one axis: the query at ``i`` sees ``kernel_size`` consecutive
    members of its class ``{c, c + d, …}`` (``c = i mod d``, ``d = dilation``), starting at
    ``clamp(i // d - kernel_size // 2, 0, L_c - kernel_size)``, or its whole class when the class
    has ``L_c <= kernel_size`` members. Tiles are ``tile`` consecutive members of one class."""

    kernel_size: int
    dilation: int = 1
    tile: int = 8

    def tiles(self, length: int) -> list[list[int]]:
        groups = []
        for first in range(min(self.dilation, length)):
            members = list(range(first, length, self.dilation))
            groups += [members[i : i + self.tile] for i in range(0, len(members), self.tile)]
        return groups

    def keys(self, length: int, query: int) -> list[int]:
        members = list(range(query % self.dilation, length, self.dilation))
        if len(members) <= self.kernel_size:
            return members
        start = min(max(query // self.dilation - self.kernel_size // 2, 0), len(members) - self.kernel_size)
        return members[start : start + self.kernel_size]


@dataclass(frozen=True)
class BlockAxis(AxisPattern):
    """HaloNet's blocks on one axis: blocks of ``block`` cells from the start (the last may be
    shorter) are the tiles; a query sees the ``block + 2·halo`` cells around its block,
    ``[start - halo, start + block + halo)``. Cells outside the axis are dropped, or with
    ``zero_keys`` kept as zero keys and values."""

    block: int
    halo: int
    zero_keys: bool = False

    def tiles(self, length: int) -> list[list[int]]:
        return [list(range(a, min(a + self.block, length))) for a in range(0, length, self.block)]

    def keys(self, length: int, query: int) -> list[int]:
        start = query - query % self.block
        cells = range(start - self.halo, start + self.block + self.halo)
        return list(cells) if self.zero_keys else [c for c in cells if 0 <= c < length]


# --- the modules ------------------------------------------------------------------------------


def _pair_index(grid: TileGrid, rows: Tensor, cols: Tensor, width: int) -> Tensor:
    """``rows · width + cols`` for every tile, query and key slot: ``(T, ty·tx, Ry·Rx)`` indices
    into a table flattened from ``(·, width)``."""
    return grid.pair(rows, cols, lambda r, c: r * width + c)


class _LocalAttention2d(GridAttention):
    """A :class:`GridAttention` whose queries see the keys of ``axis`` on each axis (the kernel of
    :mod:`visattn.layers.local_kernel`), with an optional relative-position bias
    (``_relative_bias``, used when ``rel_pos``)."""

    axis: AxisPattern
    rel_pos: bool

    def __init__(
        self,
        channels: int,
        *,
        num_heads: int,
        qk_channels: int | None,
        v_channels: int | None,
        qkv_bias: bool,
        out_bias: bool,
        gate: GateKind,
        attn_drop: float,
        scale: float | None,
    ) -> None:
        if gate not in ("scalar", "channel"):
            raise ArgumentError("gate", f"gate must be 'scalar' or 'channel', got {gate!r}")
        super().__init__(
            channels,
            num_heads=num_heads,
            qk_channels=qk_channels,
            v_channels=v_channels,
            scale=scale,
            qkv_bias=qkv_bias,
            out_bias=out_bias,
            gate=gate,
            attn_drop=attn_drop,
        )

    def _relative_bias(self, q: Tensor, grid: TileGrid) -> Tensor:
        raise NotImplementedError

    def attention_cost(self, height: int, width: int) -> GridAttentionCost:
        """Keys, scores and key cells of the kernel on a ``height × width`` grid (see
        :class:`~visattn.layers.attention.GridAttentionCost`): the tiles' padded and masked slots count."""
        rows, cols = axis_cost(self.axis, height), axis_cost(self.axis, width)
        return GridAttentionCost(
            keys=rows.keys * cols.keys, scores=rows.scores * cols.scores, key_cells=rows.key_cells * cols.key_cells
        )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        to_grid = "b (h d) y x -> b h y x d"
        q, k, v = (rearrange(conv(x), to_grid, h=self.num_heads) for conv in (self.query, self.key, self.value))
        bias_fn = self._relative_bias if self.rel_pos else None
        dropout_p = self.attn_drop if self.training else 0.0
        if self.recording is None:
            y = tiled_attention(q, k, v, self.axis, self.axis, bias_fn=bias_fn, scale=self.scale, dropout_p=dropout_p)
        else:
            y = self._attend_and_record(q, k, v, bias_fn, dropout_p)
        return self._residual(x, rearrange(y, "b h y x d -> b (h d) y x"))

    def _attend_and_record(self, q: Tensor, k: Tensor, v: Tensor, bias_fn: BiasFn | None, dropout_p: float) -> Tensor:
        """The forward's attention while recording: full-grid rows for all or the chosen queries."""
        assert self.recording is not None
        subset = self.recording.query_subset
        batch, heads, height, width = q.shape[:4]
        num_queries = height * width if subset is None else subset.numel()
        self._check_record_size(batch, heads, num_queries, height * width, q.dtype)
        y, weights, key_index = tiled_attention(
            q, k, v, self.axis, self.axis, bias_fn=bias_fn, scale=self.scale, dropout_p=dropout_p,
            need_weights=True, query_subset=subset,
        )  # fmt: skip
        grid = (height, width)
        query_index = None if subset is None else subset.to(q.device)
        record = AttentionRecord(weights, grid, grid, key_index=key_index, query_index=query_index)
        self.recording.sink(self, record)
        return y


class WindowAttention2d(_LocalAttention2d):
    """Swin's window attention (W-MSA, and SW-MSA without the cyclic shift) over a CNN feature map.

    The grid is cut into windows of ``window_size × window_size`` cells starting at the top-left
    cell; each query cell attends the cells of its own window. With ``shift = s > 0`` that grid of
    windows is moved down and right by ``s`` cells: the first row and column of windows are ``s``
    cells tall and wide, the next ``window_size``, the last whatever is left. Windows at the
    bottom and right edges are clipped to the grid: no window mixes cells that are not neighbours
    in the picture (Swin's cyclic shift would wrap the last rows onto the first), and no padded
    cell is ever a key. Any ``H, W >= 1``; a grid smaller than the window is one window.

    With ``rel_pos_bias``, the logit of query ``(qy, qx)`` for key ``(ky, kx)`` gets Swin's
    learned bias ``relative_position_bias_table[(qy - ky + w - 1)·(2w - 1) + (qx - kx + w - 1),
    head]`` (``w = window_size``), indexed exactly as in Swin and timm's ``WindowAttention``, so
    their tables copy across.

    Args:
        channels: ``C`` of the input grid.
        window_size: ``w``, the window's side in cells.
        shift: ``s`` in ``[0, w)``: how far the grid of windows is moved down and right.
        rel_pos_bias: add the learned relative-position bias (table of ``(2w-1)²`` rows, one
            column per head, initialized from a truncated normal of std 0.02 as in timm).
        num_heads: heads; ``qk_channels`` and ``v_channels`` must be multiples of it.
        qk_channels: total query/key width (default ``C // 8``, rounded up to the heads).
        v_channels: total value width (default: ``qk_channels``).
        qkv_bias: bias in the query/key/value convolutions.
        out_bias: bias in the output convolution.
        gate: ``"scalar"`` (one ``γ``) or ``"channel"`` (one per channel), zero at creation.
        attn_drop: dropout on the attention weights.
        scale: multiplies ``q kᵀ``; ``None`` is ``1/sqrt(head width)``.

    Shapes:
        ``(B, C, H, W)`` → ``(B, C, H, W)``.

    Cost: the windows are the kernel's tiles and regions: per head, ``w²`` scores per query cell
    (``H'·W'·w²`` in all, ``H', W'`` the grid rounded up to whole windows), the same for the
    mask (boolean, or a float bias), and every key gathered once.
    """

    def __init__(
        self,
        channels: int,
        window_size: int = 7,
        shift: int = 0,
        rel_pos_bias: bool = True,
        *,
        num_heads: int = 1,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        gate: GateKind = "scalar",
        attn_drop: float = 0.0,
        scale: float | None = None,
    ) -> None:
        check_range("window_size", window_size, at_least=1, integer=True)
        check_range("shift", shift, at_least=0, below=window_size, integer=True)
        super().__init__(
            channels,
            num_heads=num_heads,
            qk_channels=qk_channels,
            v_channels=v_channels,
            qkv_bias=qkv_bias,
            out_bias=out_bias,
            gate=gate,
            attn_drop=attn_drop,
            scale=scale,
        )
        self.window_size, self.shift, self.rel_pos = window_size, shift, rel_pos_bias
        self.axis = WindowAxis(window_size, shift)
        self.relative_position_bias_table = None
        if rel_pos_bias:
            table = torch.empty((2 * window_size - 1) ** 2, num_heads)
            self.relative_position_bias_table = nn.Parameter(nn.init.trunc_normal_(table, std=0.02))

    def _relative_bias(self, q: Tensor, grid: TileGrid) -> Tensor:
        """``(heads, T, ty·tx, Ry·Rx)``: the table's entry for each query-key offset ``q - k``."""
        assert self.relative_position_bias_table is not None
        span = 2 * self.window_size - 1
        rows, cols = ((self.window_size - 1 - axis.offset).clamp(0, span - 1) for axis in grid)
        return self.relative_position_bias_table.t()[:, _pair_index(grid, rows, cols, span)]

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, window_size={self.window_size}, shift={self.shift}, "
            f"num_heads={self.num_heads}, qk_channels={self.qk_channels}, v_channels={self.v_channels}"
        )


class NeighborhoodAttention2d(_LocalAttention2d):
    """Neighbourhood attention (NATTEN's ``na2d``) over a CNN feature map.

    Each query cell attends the ``kernel_size × kernel_size`` window centred on it, shifted to
    stay inside the grid, so every query sees ``kernel_size²`` keys. Per axis of length ``L``,
    with ``d = dilation``: the query at ``i`` belongs to the class ``c = i mod d`` of positions
    ``c, c + d, c + 2d, …`` (``L_c`` of them), is the ``t = i // d``-th member of it, and sees
    the ``kernel_size`` consecutive members starting at ``clamp(t - kernel_size // 2, 0,
    L_c - kernel_size)``. If its class has fewer than ``kernel_size`` members (the axis is
    shorter than ``kernel_size · d``), the query sees every member of its class on that axis
    (NATTEN refuses such inputs). Any ``H, W >= 1``.

    With ``rel_pos_bias``, the logit of query ``(qy, qx)`` for key ``(ky, kx)`` gets NATTEN's
    ``rpb[head, (ky - qy) / d + k - 1, (kx - qx) / d + k - 1]`` (``k = kernel_size``).

    Args:
        channels: ``C`` of the input grid.
        kernel_size: ``k``, odd and at least 1: the window's side in keys.
        dilation: ``d >= 1``: the step between the keys of a window.
        rel_pos_bias: add the learned relative-position bias ``rpb`` ``(heads, 2k-1, 2k-1)``
            (initialized from a truncated normal of std 0.02, as NATTEN does).
        num_heads: heads; ``qk_channels`` and ``v_channels`` must be multiples of it.
        qk_channels: total query/key width (default ``C // 8``, rounded up to the heads).
        v_channels: total value width (default: ``qk_channels``).
        qkv_bias: bias in the query/key/value convolutions.
        out_bias: bias in the output convolution.
        gate: ``"scalar"`` (one ``γ``) or ``"channel"`` (one per channel), zero at creation.
        attn_drop: dropout on the attention weights.
        scale: multiplies ``q kᵀ``; ``None`` is ``1/sqrt(head width)``.

    Shapes:
        ``(B, C, H, W)`` → ``(B, C, H, W)``.

    Cost: queries are tiled ``(k + 1) × (k + 1)`` (``8 × 8`` for ``k = 7``) among the members
    of one class per axis, and a tile's keys are the union of its queries' windows: at most
    ``2k`` members per axis. So each query computes at most ``4k²`` scores per head, ``k²`` of
    them kept (the mask or bias is as large), and the gathered keys are about ``(2k / (k + 1))²``
    times the grid (3 for ``k = 7``; each key lies in the regions of at most two tiles per
    axis), never ``k²`` copies per query. Smaller tiles waste fewer scores but gather keys more
    often, larger ones the reverse; ``k + 1`` balances the two (a count of scores and copies,
    not a timing). Forward and backward run on CPU and GPU.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        dilation: int = 1,
        rel_pos_bias: bool = True,
        *,
        num_heads: int = 1,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        gate: GateKind = "scalar",
        attn_drop: float = 0.0,
        scale: float | None = None,
    ) -> None:
        check_range("kernel_size", kernel_size, at_least=1, integer=True)
        if kernel_size % 2 == 0:
            raise ArgumentError(
                "kernel_size",
                f"kernel_size={kernel_size} is not valid: it must be an odd integer >= 1 (windows are centred)",
            )
        check_range("dilation", dilation, at_least=1, integer=True)
        super().__init__(
            channels,
            num_heads=num_heads,
            qk_channels=qk_channels,
            v_channels=v_channels,
            qkv_bias=qkv_bias,
            out_bias=out_bias,
            gate=gate,
            attn_drop=attn_drop,
            scale=scale,
        )
        self.kernel_size, self.dilation, self.rel_pos = kernel_size, dilation, rel_pos_bias
        self.axis = NeighborhoodAxis(kernel_size, dilation, tile=kernel_size + 1)
        self.rpb = None
        if rel_pos_bias:
            table = torch.empty(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1)
            self.rpb = nn.Parameter(nn.init.trunc_normal_(table, std=0.02))

    def _relative_bias(self, q: Tensor, grid: TileGrid) -> Tensor:
        """``(heads, T, ty·tx, Ry·Rx)``: ``rpb`` at each key-query offset over the dilation."""
        assert self.rpb is not None
        span = 2 * self.kernel_size - 1
        rows, cols = ((axis.offset // self.dilation + self.kernel_size - 1).clamp(0, span - 1) for axis in grid)
        return self.rpb.flatten(1)[:, _pair_index(grid, rows, cols, span)]

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
            f"num_heads={self.num_heads}, qk_channels={self.qk_channels}, v_channels={self.v_channels}"
        )


class HaloRelPos(nn.Module):
    """HaloNet's relative logits (timm's ``PosEmbedRel``): the query ``q`` at ``(qy, qx)`` gets
    ``q · height_rel[ky - qy + halo + w - 1] + q · width_rel[kx - qx + halo + w - 1]`` for the key
    ``(ky, kx)`` (``w = block + 2·halo``); both tables ``(2w - 1, head width)`` are shared by the
    heads and initialized from a truncated normal of std ``head width ** -0.5``, as in timm.

    Args:
        window: ``w``, the side of a block's key window.
        halo: the halo in cells.
        head_dim: the query width of one head.
    """

    def __init__(self, window: int, halo: int, head_dim: int) -> None:
        super().__init__()
        self.shift = halo + window - 1
        self.height_rel = nn.Parameter(torch.empty(2 * window - 1, head_dim))
        self.width_rel = nn.Parameter(torch.empty(2 * window - 1, head_dim))
        for table in (self.height_rel, self.width_rel):
            nn.init.trunc_normal_(table, std=head_dim**-0.5)

    def forward(self, q: Tensor, grid: TileGrid) -> Tensor:
        """The logits ``(B, heads, T, ty·tx, Ry·Rx)`` of the queries per tile ``q`` ``(B, heads, T, ty·tx, d)``."""
        span = self.height_rel.shape[0]
        rows, cols = ((axis.offset + self.shift).clamp(0, span - 1) for axis in grid)

        def along(table: Tensor, index: Tensor) -> Tensor:  # index (T, ty·tx, R) → (B, heads, T, ty·tx, R)
            logits = q @ table.t()
            return logits.gather(-1, index.expand(*logits.shape[:-1], index.shape[-1]))

        along_rows = along(self.height_rel, grid.spread_rows(rows))
        along_cols = along(self.width_rel, grid.spread_cols(cols))
        return (along_rows[..., :, None] + along_cols[..., None, :]).flatten(-2)


class HaloAttention2d(_LocalAttention2d):
    """HaloNet's blocked local attention (Vaswani et al. 2021; timm's ``HaloAttn``) over a CNN feature map.

    The grid is cut into blocks of ``block_size × block_size`` query cells from the top-left (the
    last block on an axis is shorter when the size is not a multiple); every query of a block
    attends the ``(block_size + 2·halo_size)²`` window around its block: rows
    ``[y0 - halo, y0 + block + halo)`` × columns ``[x0 - halo, x0 + block + halo)`` for the
    block at ``(y0, x0)``. Any ``H, W >= 1``.

    ``border`` says what the window holds outside the picture:

    - ``"masked"``: nothing: only cells of the picture are keys.
    - ``"zero"``: zero keys and values that take part in the softmax (their logit is the
      relative logit alone), which is what timm's ``HaloAttn`` computes by zero-padding its
      key/value map. On a grid that is not whole blocks, every cell of a short last block's
      window past the picture is such a zero key too, as if the key/value map were zero-padded
      to whole blocks before timm's arithmetic; the padded queries are dropped. Recorded rows
      then hold only the weights of cells of the picture and sum to less than one.

    With ``rel_pos``, :class:`HaloRelPos` adds timm's query-dependent relative logits, unscaled
    (timm's default ``scale_pos_embed=False``). Its tables are ``pos_embed.height_rel`` and
    ``pos_embed.width_rel``, timm's names. timm's ``q`` convolution is ``query``; its ``kv``
    convolution holds, per head, the head's key channels then its value channels (split them
    into ``key`` and ``value``); timm has no output convolution (make ``out`` the identity).

    Args:
        channels: ``C`` of the input grid.
        block_size: ``b``, the side of a block of queries.
        halo_size: ``h >= 0``, how far the key window reaches past the block on each side.
        border: ``"masked"`` or ``"zero"`` (above).
        rel_pos: add the relative logits of :class:`HaloRelPos`.
        num_heads: heads; ``qk_channels`` and ``v_channels`` must be multiples of it.
        qk_channels: total query/key width (default ``C // 8``, rounded up to the heads).
        v_channels: total value width (default: ``qk_channels``).
        qkv_bias: bias in the query/key/value convolutions.
        out_bias: bias in the output convolution.
        gate: ``"scalar"`` (one ``γ``) or ``"channel"`` (one per channel), zero at creation.
        attn_drop: dropout on the attention weights.
        scale: multiplies ``q kᵀ`` (not the relative logits); ``None`` is ``1/sqrt(head width)``.

    Shapes:
        ``(B, C, H, W)`` → ``(B, C, H, W)``.

    Cost: the blocks are the kernel's tiles, their windows its regions: per head, ``(b + 2h)²``
    scores per query (196 for ``b = 8, h = 3``), the same for the mask or logits, and the
    gathered keys are ``((b + 2h) / b)²`` times the grid (about 3 for ``b = 8, h = 3``). The
    relative logits add two ``(2(b + 2h) - 1)``-wide products per query.
    """

    def __init__(
        self,
        channels: int,
        block_size: int = 8,
        halo_size: int = 3,
        border: Literal["masked", "zero"] = "masked",
        rel_pos: bool = True,
        *,
        num_heads: int = 1,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        gate: GateKind = "scalar",
        attn_drop: float = 0.0,
        scale: float | None = None,
    ) -> None:
        check_range("block_size", block_size, at_least=1, integer=True)
        check_range("halo_size", halo_size, at_least=0, integer=True)
        if border not in ("masked", "zero"):
            raise ArgumentError("border", f"border must be 'masked' or 'zero', got {border!r}")
        super().__init__(
            channels,
            num_heads=num_heads,
            qk_channels=qk_channels,
            v_channels=v_channels,
            qkv_bias=qkv_bias,
            out_bias=out_bias,
            gate=gate,
            attn_drop=attn_drop,
            scale=scale,
        )
        self.block_size, self.halo_size, self.border, self.rel_pos = block_size, halo_size, border, rel_pos
        self.axis = BlockAxis(block_size, halo_size, zero_keys=border == "zero")
        window = block_size + 2 * halo_size
        self.pos_embed = HaloRelPos(window, halo_size, self.qk_channels // num_heads) if rel_pos else None

    def _relative_bias(self, q: Tensor, grid: TileGrid) -> Tensor:
        assert self.pos_embed is not None
        return self.pos_embed(q, grid)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, block_size={self.block_size}, halo_size={self.halo_size}, "
            f"border={self.border}, num_heads={self.num_heads}, qk_channels={self.qk_channels}, "
            f"v_channels={self.v_channels}"
        )
