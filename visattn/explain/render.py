"""Drawing maps on pictures: colormaps, one overlay at the picture's own size, grids of panels.

A map made on the model input covers a `box` of the original picture (all of it for a plain
resize; `visattn.explain.inputs.Preprocess.box`); `overlay` colours the map onto exactly those
pixels, and `overlay_grid` lays several overlays out with titles, the original picture first in
each row.
Maps are `(h, w)` grids (tensors or arrays) and must be finite to be drawn.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .._io import atomic_save_image, check_output, image_format, to_rgb
from .._utils import require_finite
from .inputs import Box, picture_file
from .maps import to_image
from .recording import Point

if TYPE_CHECKING:  # matplotlib is imported where it is used
    from matplotlib.colors import Colormap

__all__ = ["check_picture_output", "normalize_map", "overlay", "overlay_grid"]

Heatmap = Tensor | np.ndarray
Normalize = Literal["minmax", "max", "none"]


def _as_tensor(heatmap: Heatmap) -> Tensor:
    """A heatmap `(h, w)` (tensor or array) as a float64 CPU tensor; other shapes and NaN or infinite
    values are refused (an all-NaN map would otherwise be drawn as a constant one)."""
    heatmap = torch.as_tensor(np.asarray(heatmap) if not isinstance(heatmap, Tensor) else heatmap)
    heatmap = heatmap.detach().cpu().double()
    if heatmap.dim() != 2:
        raise ValueError(f"a heatmap is one (h, w) grid, got shape {tuple(heatmap.shape)}; pick one image and head")
    require_finite(heatmap, "the heatmap to draw", "a map must be finite to be drawn (check the model's weights)")
    return heatmap


def normalize_map(heatmap: Tensor, how: Normalize = "minmax") -> Tensor:
    """Scale a map to ``[0, 1]``: ``minmax`` (a constant map becomes 0), ``max`` (zero stays
    zero; for non-negative maps), or ``none`` (values are clipped)."""
    if how == "minmax":
        low, high = heatmap.min(), heatmap.max()
        return (heatmap - low) / (high - low) if high > low else torch.zeros_like(heatmap)
    if how == "max":
        high = heatmap.abs().max()
        return (heatmap / high).clamp(0, 1) if high > 0 else torch.zeros_like(heatmap)
    if how == "none":
        return heatmap.clamp(0, 1)
    raise ValueError(f"normalize must be 'minmax', 'max' or 'none', got {how!r}")


def _colormap(name: str) -> Colormap:
    """A matplotlib colormap by name (matplotlib is imported here: training never needs it)."""
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError as err:
        raise ValueError(f"unknown matplotlib colormap {name!r}; try 'inferno', 'viridis', 'jet' or 'gray'") from err


def _draw_marker(image: Image.Image, point: Point) -> None:
    draw = ImageDraw.Draw(image)
    x, y = point
    r = max(3, round(min(image.size) / 24))
    w = max(1, round(min(image.size) / 150))
    for color, width in (("black", 3 * w), ("white", w)):
        draw.line([(x - r, y), (x + r, y)], fill=color, width=width)
        draw.line([(x, y - r), (x, y + r)], fill=color, width=width)


#: rows of the picture :func:`overlay` blends at once
_STRIP_ROWS = 256


def overlay(
    image: Image.Image,
    heatmap: Heatmap,
    *,
    cmap: str = "inferno",
    alpha: float = 0.5,
    resample: Literal["bilinear", "nearest", "bicubic"] = "bilinear",
    normalize: Normalize = "minmax",
    box: Box | None = None,
    extent: tuple[float, float] | None = None,
    marker: Point | None = None,
) -> Image.Image:
    """Colour a grid map onto a picture, at the picture's own size.

    Args:
        image: the original PIL picture (any size; RGB, gray, with alpha...).
        heatmap: ``(h, w)`` map made on the model input (tensor or array).
        cmap: a matplotlib colormap name.
        alpha: opacity of the colours (0 = picture only, 1 = map only).
        resample: how the grid is upsampled to pixels.
        normalize: see :func:`normalize_map`.
        box: ``(left, top, right, bottom)`` of the picture that the model input covered
            (:meth:`Preprocess.box`); default the whole picture. Outside it the picture stays.
        extent: cells of the map's grid the input spans (pooled key grids; :func:`visattn.explain.maps.key_extent`).
        marker: an ``(x, y)`` pixel of the picture to mark with a cross (a query point).

    Returns:
        an RGB PIL image of ``image.size``.

    Raises:
        ValueError: ``heatmap`` is not one ``(h, w)`` grid, or holds NaN or infinite values.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colormap = _colormap(cmap)
    heat = normalize_map(_as_tensor(heatmap), normalize)
    base = to_rgb(image)
    left, top, right, bottom = (round(v) for v in (box or (0, 0, *base.size)))
    if not (0 <= left < right <= base.width and 0 <= top < bottom <= base.height):
        raise ValueError(f"box {box} does not lie inside the {base.width}×{base.height} picture")
    size = (bottom - top, right - left)
    out = np.asarray(base).copy()
    for start in range(0, bottom - top, _STRIP_ROWS):  # float copies of a strip at a time, not of the picture
        rows = slice(top + start, min(top + start + _STRIP_ROWS, bottom))
        strip = (start, start + _STRIP_ROWS)
        pixels = to_image(heat, size, extent=extent, mode=resample, rows=strip).clamp(0, 1).numpy()
        colours = colormap(pixels)[..., :3]
        region = out[rows, left:right].astype(np.float64) / 255.0
        out[rows, left:right] = np.round(((1.0 - alpha) * region + alpha * colours) * 255.0).astype(np.uint8)
    result = Image.fromarray(out, mode="RGB")
    if marker is not None:
        _draw_marker(result, marker)
    return result


def _rows(heatmaps: Heatmap | Sequence, titles: Sequence | None) -> list[list[tuple[str, Heatmap]]]:
    """Panels as rows of (title, map): a (h, w), (n, h, w) or (r, n, h, w) array, a list of
    maps (one row) or a list of lists of maps (rows)."""
    if isinstance(heatmaps, Tensor | np.ndarray):
        array = heatmaps.detach().cpu() if isinstance(heatmaps, Tensor) else torch.as_tensor(heatmaps)
        if not 2 <= array.dim() <= 4:
            raise ValueError(f"heatmaps must be (h, w), (n, h, w) or (rows, n, h, w), got {tuple(array.shape)}")
        while array.dim() < 4:
            array = array[None]
        maps = [list(row) for row in array]
    elif all(isinstance(h, Tensor | np.ndarray) for h in heatmaps):
        maps = [list(heatmaps)]
    else:
        maps = [list(row) for row in heatmaps]
    if titles is None:
        names = [["" for _ in row] for row in maps]
    elif all(isinstance(t, str) for t in titles):
        names = [list(titles)]
    else:
        names = [list(row) for row in titles]
    if [len(r) for r in names] != [len(r) for r in maps]:
        raise ValueError(f"titles {titles} do not match the panels ({[len(r) for r in maps]} per row)")
    return [list(zip(n, m, strict=True)) for n, m in zip(names, maps, strict=True)]


def overlay_grid(
    image: Image.Image,
    heatmaps: Heatmap | Sequence,
    *,
    titles: Sequence | None = None,
    row_labels: Sequence[str] | None = None,
    suptitle: str | None = None,
    panel_size: float = 2.4,
    dpi: float = 100.0,
    out: str | os.PathLike | None = None,
    force: bool = False,
    **overlay_kwargs: Any,
) -> Image.Image:
    """Panels of overlays with titles, the original picture on the left of each row, as one image.

    Args:
        image: the original PIL picture.
        heatmaps: one map ``(h, w)``, a row ``(n, h, w)`` (e.g. heads), rows ``(r, n, h, w)``
            (e.g. layers × heads), or nested lists of maps (rows may differ in length and grid).
        titles: one per panel, nested like ``heatmaps`` (a flat list for a single row).
        row_labels: one per row, written above its original picture.
        suptitle: a title over the whole grid.
        panel_size: inches per panel.
        dpi: pixels per inch of the PNG (text scales with it).
        out: also save the grid there, in the format of its extension (``.png``), as
            `visattn._io.check_output` allows.
        force: let ``out`` replace an existing file of another kind.
        overlay_kwargs: ``cmap``, ``alpha``, ``resample``, ``normalize``, ``box``, ``extent``,
            ``marker`` as in :func:`overlay` (the marker is drawn on every panel).

    Returns:
        the grid as an RGB PIL image.
    """
    from matplotlib.figure import Figure

    check_picture_output(out, image, force)
    rows = _rows(heatmaps, titles)
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row_labels for {len(rows)} rows")
    cols = 1 + max(len(r) for r in rows)
    aspect = image.height / image.width
    fig = Figure(
        figsize=(panel_size * cols, panel_size * aspect * len(rows) + 0.4 * len(rows) + (0.4 if suptitle else 0))
    )
    axes = fig.subplots(len(rows), cols, squeeze=False)
    original = image.convert("RGB")
    if overlay_kwargs.get("marker") is not None:
        _draw_marker(original, overlay_kwargs["marker"])
    for r, row in enumerate(rows):
        axes[r, 0].imshow(original)
        axes[r, 0].set_title(row_labels[r] if row_labels else "image", fontsize=9)
        for c, (title, heat) in enumerate(row, start=1):
            axes[r, c].imshow(overlay(image, heat, **overlay_kwargs))
            axes[r, c].set_title(title, fontsize=9)
        for ax in axes[r]:
            ax.set_axis_off()
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    grid = Image.open(buffer).convert("RGB")
    if out is not None:
        atomic_save_image(grid, out)
    return grid


def check_picture_output(out: str | os.PathLike | None, image: Image.Image, force: bool) -> None:
    """Refuse ``out`` before anything is drawn when `visattn._io.check_output` would: the picture
    file ``image`` was opened from, a folder, or (unless ``force``) a file of another kind."""
    if out is not None:
        check_output(out, image_format(out), [picture_file(image)], force=force)
