"""Exact attention capture: :func:`record_attention` and what it collects.

While the context manager is open, every visattn attention module of a model (found through
``named_modules()``) computes its weights explicitly, in the arithmetic of its forward pass, and
hands an :class:`~visattn.AttentionRecord` to the open :class:`AttentionRecording`. On close
the modules return to the fused kernel and keep nothing. Points are ``(x, y)``: ``x`` the
column, ``y`` the row, in pixels of the model input (or fractions with ``relative=True``).

Modules know nothing of images. A grid module says its own grids (its input is one); a token
module says neither, and the recording asks the model that owns it (the nearest enclosing
`TokenGridModel`: `grid_for(H, W)` and `num_prefix_tokens`, as a ViT has them) where its tokens
lie, each time that model is called on images. A module with a sparse key pattern hands its
weights with their `key_index`; the recording keeps them as full rows
(`AttentionRecord.with_full_keys`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, cast, runtime_checkable

import torch
from torch import Tensor, nn

from ..layers.attention import (
    AttentionRecord,
    GridAttention,
    RecordableAttention,
    RecordingRequest,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "AttentionRecording",
    "NotRecordedError",
    "Point",
    "TokenGridModel",
    "TokenLayout",
    "point_to_cell",
    "record_attention",
]

Point = tuple[float, float]


class NotRecordedError(KeyError, IndexError):
    """A layer asked for (a module path, a position in forward order or a module) that the
    recording does not hold; the message names the recorded ones. A ``KeyError`` and an
    ``IndexError``, as a failed lookup by key and by position are."""


#: default refusal limit of :func:`record_attention`: 2 GiB of weights per module call
DEFAULT_MAX_BYTES = 2**31


class AttentionRecording(Mapping[str, AttentionRecord]):
    """What :func:`record_attention` collected: module path → :class:`~visattn.AttentionRecord`.

    Paths are those of ``model.named_modules()``, in the order the modules ran. Each forward of
    the model itself starts a fresh set. Reading an empty recording raises an error that says why.

    Attributes:
        image_size: ``(H, W)`` of the last input the model was called with, or ``None``.
        modules: path → the attention module, for every module that is being recorded.
    """

    def __init__(self, modules: dict[str, RecordableAttention]) -> None:
        self.modules = modules
        self.image_size: tuple[int, int] | None = None
        self._records: dict[str, AttentionRecord] = {}

    def _require(self) -> dict[str, AttentionRecord]:
        if not self._records:
            raise RuntimeError(
                f"nothing was recorded: none of the {len(self.modules)} attention module(s) "
                f"({', '.join(self.modules)}) ran while record_attention was open; call the model "
                "inside the `with record_attention(model) as rec:` block"
            )
        return self._records

    def __getitem__(self, path: str) -> AttentionRecord:
        if not isinstance(path, str):
            raise KeyError(f"records are keyed by module path; for a position use rec.path_of({path!r})")
        return self._records[self.path_of(path)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._require())

    def __len__(self) -> int:
        return len(self._require())

    def path_of(self, module: str | int | nn.Module) -> str:
        """The recorded path for a path, a position in forward order (``-1`` = last) or a module.

        Raises `NotRecordedError` listing the recorded paths when there is no such record."""
        records = self._require()
        if isinstance(module, str):
            if module not in records:
                raise NotRecordedError(f"no attention recorded for {module!r}; recorded: {', '.join(records)}")
            return module
        if isinstance(module, int):
            paths = list(records)
            if not -len(paths) <= module < len(paths):
                raise NotRecordedError(
                    f"layer {module} out of range: {len(paths)} module(s) recorded ({', '.join(paths)})"
                )
            return paths[module]
        for path, candidate in self.modules.items():
            if candidate is module and path in records:
                return path
        raise NotRecordedError(f"{type(module).__name__} module was not recorded; recorded: {', '.join(records)}")

    def extent(self, module: str | int | nn.Module) -> tuple[float, float]:
        """How many key cells of ``module``'s key grid the input image spans (see :func:`key_extent`)."""
        return self._records[self.path_of(module)].key_extent

    def select(self, paths: Sequence[str]) -> AttentionRecording:
        """A recording of only these paths' records, in forward order (e.g. the first ``k``
        layers, for a rollout up to layer ``k``); the records are shared, not copied."""
        chosen = [self.path_of(p) for p in paths]
        subset = AttentionRecording({p: m for p, m in self.modules.items() if p in chosen})
        subset.image_size = self.image_size
        for path, record in self._require().items():
            if path in chosen:
                subset._add(path, record)
        return subset

    def _add(self, path: str, record: AttentionRecord) -> None:
        self._records.pop(path, None)  # keep forward order when a module runs again
        self._records[path] = record

    def _clear(self) -> None:
        self._records = {}

    def __repr__(self) -> str:
        lines = [
            f"  {path}: weights {tuple(r.weights.shape)}, query grid {r.query_grid}, key grid {r.key_grid}"
            for path, r in self._records.items()
        ]
        return f"AttentionRecording(image_size={self.image_size},\n" + "\n".join(lines) + ")"


@runtime_checkable
class TokenGridModel(Protocol):
    """What a model tells a recording about the tokens its attention modules see.

    `VisionTransformer` (and so `HybridViT`) has both members, as timm's `dynamic_img_size` ViTs
    have their equivalents. A model may also have `cls_token` (`None` when it has none) and
    `pool` (`"cls"`, `"mean"`, `"cls_mean"`): how its output reads the tokens.

    Attributes:
        num_prefix_tokens: class, distillation and register tokens in front of the grid tokens.
    """

    num_prefix_tokens: int

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """The token grid `(gh, gw)` of an input image `height × width`."""
        ...


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of one call of a `TokenGridModel` lie, and how it reads them out.

    Attributes:
        grid: `(gh, gw)` of the grid tokens.
        num_prefix_tokens: tokens in front of them.
        class_token: prefix token 0 is a class token.
        pool: how the model's output reads its tokens (`"cls"`, `"mean"`, `"cls_mean"`).
    """

    grid: tuple[int, int]
    num_prefix_tokens: int
    class_token: bool
    pool: str

    @classmethod
    def of(cls, model: TokenGridModel, height: int, width: int) -> TokenLayout:
        """What `model` says about its tokens for an input `height × width`."""
        class_token = getattr(model, "cls_token", None) is not None
        pool = getattr(model, "pool", None)
        pool = pool if isinstance(pool, str) else ("cls" if class_token else "mean")
        grid = model.grid_for(height, width)
        return cls((int(grid[0]), int(grid[1])), int(model.num_prefix_tokens), class_token, pool)

    def describe(self, record: AttentionRecord) -> AttentionRecord:
        """A token record (no grids of its own) with this layout: its query grid, its key grid
        unless it is cross-attention, the prefix count and the readout. A record whose query rows
        are not these tokens (another count) is returned as it is."""
        if record.weights.shape[-2] != self.num_prefix_tokens + self.grid[0] * self.grid[1]:
            return record
        return replace(
            record,
            query_grid=self.grid,
            key_grid=None if record.cross_attention else self.grid,
            num_prefix_tokens=self.num_prefix_tokens,
            class_token=self.class_token,
            pool=self.pool,
        )


def _owner_path(model: nn.Module, path: str) -> str | None:
    """The path of the nearest module enclosing ``path`` that is a :class:`TokenGridModel` (or ``None``)."""
    parts = path.split(".") if path else []
    for depth in range(len(parts) - 1, -1, -1):
        owner = ".".join(parts[:depth])
        if isinstance(model.get_submodule(owner), TokenGridModel):
            return owner
    return None


def _first_image(args: tuple, kwargs: dict) -> Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.dim() == 4:
            return value
    return None


def _check_point(point: Point, image_size: tuple[int, int], relative: bool) -> tuple[float, float]:
    """``(x, y)`` in pixels of an ``image_size`` image, checked to lie inside it."""
    if len(point) != 2:
        raise ValueError(f"a point is (x, y) = (column, row), got {point!r}")
    x, y = float(point[0]), float(point[1])
    height, width = image_size
    if relative:
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            raise ValueError(f"relative point (x={x}, y={y}) must lie in [0, 1] × [0, 1]")
        return min(x * width, math.nextafter(width, 0)), min(y * height, math.nextafter(height, 0))
    if not (0.0 <= x < width and 0.0 <= y < height):
        raise ValueError(
            f"point (x={x:g}, y={y:g}) lies outside the {width}×{height} (W×H) input image: x must be in "
            f"[0, {width}), y in [0, {height}); use relative=True for fractions of the width and height"
        )
    return x, y


def point_to_cell(
    point: Point, image_size: tuple[int, int], grid: tuple[int, int], *, relative: bool = False
) -> tuple[int, int]:
    """The ``(row, col)`` of the ``grid`` cell that covers ``point`` = ``(x, y)`` of the image.

    The grid is taken to tile the ``image_size`` ``(H, W)`` image evenly (patch tokens, or a CNN
    feature map and its stride).
    """
    x, y = _check_point(point, image_size, relative)
    (height, width), (gh, gw) = image_size, grid
    return min(int(y * gh / height), gh - 1), min(int(x * gw / width), gw - 1)


def _module_paths(model: nn.Module, layers: str | Sequence[str] | None) -> dict[str, RecordableAttention]:
    found = {path: m for path, m in model.named_modules() if isinstance(m, RecordableAttention)}
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no visattn attention modules (MultiHeadAttention or "
            "SelfAttention2d), so there is nothing to record; build a visattn model, convert a "
            "pretrained one, or add blocks with visattn.insert_attention"
        )
    if layers is None:
        return found
    patterns = [layers] if isinstance(layers, str) else list(layers)
    chosen = {p: m for p, m in found.items() if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)}
    if not chosen:
        raise ValueError(
            f"layers={patterns} matched none of the attention modules; they are: {', '.join(found)} "
            "(shell-style patterns such as 'blocks.*.attn' work too)"
        )
    return chosen


@contextlib.contextmanager
def record_attention(
    model: nn.Module,
    *,
    layers: str | Sequence[str] | None = None,
    queries: Sequence[Point] | None = None,
    relative: bool = False,
    keep_grad: bool = False,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> Iterator[AttentionRecording]:
    """Record the attention weights of every visattn attention module of ``model``.

    While open, each ``MultiHeadAttention`` and grid attention block (``SelfAttention2d`` and the
    local families of :mod:`visattn.layers.local`; inside a ViT, a CNN, any ``nn.Module``)
    computes its weights explicitly, in the arithmetic of its forward pass, and the recording
    keeps them per module path. On close the modules return to the fused kernel and keep nothing.

    Args:
        model: any module; its attention modules are found through ``named_modules()``.
        layers: module paths or shell-style patterns (``"blocks.11.attn"``, ``"blocks.*"``) to
            record; default all. A filter that matches nothing is an error listing the paths.
        queries: grid blocks only (a :class:`~visattn.layers.attention.GridAttention`:
            ``SelfAttention2d``, ``WindowAttention2d``, ``NeighborhoodAttention2d``,
            ``HaloAttention2d``): record only the query cells under these ``(x, y)`` points of
            the input image (pixels, or fractions with ``relative=True``), so a ``128×128`` grid
            costs ``O(q·HW)`` memory instead of ``O((HW)²)``; the block's output still comes
            from the fused kernel. Needs the model to be called on the image.
        relative: ``queries`` are fractions of the input's width and height.
        keep_grad: keep the weights in the autograd graph (for gradient-weighted maps);
            otherwise they are detached.
        max_bytes: a limit on the whole recording: the weights of all recorded modules of one
            forward pass together. A module whose matrix would take the total over it is refused
            before computing it (the error gives the bytes it would need); ``None`` for no limit.

    Yields:
        an :class:`AttentionRecording`: path → record with ``weights`` ``(B, heads, Nq, Nk)``,
        ``query_grid``, ``key_grid``, ``key_stride``, ``num_prefix_tokens``, ``query_index``,
        ``image_size``, ``class_token`` and ``pool``.

    Grids of token modules: each time the model that owns them (a `TokenGridModel` such as a
    ViT) is called on images `(B, C, H, W)`, a forward pre-hook asks it for its grid and prefix
    count (with recording paused, so a stem that runs attention blocks records nothing then).
    Call that model itself (`model(x)`): its other entry points (`forward_intermediates`,
    `forward_features`) run no hooks, and their token records stay without grids (never with
    another call's).

    Under ``torch.compile``: recording works on a compiled model, ``fullgraph=True`` included
    (tested): it switches an attribute of each attention module, which the compiled graph's
    guards check, rather than adding hooks after compilation (the case of pytorch#117758). The
    first recorded call compiles a second graph, with the explicit weights; later recordings and
    plain calls reuse the two graphs. Pass the original module (``record_attention(model)``) to
    keep its paths; the compiled wrapper's paths start with ``_orig_mod.``.

    Example::

        with record_attention(vit) as rec:
            vit(images)
        maps = cls_attention(rec)            # (B, heads, gh, gw)
    """
    modules = _module_paths(model, layers)
    busy = [p for p, m in modules.items() if m.recording is not None]
    if busy:
        raise RuntimeError(
            f"attention of {', '.join(busy)} is already being recorded; close that record_attention first"
        )
    grid_modules = {p: m for p, m in modules.items() if isinstance(m, GridAttention)}
    _check_queries(queries, grid_modules)
    recording = AttentionRecording(modules)
    session = _Session(model, recording, keep_grad, queries, relative, max_bytes)
    handles = [model.register_forward_pre_hook(session.start_forward, with_kwargs=True)]
    try:
        for owner in dict.fromkeys(o for o in session.owners.values() if o is not None):
            module = model.get_submodule(owner)
            handles.append(module.register_forward_pre_hook(session.layout_reader(owner), with_kwargs=True))
            handles.append(module.register_forward_hook(session.layout_closer(owner)))
        for path, module in modules.items():
            module.recording = RecordingRequest(session.sink(path), max_bytes=max_bytes)
            if queries is not None and path in grid_modules:
                handles.append(module.register_forward_pre_hook(session.choose_queries))
        yield recording
    finally:
        for handle in handles:
            handle.remove()
        for module in modules.values():
            module.recording = None


def _check_queries(queries: Sequence[Point] | None, grid_modules: dict[str, GridAttention]) -> None:
    if queries is None:
        return
    if not grid_modules:
        raise ValueError(
            "queries= selects query cells of grid attention blocks (SelfAttention2d and the local families: "
            "WindowAttention2d, NeighborhoodAttention2d, HaloAttention2d), and none is recorded here; "
            "record everything and use query_map(rec, path, point) for Transformer tokens"
        )
    if len(queries) == 0:
        raise ValueError("queries= is empty; pass at least one (x, y) point or None for all query cells")


class _Session:
    """The hooks and sinks of one open :func:`record_attention`."""

    def __init__(
        self,
        model: nn.Module,
        recording: AttentionRecording,
        keep_grad: bool,
        queries: Sequence[Point] | None,
        relative: bool,
        max_bytes: int | None = None,
    ) -> None:
        self.recording, self.keep_grad, self.queries, self.relative = recording, keep_grad, queries, relative
        self.max_bytes = max_bytes
        #: module path → path of the model that owns its tokens (``None``: a module on its own)
        self.owners = {path: _owner_path(model, path) for path in recording.modules}
        #: owner path → the layout of its current call on images
        self.layouts: dict[str, TokenLayout] = {}

    def _share_budget(self) -> None:
        """Lower every module's ``max_bytes`` to what the records held so far leave of the total."""
        if self.max_bytes is None:
            return
        held = sum(r.weights.numel() * r.weights.element_size() for r in self.recording._records.values())
        for module in self.recording.modules.values():
            if module.recording is not None:
                module.recording.max_bytes = max(0, self.max_bytes - held)

    def start_forward(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Root pre-hook: each forward of the model starts a fresh set and notes the image size."""
        self.recording._clear()
        self._share_budget()
        image = _first_image(args, kwargs)
        self.recording.image_size = None if image is None else (int(image.shape[-2]), int(image.shape[-1]))

    def layout_reader(self, owner: str) -> Callable[[nn.Module, tuple, dict], None]:
        """Pre-hook of the model at ``owner``: ask it where the tokens of this call lie."""

        def read(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            image = _first_image(args, kwargs)
            if image is None:  # not called on images: its tokens have no grid
                self.layouts.pop(owner, None)
                return
            grid_model = cast(TokenGridModel, model)  # owners are chosen as TokenGridModels (_owner_path)
            with self._paused():  # a layout that runs the model's stem (a hybrid's CNN) records nothing
                self.layouts[owner] = TokenLayout.of(grid_model, int(image.shape[-2]), int(image.shape[-1]))

        return read

    def layout_closer(self, owner: str) -> Callable[[nn.Module, tuple, Any], None]:
        """Forward hook of the model at ``owner``: its layout held for this call only (a token
        module run outside a call of its model, by hand or through another entry point, gets no
        grid rather than the last call's)."""

        def close(_model: nn.Module, _args: tuple, _output: Any) -> None:
            self.layouts.pop(owner, None)

        return close

    @contextlib.contextmanager
    def _paused(self) -> Iterator[None]:
        """Every recorded module on its fused path for a while, its request kept."""
        requests = {path: module.recording for path, module in self.recording.modules.items()}
        for module in self.recording.modules.values():
            module.recording = None
        try:
            yield
        finally:
            for path, module in self.recording.modules.items():
                module.recording = requests[path]

    def choose_queries(self, module: GridAttention, args: tuple) -> None:
        """Grid-module pre-hook: the query cells under the asked points of this input."""
        if module.recording is None:  # paused while a model finds its token grid
            return
        image_size = self.recording.image_size
        if image_size is None:
            raise ValueError(
                "queries= are points of the input image, but the model was not called on a "
                "(B, C, H, W) image; call model(images) inside record_attention"
            )
        grid = (int(args[0].shape[-2]), int(args[0].shape[-1]))
        cells = (point_to_cell(p, image_size, grid, relative=self.relative) for p in self.queries or ())
        flat = list(dict.fromkeys(r * grid[1] + c for r, c in cells))
        module.recording.query_subset = torch.tensor(flat, dtype=torch.long)

    def sink(self, path: str) -> Callable[[nn.Module, AttentionRecord], None]:
        """What the module at ``path`` hands its records to: token records get their owner's
        layout, sparse weights become full rows."""
        owner = self.owners[path]

        def receive(_module: nn.Module, record: AttentionRecord) -> None:
            if record.query_grid is None and owner in self.layouts:
                record = self.layouts[owner].describe(record)
            record = record.with_full_keys()
            weights = record.weights if self.keep_grad else record.weights.detach()
            self.recording._add(path, replace(record, weights=weights, image_size=self.recording.image_size))
            self._share_budget()

        return receive
