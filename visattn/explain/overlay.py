"""Heatmaps on the original picture: preprocessing that can be undone, overlays, grids of panels.

A model sees a preprocessed copy of a picture (resized, maybe gray, normalized). A map made on
that copy covers a ``box`` of the original picture (all of it for a plain resize); :func:`overlay`
puts the map back on exactly those pixels, at the picture's own size.

Pictures are read by `load_image` and turned into RGB by `to_rgb` (both from `visattn._io`, the
loader that training and evaluation use too), so the model sees a file the same way here as there.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from .._io import atomic_save_image, check_output, image_format, to_rgb
from .._utils import require_finite
from . import maps
from .maps import to_image
from .recording import Point, record_attention

__all__ = [
    "METHODS",
    "OVERLAY_MAX_SIDE",
    "AttentionPanels",
    "Panel",
    "Preprocess",
    "attention_overlay",
    "attention_panels",
    "default_data_config",
    "pretrained_data_config",
    "normalize_map",
    "overlay",
    "overlay_grid",
]

Box = tuple[float, float, float, float]
Heatmap = Tensor | np.ndarray
Normalize = Literal["minmax", "max", "none"]
DATA_CONFIG_KEYS = ("img_size", "in_chans", "mean", "std")


#: longest side :func:`load_image` keeps for ``visattn overlay`` (a grid panel is a few hundred pixels)
OVERLAY_MAX_SIDE = 2048


@dataclass(frozen=True)
class Preprocess:
    """The model's view of a picture: resize to ``img_size``, gray if ``in_chans == 1``, normalize.

    Built from a checkpoint's ``data_config`` with :meth:`from_data_config`; :meth:`box` says
    which part of the original the model input covers, so maps can be put back on it.
    """

    img_size: tuple[int, int]
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_data_config(cls, config: Mapping[str, Any]) -> Preprocess:
        """From ``{"img_size": [H, W], "in_chans", "mean", "std", ...}`` (other keys ignored)."""
        missing = [k for k in DATA_CONFIG_KEYS if k not in config]
        if missing:
            raise ValueError(f"data_config lacks {', '.join(missing)}; it needs {', '.join(DATA_CONFIG_KEYS)}")
        size = config["img_size"]
        size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        in_chans = int(config["in_chans"])
        if in_chans not in (1, 3):
            raise ValueError(f"data_config in_chans must be 1 (gray) or 3 (RGB), got {in_chans}")
        mean, std = tuple(float(m) for m in config["mean"]), tuple(float(s) for s in config["std"])
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"data_config mean {mean} and std {std} need {in_chans} value(s) each (in_chans)")
        return cls(size, in_chans, mean, std)

    def __call__(self, image: Image.Image) -> Tensor:
        """PIL picture (any size and mode) → model input ``(in_chans, H, W)``, float32, normalized."""
        image = to_rgb(image)
        if self.in_chans == 1:
            image = image.convert("L")
        x = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)
        x = TF.resize(x, list(self.img_size), antialias=True)
        return TF.normalize(x, list(self.mean), list(self.std))

    def box(self, image_size: tuple[int, int]) -> Box:
        """``(left, top, right, bottom)`` of the original ``(W, H)`` picture the input covers."""
        return (0.0, 0.0, float(image_size[0]), float(image_size[1]))

    def to_input(self, point: Point, image_size: tuple[int, int]) -> Point:
        """An ``(x, y)`` pixel of the original ``(W, H)`` picture → the same point of the model input."""
        left, top, right, bottom = self.box(image_size)
        x, y = float(point[0]), float(point[1])
        if not (left <= x < right and top <= y < bottom):
            raise ValueError(
                f"point (x={x:g}, y={y:g}) lies outside the {image_size[0]}×{image_size[1]} (W×H) picture; "
                f"x must be in [0, {image_size[0]}), y in [0, {image_size[1]})"
            )
        height, width = self.img_size
        return (x - left) * width / (right - left), (y - top) * height / (bottom - top)


def default_data_config(model: nn.Module, img_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """A data_config for a model without one: its own ``img_size`` and channels, ImageNet
    statistics for RGB and ``0.5`` for gray."""
    size = img_size or getattr(model, "img_size", None) or (224, 224)
    in_chans = getattr(getattr(model, "patch_embed", None), "in_chans", 3)
    mean, std = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if in_chans == 3 else ((0.5,), (0.5,))
    return {"img_size": list(size), "in_chans": in_chans, "mean": list(mean), "std": list(std)}


def _num_classes(model: nn.Module) -> int | None:
    classes = getattr(model, "num_classes", None)
    if classes is None:
        heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
        classes = heads[-1].out_features if heads else None
    return classes


def pretrained_data_config(model: nn.Module, img_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """:func:`default_data_config` for a model with published weights: the mean, std and input size
    of its ``pretrained_cfg`` (timm's record of how the weights were trained), and its class names:
    the ``label_names`` of a folder `visattn.load_pretrained` read, else ImageNet's (timm's
    ``ImageNetInfo``, shipped with timm) when its head has ImageNet's classes."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    config = default_data_config(model, img_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if len(cfg.get("mean") or ()) == config["in_chans"] == len(cfg.get("std") or ()):
        config.update(mean=list(cfg["mean"]), std=list(cfg["std"]))
    if img_size is None and cfg.get("input_size"):
        config["img_size"] = list(cfg["input_size"][-2:])
    if cfg.get("label_names") and len(cfg["label_names"]) == _num_classes(model):
        return {**config, "class_names": list(cfg["label_names"])}
    subset = infer_imagenet_subset(model) if cfg else None
    if subset is None and _num_classes(model) == 1000:
        subset = "imagenet-1k"
    if subset is not None:
        info = ImageNetInfo(subset)
        config["class_names"] = [info.index_to_description(i) for i in range(info.num_classes())]
    return config


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


def _colormap(name: str):
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

    _check_picture_output(out, image, force)
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


def picture_file(image: Image.Image | str | os.PathLike) -> str | os.PathLike | None:
    """The file a picture comes from: the path itself, or the file a PIL image was opened from."""
    return getattr(image, "filename", None) or None if isinstance(image, Image.Image) else image


def _check_picture_output(out: str | os.PathLike | None, image: Image.Image, force: bool) -> None:
    """Refuse ``out`` before anything is drawn when `visattn._io.check_output` would: the picture
    file ``image`` was opened from, a folder, or (unless ``force``) a file of another kind."""
    if out is not None:
        check_output(out, image_format(out), [picture_file(image)], force=force)


#: the maps :func:`attention_overlay` draws: every method of :data:`visattn.explain.maps.METHODS`
METHODS = tuple(maps.METHODS)


def _prediction(logits: Tensor, class_names: Sequence[str] | None) -> str:
    if logits.dim() != 2 or logits.shape[1] < 2:
        return ""
    probs = logits.softmax(dim=-1)[0]
    index = int(probs.argmax())
    name = class_names[index] if class_names and index < len(class_names) else str(index)
    return f"predicted {name} (p={probs[index]:.2g})"


def _model_view(image: Image.Image, preprocess: Preprocess) -> Image.Image:
    """``image``, or a copy reduced to :data:`OVERLAY_MAX_SIDE` (or the model input, if larger) on
    its longer side: what the model input is made from, so a huge picture is never turned into
    a float tensor whole."""
    side = max(OVERLAY_MAX_SIDE, *preprocess.img_size)
    if max(image.size) <= side:
        return image
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    source = image if image.mode in ("RGB", "L") else to_rgb(image)
    return source.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


@dataclass(frozen=True)
class Panel:
    """One map of a picture and what it is.

    Attributes:
        heatmap: `(h, w)` on the model input.
        title: what the panel is titled.
        kind: `"head"` (one head's map), `"mean"` (the mean of the heads) or `"map"` (the one map
            of a method that fuses the heads itself).
        head: the head's number for `kind="head"`, else `None`.
    """

    heatmap: Tensor
    title: str
    kind: Literal["head", "mean", "map"]
    head: int | None = None


@dataclass
class AttentionPanels:
    """Maps of one picture ready to draw: the :class:`Panel` ``entries`` (maps on the model input),
    the ``box`` of the picture they cover, the grid ``extent``, and the query ``marker`` (pixels of
    the picture)."""

    entries: list[Panel]
    suptitle: str
    box: Box
    extent: tuple[float, float] | None = None
    marker: Point | None = None

    @property
    def panels(self) -> list[Tensor]:
        """The maps ``(h, w)``, in panel order."""
        return [entry.heatmap for entry in self.entries]

    @property
    def titles(self) -> list[str]:
        return [entry.title for entry in self.entries]

    def choose(self, head: int | Literal["mean"]) -> Tensor:
        """The one map of :func:`attention_overlay`: head ``head``'s, or with ``"mean"`` the mean of
        the heads (the only head's map, or the map of a method that fuses the heads)."""
        heads = [entry for entry in self.entries if entry.kind == "head"]
        if head == "mean":
            fused = [entry for entry in self.entries if entry.kind != "head"]
            return (fused or heads)[0].heatmap
        if not heads:
            raise ValueError(
                f"head={head!r} picks one head's map, and this method gives one map ({self.titles[0]}); use 'mean'"
            )
        numbers = [entry.head for entry in heads]
        if not (isinstance(head, int) and head in numbers):
            raise ValueError(f"head must be 'mean' or a head number in 0..{len(heads) - 1}, got {head!r}")
        return heads[numbers.index(head)].heatmap


def _entries(spec: maps.MethodSpec, values: Tensor, fields: dict[str, Any]) -> list[Panel]:
    """The panels of one picture's map ``values``: ``(heads, h, w)`` of a per-head method (each head,
    then their mean), or ``(h, w)``."""
    if not spec.per_head:
        return [Panel(values, spec.label.format(**fields), "map")]
    entries = [Panel(heatmap, f"head {h}", "head", h) for h, heatmap in enumerate(values)]
    if len(entries) > 1:
        entries.append(Panel(values.mean(dim=0), "mean of heads", "mean"))
    return entries


def attention_panels(
    model: nn.Module,
    image: Image.Image,
    method: str,
    *,
    preprocess: Preprocess,
    query: Point | None = None,
    original_size: tuple[int, int] | None = None,
    layer: int | str = -1,
    target: int | None = None,
    head_fusion: Literal["mean", "max", "min"] = "mean",
    discard_ratio: float = 0.0,
    class_names: Sequence[str] | None = None,
) -> AttentionPanels:
    """One picture through ``model`` and one of :data:`METHODS`, as maps to draw on it.

    Args:
        model: a model with visattn attention modules (in eval mode).
        image: the original picture; :class:`AttentionPanels` says where on it the maps lie.
        method: ``"cls"`` (class token → patches, per head, of ``layer``), ``"rollout"``,
            ``"grad_rollout"`` (for ``target``, default the predicted class), ``"query"``
            (where the query at ``query`` attends, per head, in ``layer``) or ``"received"``
            (attention each position of ``layer`` receives, per head).
        preprocess: how the model sees the picture.
        query: ``(x, y)`` pixel of the original picture (``method="query"``).
        original_size: ``(W, H)`` of the original when ``image`` is a reduced copy of it
            (``load_image(path, max_side).info["original_size"]``): ``query`` is then in pixels
            of the original, and the marker is scaled onto ``image``. Default ``image.size``.
        layer: a recorded module's path or position (``-1``: the last one).
        head_fusion, discard_ratio: see :func:`visattn.explain.maps.rollout`.
        class_names: names for the predicted class in the title.

    Per-head methods give one panel per head and, with several heads, their mean.
    """
    spec = maps.method_spec(method)
    spec.check(query)
    x = preprocess(_model_view(image, preprocess))[None]
    size = tuple(original_size or image.size)
    point = None if query is None else preprocess.to_input(query, size)
    marker = None if query is None else (query[0] * image.width / size[0], query[1] * image.height / size[1])
    with torch.no_grad(), record_attention(model, queries=maps.grid_queries(model, point)) as rec:
        logits = model(x)
    if spec.needs_gradients and target is None:
        target = int(logits.argmax(dim=-1)[0])
    options = dict(layer=layer, query=point, target=target, head_fusion=head_fusion, discard_ratio=discard_ratio)
    heat = maps.compute_map(model if spec.needs_gradients else rec, method, x, per_head=spec.per_head, **options)
    label = class_names[target] if class_names and target is not None and 0 <= target < len(class_names) else target
    fields = dict(discard_ratio=discard_ratio, head_fusion=head_fusion, target=label)
    fields.update({} if query is None else dict(x=query[0], y=query[1]))
    name = spec.title.format(**fields) + ("" if heat.path is None else f", {heat.path}")
    caption = _prediction(logits, class_names)
    return AttentionPanels(
        _entries(spec, heat.values[0], fields),
        name + (f"; {caption}" if caption else ""),
        preprocess.box(image.size),
        heat.extent,
        marker,
    )


#: panels of ``attention_overlay(..., panels=True)`` show the picture at up to this many pixels wide
PANEL_MAX_PX = 1024


def attention_overlay(
    model: nn.Module,
    image: Image.Image,
    method: str,
    *,
    preprocess: Preprocess,
    out: str | os.PathLike | None = None,
    cmap: str = "inferno",
    alpha: float = 0.5,
    panels: bool = False,
    head: int | Literal["mean"] = "mean",
    force: bool = False,
    **panel_kwargs: Any,
) -> Image.Image:
    """One attention map drawn on ``image`` at the picture's own resolution, or (``panels=True``)
    the picture and all its maps side by side (:func:`overlay_grid`) with a title.

    Args:
        model, image, method, preprocess, panel_kwargs: as :func:`attention_panels`.
        out: also save the picture here, in the format of its extension (``.png``), as
            `visattn._io.check_output` allows.
        cmap, alpha: as :func:`overlay`.
        panels: the side-by-side figure instead of one overlay; each panel shows the picture at
            its own width up to :data:`PANEL_MAX_PX` pixels (the figure's resolution follows).
        head: for a one-overlay output of a per-head method (``cls``, ``query``, ``received``):
            ``"mean"`` (the mean of the heads) or a head number.
        force: let ``out`` replace an existing file of another kind.

    Returns:
        an RGB image of ``image.size`` (or the figure).
    """
    _check_picture_output(out, image, force)
    p = attention_panels(model, image, method, preprocess=preprocess, **panel_kwargs)
    if not panels:
        drawn = overlay(image, p.choose(head), cmap=cmap, alpha=alpha, box=p.box, extent=p.extent, marker=p.marker)
        if out is not None:
            atomic_save_image(drawn, out)
        return drawn
    dpi = max(100.0, min(image.width, PANEL_MAX_PX) / 2.4)  # 2.4-inch panels, as wide as the picture
    return overlay_grid(
        image,
        p.panels,
        titles=p.titles,
        suptitle=p.suptitle,
        box=p.box,
        extent=p.extent,
        marker=p.marker,
        out=out,
        force=force,
        cmap=cmap,
        alpha=alpha,
        dpi=dpi,
    )
