"""SelfAttention2d: identity at creation, references for the general block and the presets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visattn import SelfAttention2d
from visattn.profiling import FUSED_KERNELS, UNFUSED_KERNELS, attention_kernels

from .helpers import assert_every_parameter_gets_gradient, conv1x1, explicit_attention, randomize


def reference_block(block: SelfAttention2d, x: torch.Tensor) -> torch.Tensor:
    """The block's arithmetic, written out: per-head softmax over flattened positions."""
    b, c, h, w = x.shape
    heads = block.num_heads
    q = conv1x1(x, block.query)
    k, v = conv1x1(x, block.key), conv1x1(x, block.value)
    if block.kv_pool > 1:
        pool = F.max_pool2d if block.kv_pool_mode == "max" else F.avg_pool2d
        k, v = (pool(t, block.kv_pool, block.kv_pool, ceil_mode=True) for t in (k, v))
    n_k = k.shape[-2] * k.shape[-1]
    q = q.reshape(b, heads, -1, h * w)  # (b, heads, d, N): channel groups are the heads
    k = k.reshape(b, heads, -1, n_k)
    v = v.reshape(b, heads, -1, n_k)
    scale = 1 / math.sqrt(q.shape[2]) if block.scale is None else block.scale
    weights = torch.softmax(torch.einsum("bhdq,bhdk->bhqk", q, k) * scale, dim=-1)
    y = torch.einsum("bhqk,bhdk->bhdq", weights, v).reshape(b, -1, h, w)
    y = conv1x1(y, block.out)
    if isinstance(block.out_norm, nn.BatchNorm2d):
        y = block.out_norm(y)
    gamma = 1.0 if block.gamma is None else block.gamma.view(1, -1, 1, 1)
    return x + gamma * y


@pytest.mark.parametrize(
    "make",
    [
        lambda c: SelfAttention2d(c),
        lambda c: SelfAttention2d(c, num_heads=4, qk_channels=16, v_channels=32, kv_pool=2),
        lambda c: SelfAttention2d.sagan(c),
        lambda c: SelfAttention2d.non_local(c, sub_sample=True),
        lambda c: SelfAttention2d(c, gate="channel", pos="sincos", kv_pool=3, kv_pool_mode="avg"),
    ],
)
def test_identity_at_creation(make):
    block = make(32)
    for mode in ("train", "eval"):
        getattr(block, mode)()
        # (1, C, 1, 1) only in eval: BatchNorm cannot train on one value per channel
        shapes = [(2, 32, 7, 11), (3, 32, 16, 16)] + ([(1, 32, 1, 1)] if mode == "eval" else [])
        for shape in shapes:
            x = torch.randn(shape)
            assert torch.equal(block(x), x)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(num_heads=2, qk_channels=8, v_channels=12),
        dict(num_heads=4, qk_channels=16, v_channels=16, kv_pool=2),
        dict(kv_pool=3, kv_pool_mode="avg", scale=0.5, gate="channel"),
    ],
)
def test_general_block_matches_reference(kwargs):
    block = randomize(SelfAttention2d(32, **kwargs)).double().eval()
    x = torch.randn(2, 32, 7, 10, dtype=torch.float64)  # non-square, not a multiple of the pool
    expected = reference_block(block, x)
    torch.testing.assert_close(block(x), expected)
    with explicit_attention(block):
        torch.testing.assert_close(block(x), expected)


def test_sagan_preset_matches_reference():
    """BigGAN's Attention: theta/phi at C/8, g at C/2, 2×2 max-pooled phi/g, unscaled, no biases."""
    c = 64
    block = randomize(SelfAttention2d.sagan(c)).double().eval()
    assert (block.qk_channels, block.v_channels, block.kv_pool, block.scale) == (8, 32, 2, 1.0)
    assert block.query.bias is None and block.out.bias is None and block.gamma.numel() == 1
    x = torch.randn(2, c, 8, 6, dtype=torch.float64)
    # BigGAN layers.Attention.forward, transcribed
    theta = conv1x1(x, block.query).view(-1, c // 8, 8 * 6)
    phi = F.max_pool2d(conv1x1(x, block.key), [2, 2]).view(-1, c // 8, 8 * 6 // 4)
    g = F.max_pool2d(conv1x1(x, block.value), [2, 2]).view(-1, c // 2, 8 * 6 // 4)
    beta = F.softmax(torch.bmm(theta.transpose(1, 2), phi), -1)
    o = conv1x1(torch.bmm(g, beta.transpose(1, 2)).view(-1, c // 2, 8, 6), block.out)
    torch.testing.assert_close(block(x), x + block.gamma * o)


def test_non_local_preset_matches_reference():
    """Embedded-Gaussian non-local block (Wang et al.): θ/φ/g at C/2, softmax(θᵀφ), W_z + BN."""
    c = 32
    block = randomize(SelfAttention2d.non_local(c, sub_sample=True)).double()
    block.out_norm.running_mean.normal_()
    block.out_norm.running_var.uniform_(0.5, 2)
    block.eval()
    assert block.gamma is None and (block.qk_channels, block.v_channels) == (16, 16)
    x = torch.randn(2, c, 6, 9, dtype=torch.float64)
    theta = conv1x1(x, block.query).flatten(2).transpose(1, 2)  # (b, N, C/2)
    phi = F.max_pool2d(conv1x1(x, block.key), 2, ceil_mode=True).flatten(2)  # (b, C/2, M)
    g = F.max_pool2d(conv1x1(x, block.value), 2, ceil_mode=True).flatten(2).transpose(1, 2)
    f = F.softmax(theta @ phi, dim=-1)
    y = (f @ g).transpose(1, 2).reshape(2, c // 2, 6, 9)
    z = block.out_norm(conv1x1(y, block.out)) + x
    torch.testing.assert_close(block(x), z)


def test_non_local_identity_at_creation_in_train_mode_keeps_batchnorm_statistics_updating():
    block = SelfAttention2d.non_local(16).train()
    x = torch.randn(4, 16, 5, 5)
    assert torch.equal(block(x), x)
    assert block.out_norm.num_batches_tracked.item() == 1


def test_permutation_equivariance_without_positions():
    block = randomize(SelfAttention2d(16, num_heads=2)).double().eval()
    x = torch.randn(2, 16, 4, 6, dtype=torch.float64)
    perm = torch.randperm(24)
    permuted = x.flatten(2)[..., perm].view_as(x)
    torch.testing.assert_close(block(permuted).flatten(2), block(x).flatten(2)[..., perm])
    with_pos = randomize(SelfAttention2d(16, num_heads=2, pos="sincos")).double().eval()
    assert not torch.allclose(with_pos(permuted).flatten(2), with_pos(x).flatten(2)[..., perm])


def test_gradients_reach_every_parameter_once_the_gate_is_open():
    block = SelfAttention2d(16, num_heads=2, kv_pool=2)
    x = torch.randn(2, 16, 6, 6)
    block(x).pow(2).sum().backward()
    assert block.gamma.grad.abs().sum() > 0  # at creation only the gate learns
    assert block.query.weight.grad.abs().sum() == 0
    with torch.no_grad():
        block.gamma.fill_(0.5)
    block.zero_grad()
    block(x).pow(2).sum().backward()
    assert_every_parameter_gets_gradient(block)


def test_channels_last_and_autocast():
    block = randomize(SelfAttention2d(32, num_heads=2)).eval()
    x = torch.randn(2, 32, 9, 7)
    expected = block(x)
    torch.testing.assert_close(block(x.to(memory_format=torch.channels_last)), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("make", [lambda: SelfAttention2d(64), lambda: SelfAttention2d.sagan(64)])
def test_fused_kernel_is_taken(make):
    block = make().eval()
    x = torch.randn(2, 64, 16, 16)
    used = attention_kernels(lambda: block(x))
    assert used & FUSED_KERNELS and not used & UNFUSED_KERNELS, used


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fused_kernels_forward_and_backward_at_64x64(memory_format):
    """The benchmark's configuration (q/k/v 32 wide, BatchNorm, no gate) at a 64×64 grid, training:
    the fused kernel runs forward and backward and no (HW)×(HW) softmax is ever formed."""
    block = SelfAttention2d(64, qk_channels=32, v_channels=32, scale=64**-0.5, out_norm="batchnorm", gate=None)
    nn.init.ones_(block.out_norm.weight)  # let gradients reach the attention
    x = torch.randn(1, 64, 64, 64).to(memory_format=memory_format).requires_grad_(True)
    with torch.profiler.profile() as prof:
        block.train()(x).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names, names
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in names, names
    materializing = UNFUSED_KERNELS | {"aten::_softmax", "aten::bmm"}
    assert not names & materializing, names & materializing
    assert block.query.weight.grad.abs().sum() > 0


def test_clear_errors():
    block = SelfAttention2d(16)
    with pytest.raises(ValueError, match=r"C=16.*C=8"):
        block(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="3-D tensor"):
        block(torch.randn(16, 4, 4))
    with pytest.raises(ValueError, match="multiple of num_heads"):
        SelfAttention2d(16, num_heads=3, qk_channels=8)
    with pytest.raises(ValueError, match="gate=None"):
        SelfAttention2d(16, gate=None)
