"""functional.attention against a float64 reference written here, and its kernel choice."""

from __future__ import annotations

import math

import pytest
import torch

from visattn.layers.functional import attention
from visattn.profiling import FUSED_KERNELS, UNFUSED_KERNELS, attention_kernels


def reference(q, k, v, mask=None, scale=None):
    """softmax(q kᵀ·scale + mask) v in float64, written out loop-free but independently."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("...qd,...kd->...qk", q, k) * scale
    if mask is not None:
        scores = (
            torch.where(mask, scores, torch.tensor(-math.inf, dtype=torch.float64))
            if mask.dtype == torch.bool
            else scores + mask.double()
        )
    weights = scores.exp() / scores.exp().sum(-1, keepdim=True) if mask is None else torch.softmax(scores, -1)
    return torch.einsum("...qk,...kd->...qd", weights, v), weights


SHAPES = [
    # (lead dims, Nq, Nk, d, dv)
    ((), 5, 7, 8, 8),
    ((3,), 6, 6, 16, 4),
    ((2, 4), 9, 13, 8, 12),
    ((2, 2, 3), 4, 11, 6, 6),
]


@pytest.mark.parametrize("lead,nq,nk,d,dv", SHAPES)
@pytest.mark.parametrize("need_weights", [False, True])
def test_matches_float64_reference(lead, nq, nk, d, dv, need_weights):
    q, k, v = torch.randn(*lead, nq, d), torch.randn(*lead, nk, d), torch.randn(*lead, nk, dv)
    expected, expected_w = reference(q, k, v)
    result = attention(q, k, v, need_weights=need_weights)
    out = result[0] if need_weights else result
    assert out.shape == (*lead, nq, dv)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    if need_weights:
        weights = result[1]
        assert weights.shape == (*lead, nq, nk)
        torch.testing.assert_close(weights.double(), expected_w, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(weights.sum(-1), torch.ones(*lead, nq))


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("kind", ["bool", "float", "bool_broadcast"])
def test_masks(kind, need_weights):
    q, k, v = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 5)
    if kind == "bool":
        mask = torch.rand(2, 3, 6, 10) > 0.4
        mask[..., 0] = True  # every query attends somewhere
    elif kind == "bool_broadcast":
        mask = torch.ones(10, dtype=torch.bool)
        mask[3:7] = False
    else:
        mask = torch.randn(1, 3, 6, 10)
    expected, expected_w = reference(q, k, v, mask=mask)
    result = attention(q, k, v, mask=mask, need_weights=need_weights)
    out = result[0] if need_weights else result
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(result[1].double(), expected_w, atol=1e-6, rtol=1e-5)
        if kind == "bool_broadcast":
            assert result[1][..., 3:7].abs().max() == 0


def test_custom_scale_and_5d_mask():
    q, k, v = torch.randn(2, 2, 3, 4, 8), torch.randn(2, 2, 3, 5, 8), torch.randn(2, 2, 3, 5, 8)
    mask = torch.randn(2, 1, 1, 4, 5)
    expected, _ = reference(q, k, v, mask=mask, scale=0.3)
    torch.testing.assert_close(attention(q, k, v, mask=mask, scale=0.3).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("need_weights", [False, True])
def test_bfloat16_autocast(need_weights):
    q, k, v = torch.randn(2, 4, 32, 16), torch.randn(2, 4, 48, 16), torch.randn(2, 4, 48, 24)
    expected, _ = reference(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = attention(q, k, v, need_weights=need_weights)
    out = result[0] if need_weights else result
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=3e-2)


def test_fused_and_explicit_paths_agree_with_gradients():
    tensors = [torch.randn(2, 3, 20, 8, requires_grad=True) for _ in range(2)]
    v = torch.randn(2, 3, 20, 12, requires_grad=True)
    q, k = tensors
    grads = []
    for need_weights in (False, True):
        result = attention(q, k, v, need_weights=need_weights)
        out = result[0] if need_weights else result
        grads.append([out, *torch.autograd.grad((out**2).sum(), [q, k, v])])
    for fused, explicit in zip(*grads, strict=True):
        torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-4)


def test_fast_path_takes_the_fused_kernel_even_for_strided_views():
    # a transposed view (last dim not contiguous) and dv != d, as SelfAttention2d produces
    q = torch.randn(2, 32, 256).transpose(-1, -2)[:, None]
    k = torch.randn(2, 32, 256).transpose(-1, -2)[:, None]
    v = torch.randn(2, 64, 256).transpose(-1, -2)[:, None]
    assert q.stride(-1) != 1
    plain_sdpa = attention_kernels(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, q))
    assert plain_sdpa & UNFUSED_KERNELS, "the strided view should defeat plain SDPA (guard for this test)"
    used = attention_kernels(lambda: attention(q, k, v))
    assert used & FUSED_KERNELS and not used & UNFUSED_KERNELS, used
    masked = attention_kernels(lambda: attention(q, k, v, mask=torch.ones(256, 256, dtype=torch.bool)))
    assert masked & FUSED_KERNELS and not masked & UNFUSED_KERNELS, masked
    with torch.autocast("cpu", dtype=torch.bfloat16):
        used = attention_kernels(lambda: attention(q, k, v))
    assert used & FUSED_KERNELS and not used & UNFUSED_KERNELS, used


def test_weights_path_does_not_call_sdpa():
    q = torch.randn(1, 1, 8, 4)
    assert attention_kernels(lambda: attention(q, q, q, need_weights=True)) == set()


@pytest.mark.parametrize(
    "shapes,match",
    [
        (((4, 8), (5, 7), (5, 7)), "share their last dim"),
        (((4, 8), (5, 8), (6, 8)), "same number of tokens"),
        (((2, 4, 8), (3, 5, 8), (3, 5, 8)), "leading"),
        (((8,), (8,), (8,)), "at least 2 dims"),
    ],
)
def test_shape_errors_are_clear(shapes, match):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v)


def test_mask_errors_are_clear():
    q = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="does not broadcast"):
        attention(q, q, q, mask=torch.ones(3, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean"):
        attention(q, q, q, mask=torch.ones(4, 4, dtype=torch.long))


def test_integer_inputs_are_refused_by_name():
    q = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="floating-point.*v is torch.int64"):
        attention(q, q, q.long())


def test_a_3d_mask_beside_4d_inputs_takes_the_fused_kernel():
    # the CPU flash kernel refuses a 3-D mask beside 4-D inputs; it runs the unfused kernel then
    q, k, v = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    mask = torch.rand(3, 6, 10) > 0.4
    mask[..., 0] = True
    used = attention_kernels(lambda: attention(q, k, v, mask=mask))
    assert used & FUSED_KERNELS and not used & UNFUSED_KERNELS, used
    expected, _ = reference(q, k, v, mask=mask)
    torch.testing.assert_close(attention(q, k, v, mask=mask).double(), expected, atol=1e-5, rtol=1e-5)
