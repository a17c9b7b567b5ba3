"""Query-chunked attention: ``softmax(q kᵀ · scale) v`` one block of queries at a time.

For each block of ``chunk`` queries the scores are one batched matrix product, so in bf16 they run
on the CPU's bf16 dot-product units (AVX512-BF16, AMX) through oneDNN, which PyTorch's CPU flash
kernel does not use without AMX. Only one ``(chunk, Nk)`` block of scores exists at a time: memory
is O(chunk·Nk) besides the inputs and output, never the ``(Nq, Nk)`` matrix. The backward pass
recomputes each block's weights from the saved log-sum-exp of its rows.

Accuracy in bf16. A bf16 matrix product rounds its output to bf16, so a score ``s`` carries an
error of about ``|s|·2⁻⁹`` — on a weight ``e^s`` that is a relative error of ``|s|·2⁻⁹`` (1–4 %
for scores of 5–20, which is what an unfused bf16 ``softmax(q kᵀ)`` has). Softmax does not change
when a constant is subtracted from a row, so each block is computed twice: the first product
finds every row's maximum ``m``, the second computes ``s − m`` inside the product's fp32
accumulator (``q`` gets a column ``−m``, ``k`` a column of ones) and rounds only the difference,
which is near zero exactly for the weights that matter. The backward folds the fp32 log-sum-exp in
the same way, split into two bf16 columns (high and low part), so its weights ``exp(s − lse)``
come out normalized to fp32 accuracy. Row sums and the normalization are in fp32; gradients of
``k`` and ``v`` are summed over blocks in fp32. The result: errors like PyTorch's fused bf16
kernel, which keeps its scores in fp32 (tested).

The two operators are ``torch.library`` custom operators (``visattn::chunked_attention`` and
``visattn::chunked_attention_backward``): the profiler shows them by name, the FLOP counter
(:func:`visattn.profiling.count_flops`) counts each as the attention it computes, and
``torch.compile`` treats them as opaque kernels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["CHUNK_BYTES", "chunk_size", "chunked_attention"]

#: bytes of one block of scores. Measured on the 2-core Zen 4 of docs/performance.md (bf16, forward+backward):
#: at (BH, N, d) = (4, 4096, 32) blocks of 2–8 MiB are equally fast, 1 MiB is 10 % slower; at a
#: ViT-S/16 layer (48, 197, 64) one block of all queries (3.7 MiB) is 30 % faster than three.
CHUNK_BYTES = 4 * 2**20
LOG2E = math.log2(math.e)
#: the smallest block of queries (smaller blocks only add per-block overhead)
MIN_CHUNK = 16


def chunk_size(batch_heads: int, num_queries: int, num_keys: int, dtype: torch.dtype) -> int:
    """Queries per block so that one ``(batch_heads, chunk, num_keys)`` score block is about
    :data:`CHUNK_BYTES`; a multiple of 16, at least :data:`MIN_CHUNK`, at most ``num_queries``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = CHUNK_BYTES // max(1, batch_heads * num_keys * itemsize)
    return max(1, min(num_queries, max(MIN_CHUNK, rows // 16 * 16)))


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype of row statistics and gradient sums: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _split(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``x`` (fp32/fp64) as ``hi + lo`` in ``dtype``: the sum carries about twice its precision."""
    hi = x.to(dtype)
    return hi, (x - hi.to(x.dtype)).to(dtype)


def _ones_rows(t: Tensor, count: int) -> Tensor:
    """``t`` ``(BH, N, d)`` transposed to ``(BH, d + count, N)`` with ``count`` rows of ones below."""
    ones = t.new_ones(t.shape[0], count, t.shape[1])
    return torch.cat([t.transpose(-2, -1), ones], dim=-2)


def _scaled_bmm(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``scale · (a @ b)`` with the scaling inside the product's fp32 accumulator (one rounding)."""
    return torch.baddbmm(a.new_zeros(()), a, b, beta=0, alpha=scale)


def _block_weights(q_block: Tensor, k_t: Tensor, k_ones_t: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Unnormalized weights ``exp(s − m)`` of one block and the shift ``m`` per row (accumulator dtype).

    ``q_block`` ``(BH, c, d)``, ``k_t`` ``(BH, d, Nk)``, ``k_ones_t`` = ``k_t`` with a row of ones;
    ``s = q kᵀ·scale``. ``exp`` is taken as ``exp2`` of ``s·log2(e)`` (cheaper, the same value).
    """
    column = torch.bmm(q_block, k_t).amax(-1, keepdim=True).neg_()  # −max(q·k) per row, rounded: any constant will do
    shifted = _scaled_bmm(torch.cat([q_block, column], -1), k_ones_t, scale * LOG2E)
    return shifted.exp2_(), column.to(_accumulator(q_block.dtype)).squeeze(-1) * -scale


def _forward(q: Tensor, k: Tensor, v: Tensor, scale: float, chunk: int) -> tuple[Tensor, Tensor]:
    acc = _accumulator(q.dtype)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = torch.empty(q.shape[:-1], dtype=acc, device=q.device)
    k_t = k.transpose(-2, -1)
    k_ones_t = _ones_rows(k, 1)
    for start in range(0, q.shape[1], chunk):
        rows = slice(start, start + chunk)
        weights, shift = _block_weights(q[:, rows], k_t, k_ones_t, scale)
        total = weights.to(acc).sum(-1)
        out[:, rows] = (torch.bmm(weights, v).to(acc) / total[..., None]).to(out.dtype)
        lse[:, rows] = shift + total.log()
    return out, lse


def _backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, chunk: int
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of ``out = softmax(q kᵀ·scale) v`` given ``grad`` = ∂L/∂out, block by block.

    Per block: ``P = exp(q kᵀ·scale − lse)``, ``dV += Pᵀ dO``, ``dS = P ∘ (dO Vᵀ − δ)`` with
    ``δ = rowsum(dO ∘ O)``, ``dQ = dS K·scale``, ``dK += dSᵀ Q·scale``. ``lse`` and ``δ`` enter
    the products as high/low bf16 columns, so both differences are formed in fp32.
    """
    acc, dtype = lse.dtype, q.dtype
    delta = (grad.to(acc) * out.to(acc)).sum(-1)
    q_lse = torch.cat([q, *(t[..., None] for t in _split(lse / -scale, dtype))], -1)
    grad_delta = torch.cat([grad, *(t[..., None] for t in _split(-delta, dtype))], -1)
    k_ones_t, v_ones_t = _ones_rows(k, 2), _ones_rows(v, 2)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    for start in range(0, q.shape[1], chunk):
        rows = slice(start, start + chunk)
        p = _scaled_bmm(q_lse[:, rows], k_ones_t, scale * LOG2E).exp2_()  # the forward's weights, normalized
        dv += torch.bmm(p.transpose(-2, -1), grad[:, rows])
        ds = torch.bmm(grad_delta[:, rows], v_ones_t).mul_(p)
        dq[:, rows] = torch.bmm(ds, k).mul_(scale)
        dk += torch.bmm(ds.transpose(-2, -1), q[:, rows])
    return dq, (dk * scale).to(k.dtype), dv.to(v.dtype)


@torch.library.custom_op("visattn::chunked_attention", mutates_args=())
def _chunked_attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float, chunk: int) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, scale, chunk)


@torch.library.custom_op("visattn::chunked_attention_backward", mutates_args=())
def _chunked_attention_backward_op(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, chunk: int
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(grad, q, k, v, out, lse, scale, chunk)


@_chunked_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float, chunk: int) -> tuple[Tensor, Tensor]:
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    return out, q.new_empty(q.shape[:-1], dtype=_accumulator(q.dtype))


@_chunked_attention_backward_op.register_fake
def _(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, chunk: int
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    q, k, v, scale, chunk = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.chunk = scale, chunk


def _autograd_backward(ctx: Any, grad_out: Tensor, _grad_lse: Tensor | None) -> tuple:
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _chunked_attention_backward_op(grad_out.contiguous(), q, k, v, out, lse, ctx.scale, ctx.chunk)
    return dq, dk, dv, None, None


_chunked_attention_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, chunk: int | None = None) -> Tensor:
    """``softmax(q kᵀ · scale) v`` by blocks of ``chunk`` queries (default: :func:`chunk_size`).

    Args:
        q: queries ``(BH, Nq, d)``.
        k: keys ``(BH, Nk, d)``.
        v: values ``(BH, Nk, dv)``.
        scale: multiplies ``q kᵀ``.
        chunk: queries per block.

    Returns:
        ``(BH, Nq, dv)`` in the inputs' dtype. Differentiable in ``q``, ``k`` and ``v``.
    """
    chunk = chunk or chunk_size(q.shape[0], q.shape[1], k.shape[1], q.dtype)
    out, _ = _chunked_attention_op(q, k, v, float(scale), int(chunk))
    return out
