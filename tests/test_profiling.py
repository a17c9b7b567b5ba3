"""visattn.profiling.count_flops: attention counted by formula, equal to PyTorch's own count of the
materialized arithmetic (matmul, softmax, matmul), for every path that computes the same attention."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import selfattention2d
from visattn.layers.functional import attention, attention_backend
from visattn.profiling import attention_flops, count_flops


def materialized(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v


def counter_flops(fn) -> int:
    """PyTorch's flop counter with no formula added: the oracle for what it can see."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_formula():
    # 2 matrix products forward: 2·BH·Nq·Nk·d + 2·BH·Nq·Nk·dv; backward twice that
    assert attention_flops((2, 3, 64, 32), (2, 3, 80, 32), (2, 3, 80, 16)) == 2 * 6 * 64 * 80 * (32 + 16)
    assert attention_flops((6, 64, 32), (6, 80, 32), (6, 80, 32)) == 4 * 6 * 64 * 80 * 32
    assert attention_flops((5, 7, 8), (5, 9, 8), (5, 9, 8), backward=True) == 2 * 4 * 5 * 7 * 9 * 8


# (the CPU flash kernel pads a dv != d up to d: it does, and counts, more work; not compared)
@pytest.mark.parametrize("backend,dv", [("fused", 32), ("chunked", 32), ("chunked", 16)])
def test_every_path_counts_the_materialized_work(backend, dv):
    q, k = torch.randn(2, 3, 64, 32, requires_grad=True), torch.randn(2, 3, 80, 32, requires_grad=True)
    v = torch.randn(2, 3, 80, dv, requires_grad=True)
    forward = attention_flops(q.shape, k.shape, v.shape)
    assert counter_flops(lambda: materialized(q, k, v)) == forward  # the oracle agrees with the formula
    assert counter_flops(lambda: materialized(q, k, v).sum().backward()) == 3 * forward
    with attention_backend(backend):
        assert count_flops(lambda: attention(q, k, v)) == forward
        assert count_flops(lambda: attention(q, k, v).sum().backward()) == 3 * forward
        with torch.inference_mode():
            assert count_flops(lambda: attention(q, k, v)) == forward


def test_selfattention2d_contenders_count_the_same_work():
    x = selfattention2d.make_input(8, "cpu", batch=2, channels=64)
    contenders = selfattention2d.make_contenders(64)
    for mode in selfattention2d.MODES:
        flops = {name: count_flops(selfattention2d.step(m, x, mode)) for name, m in contenders.items()}
        assert len(set(flops.values())) == 1 and flops["visattn"] > 0, (mode, flops)
