"""record_attention and the maps: against timm's unfused attention, float64 hand computations,
non-square grids and batches of several images."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import visattn
from visattn import SelfAttention2d, VisionTransformer, record_attention
from visattn.explain.maps import (
    cls_attention,
    grad_rollout,
    key_extent,
    query_map,
    received,
    rollout,
    to_image,
)
from visattn.explain.recording import point_to_cell
from visattn.layers.functional import attention_matrix_bytes
from visattn.profiling import FUSED_KERNELS, UNFUSED_KERNELS, attention_kernels

from .helpers import conv1x1

# a non-square 2×3 token grid (8×12 pixels, 4×4 patches), three images, two heads
VIT_KW = dict(img_size=(8, 12), patch_size=4, embed_dim=16, depth=3, num_heads=2, num_classes=5)
IMAGES = (3, 3, 8, 12)


def peaky(model: nn.Module) -> nn.Module:
    """Larger random weights, so attention is far from uniform and every test can fail."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 or "token" in name or "pos" in name:
                p.normal_(0.0, 0.5)
    return model


def timm_peer(**kw) -> nn.Module:
    """timm's ViT with its attention unfused, so its weights can be observed."""
    model = timm.models.VisionTransformer(**VIT_KW, **kw)
    for block in model.blocks:
        block.attn.fused_attn = False
    return peaky(model).double().eval()


def ours_from(peer: nn.Module, **kw) -> VisionTransformer:
    ours = VisionTransformer(**VIT_KW, **kw).double().eval()
    ours.load_state_dict(peer.state_dict())
    return ours


def capture_timm_attention(peer: nn.Module, x: torch.Tensor, multiplier: bool = False):
    """timm's post-softmax attention per block (hooked at ``attn_drop``). With ``multiplier``,
    each ``A`` is replaced by ``A ⊙ M`` with ``M = 1`` requiring grad, so ``∂s/∂M = ∇A ⊙ A``."""
    seen, mults, handles = [], [], []

    def hook(_m, _inp, out):
        seen.append(out.detach())
        if multiplier:
            mult = torch.ones_like(out, requires_grad=True)
            mults.append(mult)
            return out * mult
        return None

    for block in peer.blocks:
        handles.append(block.attn.attn_drop.register_forward_hook(hook))
    try:
        logits = peer(x)
    finally:
        for h in handles:
            h.remove()
    return logits, seen, mults


# --- capture --------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(), dict(class_token=True, reg_tokens=2, global_pool="avg")])
def test_recorded_weights_equal_timm_unfused_attention(kw):
    peer = timm_peer(**kw)
    ours = ours_from(peer, **({} if not kw else dict(class_token=True, reg_tokens=2, pool="mean", fc_norm=True)))
    x = torch.randn(IMAGES, dtype=torch.float64)
    _, expected, _ = capture_timm_attention(peer, x)
    with record_attention(ours) as rec:
        ours(x)
    assert list(rec) == [f"blocks.{i}.attn" for i in range(3)]
    for (path, r), want in zip(rec.items(), expected, strict=True):
        torch.testing.assert_close(r.weights, want, atol=1e-10, rtol=1e-10)
        assert r.query_grid == r.key_grid == (2, 3), path
        assert r.num_prefix_tokens == (3 if kw else 1)
        assert r.image_size == (8, 12)
        assert r.class_token is True
        assert r.pool == ("mean" if kw else "cls")
    # the class token's attention over the patches, per head, as the DINO picture reads it
    last = expected[-1][:, :, 0, (3 if kw else 1) :].reshape(3, 2, 2, 3)
    torch.testing.assert_close(cls_attention(rec), last, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(cls_attention(rec, "blocks.2.attn"), last)
    assert not cls_attention(rec, 0).allclose(last)


def test_closing_restores_the_fused_path_and_keeps_nothing():
    model = VisionTransformer(**VIT_KW).eval()
    x = torch.randn(IMAGES)
    with record_attention(model) as rec:
        assert attention_kernels(lambda: model(x)) == set()  # explicit weights, not even the math kernel
    assert len(rec) == 3
    for module in model.modules():
        if isinstance(module, visattn.MultiHeadAttention):
            assert module.recording is None
    assert not model._forward_pre_hooks
    kernels = attention_kernels(lambda: model(x))
    assert kernels and kernels <= FUSED_KERNELS and not kernels & UNFUSED_KERNELS
    # a forward after closing adds nothing to the recording
    before = {p: r.weights for p, r in rec.items()}
    model(torch.randn(IMAGES))
    assert all(rec[p].weights is w for p, w in before.items())


def test_a_new_forward_replaces_the_records_and_keep_grad():
    model = VisionTransformer(**VIT_KW).eval()
    with record_attention(model, layers="blocks.1.*") as rec:
        model(torch.randn(IMAGES))
        model(torch.randn(1, 3, 16, 8))
    assert list(rec) == ["blocks.1.attn"]
    assert rec["blocks.1.attn"].weights.shape == (1, 2, 1 + 8, 1 + 8)
    assert rec.image_size == (16, 8) and rec["blocks.1.attn"].query_grid == (4, 2)
    assert not rec["blocks.1.attn"].weights.requires_grad
    with record_attention(model, layers=["blocks.0.attn"], keep_grad=True) as rec:
        model(torch.randn(IMAGES)).sum()
    weights = rec["blocks.0.attn"].weights
    assert weights.requires_grad
    (grad,) = torch.autograd.grad(weights.sum(), [model.blocks[0].attn.qkv.weight], allow_unused=True)
    assert grad is not None


def test_nothing_recorded_is_an_error_that_says_why():
    no_attention = record_attention(torchvision.models.resnet18())
    with pytest.raises(ValueError, match="no visattn attention modules.*insert_attention"):
        no_attention.__enter__()
    model = VisionTransformer(**VIT_KW).eval()
    with pytest.raises(ValueError, match=r"matched none.*blocks\.0\.attn"):
        record_attention(model, layers="head*").__enter__()
    with record_attention(model) as rec:
        pass
    with pytest.raises(RuntimeError, match="nothing was recorded.*call the model"):
        rollout(rec)
    with pytest.raises(RuntimeError, match="nothing was recorded"):
        len(rec)
    with record_attention(model), pytest.raises(RuntimeError, match="already being recorded"):
        record_attention(model).__enter__()


def test_memory_limit_refuses_with_the_bytes_it_would_need():
    block = SelfAttention2d(8, num_heads=2)
    x = torch.randn(2, 8, 12, 10)
    need = attention_matrix_bytes(2, 2, 120, 120, torch.float32)
    with record_attention(block, max_bytes=need - 1), pytest.raises(ValueError, match=rf"need {need} bytes.*queries="):
        block(x)
    with record_attention(block, max_bytes=need) as rec:
        block(x)
    assert rec[""].weights.shape == (2, 2, 120, 120)
    # three query cells cost three rows
    with record_attention(
        block, queries=[(0, 0), (9, 11), (5, 5)], max_bytes=attention_matrix_bytes(2, 2, 3, 120)
    ) as rec:
        block(x)
    assert rec[""].weights.shape == (2, 2, 3, 120)


def test_memory_limit_bounds_the_whole_recording():
    vit = VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=3, num_heads=2)
    x = torch.randn(2, 1, 16, 16)
    one = attention_matrix_bytes(2, 2, 17, 17, torch.float32)  # one block's (B, heads, 1 + 16, 1 + 16)
    with record_attention(vit, max_bytes=3 * one) as rec:  # room for exactly the three
        vit(x)
    assert len(rec) == 3 and sum(r.weights.numel() * r.weights.element_size() for r in rec.values()) == 3 * one
    with record_attention(vit, max_bytes=3 * one - 1), pytest.raises(ValueError, match=rf"need {one} bytes.*left"):
        vit(x)  # each matrix alone fits; all three together do not
    with record_attention(vit, max_bytes=3 * one) as rec:  # each forward starts with the whole budget
        vit(x)
        vit(x)
    assert len(rec) == 3


# --- SelfAttention2d: query maps on a non-square, pooled grid -------------------------------


def block_weights(block: SelfAttention2d, x: torch.Tensor) -> torch.Tensor:
    """float64 hand computation of a SelfAttention2d's weights ``(B, heads, H·W, kh·kw)``."""
    b, _, h, w = x.shape
    q, k = conv1x1(x, block.query), conv1x1(x, block.key)
    k = F.max_pool2d(k, block.kv_pool, ceil_mode=True)
    q = q.reshape(b, block.num_heads, -1, h * w)
    k = k.reshape(b, block.num_heads, -1, k.shape[-2] * k.shape[-1])
    scores = torch.einsum("bhdq,bhdk->bhqk", q, k) / math.sqrt(q.shape[2])
    return torch.softmax(scores, dim=-1)


class TinyCNN(nn.Module):
    """A stride-2 stem, then a pooled attention block: 10×14 images → a 5×7 grid, keys 3×4."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.attn = SelfAttention2d(8, num_heads=2, kv_pool=2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        return self.head(self.attn(self.stem(x)))


@pytest.fixture
def cnn():
    return peaky(TinyCNN()).double().eval()


def test_query_map_and_received_equal_the_hand_computation(cnn):
    x = torch.randn(4, 3, 10, 14, dtype=torch.float64)
    expected = block_weights(cnn.attn, cnn.stem(x))  # (4, 2, 35, 12)
    with record_attention(cnn) as rec:
        cnn(x)
    r = rec["attn"]
    assert (r.query_grid, r.key_grid, r.key_stride) == ((5, 7), (3, 4), (2, 2))
    torch.testing.assert_close(r.weights, expected)
    # pixel (x=9, y=3) lies in row 3·5/10 = 1, column 9·7/14 = 4 of the 5×7 grid
    assert point_to_cell((9, 3), (10, 14), (5, 7)) == (1, 4)
    want = expected[:, :, 1 * 7 + 4].reshape(4, 2, 3, 4)
    torch.testing.assert_close(query_map(rec, "attn", (9, 3)), want)
    torch.testing.assert_close(query_map(rec, cnn.attn, (9.5 / 14, 3.5 / 10), relative=True), want)
    assert not query_map(rec, "attn", (3, 9)).allclose(want)  # (x, y) is not (row, col)
    torch.testing.assert_close(received(rec, "attn"), expected.mean(dim=2).reshape(4, 2, 3, 4))
    assert rec.extent("attn") == key_extent(r) == (2.5, 3.5)


def test_queries_record_only_the_asked_cells(cnn):
    x = torch.randn(2, 3, 10, 14, dtype=torch.float64)
    expected = block_weights(cnn.attn, cnn.stem(x))
    points = [(9, 3), (0, 0), (9.9, 3.9), (13, 9)]  # the third lies in the first one's cell
    with record_attention(cnn, queries=points) as rec:
        out = cnn(x)
    torch.testing.assert_close(out, cnn(x))  # the output is the fused one, unchanged
    r = rec["attn"]
    assert r.query_index.tolist() == [1 * 7 + 4, 0, 4 * 7 + 6]
    assert r.weights.shape == (2, 2, 3, 12)
    torch.testing.assert_close(query_map(rec, "attn", (13, 9)), expected[:, :, 34].reshape(2, 2, 3, 4))
    torch.testing.assert_close(received(rec, "attn"), expected[:, :, [11, 0, 34]].mean(dim=2).reshape(2, 2, 3, 4))
    with pytest.raises(ValueError, match=r"\(row 0, col 3\).*not recorded.*queries=\[point\]"):
        query_map(rec, "attn", (6, 1))
    with pytest.raises(ValueError, match=r"outside the 14×10 \(W×H\) input image.*relative=True"):
        query_map(rec, "attn", (14, 3))
    with pytest.raises(ValueError, match="outside"), record_attention(cnn, queries=[(3, -1)]):
        cnn(x)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torchvision.models.resnet18(num_classes=3),
        lambda: timm.create_model("resnet18", pretrained=False, num_classes=3),
    ],
    ids=["torchvision", "timm"],
)
def test_self_attention_inside_a_resnet(make):
    resnet = make()
    block = SelfAttention2d(256, num_heads=4)
    nn.init.ones_(block.gamma)
    resnet.layer3 = nn.Sequential(resnet.layer3, block)
    resnet.eval()
    seen = []
    block.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    x = torch.randn(2, 3, 64, 96)
    with record_attention(resnet) as rec:
        resnet(x)
    assert list(rec) == ["layer3.1"]
    r = rec["layer3.1"]
    assert r.weights.shape == (2, 4, 4 * 6, 4 * 6) and r.query_grid == (4, 6)
    assert r.image_size == (64, 96)
    expected = block_weights(copy.deepcopy(block).double(), seen[0].double()).float()
    torch.testing.assert_close(r.weights, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        query_map(rec, "layer3.1", (95, 63)), expected[:, :, 23].reshape(2, 4, 4, 6), atol=1e-5, rtol=1e-4
    )
    with pytest.raises(ValueError, match="Transformer.*query_map.*received"):
        rollout(rec)
    with pytest.raises(ValueError, match="Transformer.*query_map.*received"):
        cls_attention(rec)
    with pytest.raises(ValueError, match="Transformer.*query_map.*received"):
        grad_rollout(resnet, x)


# --- rollout --------------------------------------------------------------------------------


def reference_rollout(weights: list[np.ndarray], fusion: str, discard: float, prefix: int) -> np.ndarray:
    """Abnar & Zuidema's rollout ``R = Â_L ⋯ Â_1`` written out with loops, per image (float64)."""
    batch, _, n, _ = weights[0].shape
    products = []
    for b in range(batch):
        result = np.eye(n)
        for w in weights:
            a = {"mean": np.mean, "max": np.max, "min": np.min}[fusion](w[b], axis=0).copy()
            to_patches = a[:, prefix:]
            count = int(to_patches.size * discard)
            if count:
                order = np.argsort(to_patches, axis=None, kind="stable")[:count]
                flat = to_patches.reshape(-1)
                flat[order] = 0.0
                a[:, prefix:] = flat.reshape(to_patches.shape)
            a = a + np.eye(n)
            for i in range(n):
                a[i] = a[i] / a[i].sum()
            result = a @ result
        products.append(result)
    return np.stack(products)


@pytest.mark.parametrize("fusion,discard", [("mean", 0.0), ("max", 0.0), ("min", 0.5), ("mean", 0.9)])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_rollout_equals_the_hand_computation(fusion, discard, pool):
    model = peaky(VisionTransformer(**VIT_KW, pool=pool)).double().eval()
    x = torch.randn(IMAGES, dtype=torch.float64)
    with record_attention(model) as rec:
        model(x)
    prefix = 1 if pool == "cls" else 0
    product = reference_rollout([r.weights.numpy() for r in rec.values()], fusion, discard, prefix)
    by_mean = product[:, prefix:, prefix:].mean(axis=1).reshape(3, 2, 3)
    got = rollout(rec, head_fusion=fusion, discard_ratio=discard)
    assert (got >= 0).all()
    if pool == "mean":
        np.testing.assert_allclose(got.numpy(), by_mean, rtol=1e-12, atol=1e-12)
        return
    np.testing.assert_allclose(got.numpy(), product[:, 0, 1:].reshape(3, 2, 3), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rollout(rec, fusion, discard, readout="mean").numpy(), by_mean, rtol=1e-12, atol=1e-12)
    # rows of the product sum to one: the class token's row over the patches is what it keeps off itself
    np.testing.assert_allclose(got.sum(dim=(1, 2)).numpy(), 1 - product[:, 0, 0], rtol=1e-12)


def test_rollout_errors_name_the_alternative():
    model = VisionTransformer(**VIT_KW, pool="mean").eval()
    with record_attention(model) as rec:
        model(torch.randn(IMAGES))
    with pytest.raises(ValueError, match="has none.*use rollout or grad_rollout"):
        cls_attention(rec)
    with pytest.raises(ValueError, match="readout='mean'"):
        rollout(rec, readout="cls")
    with pytest.raises(ValueError, match="head_fusion"):
        rollout(rec, head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        rollout(rec, discard_ratio=1.0)


# --- gradient-weighted rollout --------------------------------------------------------------


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_grad_rollout_equals_chefer_computed_on_timm(pool):
    kw = {} if pool == "cls" else dict(class_token=False, global_pool="avg")
    peer = timm_peer(**kw)
    ours = ours_from(peer, **({} if pool == "cls" else dict(pool="mean", fc_norm=True)))
    x = torch.randn(IMAGES, dtype=torch.float64)
    target = torch.tensor([4, 0, 2])
    logits, attns, mults = capture_timm_attention(peer, x, multiplier=True)
    grads_times_attn = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), mults)
    prefix = 1 if pool == "cls" else 0
    n = attns[0].shape[-1]
    want = []
    for b in range(3):
        r = np.eye(n)
        for g in grads_times_attn:
            cam = np.clip(g[b].numpy(), 0, None).mean(axis=0)
            r = r + cam @ r
        want.append(r[0, prefix:] if pool == "cls" else r[prefix:, prefix:].mean(axis=0))
    got = grad_rollout(ours, x, target)
    np.testing.assert_allclose(got.numpy(), np.stack(want).reshape(3, 2, 3), rtol=1e-10, atol=1e-12)
    # the default target is the predicted class, image by image
    predicted = grad_rollout(ours, x)
    np.testing.assert_allclose(predicted.numpy(), grad_rollout(ours, x, ours(x).argmax(-1)).numpy())
    with pytest.raises(ValueError, match="outside the model's 5 classes"):
        grad_rollout(ours, x, 5)


# --- geometry -------------------------------------------------------------------------------


def test_to_image_nearest_puts_each_cell_on_its_pixels():
    heat = torch.randn(2, 3, 5, 7)
    out = to_image(heat, (10, 21), mode="nearest")
    assert out.shape == (2, 3, 10, 21)
    torch.testing.assert_close(out, heat.repeat_interleave(2, dim=-2).repeat_interleave(3, dim=-1))
    # a pooled key grid (ceil mode): 5×7 query cells, kv_pool 2 → 3×4 key cells spanning 2.5×3.5
    keys = torch.randn(3, 4)
    out = to_image(keys, (10, 14), extent=(2.5, 3.5), mode="nearest")
    rows, cols = torch.arange(10) // 2 // 2, torch.arange(14) // 2 // 2
    torch.testing.assert_close(out, keys[rows][:, cols])
    smooth = to_image(keys, (10, 14), extent=(2.5, 3.5))
    assert smooth.min() >= keys.min() and smooth.max() <= keys.max()


def test_points_outside_and_relative_corners():
    assert point_to_cell((1.0, 1.0), (10, 14), (5, 7), relative=True) == (4, 6)
    assert point_to_cell((0.0, 0.0), (10, 14), (5, 7), relative=True) == (0, 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        point_to_cell((1.5, 0.0), (10, 14), (5, 7), relative=True)
    with pytest.raises(ValueError, match="outside"):
        point_to_cell((0, 10), (10, 14), (5, 7))
