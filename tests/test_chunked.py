"""The query-chunked attention path and the path chooser of functional.attention.

Oracles: a float64 reference written here, the explicit-weights path, float64 gradcheck, and
properties (no (Nq, Nk) tensor is ever formed; the chooser measures once per shape).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import visattn.layers.functional as functional
from visattn.layers import chunked
from visattn.layers.functional import attention, attention_backend
from visattn.profiling import CHUNKED_KERNELS, FUSED_KERNELS, attention_kernels


def reference(q, k, v, scale=None):
    q, k, v = q.double(), k.double(), v.double()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("...qd,...kd->...qk", q, k) * scale
    weights = (scores - scores.amax(-1, keepdim=True)).exp()
    return torch.einsum("...qk,...kd->...qd", weights / weights.sum(-1, keepdim=True), v)


SHAPES = [
    # (lead dims, Nq, Nk, d, dv, chunk)
    ((), 5, 7, 8, 8, 2),
    ((3,), 37, 20, 16, 4, 16),  # the last block is partial
    ((2, 4), 9, 13, 8, 12, 9),  # one block
    ((2, 2, 3), 40, 11, 6, 6, 7),
]


@pytest.mark.parametrize("lead,nq,nk,d,dv,chunk", SHAPES)
def test_float64_equals_reference(lead, nq, nk, d, dv, chunk):
    q, k, v = (torch.randn(*lead, n, w, dtype=torch.float64) for n, w in ((nq, d), (nk, d), (nk, dv)))
    q = 4 * q  # peaky weights
    flat = [t.reshape(-1, *t.shape[-2:]) for t in (q, k, v)]
    out = chunked.chunked_attention(*flat, 0.3, chunk=chunk).reshape(*lead, nq, dv)
    torch.testing.assert_close(out, reference(q, k, v, 0.3), atol=1e-12, rtol=1e-10)
    with attention_backend("chunked"):
        forced = attention(q, k, v)
    torch.testing.assert_close(forced, reference(q, k, v), atol=1e-12, rtol=1e-10)


def test_float32_equals_the_explicit_path_with_gradients():
    tensors = [torch.randn(2, 3, 50, 8, requires_grad=True), torch.randn(2, 3, 30, 8, requires_grad=True)]
    v = torch.randn(2, 3, 30, 12, requires_grad=True)
    results = []
    for backend, need_weights in (("chunked", False), ("fused", True)):
        with attention_backend(backend):
            result = attention(*tensors, v, need_weights=need_weights)
        out = result[0] if need_weights else result
        results.append([out, *torch.autograd.grad((out**2).sum(), [*tensors, v])])
    for ours, explicit in zip(*results, strict=True):
        torch.testing.assert_close(ours, explicit, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_gradcheck_float64(chunk):
    q = torch.randn(2, 9, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: chunked.chunked_attention(a, b, c, 0.7, chunk=chunk), (q, k, v))


def test_the_operators_are_consistent_for_torch_library():
    # fake (meta) kernels, autograd registration and schema, as torch.compile relies on them
    q, k, v = (torch.randn(2, 12, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.visattn.chunked_attention.default, (q, k, v, 0.5, 5))


def test_bfloat16_is_as_accurate_as_fp32_scores_allow():
    # peaky weights (scores up to ~25): bf16-rounded scores alone would err by |s|·2^-9 ≈ 5 %
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 200, 32, generator=gen) for _ in range(3))
    q = 6 * q
    grad = torch.randn(3, 200, 32, generator=gen)
    qb, kb, vb, gb = (t.bfloat16() for t in (q, k, v, grad))
    expected = reference(qb, kb, vb)  # exact arithmetic on the bf16 inputs
    naive = torch.softmax((qb @ kb.transpose(-1, -2) * 32**-0.5).double(), -1) @ vb.double()
    leaves = [t.clone().requires_grad_() for t in (qb, kb, vb)]
    out = chunked.chunked_attention(*leaves, 32**-0.5, chunk=64)
    out.backward(gb)
    error = ((out.double() - expected).norm() / expected.norm()).item()
    naive_error = ((naive - expected).norm() / expected.norm()).item()
    assert error < 6e-3 < naive_error, (error, naive_error)
    exact = [t.double().requires_grad_() for t in (qb, kb, vb)]
    reference(*exact).backward(gb.double())
    for ours, ref in zip(leaves, exact, strict=True):
        assert ((ours.grad.double() - ref.grad).norm() / ref.grad.norm()).item() < 2e-2


class _LargestTensor(TorchDispatchMode):
    """Remembers the most elements any operator produced."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_memory_is_one_block_of_scores_not_the_matrix():
    bh, nq, nk, d, chunk = 2, 96, 80, 8, 16
    q, k, v, grad = torch.randn(bh, nq, d), torch.randn(bh, nk, d), torch.randn(bh, nk, d), torch.randn(bh, nq, d)
    with _LargestTensor() as mode:
        out, lse = chunked._forward(q, k, v, 0.3, chunk)
        chunked._backward(grad, q, k, v, out, lse, 0.3, chunk)
    assert mode.numel <= bh * chunk * nk < bh * nq * nk, mode.numel


def test_chunk_size_budget():
    assert chunked.chunk_size(4, 4096, 4096, torch.bfloat16) == chunked.CHUNK_BYTES // (4 * 4096 * 2)
    assert chunked.chunk_size(48, 197, 197, torch.bfloat16) == 197  # a ViT-S/16 layer: one block
    assert chunked.chunk_size(48, 1000, 1000, torch.bfloat16) % 16 == 0
    assert chunked.chunk_size(512, 4096, 65536, torch.float32) == chunked.MIN_CHUNK
    assert chunked.chunk_size(1, 10, 10, torch.float32) == 10


def test_forced_paths_run_their_kernels_and_refuse_what_they_cannot_do():
    q = torch.randn(1, 2, 40, 8)
    leaf = q.clone().requires_grad_()
    with attention_backend("chunked"):
        assert attention_kernels(lambda: attention(q, q, q)) == {"visattn::chunked_attention"}
        assert attention_kernels(lambda: attention(leaf, leaf, leaf).sum().backward()) == CHUNKED_KERNELS
        with pytest.raises(ValueError, match="no mask and no dropout"):
            attention(q, q, q, mask=torch.ones(40, 40, dtype=torch.bool))
        with pytest.raises(ValueError, match="no mask and no dropout"):
            attention(q, q, q, dropout_p=0.1)
    with attention_backend("fused"):
        assert attention_kernels(lambda: attention(q, q, q)) <= FUSED_KERNELS
    with pytest.raises(ValueError, match="one of"), attention_backend("flash"):
        pass


def test_chunked_under_autocast_runs_in_bfloat16():
    q = torch.randn(2, 3, 40, 16)
    with attention_backend("chunked"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, q, q)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(q, q, q), atol=3e-2, rtol=3e-2)


@pytest.fixture
def auto(monkeypatch):
    """The "auto" chooser on a CPU that reports native bf16, with the timing stubbed out."""
    monkeypatch.setattr(functional, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(functional, "_choices", {})
    calls = []

    def measured(path):
        def fake(q, k, v, scale, with_grad):
            calls.append((tuple(q.shape), with_grad))
            return path

        monkeypatch.setattr(functional, "_measure_paths", fake)

    with attention_backend("auto"):
        yield measured, calls


def test_auto_measures_each_shape_once_and_runs_the_winner(auto):
    measured, calls = auto
    measured("chunked")
    q = torch.randn(1, 1, 256, 8, dtype=torch.bfloat16)
    assert attention_kernels(lambda: attention(q, q, q)) == {"visattn::chunked_attention"}
    attention(q, q, q)
    assert calls == [((1, 1, 256, 8), False)]
    assert list(functional.attention_choices().values()) == ["chunked"]
    leaf = q.clone().requires_grad_()
    attention(leaf, leaf, leaf).sum().backward()  # forward+backward is a shape of its own
    assert calls[-1] == ((1, 1, 256, 8), True)
    measured("fused")
    wide = torch.randn(2, 1, 256, 8, dtype=torch.bfloat16)
    assert attention_kernels(lambda: attention(wide, wide, wide)) <= FUSED_KERNELS


def test_auto_does_not_measure_what_only_the_fused_kernel_does(auto, monkeypatch):
    measured, calls = auto
    measured("chunked")
    big, small = torch.randn(1, 1, 256, 8), torch.randn(1, 1, 127, 8)
    attention(big, big, big)  # float32
    attention(small.bfloat16(), small.bfloat16(), small.bfloat16())  # fewer scores than MIN_MEASURED_SCORES
    attention(big.bfloat16(), big.bfloat16(), big.bfloat16(), mask=torch.ones(256, 256, dtype=torch.bool))
    monkeypatch.setattr(functional, "cpu_has_native_bf16", lambda: False)  # bf16 would be emulated
    attention(big.bfloat16(), big.bfloat16(), big.bfloat16())
    assert calls == []


@pytest.mark.parametrize("fused,chunked_s,expected", [(1.0, 0.5, "chunked"), (1.0, 0.95, "fused"), (1.0, 2.0, "fused")])
def test_measurement_keeps_chunked_only_when_clearly_faster(monkeypatch, fused, chunked_s, expected):
    """The "auto" chooser's first call of a shape times both paths (the clock stubbed with the
    given seconds) and keeps chunked only when it is clearly faster; the timing runs on copies, so
    the caller's tensor still gets its gradient."""

    def timed(fns):
        assert list(fns) == ["fused", "chunked"]
        for fn in fns.values():
            fn()  # the paths run on copies of the inputs
        return {"fused": fused, "chunked": chunked_s}

    monkeypatch.setattr(functional, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(functional, "_choices", {})
    monkeypatch.setattr(functional, "_best_seconds", timed)
    q = torch.randn(1, 1, 128, 8, dtype=torch.bfloat16, requires_grad=True)  # MIN_MEASURED_SCORES scores
    with attention_backend("auto"):
        attention(q, q, q).float().sum().backward()
    assert list(functional.attention_choices().values()) == [expected]
    assert q.grad is not None and torch.isfinite(q.grad.float()).all()


def test_the_measurement_is_invisible_to_the_callers_flop_counter(monkeypatch):
    from visattn.profiling import attention_flops, count_flops

    monkeypatch.setattr(functional, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(functional, "_choices", {})
    q = torch.randn(1, 1, 128, 8, dtype=torch.bfloat16)
    with attention_backend("auto"):
        assert count_flops(lambda: attention(q, q, q)) == attention_flops(q.shape, q.shape, q.shape)
    assert len(functional.attention_choices()) == 1  # it did measure, inside the counted call
