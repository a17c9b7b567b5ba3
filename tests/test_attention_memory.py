"""Attention memory stays linear in the number of tokens, whatever the head width.

Narrow heads (one channel per head is `SelfAttention2d`'s default below 16 channels, and for 64
channels with 8 heads) once made `scaled_dot_product_attention` fall back to its unfused kernel,
which stores the `(N, N)` weights: a size-1 last dim counted as contiguous whatever its stride,
so the layout fix was skipped. Oracles: a float64 reference written in the tests (outputs and
gradients), the kernel names the profiler saw, and the peak resident memory a child process
measures of itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visattn.layers.functional import attention, attention_matrix_bytes, fused_head_widths
from visattn.profiling import FUSED_KERNELS, UNFUSED_KERNELS, attention_kernels

from .test_chunked import reference

ROOT = Path(__file__).resolve().parents[1]
#: (q/k width, v width) per head: the narrow widths, equal and unequal
WIDTHS = [(1, 1), (2, 2), (3, 3), (5, 5), (1, 2), (3, 1)]


def grid_heads(batch: int, heads: int, width: int, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """`(batch, heads, tokens, width)` laid out as `SelfAttention2d` makes it: a view of a
    channels-first `(batch, heads·width, tokens)` map, so the last dim is not the contiguous one."""
    return torch.randn(batch, heads * width, tokens, dtype=dtype).view(batch, heads, width, tokens).transpose(-1, -2)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("d,dv", WIDTHS)
def test_narrow_heads_take_the_fused_kernel_and_equal_the_reference(d, dv, dtype, tolerance):
    q, k = grid_heads(2, 3, d, 40, dtype), grid_heads(2, 3, d, 33, dtype)
    v = grid_heads(2, 3, dv, 33, dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    grad = torch.randn(2, 3, 40, dv, dtype=dtype)
    results = {}

    def run() -> None:
        results["out"] = attention(*leaves, scale=0.7)
        results["grads"] = torch.autograd.grad(results["out"], leaves, grad)

    kernels = attention_kernels(run)
    assert kernels & FUSED_KERNELS and not kernels & UNFUSED_KERNELS, kernels
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference(*exact, 0.7)
    expected_grads = torch.autograd.grad(expected, exact, grad.double())
    for ours, theirs in zip([results["out"], *results["grads"]], [expected, *expected_grads], strict=True):
        torch.testing.assert_close(ours.double(), theirs, atol=tolerance, rtol=tolerance)


def test_head_widths_are_padded_to_what_the_fused_kernels_take():
    """The table measured with `torch._fused_sdp_choice` (torch 2.14): CPU flash needs `d == dv`;
    CUDA needs widths in multiples of 16 bytes unless flash takes `d == dv` in half precision."""
    assert fused_head_widths(1, 1, "cpu", torch.float32) == (1, 1)
    assert fused_head_widths(3, 1, "cpu", torch.float32) == (3, 3)
    assert fused_head_widths(1, 2, "cpu", torch.bfloat16) == (2, 2)
    assert fused_head_widths(1, 1, "cuda", torch.float32) == (4, 4)
    assert fused_head_widths(5, 2, "cuda", torch.float32) == (8, 4)
    assert fused_head_widths(3, 1, "cuda", torch.bfloat16) == (8, 8)
    assert fused_head_widths(64, 32, "cuda", torch.float16) == (64, 32)


CHILD = r"""
import json, resource, sys, torch
from visattn import SelfAttention2d

def peak():  # bytes; ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

side, widths = int(sys.argv[1]), json.loads(sys.argv[2])
x = torch.randn(1, 8, side, side)
blocks = [SelfAttention2d(8, qk_channels=d, v_channels=dv) for d, dv in widths]
before = peak()
for (d, dv), block in zip(widths, blocks):
    block(x.clone().requires_grad_()).sum().backward()
    print(json.dumps({"d": d, "dv": dv, "grew": peak() - before}), flush=True)
"""


@pytest.mark.slow
def test_memory_stays_far_below_the_weight_matrix_forward_and_backward():
    """A 128×128 grid is 16,384 tokens: its float32 weight matrix is 1 GiB per head (the unfused
    kernel stored three times that, forward and backward, before the fix). A child process runs
    one `SelfAttention2d` per head width, forward and backward, and reports how much its peak
    resident memory grew after each; none may add an eighth of the matrix."""
    side = 128
    matrix = attention_matrix_bytes(1, 1, side * side, side * side)
    assert matrix >= 2**30
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(side), json.dumps(WIDTHS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(row["d"], row["dv"]) for row in rows] == WIDTHS
    for row in rows:
        assert row["grew"] < matrix / 8, f"{row}: grew {row['grew'] / 2**20:.0f} MiB, matrix {matrix / 2**20:.0f} MiB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,dv", WIDTHS)
def test_cuda_narrow_heads_take_a_fused_kernel_and_little_memory(d, dv, dtype):
    tokens = 16384
    q, k, v = (grid_heads(1, 1, w, tokens, dtype).cuda().requires_grad_() for w in (d, d, dv))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    kernels = attention_kernels(lambda: attention(q, k, v).sum().backward())
    torch.cuda.synchronize()
    assert kernels & FUSED_KERNELS and not kernels & UNFUSED_KERNELS, kernels
    matrix = attention_matrix_bytes(1, 1, tokens, tokens, dtype)
    assert torch.cuda.max_memory_allocated() - start < matrix / 8
