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

:func:`to_image` resamples any of them onto the input image's pixels. Points are ``(x, y)``:
``x`` is the column, ``y`` the row, in pixels of the model input (or fractions of its width and
height with ``relative=True``), as PIL and matplotlib count them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..layers.attention import AttentionRecord, MultiHeadAttention
from .recording import AttentionRecording, Point, point_to_cell, record_attention

__all__ = [
    "AttentionRecording",
    "cls_attention",
    "grad_rollout",
    "key_extent",
    "point_to_cell",
    "query_map",
    "received",
    "record_attention",
    "rollout",
    "to_image",
]


# --- maps -----------------------------------------------------------------------------------


def _grid_tokens(rec: AttentionRecord, path: str) -> tuple[int, tuple[int, int]]:
    if rec.key_grid is None:
        raise ValueError(f"{path} recorded cross-attention or tokens without a grid; its keys have no image positions")
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
            "(MultiHeadAttention), and none was recorded here (recorded: "
            f"{', '.join(recording)}); for a SelfAttention2d use query_map (where a point attends) "
            "or received (attention each position receives)"
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
            raise IndexError(f"layer {layer} out of range: {len(layers)} Transformer layer(s) recorded")
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
    target: int | Sequence[int] | Tensor | None = None,
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
        module: a recorded ``SelfAttention2d`` (or Transformer layer): path, position or module.
        point: ``(x, y)`` = (column, row) in pixels of the input image, or fractions of its width
            and height with ``relative=True``.
        image_size: ``(H, W)`` of the input; default the one recorded.

    Returns:
        ``(B, heads, kh, kw)``; each head's map sums to one (over the grid tokens). Use
        :func:`to_image` with ``recording.extent(module)`` to put it on the image.
    """
    path, rec = _grid_record(recording, module)
    image_size = image_size or rec.image_size
    if image_size is None:
        raise ValueError(
            "the input image size was not recorded (the model itself was not called); pass image_size=(H, W)"
        )
    row, col = point_to_cell(point, image_size, rec.query_grid, relative=relative)
    flat = row * rec.query_grid[1] + col
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
