"""MultiHeadAttention and EncoderBlock against timm (same weights) and references written here."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from timm.models.vision_transformer import Attention as TimmAttention
from timm.models.vision_transformer import Block as TimmBlock
from torch import nn

from visattn import EncoderBlock, MultiHeadAttention

from .helpers import assert_every_parameter_gets_gradient, explicit_attention


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_mha_matches_timm_attention(qk_norm, qkv_bias):
    timm_attn = TimmAttention(64, num_heads=4, qkv_bias=qkv_bias, qk_norm=qk_norm, norm_layer=nn.LayerNorm).eval()
    ours = MultiHeadAttention(64, 4, qkv_bias=qkv_bias, qk_norm=qk_norm).eval()
    if qk_norm:  # non-trivial norm affine parameters
        for p in timm_attn.q_norm.parameters():
            nn.init.normal_(p)
    ours.load_state_dict(timm_attn.state_dict())
    x = torch.randn(3, 17, 64)
    torch.testing.assert_close(ours(x), timm_attn(x), atol=1e-5, rtol=1e-5)
    with explicit_attention(ours):
        torch.testing.assert_close(ours(x), timm_attn(x), atol=1e-5, rtol=1e-5)


def test_mha_cross_attention_matches_reference():
    mha = MultiHeadAttention(32, 2).double().eval()
    x, context = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 9, 32, dtype=torch.float64)
    w, b = mha.qkv.weight, mha.qkv.bias
    q = (x @ w[:32].T + b[:32]).view(2, 5, 2, 16).transpose(1, 2)
    k = (context @ w[32:64].T + b[32:64]).view(2, 9, 2, 16).transpose(1, 2)
    v = (context @ w[64:].T + b[64:]).view(2, 9, 2, 16).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16), -1)
    expected = mha.proj((weights @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(mha(x, context=context), expected)


def test_mha_mask_blocks_tokens():
    mha = MultiHeadAttention(16, 2).eval()
    x = torch.randn(1, 6, 16)
    keep = torch.tensor([True, True, True, False, False, False])
    changed = x.clone()
    changed[:, 3:] = torch.randn(1, 3, 16)  # masked-out keys may change freely
    out_a, out_b = mha(x, attn_mask=keep), mha(changed, attn_mask=keep)
    torch.testing.assert_close(out_a[:, :3], out_b[:, :3])


def test_mha_errors():
    mha = MultiHeadAttention(16, 2)
    with pytest.raises(ValueError, match=r"\(B, N, 16\)"):
        mha(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="context"):
        mha(torch.randn(2, 5, 16), context=torch.randn(3, 4, 16))
    with pytest.raises(ValueError, match="multiple of num_heads"):
        MultiHeadAttention(10, 4)


@pytest.mark.parametrize("layer_scale", [None, 0.1])
def test_pre_norm_block_matches_timm_block(layer_scale):
    norm = partial(nn.LayerNorm, eps=1e-6)
    theirs = TimmBlock(48, 3, mlp_ratio=2.0, qkv_bias=True, init_values=layer_scale, norm_layer=norm).eval()
    ours = EncoderBlock(48, 3, mlp_ratio=2.0, layer_scale=layer_scale, norm_layer=norm).eval()
    for p in theirs.parameters():  # make every parameter matter
        nn.init.normal_(p, std=0.2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 10, 48)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_post_norm_block_matches_reference():
    block = EncoderBlock(32, 4, mlp_ratio=3.0, norm="post").double().eval()
    for p in block.parameters():
        nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 7, 32, dtype=torch.float64)

    def layer_norm(t, ln):
        mean, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias

    def self_attention(t):
        a = block.attn
        q, k, v = (t @ a.qkv.weight.T + a.qkv.bias).view(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
        return (w @ v).transpose(1, 2).reshape(2, 7, 32) @ a.proj.weight.T + a.proj.bias

    def mlp(t):
        m = block.mlp
        hidden = torch.nn.functional.gelu(t @ m.fc1.weight.T + m.fc1.bias)
        return hidden @ m.fc2.weight.T + m.fc2.bias

    h = layer_norm(x + self_attention(x), block.norm1)
    expected = layer_norm(h + mlp(h), block.norm2)
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_block_gradients_and_drop_path(norm):
    block = EncoderBlock(32, 4, norm=norm, drop_path=0.5, layer_scale=1e-2)
    x = torch.randn(8, 5, 32)
    block.train()
    a, b = block(x), block(x)
    assert not torch.equal(a, b), "drop path should make training passes differ"
    block(x).sum().backward()
    assert_every_parameter_gets_gradient(block)
    block.eval()
    torch.testing.assert_close(block(x), block(x))


def test_block_rejects_unknown_norm():
    with pytest.raises(ValueError, match="'pre' or 'post'"):
        EncoderBlock(16, 2, norm="sandwich")
