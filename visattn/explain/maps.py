"""Where the model looks: exact attention capture and the maps made from it.

:func:`record_attention` switches every visattn attention module of a model to the explicit
path for as long as it is open, and collects an :class:`~visattn.AttentionRecord` per module
path. The map functions turn those records into heatmaps on grids:

=================  =========================================  ==============================
function           what it shows                              shape
=================  =========================================  ==============================
cls_attention      class token → patches, per head (DINO)     ``(B, heads, gh, gw)``
rollout            attention rollout (Abnar & Zuidema 2020)   ``(B, gh, gw)``
grad_rollout       gradient-weighted rollout (Chefer 2021)    ``(B, gh, gw)``
query_map          where the query at an image point looks    ``(B, heads, kh, kw)``
received           how much attention each key receives       ``(B, heads, kh, kw)``
=================  =========================================  ==============================

:func:`compute` runs any of them by name (:data:`METHODS`, the one table of map methods that
the overlay, the metrics, the explorer and the command line read).

:func:`to_image` resamples any of them onto the input image's pixels. Points are ``(x, y)``:
``x`` is the column, ``y`` the row, in pixels of the model input (or fractions of its width and
height with ``relative=True``), as PIL and matplotlib count them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..layers.attention import AttentionRecord, GridAttention, MultiHeadAttention
from .recording import AttentionRecording, NotRecordedError, Point, point_to_cell, record_attention

__all__ = [
    "METHODS",
    "AttentionMap",
    "MapRequest",
    "MethodSpec",
    "cls_attention",
    "compute",
    "compute_map",
    "grid_queries",
    "grad_rollout",
    "key_extent",
    "method_spec",
    "query_map",
    "received",
    "rollout",
    "to_image",
]

#: the classes to explain: one for all images, one per image, or ``None`` (the predicted ones)
Target = int | Sequence[int] | Tensor | None


# --- maps -----------------------------------------------------------------------------------


def _grid_tokens(rec: AttentionRecord, path: str) -> tuple[int, tuple[int, int]]:
    if rec.key_grid is None:
        raise ValueError(
            f"{path} recorded cross-attention or tokens without a grid; its keys have no image positions "
            "(token modules get their grid from the model that owns them when that model is called: model(x))"
        )
    return rec.num_prefix_tokens, rec.key_grid


def _token_layers(recording: AttentionRecording, method: str) -> list[tuple[str, AttentionRecord]]:
    """The Transformer self-attention records, in forward order, that share one token layout."""
    layers = [
        (path, r)
        for path, r in recording.items()
        if isinstance(recording.modules[path], MultiHeadAttention) and r.key_grid is not None
    ]
    if not layers:
        raise ValueError(
            f"{method} follows attention through the token layers of a Transformer "
            "(MultiHeadAttention): it needs global attention between every pair of tokens, and none was "
            f"recorded here (recorded: {', '.join(recording)}); for a grid block (SelfAttention2d, or a "
            "local family: window, neighborhood, halo) use query_map (where a point attends) or received "
            "(attention each position receives)"
        )
    first = layers[0][1]
    for path, r in layers:
        if r.weights.shape[-2:] != first.weights.shape[-2:] or r.key_grid != first.key_grid:
            raise ValueError(
                f"{method} needs every layer on the same tokens; {path} has {tuple(r.weights.shape)} "
                f"on grid {r.key_grid}, {layers[0][0]} {tuple(first.weights.shape)} on {first.key_grid}"
            )
    return layers


def cls_attention(recording: AttentionRecording, layer: int | str = -1) -> Tensor:
    """Class token → patch attention of one Transformer layer, per head (the DINO picture).

    Args:
        recording: from :func:`record_attention`.
        layer: position among the recorded Transformer layers (``-1`` = last) or a module path.

    Returns:
        ``(B, heads, gh, gw)``; each head's map sums to one minus what the class token gives to
        the prefix tokens.
    """
    layers = _token_layers(recording, "cls_attention")
    if isinstance(layer, str):
        matches = [entry for entry in layers if entry[0] == recording.path_of(layer)]
        if not matches:
            raise ValueError(
                f"{layer} is not a Transformer layer; cls_attention reads one of: {', '.join(p for p, _ in layers)}"
            )
        path, rec = matches[0]
    else:
        if not -len(layers) <= layer < len(layers):
            raise NotRecordedError(f"layer {layer} out of range: {len(layers)} Transformer layer(s) recorded")
        path, rec = layers[layer]
    if not rec.class_token:
        raise ValueError(
            f"cls_attention reads the class token, and the model of {path} has none (it pools the "
            "mean of its patch tokens); use rollout or grad_rollout, which read mean-pooled models"
        )
    prefix, (gh, gw) = _grid_tokens(rec, path)
    return rearrange(rec.weights[:, :, 0, prefix:], "b h (y x) -> b h y x", y=gh, x=gw)


def _product_dtype(weights: Tensor) -> torch.dtype:
    """Products through many layers are taken in at least float32 (weights may be half precision)."""
    return torch.promote_types(weights.dtype, torch.float32)


def _fuse_heads(weights: Tensor, head_fusion: str) -> Tensor:
    if head_fusion == "mean":
        return weights.mean(dim=1)
    if head_fusion == "max":
        return weights.amax(dim=1)
    if head_fusion == "min":
        return weights.amin(dim=1)
    raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")


def _discard_weakest(fused: Tensor, ratio: float, prefix: int) -> Tensor:
    """Zero the ``ratio`` weakest links to patch tokens of each image; links to the prefix stay."""
    to_patches = fused[:, :, prefix:].reshape(fused.shape[0], -1)
    count = int(to_patches.shape[1] * ratio)
    if count == 0:
        return fused
    weakest = to_patches.topk(count, dim=1, largest=False).indices
    kept = torch.ones_like(to_patches).scatter_(1, weakest, 0.0).view(fused.shape[0], fused.shape[1], -1)
    return torch.cat([fused[:, :, :prefix], fused[:, :, prefix:] * kept], dim=2)


def _read_out(relevance: Tensor, rec: AttentionRecord, readout: str | None, path: str) -> Tensor:
    """Token relevance ``(B, N, N)`` → the map of what the model's output reads ``(B, gh, gw)``."""
    prefix, (gh, gw) = _grid_tokens(rec, path)
    readout = rec.pool if readout is None else readout
    if readout not in ("cls", "mean", "cls_mean"):
        raise ValueError(
            f"readout must be 'cls', 'mean', 'cls_mean' or None (the model's own pooling), got {readout!r}"
        )
    if readout != "mean" and not rec.class_token:
        raise ValueError(
            f"readout={readout!r} needs a class token, and the model of {path} has none; "
            "use readout='mean' (the mean of the patch tokens, what it pools)"
        )
    cls_row = relevance[:, 0, prefix:]
    mean_row = relevance[:, prefix:, prefix:].mean(dim=1)
    row = {"cls": cls_row, "mean": mean_row, "cls_mean": (cls_row + mean_row) / 2}[readout]
    return rearrange(row, "b (y x) -> b y x", y=gh, x=gw)


def rollout(
    recording: AttentionRecording,
    head_fusion: Literal["mean", "max", "min"] = "mean",
    discard_ratio: float = 0.0,
    *,
    readout: Literal["cls", "mean", "cls_mean"] | None = None,
) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) through all recorded Transformer layers.

    Per layer: fuse the heads (``mean``/``max``/``min``), zero the ``discard_ratio`` weakest
    links to patch tokens (links to the class/prefix tokens are kept), add the identity for the
    residual path and renormalize each row to sum to one: ``Â = (A + I) / rowsum``. Then
    ``R = Â_L ⋯ Â_1``. The map is the class token's row of ``R`` (``readout="cls"``), the mean
    of the patch tokens' rows (``"mean"``), or the average of the two (``"cls_mean"``, for a head
    that reads both, as DINOv2's classifier); default: how the model pools.

    Returns:
        ``(B, gh, gw)`` non-negative (with ``discard_ratio=0`` a class token's row sums to one
        over all tokens, prefix included).
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    layers = _token_layers(recording, "rollout")
    path, last = layers[-1]
    batch, _, tokens, _ = last.weights.shape
    dtype = _product_dtype(last.weights)
    eye = torch.eye(tokens, dtype=dtype, device=last.weights.device)
    relevance = eye.expand(batch, tokens, tokens)
    for _, rec in layers:
        fused = _fuse_heads(rec.weights.to(dtype), head_fusion)
        if discard_ratio > 0.0:
            fused = _discard_weakest(fused, discard_ratio, rec.num_prefix_tokens)
        fused = fused + eye
        fused = fused / fused.sum(dim=-1, keepdim=True)
        relevance = fused @ relevance
    return _read_out(relevance, last, readout, path)


def grad_rollout(
    model: nn.Module,
    x: Tensor,
    target: Target = None,
    *,
    readout: Literal["cls", "mean", "cls_mean"] | None = None,
    layers: str | Sequence[str] | None = None,
) -> Tensor:
    """Gradient-weighted attention rollout (Chefer et al. 2021, "Generic Attention-model
    Explainability", self-attention rule) for a chosen class.

    Runs ``model(x)`` with the weights kept in the graph, takes ``∂ logit_target / ∂A`` for each
    Transformer layer, and accumulates ``R ← R + Ā R`` from ``R = I``, first layer to last, with
    ``Ā = mean_heads((∇A ⊙ A)⁺)``. Read out as in :func:`rollout`.

    Args:
        model: the classifier, in the mode it should explain (usually ``eval()``).
        x: images ``(B, C, H, W)``.
        target: class per image (an int for all, or ``B`` of them); default the predicted class.
        readout, layers: see :func:`rollout` and :func:`record_attention`.

    Returns:
        ``(B, gh, gw)``, non-negative.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), record_attention(model, layers=layers, keep_grad=True) as recording:
        logits = model(x)
        if logits.dim() != 2:
            raise ValueError(f"grad_rollout needs class logits (B, classes), the model returned {tuple(logits.shape)}")
        if target is None:
            target = logits.argmax(dim=-1)
        target = torch.as_tensor(target, device=logits.device).long().expand(logits.shape[0])
        if target.min() < 0 or target.max() >= logits.shape[1]:
            raise ValueError(f"target {target.tolist()} outside the model's {logits.shape[1]} classes")
        token_layers = _token_layers(recording, "grad_rollout")
        score = logits.gather(1, target[:, None]).sum()
        grads = torch.autograd.grad(score, [rec.weights for _, rec in token_layers])
    path, last = token_layers[-1]
    batch, _, tokens, _ = last.weights.shape
    dtype = _product_dtype(last.weights)
    relevance = torch.eye(tokens, dtype=dtype, device=last.weights.device).expand(batch, tokens, tokens)
    for (_, rec), grad in zip(token_layers, grads, strict=True):
        cam = (grad.to(dtype) * rec.weights.detach().to(dtype)).clamp(min=0).mean(dim=1)
        relevance = relevance + cam @ relevance
    return _read_out(relevance, last, readout, path)


def _grid_record(recording: AttentionRecording, module: str | int | nn.Module) -> tuple[str, AttentionRecord]:
    path = recording.path_of(module)
    rec = recording[path]
    _grid_tokens(rec, path)
    if rec.query_grid is None:
        raise ValueError(f"{path} recorded tokens without a query grid; its queries have no image positions")
    return path, rec


def _to_key_grid(rows: Tensor, rec: AttentionRecord) -> Tensor:
    assert rec.key_grid is not None  # a record from _grid_record
    kh, kw = rec.key_grid
    return rearrange(rows[..., rec.num_prefix_tokens :], "b h (y x) -> b h y x", y=kh, x=kw)


def query_map(
    recording: AttentionRecording,
    module: str | int | nn.Module,
    point: Point,
    *,
    relative: bool = False,
    image_size: tuple[int, int] | None = None,
) -> Tensor:
    """Where the query at ``point`` attends, per head, on ``module``'s key grid.

    Args:
        recording: from :func:`record_attention` (with ``queries=`` covering ``point``, or all).
        module: a recorded grid block (``SelfAttention2d``, a local family) or Transformer layer:
            path, position or module.
        point: ``(x, y)`` = (column, row) in pixels of the input image, or fractions of its width
            and height with ``relative=True``.
        image_size: ``(H, W)`` of the input; default the one recorded.

    Returns:
        ``(B, heads, kh, kw)``; each head's map sums to one (over the grid tokens). Use
        :func:`to_image` with ``recording.extent(module)`` to put it on the image.
    """
    path, rec = _grid_record(recording, module)
    query_grid = rec.query_grid
    assert query_grid is not None  # _grid_record checked it
    image_size = image_size or rec.image_size
    if image_size is None:
        raise ValueError(
            "the input image size was not recorded (the model itself was not called); pass image_size=(H, W)"
        )
    row, col = point_to_cell(point, image_size, query_grid, relative=relative)
    flat = row * query_grid[1] + col
    index = rec.query_index
    if index is None:
        position = rec.num_prefix_tokens + flat
    else:
        hits = (index == flat).nonzero()
        if hits.numel() == 0:
            raise ValueError(
                f"the query cell (row {row}, col {col}) under point {tuple(point)} of {path} was not "
                "recorded; record it with record_attention(model, queries=[point]) or without queries="
            )
        position = int(hits[0, 0])
    return _to_key_grid(rec.weights[:, :, position], rec)


def received(recording: AttentionRecording, module: str | int | nn.Module) -> Tensor:
    """How much attention each key position of ``module`` receives, per head.

    The mean over the recorded grid queries (all of them, or those of ``queries=``; class and
    register tokens excluded) of the weights given to each grid key.

    Returns:
        ``(B, heads, kh, kw)``; sums to at most one per head (one without prefix tokens).
    """
    path, rec = _grid_record(recording, module)
    weights = rec.weights
    if rec.query_index is None:
        weights = weights[:, :, rec.num_prefix_tokens :]
    return _to_key_grid(weights.mean(dim=2), rec)


# --- one dispatcher over the named methods ----------------------------------------------------


@dataclass(frozen=True)
class MapRequest:
    """What a map method of :data:`METHODS` reads: the recording, or (gradient methods) the model
    and its input, and the options of :func:`compute_map`."""

    recording: AttentionRecording | None
    model: nn.Module | None
    x: Tensor | None
    layer: int | str = -1
    query: Point | None = None
    relative: bool = False
    target: Target = None
    head_fusion: Literal["mean", "max", "min"] = "mean"
    discard_ratio: float = 0.0
    layers: str | Sequence[str] | None = None

    def recorded(self) -> AttentionRecording:
        """The recording, which `compute_map` makes for every method but the gradient ones."""
        assert self.recording is not None
        return self.recording

    def model_and_input(self) -> tuple[nn.Module, Tensor]:
        """The model and its input, which `compute_map` passes for the gradient methods."""
        assert self.model is not None and self.x is not None
        return self.model, self.x

    def query_point(self) -> Point:
        """The query point, which `compute_map` requires of a method that needs one."""
        assert self.query is not None
        return self.query


@dataclass(frozen=True)
class MethodSpec:
    """One named map method: how to run it and what it needs.

    Attributes:
        name: the name :func:`compute` and the command line take.
        run: the map from a :class:`MapRequest`: `(B, heads, h, w)` for a per-head method,
            `(B, h, w)` otherwise.
        title: what the map shows, a format string over `x`, `y` (the query point as shown),
            `discard_ratio`, `head_fusion` and `target`.
        label: the title of a one-map method's panel (same fields); per-head methods have a
            panel per head.
        per_head: gives one map per head.
        reads_layer: reads one recorded module, chosen by `layer`; otherwise combines all of them.
        needs_class_token: reads the class token (a mean-pooled model has none).
        needs_gradients: takes gradients through the model, so it needs the model and `x`, not a recording.
        needs_query: needs a query point.
        on_key_grid: the map lies on the module's key grid (which a pooled grid lets reach past
            the image: see :func:`key_extent`); otherwise on the token grid.
    """

    name: str
    run: Callable[[MapRequest], Tensor]
    title: str
    label: str = ""
    per_head: bool = False
    reads_layer: bool = False
    needs_class_token: bool = False
    needs_gradients: bool = False
    needs_query: bool = False
    on_key_grid: bool = False

    def check(self, query: Point | None = None, per_head: bool = False) -> None:
        """Raise a `ValueError` unless a query point is given exactly when the method needs one,
        and `per_head` only for a per-head method."""
        if self.needs_query and query is None:
            raise ValueError(f"method {self.name!r} needs a query point (x, y)")
        if query is not None and not self.needs_query:
            raise ValueError(f"method {self.name!r} takes no query point; 'query' maps where one attends")
        if per_head and not self.per_head:
            raise ValueError(f"{self.name} gives one map (head_fusion fuses its heads); per_head is for the others")


#: the map methods by name, in the order menus list them
METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "cls",
            lambda r: cls_attention(r.recorded(), r.layer),
            "class-token attention",
            per_head=True,
            reads_layer=True,
            needs_class_token=True,
        ),
        MethodSpec(
            "rollout",
            lambda r: rollout(r.recorded(), r.head_fusion, r.discard_ratio),
            "attention rollout, discard {discard_ratio:g}",
            label="rollout ({head_fusion})",
        ),
        MethodSpec(
            "grad_rollout",
            lambda r: grad_rollout(*r.model_and_input(), r.target, layers=r.layers),
            "gradient-weighted rollout",
            label="class {target}",
            needs_gradients=True,
        ),
        MethodSpec(
            "query",
            lambda r: query_map(r.recorded(), r.layer, r.query_point(), relative=r.relative),
            "where ({x:g}, {y:g}) attends",
            per_head=True,
            reads_layer=True,
            needs_query=True,
            on_key_grid=True,
        ),
        MethodSpec(
            "received",
            lambda r: received(r.recorded(), r.layer),
            "attention received",
            per_head=True,
            reads_layer=True,
            on_key_grid=True,
        ),
    )
}


def method_spec(method: str) -> MethodSpec:
    """The :class:`MethodSpec` named ``method``; an unknown name is an error listing the names."""
    if method not in METHODS:
        raise ValueError(f"unknown map method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method]


@dataclass(frozen=True)
class AttentionMap:
    """A map from :func:`compute_map` and where it lies.

    Attributes:
        values: `(B, h, w)`, or `(B, heads, h, w)` with `per_head=True`.
        extent: cells of the map's grid that the input image spans (`to_image`'s `extent`), or
            `None` for the whole grid.
        path: the recorded module the map reads (methods that read one layer), or `None`.
    """

    values: Tensor
    extent: tuple[float, float] | None
    path: str | None


def grid_queries(model: nn.Module, query: Point | None) -> list[Point] | None:
    """What `record_attention(model, queries=...)` needs to serve a query map at `query`: the point,
    where `model` has grid blocks (`GridAttention`: only their query cells are recorded), else `None`."""
    if query is None or not any(isinstance(m, GridAttention) for m in model.modules()):
        return None
    return [query]


def _recorded(model: nn.Module, x: Tensor, request: MapRequest) -> AttentionRecording:
    queries = grid_queries(model, request.query)
    with (
        torch.no_grad(),
        record_attention(model, layers=request.layers, queries=queries, relative=request.relative) as recording,
    ):
        model(x)
    return recording


def compute_map(
    source: nn.Module | AttentionRecording,
    method: str,
    x: Tensor | None = None,
    *,
    layer: int | str = -1,
    query: Point | None = None,
    relative: bool = False,
    target: Target = None,
    head_fusion: Literal["mean", "max", "min"] = "mean",
    discard_ratio: float = 0.0,
    layers: str | Sequence[str] | None = None,
    per_head: bool = False,
) -> AttentionMap:
    """One named map (:data:`METHODS`) from a model and its input, or from a recording, with
    where it lies.

    Args:
        source: the model (then `x` is required: it is run once inside :func:`record_attention`),
            or an :class:`AttentionRecording` already made (not for gradient methods).
        method: a name of :data:`METHODS`: `"cls"`, `"rollout"`, `"grad_rollout"`, `"query"`,
            `"received"`.
        x: images `(B, C, H, W)` as the model takes them.
        layer: the module a one-layer method reads (path or position; `-1` the last).
        query: `(x, y)` point of the input for `"query"` (pixels, or fractions with `relative`).
        target: the class of `"grad_rollout"` (default the predicted one).
        head_fusion, discard_ratio: of `"rollout"` (:func:`rollout`).
        layers: the modules to record (:func:`record_attention`'s filter), e.g. only the token
            layers of a hybrid model.
        per_head: per-head methods: each head's map instead of their mean.

    Returns:
        an :class:`AttentionMap`: `(B, h, w)` values (or `(B, heads, h, w)` with `per_head`) on
        the method's grid (the token grid, or the key grid of `layer` for `"query"` and
        `"received"`), its `extent` and the module path it reads.
    """
    spec = method_spec(method)
    spec.check(query, per_head)
    request = MapRequest(
        None,
        None,
        x,
        layer=layer,
        query=query,
        relative=relative,
        target=target,
        head_fusion=head_fusion,
        discard_ratio=discard_ratio,
        layers=layers,
    )
    if isinstance(source, AttentionRecording):
        if spec.needs_gradients:
            raise ValueError(f"{method} takes gradients through the model: pass the model and x, not a recording")
        request = replace(request, recording=source)
    elif x is None:
        raise ValueError(f"computing {method!r} from a model needs its input images x (B, C, H, W)")
    else:
        request = replace(request, model=source)
        if not spec.needs_gradients:
            request = replace(request, recording=_recorded(source, x, request))
    values = spec.run(request)
    if spec.per_head and not per_head:
        values = values.mean(dim=1)
    path = request.recorded().path_of(layer) if spec.reads_layer else None
    return AttentionMap(values, request.recorded().extent(layer) if spec.on_key_grid else None, path)


def compute(source: nn.Module | AttentionRecording, method: str, x: Tensor | None = None, **options: Any) -> Tensor:
    """One named map (:data:`METHODS`): the values of :func:`compute_map`, with its arguments.

    Returns:
        `(B, h, w)`, or `(B, heads, h, w)` with `per_head=True`.

    Example::

        heat = maps.compute(vit, "rollout", images)                      # (B, gh, gw)
        heads = maps.compute(rec, "received", layer="layer3.1", per_head=True)
    """
    return compute_map(source, method, x, **options).values


# --- geometry -------------------------------------------------------------------------------


def key_extent(rec: AttentionRecord) -> tuple[float, float]:
    """How many cells of ``rec``'s key grid the input image spans: ``query_grid / key_stride``.

    Equal to the key grid for unpooled keys; smaller when ``kv_pool`` pooled an odd-sized grid
    in ceil mode (the last key row/column then reaches past the image).
    """
    return rec.key_extent


def to_image(
    heatmap: Tensor,
    image_size: tuple[int, int],
    *,
    extent: tuple[float, float] | None = None,
    mode: Literal["bilinear", "nearest", "bicubic"] = "bilinear",
    rows: tuple[int, int] | None = None,
) -> Tensor:
    """Resample a grid map ``(..., h, w)`` onto the pixels of an ``image_size`` ``(H, W)`` image.

    The grid's cells tile the image evenly (patches, feature-map strides); ``extent`` says how
    many cells the image spans when that is less than the grid (pooled key grids, see
    :func:`key_extent`). Each pixel's centre samples the grid at its position. ``rows``
    ``(start, stop)`` samples only those pixel rows of the image (a strip of a large picture).

    Returns:
        ``(..., H, W)`` in the heatmap's dtype, or ``(..., stop - start, W)`` with ``rows``.
    """
    if heatmap.dim() < 2:
        raise ValueError(f"heatmap must be (..., h, w), got {tuple(heatmap.shape)}")
    if mode not in ("bilinear", "nearest", "bicubic"):
        raise ValueError(f"mode must be 'bilinear', 'nearest' or 'bicubic', got {mode!r}")
    height, width = int(image_size[0]), int(image_size[1])
    gh, gw = heatmap.shape[-2:]
    eh, ew = (gh, gw) if extent is None else extent
    dtype = heatmap.dtype if heatmap.is_floating_point() else torch.float32
    start, stop = (0, height) if rows is None else (max(0, rows[0]), min(height, rows[1]))
    ys = (torch.arange(start, stop, dtype=torch.float64) + 0.5) / height * eh / gh * 2 - 1
    xs = (torch.arange(width, dtype=torch.float64) + 0.5) / width * ew / gw * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).to(dtype=dtype, device=heatmap.device)
    flat = heatmap.reshape(-1, 1, gh, gw).to(dtype)
    out = F.grid_sample(
        flat, grid.expand(flat.shape[0], len(ys), width, 2), mode=mode, padding_mode="border", align_corners=False
    )
    return out.reshape(*heatmap.shape[:-2], len(ys), width)
