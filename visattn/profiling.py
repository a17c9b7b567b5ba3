"""Which attention kernel did PyTorch run? (for tests and benchmarks)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["FUSED_KERNELS", "UNFUSED_KERNELS", "attention_kernels"]

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


def attention_kernels(fn: Callable[[], object]) -> set[str]:
    """Run ``fn()`` under the profiler; return the names of the attention kernels it called."""
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key in FUSED_KERNELS | UNFUSED_KERNELS}
