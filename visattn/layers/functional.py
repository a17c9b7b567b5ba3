"""The attention arithmetic, written once: ``softmax(q kᵀ · scale + mask) v``.

Every visattn module (the ViT's :class:`~visattn.MultiHeadAttention`, the CNN block
:class:`~visattn.SelfAttention2d`) calls :func:`attention`. Without weights it runs one of two
paths that never store the weight matrix: :func:`torch.nn.functional.scaled_dot_product_attention`
on inputs laid out for the fused (flash) kernel, or the query-chunked path of
:mod:`visattn.layers.chunked` (bf16 products on the matrix units), whichever measured faster for
the shape (see :func:`attention_backend`). With ``need_weights=True`` it computes the weights
explicitly, in the same arithmetic, and returns them too.

Head widths the fused kernels refuse are zero-padded and one-channel heads are laid out with unit
stride, so memory stays linear in the number of tokens for every head width (``fused_head_widths``
holds the measured rules). PyTorch still runs its unfused kernel, which stores the weights, for
attention dropout on CPU and for float64 on CUDA.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes

from .._utils import autocast_enabled, cpu_has_native_bf16
from .chunked import chunked_attention

__all__ = [
    "BACKENDS",
    "attention",
    "attention_backend",
    "attention_choices",
    "attention_matrix_bytes",
    "attention_weights",
    "fused_head_widths",
]

#: the paths :func:`attention` can take without weights; ``"auto"`` measures (see :func:`attention_backend`)
BACKENDS = ("auto", "fused", "chunked")
#: ``"auto"`` measures only calls with at least this many scores per batch·head (``Nq·Nk``); smaller
#: ones (a 65-token ViT) are cheap either way and take the fused kernel without a measurement
MIN_MEASURED_SCORES = 128 * 128
#: ``"auto"`` takes the chunked path only when it measured at least this much faster
CHUNKED_MARGIN = 0.9
_state = {"backend": "auto"}
#: (device, dtype, q shape, Nk, dv, with grad) → the path measured faster
_choices: dict[tuple, str] = {}


def attention_matrix_bytes(
    batch: int, heads: int, num_queries: int, num_keys: int, dtype: torch.dtype = torch.float32
) -> int:
    """Bytes of a materialized ``(batch, heads, Nq, Nk)`` weight matrix of ``dtype``.

    This is what ``need_weights=True`` (and every unfused implementation) stores; the fused kernel
    stores none of it.
    """
    return batch * heads * num_queries * num_keys * torch.empty((), dtype=dtype).element_size()


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    if q.dim() < 2 or k.dim() < 2 or v.dim() < 2:
        raise ValueError(
            "attention expects q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv) with at least 2 dims; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share their last dim d: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same number of tokens Nk (dim -2): k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        raise ValueError(
            "q, k and v must have the same leading (batch/head) dims: "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if mask is not None:
        target = (*q.shape[:-1], k.shape[-2])
        try:
            fits = torch.broadcast_shapes(mask.shape, target) == target
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to the weights' shape (..., Nq, Nk) = {target}"
            )
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise ValueError(f"mask must be boolean (True = attend) or an additive float tensor, got {mask.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_floating_point():
            raise ValueError(f"attention needs floating-point q, k and v; {name} is {t.dtype} (convert with .float())")


def _last_dim_contiguous(t: Tensor) -> Tensor:
    """The fused kernels need stride 1 on the last dim; copy only when a view lacks it.

    ``clone``, not ``contiguous``: a view whose last dim has size 1 (one channel per head) counts
    as contiguous whatever that dim's stride is, so ``contiguous`` returns it unchanged, and
    ``scaled_dot_product_attention`` would then fall back to its unfused kernel, which stores
    the ``(Nq, Nk)`` matrix. A clone in contiguous format gets stride 1 there.
    """
    return t if t.stride(-1) == 1 else t.clone(memory_format=torch.contiguous_format)


def _as_4d(t: Tensor) -> Tensor:
    """A (batch, heads, N, d) layout, the rank the fused kernels take: the dims between the first
    and the last two fold into the heads (``(B, heads, tiles, N, d)`` → ``(B, heads·tiles, N, d)``,
    a view of a contiguous tensor), so a mask that is the same for every batch element stays one."""
    if t.dim() == 4:
        return t
    if t.dim() == 2:
        return t[None, None]
    if t.dim() == 3:
        return t[None]
    return t.reshape(t.shape[0], -1, t.shape[-2], t.shape[-1])


def _mask_for_kernel(mask: Tensor, q: Tensor, nk: int) -> Tensor:
    """The mask in the form the fused kernel takes: folded like q, float masks in q's dtype.

    A 3-D mask beside 4-D inputs gets a leading dim: the CPU flash kernel refuses 3-D masks.
    Beside inputs of more than 4 dims the mask keeps its own batch dim (1 when it is shared, so it
    is not copied per batch element) and is expanded over the dims that fold into the heads.
    """
    if q.dim() > 4:
        mask = mask[(None,) * (q.dim() - mask.dim())]
        mask = _as_4d(mask.expand(mask.shape[0], *q.shape[1:-1], nk))
    elif q.dim() != 4:
        mask = _as_4d(mask.expand(*q.shape[:-1], nk))
    elif mask.dim() < 2:
        mask = mask.expand(q.shape[-2], nk)
    elif mask.dim() == 3:
        mask = mask[None]
    return mask if mask.dtype == torch.bool else mask.to(q.dtype)


def _kernel_dtype(q: Tensor) -> torch.dtype:
    """The dtype the kernels compute in: autocast's inside an autocast region of ``q``'s device
    (CPU or CUDA), else ``q``'s."""
    return torch.get_autocast_dtype(q.device.type) if autocast_enabled(q.device) else q.dtype


def fused_head_widths(d: int, dv: int, device_type: str, dtype: torch.dtype) -> tuple[int, int]:
    """Head widths ``(d, dv)``, at least the given ones, at which ``scaled_dot_product_attention``
    runs a fused kernel for ``dtype`` inputs on a ``device_type`` device instead of its unfused one
    (which stores the ``(Nq, Nk)`` weights).

    Measured with torch 2.14 (``torch._fused_sdp_choice``): the CPU flash kernel takes any width
    in float32/64, bf16 and fp16, but only ``d == dv``. On CUDA the flash kernel takes any
    ``d == dv`` in half precision; otherwise (``d != dv``, or float32) the efficient and cuDNN
    kernels need both widths to be multiples of 16 bytes (4 in float32, 8 in half precision).
    """
    if device_type == "cuda":
        align = max(1, 16 // torch.empty((), dtype=dtype).element_size())
        return -(-d // align) * align, -(-dv // align) * align
    width = max(d, dv)
    return width, width


def _kernel_input(t: Tensor, width: int) -> Tensor:
    """``t`` as the fused kernels take it: 4-D, zero columns appended up to ``width``, last-dim stride 1."""
    t = _as_4d(t)
    if t.shape[-1] < width:
        t = F.pad(t, (0, width - t.shape[-1]))
    return _last_dim_contiguous(t)


def attention_weights(q: Tensor, k: Tensor, *, mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """The attention weights ``softmax(q kᵀ · scale + mask)`` explicitly.

    Args:
        q: queries ``(..., Nq, d)``.
        k: keys ``(..., Nk, d)``.
        mask: boolean (True = attend) or additive float, broadcastable to ``(..., Nq, Nk)``.
        scale: multiplies ``q kᵀ``; defaults to ``1 / sqrt(d)``.

    Returns:
        ``(..., Nq, Nk)`` weights whose rows sum to one (a row with every key masked is zero).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    # half-precision scores are normalized in float32, as the fused kernels do
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    # a row whose keys are all masked gives NaN from softmax; it attends to nothing instead
    if mask is not None and mask.dtype == torch.bool:
        weights = weights.nan_to_num(0.0)
    return weights.to(scores.dtype)


@contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Choose the path :func:`attention` takes without weights, inside the ``with`` block.

    - ``"auto"`` (the default): the fused kernel, except for bf16 on a CPU with native bf16
      matrix products (oneDNN: AVX512-BF16 or AMX), no mask, no dropout and at least
      :data:`MIN_MEASURED_SCORES` scores per batch·head. There the first call of each shape
      times both paths (forward, or forward+backward when gradients are needed; one warm-up,
      then the best of two calls each, alternating, on copies of the inputs) and keeps the
      chunked path only if it was at least 10 % faster. The choice is cached per shape
      (:func:`attention_choices`); the profiler shows the kernel run
      (:func:`visattn.profiling.attention_kernels`). Under ``torch.compile`` nothing is timed
      and the fused kernel runs.
    - ``"fused"``: always :func:`torch.nn.functional.scaled_dot_product_attention`.
    - ``"chunked"``: always :func:`visattn.layers.chunked.chunked_attention` (any dtype; no mask
      or dropout).
    """
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    previous, _state["backend"] = _state["backend"], name
    try:
        yield
    finally:
        _state["backend"] = previous


def attention_choices() -> dict[tuple, str]:
    """The paths ``"auto"`` chose so far: ``(device, dtype, q shape, Nk, dv, with grad)`` → path."""
    return dict(_choices)


def _chunked(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The chunked path on ``(..., N, d)`` inputs (leading dims folded into one)."""
    if torch.is_autocast_enabled(q.device.type):  # as autocast would cast the fused kernel's inputs
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = (t.to(dtype) for t in (q, k, v))
    qf, kf, vf = (t.reshape(-1, t.shape[-2], t.shape[-1]) for t in (q, k, v))
    return chunked_attention(qf, kf, vf, scale).reshape(*q.shape[:-1], v.shape[-1])


def _best_seconds(fns: dict[str, Callable[[], object]], rounds: int = 2) -> dict[str, float]:
    """Fastest of ``rounds`` timed calls of each function after one warm-up, alternating them."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, math.inf)
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _measure_paths(q: Tensor, k: Tensor, v: Tensor, scale: float, with_grad: bool) -> str:
    """Time the fused and the chunked path on copies of the inputs; the faster one's name."""
    inputs = [t.detach() for t in (q, k, v)]

    def run(path: Callable[..., Tensor]) -> Callable[[], None]:
        def once() -> None:
            xs = [t.requires_grad_(with_grad) for t in (x.clone() for x in inputs)]
            with torch.enable_grad() if with_grad else torch.no_grad():
                out = path(*xs, scale)
                if with_grad:
                    out.backward(torch.ones_like(out))

        return once

    # outside the caller's dispatch modes: a FlopCounterMode (or any mode) around the first call of
    # a shape must neither count nor slow down the timing runs
    with _disable_current_modes():
        seconds = _best_seconds({"fused": run(_fused), "chunked": run(_chunked)})
    return "chunked" if seconds["chunked"] < CHUNKED_MARGIN * seconds["fused"] else "fused"


def _path(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None, dropout_p: float) -> str:
    """The path this call takes: the forced one, or what ``"auto"`` measured (see :func:`attention_backend`)."""
    backend = _state["backend"]
    if backend == "chunked" and (mask is not None or dropout_p > 0.0):
        raise ValueError(
            "attention_backend('chunked') takes no mask and no dropout; use attention_backend('fused') "
            "(or 'auto') for this call"
        )
    if backend != "auto":
        return backend
    dtype = _kernel_dtype(q)
    eligible = (
        q.device.type == "cpu"
        and dtype == torch.bfloat16
        and mask is None
        and dropout_p == 0.0
        and q.shape[-2] * k.shape[-2] >= MIN_MEASURED_SCORES
        and not torch.compiler.is_compiling()
        and cpu_has_native_bf16()
    )
    if not eligible:
        return "fused"
    with_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    key = (q.device.type, dtype, tuple(q.shape), k.shape[-2], v.shape[-1], with_grad)
    if key not in _choices:
        _choices[key] = _measure_paths(q, k, v, scale, with_grad)
    return _choices[key]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    scale: float | None = None,
    need_weights: bool = False,
    dropout_p: float = 0.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention ``softmax(q kᵀ · scale + mask) v``.

    Args:
        q: queries ``(..., Nq, d)``.
        k: keys ``(..., Nk, d)``.
        v: values ``(..., Nk, dv)``; ``dv`` may differ from ``d``.
        mask: boolean (True = attend) or additive float tensor, broadcastable to
            ``(..., Nq, Nk)``.
        scale: multiplies ``q kᵀ``; defaults to ``1 / sqrt(d)``.
        need_weights: also return the weights ``(..., Nq, Nk)`` (rows sum to one). This
            computes the full matrix (``Nq·Nk`` numbers per head); without it the fused kernel
            never stores it.
        dropout_p: dropout on the weights (training only; the returned weights are before it).

    Returns:
        ``out`` of shape ``(..., Nq, dv)``, or ``(out, weights)`` when ``need_weights``.

    Without weights the path is chosen by :func:`attention_backend`. The fused path feeds
    ``scaled_dot_product_attention`` 4-D inputs whose last dim has stride 1 (also when it has
    size 1: one channel per head), so a fused kernel is selected on CPU and GPU, and memory stays
    linear in the number of tokens. Head widths a fused kernel refuses (``dv != d`` on CPU;
    widths that are not a multiple of 16 bytes on CUDA, see ``fused_head_widths``) are
    zero-padded, which leaves the result unchanged. Two cases still run PyTorch's unfused kernel,
    which stores the ``(Nq, Nk)`` weights: ``dropout_p > 0`` on CPU, and float64 on CUDA. The chunked path
    (:func:`visattn.layers.chunked.chunked_attention`) computes the same function by blocks of
    queries with bf16 matrix products.
    """
    _check_inputs(q, k, v, mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)

    if need_weights:
        weights = attention_weights(q, k, mask=mask, scale=scale)
        dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
        out = torch.matmul(dropped.to(v.dtype), v)
        return out, weights
    if _path(q, k, v, scale, mask, dropout_p) == "chunked":
        return _chunked(q, k, v, scale)
    return _fused(q, k, v, scale, mask, dropout_p)


def _fused(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """``scaled_dot_product_attention`` on inputs laid out for the fused kernel (see :func:`attention`).

    Head widths the kernel would refuse are zero-padded (``fused_head_widths``): zero columns
    of q and k leave ``q kᵀ`` unchanged (the scale is passed as computed for the real width), zero
    columns of v give zero output columns, which are cut off again.
    """
    dv = v.shape[-1]
    lead = q.shape[:-2]
    width, v_width = fused_head_widths(q.shape[-1], dv, q.device.type, _kernel_dtype(q))
    q4, k4, v4 = _kernel_input(q, width), _kernel_input(k, width), _kernel_input(v, v_width)
    mask4 = None if mask is None else _mask_for_kernel(mask, q, k.shape[-2])
    out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask4, dropout_p=dropout_p, scale=scale)
    if out.shape[-1] != dv:
        out = out[..., :dv]
    return out.reshape(*lead, q.shape[-2], dv)
