"""The recording's seam: modules hand over what they know, models say where their tokens lie.

A module with a sparse key pattern records its weights over each query's keys with their
positions (`key_index`); the recording keeps full-grid rows. A token module records no grid; the
model that owns it (a `TokenGridModel`) says its grid and prefix when it is called.
"""

from __future__ import annotations

import inspect

import pytest
import timm
import torch
from einops import rearrange
from torch import Tensor, nn

from visattn import EncoderBlock, HybridViT, MultiHeadAttention, SelfAttention2d, record_attention
from visattn.explain.recording import TokenGridModel
from visattn.layers.attention import AttentionRecord, RecordableAttention, place_keys
from visattn.layers.functional import attention


class RowAttention(RecordableAttention):
    """Test-only sparse key pattern: each cell of a `(B, C, H, W)` grid attends to the cells of its
    own row within `reach` columns (the whole row with `reach=None`); slots past the left or right
    edge are empty (`-1`)."""

    def __init__(self, channels: int, num_heads: int, reach: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.reach = num_heads, reach
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)

    def key_index(self, height: int, width: int) -> Tensor:
        """`(H·W, K)` flat key positions of each query cell, `-1` for an empty slot."""
        rows = torch.arange(height).repeat_interleave(width)[:, None]
        cols = torch.arange(width).repeat(height)[:, None]
        if self.reach is None:
            key_cols = torch.arange(width)[None].expand(height * width, width)
        else:
            key_cols = cols + torch.arange(-self.reach, self.reach + 1)[None]
        inside = (key_cols >= 0) & (key_cols < width)
        return torch.where(inside, rows * width + key_cols, -1)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        q, k, v = rearrange(self.qkv(x), "b (three h d) y x -> three b h (y x) d", three=3, h=self.num_heads)
        index = self.key_index(height, width)
        keys, values = k[:, :, index.clamp(min=0)], v[:, :, index.clamp(min=0)]  # (B, h, HW, K, d)
        mask = (index >= 0)[:, None, :]  # (HW, 1, K)
        if self.recording is None:
            out = attention(q[..., None, :], keys, values, mask=mask)
        else:
            self._check_record_size(q.shape[0], q.shape[1], q.shape[2], height * width, q.dtype)
            out, weights = attention(q[..., None, :], keys, values, mask=mask, need_weights=True)
            grid = (height, width)
            record = AttentionRecord(weights[..., 0, :], query_grid=grid, key_grid=grid, key_index=index)
            self.recording.sink(self, record)
        return rearrange(out[..., 0, :], "b h (y x) d -> b (h d) y x", y=height)


def dense_reference(module: RowAttention, x: Tensor) -> Tensor:
    """float64 `softmax(q kᵀ/√d)` over every key of the grid, `-inf` outside each query's key set:
    `(B, heads, H·W, H·W)`."""
    weight, bias = module.qkv.weight.double()[:, :, 0, 0], module.qkv.bias.double()
    qkv = torch.einsum("oc,bcyx->boyx", weight, x.double()) + bias[:, None, None]
    q, k, _ = rearrange(qkv, "b (three h d) y x -> three b h (y x) d", three=3, h=module.num_heads)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    height, width = x.shape[-2:]
    row = torch.arange(height * width) // width
    col = torch.arange(height * width) % width
    allowed = row[:, None] == row[None, :]
    if module.reach is not None:
        allowed &= (col[:, None] - col[None, :]).abs() <= module.reach
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)


@pytest.mark.parametrize("reach", [None, 1])
@pytest.mark.parametrize("size", [(3, 5), (1, 1), (4, 2)])
def test_sparse_weights_are_recorded_as_full_grid_rows(reach, size):
    torch.manual_seed(0)
    module = RowAttention(8, num_heads=2, reach=reach).eval()
    x = torch.randn(2, 8, *size)
    with torch.no_grad(), record_attention(module) as rec:
        out = module(x)
    record = rec[""]
    height, width = size
    assert record.weights.shape == (2, 2, height * width, height * width)
    assert record.key_index is None and record.query_grid == record.key_grid == size
    torch.testing.assert_close(record.weights.double(), dense_reference(module, x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(module(x), out)  # the fused path gives what the recorded path gave


def test_sparse_records_keep_their_gradient():
    module = RowAttention(4, num_heads=1, reach=1).double()
    x = torch.randn(1, 4, 2, 3, dtype=torch.float64)
    with record_attention(module, keep_grad=True) as rec:
        module(x)
    weights = rec[""].weights
    (grad,) = torch.autograd.grad(weights[0, 0, 4, 5], module.qkv.weight, retain_graph=True)  # a key of its set
    assert grad.abs().sum() > 0
    (grad,) = torch.autograd.grad(weights[0, 0, 4, 0].sum(), module.qkv.weight, allow_unused=True)
    assert grad is None or grad.abs().sum() == 0  # outside the set: a constant zero


def test_place_keys_puts_each_weight_at_its_position_and_drops_empty_slots():
    weights = torch.tensor([[0.25, 0.75, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)
    index = torch.tensor([[4, 0, -1], [2, -1, -1]])
    want = torch.tensor([[0.75, 0, 0, 0, 0.25], [0, 0, 1.0, 0, 0]], dtype=torch.float64)
    assert torch.equal(place_keys(weights, index, 5), want)
    with pytest.raises(ValueError, match=r"outside \[-1, 5\)"):
        place_keys(weights, torch.tensor([[5, 0, -1], [2, -1, -1]]), 5)
    with pytest.raises(ValueError, match="need the key grid"):
        AttentionRecord(weights[None, None], query_grid=(1, 2), key_grid=None, key_index=index).with_full_keys()


# --- token modules: the owning model says where the tokens lie --------------------------------


class Tokens(nn.Module):
    """A model of the `TokenGridModel` protocol that is not a ViT: `(B, 3, H, W)` → 2×3 patches
    → two prefix tokens + `(H/2)·(W/3)` tokens → self-attention, cross-attention to a memory,
    and one pooled token attending to itself alone."""

    num_prefix_tokens = 2

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, kernel_size=(2, 3), stride=(2, 3))
        self.prefix = nn.Parameter(torch.randn(1, 2, 16))
        self.memory = nn.Parameter(torch.randn(1, 5, 16))
        self.self_attn, self.cross_attn, self.pooled_attn = (MultiHeadAttention(16, 2) for _ in range(3))

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        return height // 2, width // 3

    def forward(self, x: Tensor) -> Tensor:
        tokens = rearrange(self.embed(x), "b d y x -> b (y x) d")
        tokens = torch.cat([self.prefix.expand(len(x), -1, -1), tokens], dim=1)
        tokens = self.self_attn(tokens)
        tokens = self.cross_attn(tokens, context=self.memory.expand(len(x), -1, -1))
        return self.pooled_attn(tokens.mean(dim=1, keepdim=True))


def test_token_records_get_the_grid_and_prefix_of_the_model_that_owns_them():
    model = Tokens().eval()
    assert isinstance(model, TokenGridModel)
    with torch.no_grad(), record_attention(model) as rec:
        model(torch.randn(2, 3, 8, 9))  # a 4×3 grid, not square
        own = rec["self_attn"]
        assert (own.query_grid, own.key_grid, own.num_prefix_tokens) == ((4, 3), (4, 3), 2)
        assert own.weights.shape == (2, 2, 2 + 12, 2 + 12) and own.image_size == (8, 9)
        cross = rec["cross_attn"]
        assert (cross.query_grid, cross.key_grid, cross.num_prefix_tokens) == ((4, 3), None, 2)
        pooled = rec["pooled_attn"]  # one token: not the model's tokens, so no grid
        assert (pooled.query_grid, pooled.key_grid, pooled.num_prefix_tokens) == (None, None, 0)
        model(torch.randn(1, 3, 4, 12))  # another input size: another grid
        assert rec["self_attn"].query_grid == (2, 4)
        model.self_attn(torch.randn(1, 2 + 8, 16))  # run outside a call of its model: no grid, not the last one
        assert rec["self_attn"].query_grid is None and rec["self_attn"].num_prefix_tokens == 0


def test_a_token_module_on_its_own_records_no_grid():
    block = EncoderBlock(16, 2).eval()
    with torch.no_grad(), record_attention(block) as rec:
        block(torch.randn(2, 7, 16))
    record = rec["attn"]
    assert record.weights.shape == (2, 2, 7, 7)
    assert (record.query_grid, record.key_grid, record.num_prefix_tokens, record.class_token) == (None, None, 0, False)


def test_the_forward_signatures_are_timms():
    """No image metadata in any forward: timm's `Attention(x, attn_mask)` and `Block(x, attn_mask)`
    (plus `context` for cross-attention); timm's later `is_causal` is not taken."""
    timm_attention = list(inspect.signature(timm.layers.Attention.forward).parameters)[:3]
    timm_block = list(inspect.signature(timm.models.vision_transformer.Block.forward).parameters)[:3]
    assert timm_attention == timm_block == ["self", "x", "attn_mask"]
    assert list(inspect.signature(MultiHeadAttention.forward).parameters) == [*timm_attention, "context"]
    assert list(inspect.signature(EncoderBlock.forward).parameters) == timm_block


def test_asking_a_hybrid_for_its_grid_records_nothing_of_its_backbone():
    """A `HybridViT` finds its grid with a dry pass of its CNN; a block inserted in the CNN runs
    there on its fused path, so the recording holds the real forward only."""
    backbone = {"attention": {"at": ["layer1"], "num_heads": 2}}
    model = HybridViT(
        "resnet18_small", "layer2", img_size=16, embed_dim=32, depth=1, num_heads=2, backbone_kwargs=backbone
    )
    model.eval()
    blocks = [m for m in model.modules() if isinstance(m, SelfAttention2d)]
    assert len(blocks) == 1
    calls = []
    blocks[0].register_forward_pre_hook(lambda module, args: calls.append(module.recording is not None))
    with torch.no_grad(), record_attention(model) as rec:
        model(torch.randn(2, 3, 24, 16))
    assert calls == [False, True]  # the dry pass for the grid, unrecorded; then the forward, recorded
    (grid_path,) = [p for p in rec if isinstance(rec.modules[p], SelfAttention2d)]
    assert rec[grid_path].weights.shape[0] == 2
    assert rec["blocks.0.attn"].query_grid == model.grid_for(24, 16)
    with torch.no_grad(), record_attention(model, queries=[(15.0, 23.0)]) as rec:  # the last cell only
        model(torch.randn(2, 3, 24, 16))
    grid = rec[grid_path].query_grid
    assert rec[grid_path].query_index.tolist() == [grid[0] * grid[1] - 1]
