"""Which attention kernel did PyTorch run, and how many FLOPs did a call do? (tests, benchmarks).

A leaf: imports nothing of visattn. The chunked path's operators are looked up by name in
``torch.ops`` (they exist once ``visattn.layers`` is imported).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "CHUNKED_KERNELS",
    "FUSED_KERNELS",
    "UNFUSED_KERNELS",
    "attention_flops",
    "attention_kernels",
    "count_flops",
]

#: operator names of the fused kernels behind ``scaled_dot_product_attention``
FUSED_KERNELS = frozenset(
    {
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_cudnn_attention",
    }
)
#: the slow kernel that stores the full weight matrix
UNFUSED_KERNELS = frozenset({"aten::_scaled_dot_product_attention_math"})
#: visattn's query-chunked path (:mod:`visattn.layers.chunked`), forward and backward
CHUNKED_KERNELS = frozenset({"visattn::chunked_attention", "visattn::chunked_attention_backward"})

#: attention operators whose FLOPs :func:`count_flops` counts by formula: (forward, backward) names.
#: PyTorch's counter misses the CPU flash kernel entirely (it counts 0) and counts a recomputation
#: of the scores in the backward of the others; visattn's chunked operators are opaque to it.
_FORMULA_OPS = {
    "forward": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_cudnn_attention",
        "visattn::chunked_attention",
    ),
    "backward": (
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
        "aten::_scaled_dot_product_flash_attention_backward",
        "aten::_scaled_dot_product_efficient_attention_backward",
        "aten::_scaled_dot_product_cudnn_attention_backward",
        "visattn::chunked_attention_backward",
    ),
}


def attention_kernels(fn: Callable[[], object]) -> set[str]:
    """Run ``fn()`` under the profiler; return the names of the attention kernels it called
    (of :data:`FUSED_KERNELS`, :data:`UNFUSED_KERNELS` and :data:`CHUNKED_KERNELS`)."""
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
    known = FUSED_KERNELS | UNFUSED_KERNELS | CHUNKED_KERNELS
    return {e.key for e in prof.key_averages() if e.key in known}


def attention_flops(
    query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int], *, backward: bool = False
) -> int:
    """FLOPs of ``softmax(q kᵀ) v`` as the work of its two matrix products.

    With ``q`` ``(..., Nq, d)``, ``k`` ``(..., Nk, d)``, ``v`` ``(..., Nk, dv)`` and ``BH`` the
    product of the leading dims of ``q`` (batch × heads):

    - forward: ``q kᵀ`` and ``weights · v``, ``2·BH·Nq·Nk·d + 2·BH·Nq·Nk·dv`` (for ``dv = d``:
      ``4·BH·Nq·Nk·d``);
    - backward: the gradients of both products, two matrix products each (``dq``, ``dk``;
      ``dweights``, ``dv``), twice the forward.

    This is exactly what :class:`~torch.utils.flop_counter.FlopCounterMode` counts for the
    materialized arithmetic (``matmul``, ``softmax``, ``matmul`` and its autograd backward), so
    fused, chunked and materialized implementations of the same attention count the same
    FLOPs. Work an implementation adds — recomputing the scores in a backward that does not
    store them, zero-padded head dims — is not counted; it shows as lower FLOP/s. Softmax,
    scaling and masking are not counted (element-wise, as everywhere in the counter).
    """
    batch_heads = math.prod(query_shape[:-2])
    num_queries, dim = query_shape[-2], query_shape[-1]
    num_keys, value_dim = key_shape[-2], value_shape[-1]
    forward = 2 * batch_heads * num_queries * num_keys * (dim + value_dim)
    return 2 * forward if backward else forward


def _forward_formula(query_shape: list, key_shape: list, value_shape: list, *_args: Any, **_kwargs: Any) -> int:
    return attention_flops(query_shape, key_shape, value_shape)


def _backward_formula(
    _grad_shape: list, query_shape: list, key_shape: list, value_shape: list, *_args: Any, **_kwargs: Any
) -> int:
    return attention_flops(query_shape, key_shape, value_shape, backward=True)


def _operator(name: str) -> object | None:
    """``torch.ops.<namespace>.<op>`` for ``"namespace::op"``, or None where it does not exist."""
    namespace, op = name.split("::")
    try:
        return getattr(getattr(torch.ops, namespace), op)
    except (AttributeError, RuntimeError):
        return None


def _formula_mapping() -> dict[object, Callable[..., int]]:
    mapping = {}
    for kind, formula in (("forward", _forward_formula), ("backward", _backward_formula)):
        for name in _FORMULA_OPS[kind]:
            op = _operator(name)
            if op is not None:
                mapping[op] = formula
    return mapping


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn()``: PyTorch's flop counter, attention counted by formula.

    :class:`~torch.utils.flop_counter.FlopCounterMode` counts matrix products and convolutions
    (forward and backward). It does not see the CPU flash kernel at all (0 FLOPs), counts a
    recomputation of the scores in the backward of the GPU fused kernels, and cannot look inside
    visattn's chunked operators; for all of them :func:`attention_flops` is counted instead, so
    every implementation of the same attention counts the same work.
    """
    with FlopCounterMode(display=False, custom_mapping=_formula_mapping()) as counter:
        fn()
    return counter.get_total_flops()
