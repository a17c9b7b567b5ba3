"""Local attention on a grid by tiles: the one kernel of the window, neighbourhood and halo families.

Each family's key sets are separable per axis: the query at ``(i, j)`` attends the keys
``{(r, c) : r ∈ S_y(i), c ∈ S_x(j)}``, where an :class:`AxisPattern` gives ``S_y`` and ``S_x``
and how the queries of one axis are grouped into tiles. :func:`tiled_attention` cuts the
queries into tiles (a group of rows × a group of columns), gathers for each tile the union of its
queries' keys on each axis (the region, padded to one length ``R`` per axis) and runs **one**
call of :func:`visattn.layers.functional.attention` on ``(B, heads, tiles, ty·tx, Ry·Rx)``
tensors, with a mask that is the outer product of the per-axis membership masks (boolean, or
additive float: ``-inf`` outside the key set plus a relative-position bias).

Cost: ``O(H·W·Ry·Rx)`` time and memory per head (scores, mask and gathered keys), never
``O((H·W)²)``; each key is gathered once per tile whose region holds it, not once per query.

The index tensors are built from Python ints only (the grid size and the pattern's parameters),
so the kernel runs under ``torch.compile(fullgraph=True)`` and exports with
``torch.onnx.export(dynamo=True)`` at a fixed grid size. The per-axis tables are cached as Python
tuples; their tensors are built on the input's device at each call (a few hundred integers).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, cast, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import attention, attention_weights

__all__ = ["AxisCost", "AxisPattern", "AxisTiles", "TileGrid", "axis_cost", "tiled_attention"]


class AxisPattern:
    """One axis of a separable local key pattern: which key coordinates each query sees, and how
    the queries are grouped into tiles.

    Subclasses are frozen dataclasses (hashable: the kernel caches each axis's tables by pattern
    and length).
    """

    def tiles(self, length: int) -> list[list[int]]:
        """The query coordinates of each tile on an axis of ``length`` cells; every coordinate
        lies in exactly one tile."""
        raise NotImplementedError

    def keys(self, length: int, query: int) -> list[int]:
        """The key coordinates the query at ``query`` sees on this axis, ascending. Coordinates
        outside ``[0, length)`` are zero keys and values that take part in the softmax."""
        raise NotImplementedError


@dataclass(frozen=True)
class _AxisTable:
    """One axis's tiling as Python tuples (``n`` tiles of ``t`` query slots and ``R`` key slots)."""

    queries: tuple[tuple[int, ...], ...]  # (n, t) coordinates; `length` (the zero row) for a padded slot
    keys: tuple[tuple[int, ...], ...]  # (n, R) coordinates inside the grid, -1 elsewhere (zero key, padding)
    member: tuple[tuple[tuple[bool, ...], ...], ...]  # (n, t, R): the slot's query sees the key
    offset: tuple[tuple[tuple[int, ...], ...], ...]  # (n, t, R) key - query coordinate (0 on a padded slot)
    inverse: tuple[int, ...]  # (length,) slot (tile · t + index) of each query coordinate


def _padded(values: list, size: int, fill: object) -> tuple:
    return tuple(values) + (fill,) * (size - len(values))


@functools.lru_cache(maxsize=256)
def _axis_table(pattern: AxisPattern, length: int) -> _AxisTable:
    """The tables of ``pattern`` on an axis of ``length`` cells. A padded query slot copies the
    key set of its tile's first query (its output is dropped; its row is never empty)."""
    groups = pattern.tiles(length)
    key_sets = [pattern.keys(length, query) for query in range(length)]
    regions = [sorted({c for query in group for c in key_sets[query]}) for group in groups]
    t, r = max(map(len, groups)), max(map(len, regions))
    inverse = [0] * length
    member, offset = [], []
    for n, (group, region) in enumerate(zip(groups, regions, strict=True)):
        for slot, query in enumerate(group):
            inverse[query] = n * t + slot
        rows = _padded(group, t, group[0])
        member.append(tuple(_padded([c in key_sets[q] for c in region], r, False) for q in rows))
        offset.append(tuple(_padded([c - q for c in region], r, 0) for q in rows))
    return _AxisTable(
        queries=tuple(_padded(group, t, length) for group in groups),
        keys=tuple(_padded([c if 0 <= c < length else -1 for c in region], r, -1) for region in regions),
        member=tuple(member),
        offset=tuple(offset),
        inverse=tuple(inverse),
    )


class AxisCost(NamedTuple):
    """What one axis contributes to the kernel's cost (the grid's is the product of its two axes').

    Attributes:
        keys: the most key coordinates a query sees on the axis.
        scores: query slots × key slots summed over the tiles (padded and masked ones included:
            the kernel computes them).
        key_cells: key slots summed over the tiles (how many cells it gathers).
    """

    keys: int
    scores: int
    key_cells: int


def axis_cost(pattern: AxisPattern, length: int) -> AxisCost:
    """The :class:`AxisCost` of ``pattern`` on an axis of ``length`` cells."""
    table = _axis_table(pattern, length)
    tiles, query_slots, key_slots = len(table.queries), len(table.queries[0]), len(table.keys[0])
    keys = max(sum(row) for tile in table.member for row in tile)
    return AxisCost(keys=keys, scores=tiles * query_slots * key_slots, key_cells=tiles * key_slots)


class AxisTiles(NamedTuple):
    """One axis's tiling as tensors on the input's device (``n`` tiles, ``t`` query slots, ``R`` key slots).

    Attributes:
        queries: ``(n, t)`` long: the coordinate gathered into each query slot (``length``, a
            zero row, for a padded slot).
        keys: ``(n, R)`` long: the coordinate of each key slot inside the grid, ``-1`` elsewhere.
        gather: ``(n, R)`` long: the row gathered into each key slot (``length``, a zero row,
            for a slot outside the grid or a padded one).
        member: ``(n, t, R)`` bool: the slot's query sees the key (a zero key outside the grid
            included).
        offset: ``(n, t, R)`` long: key coordinate minus query coordinate.
        inverse: ``(length,)`` long: the slot ``tile · t + index`` of each query coordinate.
    """

    queries: Tensor
    keys: Tensor
    gather: Tensor
    member: Tensor
    offset: Tensor
    inverse: Tensor

    @classmethod
    def of(cls, pattern: AxisPattern, length: int, device: torch.device) -> AxisTiles:
        """The tiles of ``pattern`` on an axis of ``length`` cells, on ``device``."""
        # under torch.compile the builder is traced (its tables become constants of the graph) rather
        # than looked up in the cache, which dynamo would skip with a warning
        table = (
            _axis_table.__wrapped__(pattern, length) if torch.compiler.is_compiling() else _axis_table(pattern, length)
        )

        def tensor(values: tuple, dtype: torch.dtype = torch.long) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        keys = tensor(table.keys)
        return cls(
            queries=tensor(table.queries),
            keys=keys,
            gather=torch.where(keys < 0, length, keys),
            member=tensor(table.member, torch.bool),
            offset=tensor(table.offset),
            inverse=tensor(table.inverse),
        )


class TileGrid(NamedTuple):
    """The 2-D tiling of one call: tiles ``T = ny·nx`` of ``ty·tx`` queries, regions of ``Ry·Rx`` keys.

    A bias function (see :func:`tiled_attention`) reads the per-axis tables (``rows.offset``,
    ``cols.offset``) and lays them out per tile with :meth:`pair`, :meth:`spread_rows` and
    :meth:`spread_cols`.
    """

    rows: AxisTiles
    cols: AxisTiles

    def pair(self, along_rows: Tensor, along_cols: Tensor, combine: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """``combine(a_y, a_x)`` of a row table ``(ny, ty, Ry)`` and a column table ``(nx, tx, Rx)``
        for every tile, query and key: ``(T, ty·tx, Ry·Rx)`` (``ty = tx = 1`` gives ``(T, 1, Ry·Rx)``)."""
        grid = combine(along_rows[:, None, :, None, :, None], along_cols[None, :, None, :, None, :])
        ny, nx, a, b, ry, rx = grid.shape
        return grid.reshape(ny * nx, a * b, ry * rx)

    def spread_rows(self, along_rows: Tensor) -> Tensor:
        """A row table ``(ny, ty, Ry)`` for every tile and query: ``(T, ty·tx, Ry)``."""
        (ny, ty, ry), (nx, tx, _) = along_rows.shape, self.cols.member.shape
        return along_rows[:, None, :, None, :].expand(ny, nx, ty, tx, ry).reshape(ny * nx, ty * tx, ry)

    def spread_cols(self, along_cols: Tensor) -> Tensor:
        """A column table ``(nx, tx, Rx)`` for every tile and query: ``(T, ty·tx, Rx)``."""
        (ny, ty, _), (nx, tx, rx) = self.rows.member.shape, along_cols.shape
        return along_cols[None, :, None, :, :].expand(ny, nx, ty, tx, rx).reshape(ny * nx, ty * tx, rx)

    def gather(self, x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """``x`` ``(B, heads, H, W, d)`` at the coordinates ``rows`` ``(ny, a)`` × ``cols`` ``(nx, b)``
        (``H``/``W`` for a zero row/column): ``(B, heads, T, a·b, d)``."""
        x = F.pad(x, (0, 0, 0, 1, 0, 1))
        x = x.index_select(2, rows.flatten()).index_select(3, cols.flatten())
        (ny, a), (nx, b) = rows.shape, cols.shape
        x = x.reshape(*x.shape[:2], ny, a, nx, b, x.shape[-1]).transpose(3, 4)
        return x.reshape(*x.shape[:2], ny * nx, a * b, x.shape[-1])

    def untile(self, x: Tensor) -> Tensor:
        """Per-tile rows ``(..., T, ty·tx, X)`` → per-cell rows ``(..., H, W, X)`` (padded slots dropped)."""
        (ny, ty, _), (nx, tx, _) = self.rows.member.shape, self.cols.member.shape
        x = x.reshape(*x.shape[:-3], ny, nx, ty, tx, x.shape[-1]).transpose(-4, -3)
        x = x.reshape(*x.shape[:-5], ny * ty, nx * tx, x.shape[-1])
        return x.index_select(-3, self.rows.inverse).index_select(-2, self.cols.inverse)

    def key_index(self, width: int) -> Tensor:
        """``(T, ty·tx, Ry·Rx)`` long: flat row-major key position of each slot on the ``H×W``
        grid, ``-1`` where the query does not see a key of the grid."""
        seen = self.pair(self.rows.member, self.cols.member, torch.logical_and)
        rows, cols = self.rows.keys[:, None], self.cols.keys[:, None]
        inside = self.pair(rows >= 0, cols >= 0, torch.logical_and)
        flat = self.pair(rows, cols, lambda r, c: r * width + c)
        return torch.where(seen & inside, flat, -1)

    def slots(self, flat_queries: Tensor, width: int) -> tuple[Tensor, Tensor]:
        """``(tile, slot)`` of each flat row-major query position ``(Nq,)``: two ``(Nq,)`` long tensors."""
        sy = self.rows.inverse[flat_queries // width]
        sx = self.cols.inverse[flat_queries % width]
        ty, tx = self.rows.member.shape[1], self.cols.member.shape[1]
        nx = self.cols.member.shape[0]
        return (sy // ty) * nx + sx // tx, (sy % ty) * tx + sx % tx


#: a relative-position bias: ``(queries per tile (B, heads, T, ty·tx, d), tiling)`` → an additive
#: tensor broadcastable to ``(B, heads, T, ty·tx, Ry·Rx)``
BiasFn = Callable[[Tensor, TileGrid], Tensor]


def _mask(grid: TileGrid, bias: Tensor | None) -> Tensor:
    """Boolean ``(T, ty·tx, R)`` (True = attend), or the bias with ``-inf`` outside the key sets."""
    member = grid.pair(grid.rows.member, grid.cols.member, torch.logical_and)
    if bias is None:
        return member
    return bias.masked_fill(~member, -math.inf)


@overload
def tiled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rows: AxisPattern,
    cols: AxisPattern,
    *,
    bias_fn: BiasFn | None = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    need_weights: Literal[False] = ...,
    query_subset: Tensor | None = ...,
) -> Tensor: ...


@overload
def tiled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rows: AxisPattern,
    cols: AxisPattern,
    *,
    bias_fn: BiasFn | None = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    need_weights: Literal[True],
    query_subset: Tensor | None = ...,
) -> tuple[Tensor, Tensor, Tensor]: ...


def tiled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rows: AxisPattern,
    cols: AxisPattern,
    *,
    bias_fn: BiasFn | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    query_subset: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Each query cell attends its local key set (``rows`` × ``cols``), by tiles, in one attention call.

    Args:
        q: queries ``(B, heads, H, W, d)``.
        k: keys ``(B, heads, H, W, d)``.
        v: values ``(B, heads, H, W, dv)``.
        rows: the pattern along ``H``.
        cols: the pattern along ``W``.
        bias_fn: an additive relative-position bias, called with the queries per tile
            ``(B, heads, T, ty·tx, d)`` and the :class:`TileGrid`; returns a tensor broadcastable
            to ``(B, heads, T, ty·tx, Ry·Rx)``. Without it the mask is boolean.
        scale: multiplies ``q kᵀ``; defaults to ``1 / sqrt(d)``.
        dropout_p: dropout on the weights.
        need_weights: also return the weights and where their keys lie.
        query_subset: with ``need_weights``, ``(Nq,)`` flat row-major query cells whose weights
            to return (the output still comes from the path without weights).

    Returns:
        ``out`` ``(B, heads, H, W, dv)``; with ``need_weights`` also ``weights``
        ``(B, heads, Nq, Ry·Rx)`` (``Nq = H·W``, or the subset's rows in its order) and
        ``key_index`` ``(Nq, Ry·Rx)`` long: the flat row-major position of each weight's key on
        the ``H×W`` grid, ``-1`` for a slot that is not a key of the grid (masked, or a zero key
        outside it, whose weight is then part of the row but of no cell) — what
        :class:`~visattn.layers.attention.AttentionRecord` takes as ``weights`` and ``key_index``.
    """
    height, width = q.shape[2], q.shape[3]
    grid = TileGrid(AxisTiles.of(rows, height, q.device), AxisTiles.of(cols, width, q.device))
    q_tiles = grid.gather(q, grid.rows.queries, grid.cols.queries)
    k_tiles, v_tiles = (grid.gather(t, grid.rows.gather, grid.cols.gather) for t in (k, v))
    mask = _mask(grid, None if bias_fn is None else bias_fn(q_tiles, grid))
    if need_weights and query_subset is None:
        out, weights = attention(
            q_tiles, k_tiles, v_tiles, mask=mask, scale=scale, dropout_p=dropout_p, need_weights=True
        )
        key_index = grid.untile(grid.key_index(width)).flatten(0, 1)
        return grid.untile(out), grid.untile(weights).flatten(2, 3), key_index
    out = grid.untile(cast(Tensor, attention(q_tiles, k_tiles, v_tiles, mask=mask, scale=scale, dropout_p=dropout_p)))
    if not need_weights or query_subset is None:
        return out
    tile, slot = grid.slots(query_subset.to(q.device), width)
    rows_mask = mask[..., tile, slot, :].unsqueeze(-2)
    weights = attention_weights(
        q_tiles[:, :, tile, slot].unsqueeze(-2), k_tiles[:, :, tile], mask=rows_mask, scale=scale
    )
    return out, weights[..., 0, :], grid.key_index(width)[tile, slot]
