"""Attention modules: token attention for Transformers and grid attention for CNNs.

Both call :func:`visattn.layers.functional.attention`; neither writes the softmax itself.
While :func:`visattn.record_attention` is open, each module computes its weights explicitly
and hands them to its recording's ``sink``; otherwise the fused kernel runs and nothing is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .._utils import ArgumentError, check_grid_values, check_probabilities, check_range
from .functional import attention, attention_matrix_bytes, attention_weights
from .pos_embed import sincos_2d

__all__ = [
    "AttentionRecord",
    "GridAttention",
    "GridAttentionCost",
    "MultiHeadAttention",
    "RecordableAttention",
    "RecordingRequest",
    "SelfAttention2d",
    "check_heads",
    "place_keys",
]

#: the most heads an error message lists as valid choices
_MAX_LISTED_HEADS = 64


def check_heads(num_heads: int, **widths: int) -> None:
    """Raise an ``ArgumentError`` (a ``ValueError``) naming the argument unless ``num_heads`` is a
    positive integer and each of ``widths`` (``dim=768``, ``qk_channels=32``) a positive integer
    multiple of it."""
    check_range("num_heads", num_heads, at_least=1, integer=True)
    for name, width in widths.items():
        check_range(name, width, at_least=1, integer=True)
        if width % num_heads:
            choices = [h for h in range(1, min(width, _MAX_LISTED_HEADS) + 1) if width % h == 0]
            raise ArgumentError(
                "num_heads",
                f"{name}={width} must be a multiple of num_heads={num_heads} (each head gets {name} / num_heads "
                f"channels); choose num_heads from {choices} or another {name}",
            )


@dataclass
class AttentionRecord:
    """What one attention call produced for a recording.

    A module fills in what it knows: a grid module (`(B, C, H, W)` input) its query and key
    grids; a token module (`(B, N, D)` input) neither, and `visattn.record_attention` adds the
    grid and prefix count of the model that owns it (the model's `grid_for(H, W)` and
    `num_prefix_tokens`, asked when the model is called).

    A module that attends each query to a subset of the keys (windows, neighbourhoods, rows and
    columns) hands its weights over that subset, `(B, heads, Nq, K)`, with `key_index` `(Nq, K)`:
    where each of those keys lies on the full key axis. The recording places them into full rows
    (`with_full_keys`), so every record it keeps has `(B, heads, Nq, Nk)` weights, zero outside
    each query's key set.

    Attributes:
        weights: ``(B, heads, Nq, Nk)`` attention weights (rows sum to one), or
            ``(B, heads, Nq, K)`` over the keys of ``key_index``.
        query_grid: ``(gh, gw)`` of the query tokens after the prefix, or ``None`` (not known
            to the module).
        key_grid: ``(gh, gw)`` of the key tokens after the prefix (a pooled key grid has its
            own size), or ``None`` (not known to the module, or cross-attention: keys without
            image positions).
        key_stride: ``(sh, sw)`` query cells per key cell (``kv_pool`` of a ``SelfAttention2d``,
            ``(1, 1)`` otherwise); the key grid spans ``query_grid / key_stride`` of its cells.
        num_prefix_tokens: class/register tokens in front of the grid tokens.
        query_index: flat indices (row-major) into the query grid of the recorded query rows
            (``None`` = all of them, prefix included).
        key_index: `None` (`weights` has every key), or `(Nq, K)` long positions on the full
            key axis `Nk = num_prefix_tokens + kh·kw` (prefix first, then the key grid row-major)
            of the `K` keys each query row of `weights` attends to; `-1` marks an empty slot (its
            weight is ignored). A query's real positions are distinct.
        cross_attention: the keys are another sequence than the queries (`context`), so the
            owning model's grid describes the queries only.
        image_size: ``(H, W)`` of the model input, or ``None`` (set by ``record_attention``).
        class_token: whether prefix token 0 is a class token (set by ``record_attention``).
        pool: ``"cls"``, ``"mean"`` or ``"cls_mean"``, how the owning model reads its tokens out (set by
            ``record_attention``).
    """

    weights: Tensor
    query_grid: tuple[int, int] | None
    key_grid: tuple[int, int] | None
    key_stride: tuple[int, int] = (1, 1)
    num_prefix_tokens: int = 0
    query_index: Tensor | None = None
    key_index: Tensor | None = None
    cross_attention: bool = False
    image_size: tuple[int, int] | None = None
    class_token: bool = False
    pool: str = "mean"

    @property
    def key_extent(self) -> tuple[float, float]:
        """How many cells of the key grid the input image spans: ``query_grid / key_stride``.

        Equal to the key grid for unpooled keys; smaller when ``kv_pool`` pooled an odd-sized
        grid in ceil mode (the last key row/column then reaches past the image).
        """
        if self.query_grid is None:
            raise ValueError("this record has no query grid, so its keys have no image extent")
        (qh, qw), (sh, sw) = self.query_grid, self.key_stride
        return qh / sh, qw / sw

    def with_full_keys(self) -> AttentionRecord:
        """This record with every key: weights over `key_index` placed into full rows
        `(B, heads, Nq, prefix + kh·kw)`, zeros elsewhere (`self` when there is no `key_index`)."""
        if self.key_index is None:
            return self
        if self.key_grid is None:
            raise ValueError("weights over a subset of keys (key_index) need the key grid they index")
        num_keys = self.num_prefix_tokens + self.key_grid[0] * self.key_grid[1]
        return replace(self, weights=place_keys(self.weights, self.key_index, num_keys), key_index=None)


def place_keys(weights: Tensor, key_index: Tensor, num_keys: int) -> Tensor:
    """Weights over a subset of keys → full rows over all ``num_keys`` keys, zero elsewhere.

    Args:
        weights: `(..., Nq, K)`: each query row's weights over its `K` keys.
        key_index: `(Nq, K)` (or any shape that broadcasts to `weights`) positions in
            `[0, num_keys)` of those keys, `-1` for an empty slot; distinct within a row.
        num_keys: length of the full key axis.

    Returns:
        `(..., Nq, num_keys)` in the dtype of `weights` (differentiable in `weights`).
    """
    index = key_index.to(weights.device).long().expand_as(weights)
    if not torch.compiler.is_compiling() and bool(((index < -1) | (index >= num_keys)).any()):
        raise ValueError(f"key_index holds positions outside [-1, {num_keys}) (-1 marks an empty slot)")
    spare = torch.where(index < 0, num_keys, index)  # empty slots go to one extra column, dropped below
    full = weights.new_zeros(*weights.shape[:-1], num_keys + 1).scatter(-1, spare, weights)
    return full[..., :num_keys]


@dataclass(frozen=True)
class GridAttentionCost:
    """What a grid attention block computes on one ``H × W`` grid, per head and image.

    Attributes:
        keys: keys of the largest key set of a query (all positions for global attention).
        scores: query·key products the block computes (its masked ones included).
        key_cells: key/value cells it gathers (``keys`` for global attention; the windows or
            halos of every tile for a local family).
    """

    keys: int
    scores: int
    key_cells: int


@dataclass
class RecordingRequest:
    """The one switch of a :class:`RecordableAttention`: set while a recording is open.

    Attributes:
        sink: receives ``(module, record)`` after each forward call.
        max_bytes: refuse, before computing them, weights larger than this (``None``: no limit).
            :func:`visattn.record_attention` lowers it as records accumulate, so that it bounds
            the whole recording rather than each matrix.
        query_subset: flat query-cell indices to record (``SelfAttention2d``; ``None``: all).
    """

    sink: Callable[[nn.Module, AttentionRecord], None]
    max_bytes: int | None = None
    query_subset: Tensor | None = None


class RecordableAttention(nn.Module):
    """Base of the attention modules :func:`visattn.record_attention` records.

    ``recording`` is ``None`` except while a recording is open; then the module also computes
    its weights and hands an :class:`AttentionRecord` to ``recording.sink``.

    This is where a new attention family plugs in: subclass it, keep the fused path when
    `recording` is `None`, and otherwise call `recording.sink(self, AttentionRecord(...))` once
    per forward with what the module knows: its grids if its input is a grid, and, for a sparse
    key pattern, the weights over each query's keys with their `key_index` on the full key grid
    (check the size of the full rows with `_check_record_size` first: the recording keeps those).
    Nothing about images or the owning model goes into `forward`'s signature.
    """

    #: advice added to the too-large error (how this kind of module records less)
    record_hint: ClassVar[str] = ""
    recording: RecordingRequest | None

    def __init__(self) -> None:
        super().__init__()
        self.recording = None

    def _check_record_size(self, batch: int, heads: int, num_queries: int, num_keys: int, dtype: torch.dtype) -> None:
        """Raise before materializing ``(batch, heads, Nq, Nk)`` weights over ``recording.max_bytes``."""
        limit = self.recording.max_bytes if self.recording is not None else None
        if limit is None:
            return
        need = attention_matrix_bytes(batch, heads, num_queries, num_keys, dtype)
        if need > limit:
            raise ValueError(
                f"recording {type(self).__name__} weights (B={batch}, heads={heads}, Nq={num_queries}, "
                f"Nk={num_keys}, {dtype}) would need {need} bytes ({need / 2**20:.1f} MiB), over the "
                f"{limit} bytes left of the recording's max_bytes; {self.record_hint}record a smaller batch "
                "or fewer layers, or raise max_bytes"
            )


class MultiHeadAttention(RecordableAttention):
    """Multi-head attention over tokens (self-attention, or cross-attention with ``context``).

    Parameter names follow timm's ``Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``proj``), so
    its weights load as they are.

    Args:
        dim: token width ``D``; must be a multiple of ``num_heads``.
        num_heads: number of heads; each has width ``D / num_heads``.
        qkv_bias: bias in the query/key/value projection.
        qk_norm: LayerNorm on each head's queries and keys (ViT-22B, timm ``qk_norm``).
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
        norm_layer: the norm used by ``qk_norm``.

    Shapes:
        ``x`` ``(B, N, D)``, optional ``context`` ``(B, M, D)`` → ``(B, N, D)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        check_heads(num_heads, dim=dim)
        check_probabilities(attn_drop=attn_drop, proj_drop=proj_drop)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _project(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        if context is None:
            # unbind, not qkv[0], qkv[1], qkv[2]: its backward stacks the three gradients once
            # instead of zero-filling three full-size buffers and adding them
            q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads).unbind(0)
            return q, k, v
        w_q, w_kv = self.qkv.weight.split([self.dim, 2 * self.dim])
        b_q, b_kv = (None, None) if self.qkv.bias is None else self.qkv.bias.split([self.dim, 2 * self.dim])
        q = rearrange(F.linear(x, w_q, b_q), "b n (h d) -> b h n d", h=self.num_heads)
        kv = rearrange(F.linear(context, w_kv, b_kv), "b m (two h d) -> two b h m d", two=2, h=self.num_heads)
        k, v = kv.unbind(0)
        return q, k, v

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        """Attend from `x` `(B, N, D)` to itself, or to `context` `(B, M, D)` (timm's signature
        plus `context`).

        `attn_mask` (boolean, True = attend, or additive float) broadcasts to `(B, heads, N, M)`.
        Recorded weights carry no grid: `record_attention` adds the owning model's.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MultiHeadAttention expects tokens (B, N, {self.dim}), got {tuple(x.shape)}")
        if context is not None and (
            context.dim() != 3 or context.shape[-1] != self.dim or context.shape[0] != x.shape[0]
        ):
            raise ValueError(f"context must be (B={x.shape[0]}, M, {self.dim}), got {tuple(context.shape)}")
        q, k, v = self._project(x, context)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop if self.training else 0.0
        if self.recording is None:
            out = attention(q, k, v, mask=attn_mask, dropout_p=dropout_p)
        else:
            self._check_record_size(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.dtype)
            out, weights = attention(q, k, v, mask=attn_mask, dropout_p=dropout_p, need_weights=True)
            record = AttentionRecord(weights, query_grid=None, key_grid=None, cross_attention=context is not None)
            self.recording.sink(self, record)
        out = rearrange(out, "b h n d -> b n (h d)")
        return self.proj_drop(self.proj(out))


GateKind = Literal["scalar", "channel"]


def default_qk_channels(channels: int, num_heads: int) -> int:
    """:class:`SelfAttention2d`'s default query/key width: ``C / 8``, rounded up to the heads."""
    return math.ceil(max(1, channels // 8) / num_heads) * num_heads


def pooled_grid(height: int, width: int, kv_pool: int) -> tuple[int, int]:
    """The key/value grid of a ``height × width`` query grid pooled by ``kv_pool`` (ceil mode)."""
    return math.ceil(height / kv_pool), math.ceil(width / kv_pool)


def _resolve_widths(channels: int, num_heads: int, qk_channels: int | None, v_channels: int | None) -> tuple[int, int]:
    """``(qk_channels, v_channels)`` of a :class:`SelfAttention2d`: defaults filled in, checked."""
    check_range("channels", channels, at_least=1, integer=True)
    check_heads(num_heads)
    if qk_channels is None:
        qk_channels = default_qk_channels(channels, num_heads)
    v_channels = qk_channels if v_channels is None else v_channels
    check_heads(num_heads, qk_channels=qk_channels, v_channels=v_channels)
    return qk_channels, v_channels


def _check_options(kv_pool: int, kv_pool_mode: str, pos: str | None) -> None:
    """Raise a ``ValueError`` for a :class:`SelfAttention2d` option outside its choices."""
    check_range("kv_pool", kv_pool, at_least=1, integer=True)
    if kv_pool_mode not in ("max", "avg"):
        raise ValueError(f"kv_pool_mode must be 'max' or 'avg', got {kv_pool_mode!r}")
    if pos not in (None, "sincos"):
        raise ValueError(f"pos must be None or 'sincos', got {pos!r}")


def _check_output(out_norm: str | None, gate: str | None) -> None:
    """Raise a ``ValueError`` for a :class:`GridAttention` output option outside its choices."""
    if out_norm not in (None, "batchnorm"):
        raise ValueError(f"out_norm must be None or 'batchnorm', got {out_norm!r}")
    if gate not in (None, "scalar", "channel"):
        raise ValueError(f"gate must be 'scalar', 'channel' or None, got {gate!r}")
    if gate is None and out_norm is None:
        raise ValueError(
            "gate=None needs out_norm='batchnorm' (its zero-initialized weight keeps the block "
            "the identity at insertion); use gate='scalar' otherwise"
        )


class GridAttention(RecordableAttention):
    """Base of the attention modules over a CNN feature map ``(B, C, H, W)``, with a gated residual.

    It holds what they share: the 1×1 convolutions ``query``, ``key`` and ``value`` (grid →
    per-head queries, keys and values), the 1×1 output convolution ``out`` with an optional
    BatchNorm ``out_norm``, the residual gate ``gamma`` (zero at creation, so the block is
    exactly the identity when it is inserted) and the input check. A subclass says which
    positions attend to which; :func:`visattn.record_attention` can record only some of its
    query cells (``queries=``).

    Args:
        channels: ``C`` of the input grid.
        num_heads: heads; ``qk_channels`` and ``v_channels`` must be multiples of it.
        qk_channels: total query/key width (default ``C // 8``, rounded up to the heads).
        v_channels: total value width (default: ``qk_channels``).
        scale: multiplies ``q kᵀ``; ``None`` is ``1/sqrt(head width)``.
        qkv_bias: bias in the query/key/value convolutions.
        out_bias: bias in the output convolution.
        out_norm: ``"batchnorm"`` puts a BatchNorm after the output convolution.
        gate: ``"scalar"`` (one ``γ``), ``"channel"`` (one ``γ`` per channel), or ``None``
            (no gate; requires ``out_norm="batchnorm"``, whose weight starts at zero instead).
        attn_drop: dropout on the attention weights.
    """

    record_hint = "pass record_attention(..., queries=[(x, y), ...]) to record only some query cells, "

    def __init__(
        self,
        channels: int,
        *,
        num_heads: int = 1,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        scale: float | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        out_norm: Literal["batchnorm"] | None = None,
        gate: GateKind | None = "scalar",
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        qk_channels, v_channels = _resolve_widths(channels, num_heads, qk_channels, v_channels)
        _check_output(out_norm, gate)
        check_probabilities(attn_drop=attn_drop)
        self.channels = channels
        self.num_heads = num_heads
        self.qk_channels = qk_channels
        self.v_channels = v_channels
        self.scale = scale
        self.attn_drop = attn_drop

        self.query = nn.Conv2d(channels, qk_channels, 1, bias=qkv_bias)
        self.key = nn.Conv2d(channels, qk_channels, 1, bias=qkv_bias)
        self.value = nn.Conv2d(channels, v_channels, 1, bias=qkv_bias)
        self.out = nn.Conv2d(v_channels, channels, 1, bias=out_bias)
        self.out_norm = nn.BatchNorm2d(channels) if out_norm == "batchnorm" else nn.Identity()
        if isinstance(self.out_norm, nn.BatchNorm2d):
            nn.init.zeros_(self.out_norm.weight)
        if gate is None:
            self.gamma = None
        else:
            self.gamma = nn.Parameter(torch.zeros(channels if gate == "channel" else 1))

    def _check_input(self, x: Tensor) -> None:
        name = type(self).__name__
        if x.dim() != 4:
            raise ValueError(
                f"{name} expects a feature map (B, C={self.channels}, H, W), got a "
                f"{x.dim()}-D tensor of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.channels:
            raise ValueError(
                f"{name} was built for C={self.channels} channels, got input "
                f"{tuple(x.shape)} with C={x.shape[1]}; build it with channels={x.shape[1]}"
            )
        check_grid_values(x, self.query.weight, name)

    def _residual(self, x: Tensor, y: Tensor) -> Tensor:
        """``x + γ·out_norm(out(y))`` for the attention result ``y`` ``(B, v_channels, H, W)``."""
        y = self.out_norm(self.out(y))
        if self.gamma is None:
            return x + y
        gamma = self.gamma.view(1, -1, 1, 1).to(y.dtype)
        return x + gamma * y


class SelfAttention2d(GridAttention):
    """Spatial self-attention over a CNN feature map, with a gated residual.

    Three 1×1 convolutions turn the grid ``x`` ``(B, C, H, W)`` into queries, keys and values;
    the ``H·W`` positions attend to each other (per head) through
    :func:`visattn.layers.functional.attention`; the result goes through a 1×1 output convolution
    (and an optional BatchNorm) and is added back: ``x + γ·y``. The gate ``γ`` starts at zero
    (or, with ``gate=None``, the output BatchNorm's weight does), so **the block is exactly the
    identity when it is created** and a pretrained network's predictions do not change.

    Args:
        channels: ``C`` of the input grid.
        num_heads: heads; ``qk_channels`` and ``v_channels`` must be multiples of it.
        qk_channels: total query/key width (default ``C // 8``, rounded up to the heads).
        v_channels: total value width (default: ``qk_channels``, so all heads share one size
            and the CPU flash kernel needs no padding).
        kv_pool: pool keys and values by this factor (``ceil`` mode, any ``H, W``), cutting the
            cost by ``kv_pool²`` (SAGAN, non-local sub-sampling).
        kv_pool_mode: ``"max"`` (SAGAN, non-local) or ``"avg"``.
        pos: ``None`` (permutation-equivariant over positions) or ``"sincos"``: a fixed 2D
            sin-cos map of the grid is added to the input of the query and key convolutions.
        scale: multiplies ``q kᵀ``; ``None`` is ``1/sqrt(head width)``; SAGAN and the non-local
            block use ``1.0`` (unscaled).
        qkv_bias: bias in the query/key/value convolutions.
        out_bias: bias in the output convolution.
        out_norm: ``"batchnorm"`` puts a BatchNorm after the output convolution.
        gate: ``"scalar"`` (one ``γ``), ``"channel"`` (one ``γ`` per channel), or ``None``
            (no gate; requires ``out_norm="batchnorm"``, whose weight starts at zero instead).
        attn_drop: dropout on the attention weights.

    Shapes:
        ``(B, C, H, W)`` → ``(B, C, H, W)``.
    """

    def __init__(
        self,
        channels: int,
        *,
        num_heads: int = 1,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        kv_pool: int = 1,
        kv_pool_mode: Literal["max", "avg"] = "max",
        pos: Literal["sincos"] | None = None,
        scale: float | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        out_norm: Literal["batchnorm"] | None = None,
        gate: GateKind | None = "scalar",
        attn_drop: float = 0.0,
    ) -> None:
        _check_options(kv_pool, kv_pool_mode, pos)
        super().__init__(
            channels,
            num_heads=num_heads,
            qk_channels=qk_channels,
            v_channels=v_channels,
            scale=scale,
            qkv_bias=qkv_bias,
            out_bias=out_bias,
            out_norm=out_norm,
            gate=gate,
            attn_drop=attn_drop,
        )
        self.kv_pool = kv_pool
        self.kv_pool_mode = kv_pool_mode
        self.pos = pos

    # --- presets from the literature -------------------------------------------------------

    @classmethod
    def sagan(cls, channels: int, **overrides: Any) -> SelfAttention2d:
        """SAGAN / BigGAN self-attention (Zhang et al. 2019).

        Query/key width ``C/8``, value width ``C/2``, keys and values max-pooled 2×2, unscaled
        ``softmax(qᵀk)``, bias-free 1×1 convolutions, scalar ``γ = 0``. (Spectral norm, a GAN
        training device, is left to the user.)
        """
        kwargs = dict(
            num_heads=1,
            qk_channels=max(1, channels // 8),
            v_channels=max(1, channels // 2),
            kv_pool=2,
            kv_pool_mode="max",
            scale=1.0,
            qkv_bias=False,
            out_bias=False,
            gate="scalar",
        )
        return cls(channels, **{**kwargs, **overrides})

    @classmethod
    def non_local(cls, channels: int, sub_sample: bool = False, **overrides: Any) -> SelfAttention2d:
        """Embedded-Gaussian non-local block (Wang et al. 2018).

        θ/φ/g 1×1 convolutions at ``C/2`` with bias, unscaled ``softmax(θᵀφ)``, optional 2×2
        max-pool sub-sampling of φ and g, output convolution ``W_z`` followed by BatchNorm whose
        weight starts at zero (the paper's identity initialization; no ``γ``).
        """
        half = max(1, channels // 2)
        kwargs = dict(
            num_heads=1,
            qk_channels=half,
            v_channels=half,
            kv_pool=2 if sub_sample else 1,
            kv_pool_mode="max",
            scale=1.0,
            qkv_bias=True,
            out_bias=True,
            out_norm="batchnorm",
            gate=None,
        )
        return cls(channels, **{**kwargs, **overrides})

    # --- forward -----------------------------------------------------------------------------

    def key_grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The key/value grid ``(h, w)`` for a query grid ``(height, width)`` (pooling, ceil mode)."""
        return pooled_grid(height, width, self.kv_pool)

    def attention_cost(self, height: int, width: int) -> GridAttentionCost:
        """Keys, scores and key cells on a ``height × width`` grid (see :class:`GridAttentionCost`)."""
        keys = math.prod(self.key_grid_size(height, width))
        return GridAttentionCost(keys=keys, scores=height * width * keys, key_cells=keys)

    def _pool(self, t: Tensor) -> Tensor:
        if self.kv_pool == 1:
            return t
        pool = F.max_pool2d if self.kv_pool_mode == "max" else F.avg_pool2d
        return pool(t, self.kv_pool, self.kv_pool, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        height, width = x.shape[-2:]
        qk_input = x
        if self.pos == "sincos":
            grid_pos = sincos_2d(height, width, self.channels, device=x.device, dtype=x.dtype)
            qk_input = x + rearrange(grid_pos, "(y x) c -> c y x", y=height)
        q = self.query(qk_input)
        k = self._pool(self.key(qk_input))
        v = self._pool(self.value(x))
        key_height, key_width = k.shape[-2:]
        to_tokens = "b (h d) y x -> b h (y x) d"
        q, k, v = (rearrange(t, to_tokens, h=self.num_heads) for t in (q, k, v))
        dropout_p = self.attn_drop if self.training else 0.0
        if self.recording is None:
            y = cast(Tensor, attention(q, k, v, scale=self.scale, dropout_p=dropout_p))  # no weights asked
        else:
            y = self._attend_and_record(q, k, v, dropout_p, (height, width), (key_height, key_width))
        return self._residual(x, rearrange(y, "b h (y x) d -> b (h d) y x", y=height))

    def _attend_and_record(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        dropout_p: float,
        query_grid: tuple[int, int],
        key_grid: tuple[int, int],
    ) -> Tensor:
        """The forward's attention while recording: weights for all or only the chosen queries."""
        assert self.recording is not None
        subset = self.recording.query_subset
        num_queries = query_grid[0] * query_grid[1] if subset is None else subset.numel()
        self._check_record_size(q.shape[0], q.shape[1], num_queries, k.shape[2], q.dtype)
        if subset is None:
            y, weights = attention(q, k, v, scale=self.scale, dropout_p=dropout_p, need_weights=True)
        else:
            # the output still comes from the fused kernel; only the asked-for rows are explicit
            y = attention(q, k, v, scale=self.scale, dropout_p=dropout_p)
            subset = subset.to(q.device)
            weights = attention_weights(q[:, :, subset], k, scale=self.scale)  # no unused weights·v
        self.recording.sink(
            self,
            AttentionRecord(
                weights=weights,
                query_grid=query_grid,
                key_grid=key_grid,
                key_stride=(self.kv_pool, self.kv_pool),
                query_index=subset,
            ),
        )
        return y

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_heads={self.num_heads}, qk_channels={self.qk_channels}, "
            f"v_channels={self.v_channels}, kv_pool={self.kv_pool}, pos={self.pos}, scale={self.scale}"
        )
