"""The attention explorer: one self-contained HTML page for a model and its pictures.

:func:`explore` runs each picture through the model inside :func:`record_attention` and writes
one HTML file (``explorer.html``, shipped as package data, with the data inlined): the picture at
its own aspect ratio with a map over it, the top-5 predictions, a layer selector, a head selector
(each head, their mean, their max), the methods (class-token attention, rollout and gradient
rollout for Transformer layers; query map and attention received for every layer), opacity and
colormap controls, and the row of weights of any pointed patch or grid cell.

What the page draws is exact: every map is stored as ``uint8`` with its own minimum and maximum
(``value = lo + q / 255 · (hi - lo)``, error at most ``(hi - lo) / 510``), computed from the
weights :func:`record_attention` gives. Mean and max over heads are computed here and stored as
maps of their own, not recombined from quantized heads. Where the query rows of all layers would
pass ``max_mb``, a layer keeps every ``s``-th row and column of query cells (recorded with
``queries=``, so a large grid is never materialized) and the page says so.

What the page shows of the data (class names, module paths, picture names, the title, notes) is
inserted as text, never as markup: a class folder named `<img src=x onerror=...>` is shown as
those characters. Scores and maps must be finite (NaN weights are refused with one line before
anything is written), and the embedded JSON is strict and cannot end its `<script>` element.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .._io import atomic_write_text, check_output, load_image
from .._utils import require_finite
from ..data_spec import DataSpec
from ..layers.attention import GridAttention
from . import maps
from .inputs import Preprocess, default_data_config, picture_file
from .recording import AttentionRecording, record_attention

__all__ = [
    "COLORMAPS",
    "ExplorerPage",
    "dequantize",
    "explore",
    "quantize",
    "read_page_data",
]

#: matplotlib colormaps embedded in the page as 256-entry lookup tables
COLORMAPS = ("inferno", "viridis", "magma", "plasma", "turbo", "jet", "gray", "coolwarm")
#: longest side of a picture as embedded in the page (the map is drawn over it)
PICTURE_MAX_SIDE = 1024
#: predictions listed (and gradient rollouts computed: one per listed class)
TOP_K = 5
#: bytes of float32 weights one recording pass may hold while computing "attention received"
RECEIVED_CHUNK_BYTES = 64 * 2**20
_DATA_TAG = re.compile(r'<script type="application/json" id="visattn-data">(.*?)</script>', re.S)
#: what a map or a score that is not finite most likely comes from
_NOT_FINITE = "the model's weights are probably not finite (e.g. saved after training diverged); no page was written"
#: characters of the JSON text that could end or confuse its <script> element, as JSON escapes
_SCRIPT_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


# --- encoding ------------------------------------------------------------------------------------


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def quantize(values: Tensor, dims: int = 2, what: str = "maps") -> dict[str, Any]:
    """Maps ``(..., *map_dims)`` → ``uint8`` with a minimum and maximum per map, base64-encoded.

    Each map (the last ``dims`` dimensions) is stored as ``q = round((v - lo) / (hi - lo) · 255)``
    with its own ``lo``/``hi`` (float32), so a value comes back within ``(hi - lo) / 510`` and
    ``q / 255`` is the map normalized to its own range (what the colormap shows).

    Returns:
        ``{"shape": [...], "q": uint8 bytes, "lo": float32 bytes, "hi": float32 bytes}`` (base64,
        little-endian), maps in row-major order of the leading dimensions.

    Raises:
        ValueError: a value is NaN or infinite (the message names the values as ``what``).
    """
    require_finite(values, what, _NOT_FINITE)
    array = values.detach().to(torch.float64).cpu().numpy()
    flat = array.reshape(-1, int(np.prod(array.shape[len(array.shape) - dims :])))
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    span = np.where(hi > lo, hi - lo, 1.0)
    q = np.rint((flat - lo[:, None]) / span[:, None] * 255.0).clip(0, 255).astype(np.uint8)
    return {
        "shape": list(array.shape),
        "q": _b64(q),
        "lo": _b64(lo.astype("<f4")),
        "hi": _b64(hi.astype("<f4")),
    }


def dequantize(entry: dict[str, Any]) -> np.ndarray:
    """The values of a :func:`quantize` entry, ``float64`` of its ``shape``."""
    q = np.frombuffer(base64.b64decode(entry["q"]), dtype=np.uint8).astype(np.float64)
    lo = np.frombuffer(base64.b64decode(entry["lo"]), dtype="<f4").astype(np.float64)
    hi = np.frombuffer(base64.b64decode(entry["hi"]), dtype="<f4").astype(np.float64)
    maps_ = q.reshape(len(lo), -1)
    return (lo[:, None] + maps_ / 255.0 * (hi - lo)[:, None]).reshape(entry["shape"])


def _fixed16(values: Tensor, what: str) -> dict[str, Any]:
    """Weights in ``[0, 1]`` as ``uint16`` fixed point (to 1/65535): the few prefix-token values."""
    require_finite(values, what, _NOT_FINITE)
    array = values.detach().to(torch.float64).cpu().numpy()
    return {"shape": list(array.shape), "q16": _b64(np.rint(array.clip(0, 1) * 65535).astype("<u2"))}


def read_page_data(page: str | os.PathLike) -> dict[str, Any]:
    """The data an explorer page embeds (a path to the HTML file, or its text), as a dict."""
    text = page if isinstance(page, str) and page.lstrip().startswith("<") else Path(page).read_text("utf-8")
    found = _DATA_TAG.search(text)
    if found is None:
        raise ValueError(f"{page if len(str(page)) < 200 else 'the text'} is not a visattn explorer page")
    return json.loads(found.group(1))


def _colormap_tables() -> dict[str, str]:
    import matplotlib

    tables = {}
    for name in COLORMAPS:
        rgb = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]
        tables[name] = _b64(np.rint(rgb * 255).astype(np.uint8))
    return tables


def _picture_src(picture: Image.Image) -> str:
    """The picture as a data URL: PNG when small (digits, icons), JPEG otherwise."""
    image = picture.convert("RGB")
    if max(image.size) > PICTURE_MAX_SIDE:
        image.thumbnail((PICTURE_MAX_SIDE, PICTURE_MAX_SIDE))
    buffer = io.BytesIO()
    small = image.width * image.height <= 256 * 256
    image.save(buffer, format="PNG" if small else "JPEG", quality=90)
    kind = "png" if small else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --- what the page shows of each attention module ------------------------------------------------


@dataclass
class LayerShape:
    """One recorded attention module as the page lays it out.

    ``queries``: query rows with image positions (``gh · gw``); ``prefix``: class/register tokens
    in front of them (their rows are always kept); ``stride``: every ``stride``-th row and column
    of query cells is kept (1 = all).
    """

    path: str
    kind: str  # "token" (MultiHeadAttention) or "grid" (GridAttention: SelfAttention2d, local families)
    heads: int
    query_grid: tuple[int, int]
    key_grid: tuple[int, int]
    extent: tuple[float, float]
    prefix: int
    class_token: bool
    stride: int = 1

    @property
    def head_maps(self) -> int:
        """Maps per query: each head, then their mean and max (when there are several)."""
        return self.heads + (2 if self.heads > 1 else 0)

    def kept_cells(self, stride: int | None = None) -> list[tuple[int, int]]:
        """``(row, col)`` of the query cells kept at ``stride``, row-major, centred in each block."""
        s = self.stride if stride is None else stride
        gh, gw = self.query_grid
        rows = range(min((s - 1) // 2, gh - 1), gh, s)
        cols = range(min((s - 1) // 2, gw - 1), gw, s)
        return [(r, c) for r in rows for c in cols]

    def map_bytes(self) -> int:
        """Bytes of the page data (before base64) of this module's whole-grid maps: attention
        received, class-token attention and rollout (Transformer layers)."""
        keys, queries = self.key_grid[0] * self.key_grid[1], self.query_grid[0] * self.query_grid[1]
        token_maps = (self.head_maps + 2) * (queries + 8) if self.kind == "token" else 0
        return self.head_maps * (keys + 8) + token_maps

    def row_bytes(self, stride: int) -> int:
        """Bytes of the page data (before base64) of this module's query rows at ``stride``."""
        keys = self.key_grid[0] * self.key_grid[1]
        rows = self.prefix + len(self.kept_cells(stride))
        return self.head_maps * rows * (keys + 8 + 2 * self.prefix)


def _layer_shapes(recording: AttentionRecording) -> list[LayerShape]:
    shapes = []
    for path, rec in recording.items():
        if rec.key_grid is None or rec.query_grid is None:
            continue  # cross-attention: its keys have no place on the picture
        shapes.append(
            LayerShape(
                path=path,
                kind="grid" if isinstance(recording.modules[path], GridAttention) else "token",
                heads=int(rec.weights.shape[1]),
                query_grid=rec.query_grid,
                key_grid=rec.key_grid,
                extent=rec.key_extent,
                prefix=rec.num_prefix_tokens,
                class_token=rec.class_token and rec.num_prefix_tokens > 0,  # a backbone block of a hybrid has none
            )
        )
    return shapes


def plan_strides(layers: Sequence[LayerShape], budget: float) -> dict[str, int]:
    """Query-cell strides that keep all layers' rows within ``budget`` bytes (one picture).

    Starts from every cell of every layer and, while over the budget, thins the layer whose rows
    cost the most by one more step of stride.

    Raises:
        ValueError: even one query cell per layer is over the budget.
    """
    strides = {layer.path: 1 for layer in layers}
    by_path = {layer.path: layer for layer in layers}

    def cost(path: str) -> int:
        return by_path[path].row_bytes(strides[path])

    while sum(cost(p) for p in strides) > budget:
        thinnable = [p for p in strides if len(by_path[p].kept_cells(strides[p])) > 1]
        if not thinnable:
            need = sum(cost(p) for p in strides)
            raise ValueError(f"even one query cell per layer needs {need} bytes, over the budget of {budget:.0f}")
        widest = max(thinnable, key=cost)
        strides[widest] += 1
    return strides


# --- maps of one picture -------------------------------------------------------------------------


def _with_fused(per_head: Tensor) -> Tensor:
    """``(heads, ...)`` → each head, then (with several) their mean and max: ``(heads + 2, ...)``."""
    if per_head.shape[0] == 1:
        return per_head
    per_head = per_head.to(torch.float64)
    return torch.cat([per_head, per_head.mean(0, keepdim=True), per_head.amax(0, keepdim=True)])


def _cell_points(layer: LayerShape, cells: Sequence[tuple[int, int]], image_size: tuple[int, int]) -> list:
    """The ``(x, y)`` input pixel at the centre of each query cell (what ``queries=`` takes)."""
    (height, width), (gh, gw) = image_size, layer.query_grid
    return [((c + 0.5) * width / gw, (r + 0.5) * height / gh) for r, c in cells]


def _record_cells(
    model: nn.Module, x: Tensor, layer: LayerShape, cells: Sequence[tuple[int, int]]
) -> AttentionRecording:
    """A grid module's weights for exactly these query cells (one forward, ``queries=``)."""
    points = _cell_points(layer, cells, (x.shape[-2], x.shape[-1]))
    with torch.no_grad(), record_attention(model, layers=layer.path, queries=points, max_bytes=None) as rec:
        model(x)
    index = rec[layer.path].query_index
    want = torch.tensor([r * layer.query_grid[1] + c for r, c in cells])
    if index is None or not torch.equal(index.cpu(), want):
        raise RuntimeError(f"{layer.path}: the recorded query cells are not the ones asked for")
    return rec


def _grid_received(model: nn.Module, x: Tensor, layer: LayerShape) -> Tensor:
    """``maps.received`` over every query cell, recorded a chunk of cells at a time: ``(heads, kh, kw)``."""
    cells = layer.kept_cells(1)
    per_row = layer.heads * layer.key_grid[0] * layer.key_grid[1] * 4
    chunk = max(1, RECEIVED_CHUNK_BYTES // per_row)
    total: Tensor | None = None
    for start in range(0, len(cells), chunk):
        part = cells[start : start + chunk]
        recording = _record_cells(model, x, layer, part)
        mean = maps.compute(recording, "received", layer=layer.path, per_head=True)[0].to(torch.float64) * len(part)
        total = mean if total is None else total + mean
    assert total is not None  # a grid has at least one cell
    return total / len(cells)


def _split_rows(weights: Tensor, layer: LayerShape) -> dict[str, Any]:
    """Query rows ``(heads, rows, Nk)`` → quantized key-grid maps and fixed-point prefix weights."""
    fused = _with_fused(weights)
    kh, kw = layer.key_grid
    grid_part = fused[..., layer.prefix :].reshape(*fused.shape[:2], kh, kw)
    entry = {"maps": quantize(grid_part, what=f"the query rows of {layer.path}")}
    if layer.prefix:
        entry["prefix"] = _fixed16(fused[..., : layer.prefix], f"the prefix-token weights of {layer.path}")
    return entry


def _query_rows(model: nn.Module, x: Tensor, recording: AttentionRecording, layer: LayerShape) -> dict[str, Any]:
    """The kept query rows of one module: prefix queries first, then the kept cells row-major."""
    cells = layer.kept_cells()
    if layer.kind == "grid":
        weights = _record_cells(model, x, layer, cells)[layer.path].weights[0]
    else:
        full = recording[layer.path].weights[0]
        index = list(range(layer.prefix)) + [layer.prefix + r * layer.query_grid[1] + c for r, c in cells]
        weights = full[:, index]
    return _split_rows(weights, layer)


def _token_maps(recording: AttentionRecording, layer: LayerShape, token_paths: list[str]) -> dict[str, Any]:
    """Class-token attention and rollout (through this layer: mean and max fusion) of a token layer."""
    out: dict[str, Any] = {}
    if layer.class_token:
        cls = _with_fused(maps.compute(recording, "cls", layer=layer.path, per_head=True)[0])
        out["cls"] = quantize(cls, what=f"the class-token attention of {layer.path}")
    upto = recording.select(token_paths[: token_paths.index(layer.path) + 1])
    rollouts = torch.stack([maps.compute(upto, "rollout", head_fusion=fusion)[0] for fusion in ("mean", "max")])
    out["rollout"] = quantize(rollouts, what=f"the rollout through {layer.path}")
    return out


def _layer_entry(
    model: nn.Module, x: Tensor, recording: AttentionRecording, layer: LayerShape, token_paths: list[str]
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "path": layer.path,
        "kind": layer.kind,
        "heads": layer.heads,
        "query_grid": list(layer.query_grid),
        "key_grid": list(layer.key_grid),
        "extent": list(layer.extent),
        "prefix": _prefix_names(layer),
        "stride": layer.stride,
        "offset": min((layer.stride - 1) // 2, layer.query_grid[0] - 1),
        "offset_x": min((layer.stride - 1) // 2, layer.query_grid[1] - 1),
        "rows": _query_rows(model, x, recording, layer),
    }
    if layer.kind == "grid":
        received = _grid_received(model, x, layer)
    else:
        received = maps.compute(recording, "received", layer=layer.path, per_head=True)[0]
    entry["received"] = quantize(_with_fused(received), what=f"the attention received in {layer.path}")
    if layer.kind == "token":
        entry.update(_token_maps(recording, layer, token_paths))
    return entry


def _prefix_names(layer: LayerShape) -> list[str]:
    names = ["class token"] if layer.class_token else []
    return names + [f"register {i}" for i in range(layer.prefix - len(names))]


# --- one picture ---------------------------------------------------------------------------------


@dataclass
class _View:
    """One picture run through the model: its input, prediction and probe recording."""

    name: str
    picture: Image.Image
    x: Tensor
    logits: Tensor
    recording: AttentionRecording
    layers: list[LayerShape] = field(default_factory=list)


def _probe(model: nn.Module, x: Tensor) -> tuple[Tensor, AttentionRecording]:
    """One forward recording every Transformer layer whole and one query cell of each grid block
    (enough to learn its grids without materializing them)."""
    grid_blocks = any(isinstance(m, GridAttention) for m in model.modules())
    queries = [(0.0, 0.0)] if grid_blocks else None
    with torch.no_grad(), record_attention(model, queries=queries) as recording:
        logits = model(x)
    return logits, recording


def _predictions(logits: Tensor, class_names: Sequence[str] | None) -> list[dict[str, Any]]:
    if logits.dim() != 2 or logits.shape[1] < 2:
        return []
    probs = logits.detach().double().softmax(dim=-1)[0]
    top = probs.topk(min(TOP_K, probs.numel()))
    names = list(class_names or [])
    return [
        {"index": int(i), "label": names[i] if i < len(names) else str(int(i)), "p": float(p)}
        for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]


def _grad_rollouts(model: nn.Module, view: _View, predictions: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Gradient-weighted rollout for each listed class, ``(k, gh, gw)``; ``None`` without Transformer layers."""
    token_paths = [layer.path for layer in view.layers if layer.kind == "token"]
    if not token_paths or not predictions:
        return None
    targets = [p["index"] for p in predictions]
    copies = view.x.expand(len(targets), *view.x.shape[1:])  # one batch: a copy of the picture per class
    heat = maps.compute(model, "grad_rollout", copies, target=targets, layers=token_paths)
    return quantize(heat, what="the gradient rollouts")


def _image_entry(model: nn.Module, view: _View, class_names: Sequence[str] | None) -> dict[str, Any]:
    token_paths = [layer.path for layer in view.layers if layer.kind == "token"]
    predictions = _predictions(view.logits, class_names)
    return {
        "name": view.name,
        "width": view.picture.width,
        "height": view.picture.height,
        "src": _picture_src(view.picture),
        "input_size": list(view.x.shape[-2:]),
        "predictions": predictions,
        "grad_rollout": _grad_rollouts(model, view, predictions),
        "layers": [_layer_entry(model, view.x, view.recording, layer, token_paths) for layer in view.layers],
    }


# --- the page ------------------------------------------------------------------------------------


@dataclass
class ExplorerPage:
    """What :func:`explore` wrote: the file, its size and what it says about subsampling."""

    path: Path
    bytes: int
    picture_bytes: int
    notes: list[str]
    strides: dict[str, int]

    def summary(self) -> str:
        text = f"{self.path} ({self.bytes / 1e6:.2f} MB, pictures {self.picture_bytes / 1e6:.2f} MB)"
        return text + "".join(f"; {note}" for note in self.notes)


def _as_picture(image: Image.Image | str | os.PathLike, number: int) -> tuple[str, Image.Image]:
    if isinstance(image, Image.Image):
        return f"picture {number + 1}", image
    return Path(image).name, load_image(image, max_side=max(PICTURE_MAX_SIDE, 2048))


def _views(model: nn.Module, images: Sequence, preprocess: Preprocess) -> list[_View]:
    views = []
    for number, image in enumerate(images):
        name, picture = _as_picture(image, number)
        x = preprocess(picture)[None].to(next(model.parameters()).device)
        logits, recording = _probe(model, x)
        require_finite(logits, f"the model's output for {name}", _NOT_FINITE)
        views.append(_View(name, picture, x, logits, recording, _layer_shapes(recording)))
        if not views[-1].layers:
            raise ValueError(
                f"{type(model).__name__} recorded no attention with positions on the picture "
                f"(recorded: {', '.join(recording)}); the explorer needs self-attention over patches or grid cells"
            )
    return views


def _subsampling_notes(layers: Sequence[LayerShape], max_mb: float) -> list[str]:
    notes = []
    for layer in layers:
        if layer.stride > 1:
            kept = len(layer.kept_cells())
            total = layer.query_grid[0] * layer.query_grid[1]
            notes.append(
                f"{layer.path}: query rows kept for one cell in every {layer.stride}×{layer.stride} block "
                f"({kept} of {total} cells) to stay within {max_mb:g} MB; pointing elsewhere shows the "
                "nearest kept cell (marked); attention received still averages every query cell"
            )
    return notes


def _fill_template(data: dict[str, Any], title: str) -> str:
    """The page: `data` as JSON inside its `<script type="application/json">` element, `title` as HTML text.

    The JSON is strict (`NaN` or `Infinity` raise `ValueError`, as `JSON.parse` would refuse them)
    and ASCII (`ensure_ascii`: U+2028, U+2029 and every other non-ASCII character are `\\uXXXX`
    escapes); `<`, `>` and `&` are escaped too, so no string in it can close the element, open
    a comment or be read as markup.
    """
    template = resources.files(__package__).joinpath("explorer.html").read_text("utf-8")
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).translate(_SCRIPT_SAFE)
    page = template.replace("__VISATTN_TITLE__", html.escape(title))
    return page.replace("__VISATTN_DATA__", payload)


def explore(
    model: nn.Module,
    images: Sequence[Image.Image | str | os.PathLike] | Image.Image | str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    data_config: DataSpec | None = None,
    class_names: Sequence[str] | None = None,
    max_mb: float = 20.0,
    title: str | None = None,
    cmap: str = "inferno",
    alpha: float = 0.6,
    force: bool = False,
) -> ExplorerPage:
    """Write one self-contained HTML page to explore where ``model`` looks in ``images``.

    Args:
        model: a model with visattn attention modules (a ``VisionTransformer``, a CNN with
            ``SelfAttention2d`` blocks, a ``HybridViT``, a converted timm/torchvision ViT);
            put in eval mode here.
        images: pictures (PIL images or files), any size and aspect ratio; each is shown at its
            own aspect ratio and fed to the model as ``data_config`` says.
        out_path: the HTML file to write (atomically). Never one of the picture files (nor a
            link to one); an existing file there is replaced only if it is an HTML page or empty
            (`visattn._io.check_output`).
        data_config: how the model is fed, a :class:`~visattn.data_spec.DataSpec` (a visattn
            checkpoint's: ``DataSpec.from_dict(state["data_config"])``); default from the model
            (:func:`default_data_config`).
        class_names: names of the classes (default ``data_config.class_names`` if any).
        max_mb: size budget of the page in megabytes; query rows beyond it are subsampled.
        title: the page's title (default the model's class name).
        cmap, alpha: the colormap (one of :data:`COLORMAPS`) and opacity the page opens with.
        force: let ``out_path`` replace an existing file of another kind than an HTML page.

    Returns:
        an :class:`ExplorerPage` with the file's size and the notes the page shows.

    Raises:
        ValueError: a bad argument, a model that records no attention on the picture, or class
            scores or maps with NaN or infinite values (e.g. from NaN weights); nothing is written.
    """
    if cmap not in COLORMAPS:
        raise ValueError(f"cmap must be one of {', '.join(COLORMAPS)}, got {cmap!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not 0 < max_mb < math.inf:
        raise ValueError(f"max_mb must be a positive number of megabytes, got {max_mb}")
    images = [images] if isinstance(images, Image.Image | str | os.PathLike) else list(images)
    if not images:
        raise ValueError("give at least one picture")
    check_output(out_path, "HTML", [picture_file(image) for image in images], force=force)
    model.eval()
    spec = data_config or default_data_config(model)
    class_names = class_names or spec.class_names
    views = _views(model, images, Preprocess.from_spec(spec))
    return _write_page(model, views, Path(out_path), class_names, max_mb, title or type(model).__name__, cmap, alpha)


def _plan(views: list[_View], max_mb: float) -> dict[str, int]:
    """Query-cell strides that keep the page within ``max_mb`` (:func:`plan_strides`), after the
    pictures, the template and the whole-picture maps (known in advance) have taken their share."""
    template = resources.files(__package__).joinpath("explorer.html").read_text("utf-8")
    layers = views[0].layers  # every picture is fed at the same input size: the same layers
    token_grids = [lay.query_grid[0] * lay.query_grid[1] for lay in layers if lay.kind == "token"]
    grad_rollouts = TOP_K * (max(token_grids) + 8) if token_grids else 0
    small_maps = len(views) * (sum(layer.map_bytes() for layer in layers) + grad_rollouts)
    fixed = sum(len(_picture_src(v.picture)) for v in views) + len(template) + 16 * 1024 + small_maps * 4 / 3
    per_picture = (max_mb * 1e6 - fixed) * 3 / 4 / len(views)
    fewest = sum(layer.row_bytes(max(layer.query_grid)) for layer in layers)  # one query cell per layer
    if fewest > per_picture:
        least = (fixed + fewest * 4 / 3 * len(views)) / 1e6
        raise ValueError(
            f"max_mb={max_mb:g} is too small for this page: the pictures and whole-picture maps take "
            f"{fixed / 1e6:.2f} MB and the query rows at least {least - fixed / 1e6:.2f} MB more; "
            f"give at least {least:.2f}"
        )
    return plan_strides(layers, per_picture)


def _write_page(
    model: nn.Module,
    views: list[_View],
    out_path: Path,
    class_names: Sequence[str] | None,
    max_mb: float,
    title: str,
    cmap: str,
    alpha: float,
) -> ExplorerPage:
    """Plan the query rows within ``max_mb``, encode every picture's maps, write the page."""
    if not out_path.resolve().parent.is_dir():
        raise FileNotFoundError(f"{out_path}: the folder {out_path.parent} does not exist; create it first")
    strides = _plan(views, max_mb)
    for view in views:
        for layer in view.layers:
            layer.stride = strides[layer.path]
    notes = _subsampling_notes(views[0].layers, max_mb)
    data: dict[str, Any] = {
        "format": "visattn-explorer",
        "version": 1,
        "title": title,
        "max_mb": max_mb,
        "notes": notes,
        "cmap": cmap,
        "alpha": alpha,
        "colormaps": _colormap_tables(),
        "images": [_image_entry(model, view, class_names) for view in views],
    }
    page = _fill_template(data, title)
    atomic_write_text(out_path, page)
    pictures = sum(len(image["src"]) for image in data["images"])
    return ExplorerPage(out_path, len(page.encode("utf-8")), pictures, notes, strides)
