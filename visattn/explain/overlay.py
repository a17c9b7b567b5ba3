"""Attention maps of one picture, drawn on it: the pipeline behind `visattn overlay`.

`attention_panels` runs a picture through a model inside `record_attention` and turns one of
`METHODS` into maps on the model input (one panel per head and their mean, or the one map of a
method that fuses the heads); `attention_overlay` draws one of them on the picture at its own
resolution (`visattn.explain.render.overlay`), or all of them side by side
(`visattn.explain.render.overlay_grid`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor, nn

from .._io import atomic_save_image, to_rgb
from . import maps
from .inputs import Box, Preprocess
from .recording import Point, record_attention
from .render import check_picture_output, overlay, overlay_grid

__all__ = [
    "METHODS",
    "OVERLAY_MAX_SIDE",
    "AttentionPanels",
    "Panel",
    "attention_overlay",
    "attention_panels",
]

#: longest side `visattn._io.load_image` keeps for `visattn overlay` (a grid panel is a few hundred pixels)
OVERLAY_MAX_SIDE = 2048


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
    width, height = original_size or image.size
    size = (width, height)
    point = None if query is None else preprocess.to_input(query, size)
    marker = None if query is None else (query[0] * image.width / size[0], query[1] * image.height / size[1])
    with torch.no_grad(), record_attention(model, queries=maps.grid_queries(model, point)) as rec:
        logits = model(x)
    if spec.needs_gradients and target is None:
        target = int(logits.argmax(dim=-1)[0])
    source = model if spec.needs_gradients else rec
    heat = maps.compute_map(
        source,
        method,
        x,
        per_head=spec.per_head,
        layer=layer,
        query=point,
        target=target,
        head_fusion=head_fusion,
        discard_ratio=discard_ratio,
    )
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
    check_picture_output(out, image, force)
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
