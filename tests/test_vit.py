"""VisionTransformer: timm oracle, every registered model through the same checks, sizes, errors."""

from __future__ import annotations

import pytest
import timm
import torch

from visattn import VisionTransformer, create_model, list_models
from visattn.layers.patch_embed import ConvStem
from visattn.layers.pos_embed import sincos_2d

from .helpers import assert_every_parameter_gets_gradient, explicit_attention


def test_matches_timm_vit_tiny_with_copied_weights():
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    ours = create_model("vit_tiny_patch16_224", num_classes=10).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: every name maps one to one
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x), atol=1e-4, rtol=1e-4)


def test_matches_timm_with_mean_pool_fc_norm_registers_and_layer_scale():
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)
    theirs = timm.models.VisionTransformer(**kw, global_pool="avg", reg_tokens=2, init_values=0.1, qk_norm=True).eval()
    ours = VisionTransformer(
        **kw, pool="mean", class_token=True, fc_norm=True, reg_tokens=2, layer_scale=0.1, qk_norm=True
    ).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)


#: ViT-S and ViT-B at their width and heads, on 2 of their 12 identical blocks and a small non-square input
SMALLER = {"vit_base_patch16_224": ((3, 64, 96), {"depth": 2}), "vit_small_patch16_224": ((3, 96, 64), {"depth": 2})}


@pytest.mark.parametrize("name", [n for n in list_models() if n.startswith("vit_")])
def test_every_registered_vit(name):
    """Shape, no NaN, a gradient for every parameter, fused == explicit-weights attention."""
    size, kwargs = SMALLER.get(name, (None, {}))
    model = create_model(name, num_classes=7, **kwargs)
    c, h, w = size or (model.patch_embed.in_chans, *model.img_size)
    x = torch.randn(2, c, h, w)
    model.eval()
    fused = model(x)
    with explicit_attention(model):
        explicit = model(x)
    assert fused.shape == (2, 7) and torch.isfinite(fused).all()
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-4)
    model.train()
    model(x).logsumexp(-1).sum().backward()
    assert_every_parameter_gets_gradient(model)


@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_variants_any_size_and_channels(pos_embed, pool, norm):
    model = VisionTransformer(
        img_size=32,
        patch_size=8,
        in_chans=2,
        num_classes=3,
        embed_dim=32,
        depth=2,
        num_heads=2,
        pos_embed=pos_embed,
        pool=pool,
        norm=norm,
    ).eval()
    for h, w in [(32, 32), (16, 40), (64, 24)]:
        x = torch.randn(2, 2, h, w)
        assert model(x).shape == (2, 3)
        tokens = model.forward_features(x)
        assert tokens.shape == (2, model.num_prefix_tokens + (h // 8) * (w // 8), 32)
        assert model.forward_head(tokens, pre_logits=True).shape == (2, 32)


def _added_positions(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """What ``model.embed`` adds to the class token and the patch tokens of ``x``: the positions
    it uses for ``x``'s grid, ``(1, 1 + gh·gw, D)``."""
    patches, _ = model.patch_embed.tokenize(x)
    embedded, _ = model.eval().embed(x)
    return (embedded - torch.cat([model.cls_token.expand(len(x), -1, -1), patches], dim=1))[:1]


def test_learned_positions_resampled_and_untouched_at_native_size():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    with torch.no_grad():
        native = _added_positions(model, torch.randn(2, 3, 32, 32))
        resampled = _added_positions(model, torch.randn(2, 3, 16, 48))  # a 2×6 grid
    torch.testing.assert_close(native, model.pos_embed.detach(), atol=1e-6, rtol=0)
    assert resampled.shape == (1, 1 + 12, 32)
    torch.testing.assert_close(
        resampled[:, :1], model.pos_embed[:, :1].detach(), atol=1e-6, rtol=0
    )  # class token kept apart
    expected = timm.layers.resample_abs_pos_embed(model.pos_embed.detach(), [2, 6], [4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(resampled, expected, atol=1e-6, rtol=0)  # timm's bicubic resampling


def test_sincos_positions_are_the_grid_embedding():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, pos_embed="sincos")
    with torch.no_grad():
        pos = _added_positions(model, torch.randn(1, 3, 24, 40))  # a 3×5 grid
    assert pos.shape == (1, 16, 32)
    torch.testing.assert_close(pos[0, 0], torch.zeros(32), atol=1e-6, rtol=0)  # none on the class token
    torch.testing.assert_close(pos[0, 1:], sincos_2d(3, 5, 32), atol=1e-6, rtol=0)
    emb = sincos_2d(3, 5, 32)
    torch.testing.assert_close(emb[5 * 2 + 3, 0], torch.sin(torch.tensor(2.0)))  # row y=2, channel 0: sin(y)
    torch.testing.assert_close(emb[5 * 2 + 3, 16], torch.sin(torch.tensor(3.0)))  # column x=3
    assert len({tuple(r.tolist()) for r in emb}) == 15  # every cell distinct


def test_translation_of_patch_grid_matters_only_through_positions():
    """With positions removed, a ViT with mean pooling is invariant to permuting patches."""
    model = VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, num_classes=4, embed_dim=32, depth=2, num_heads=2, pool="mean"
    ).eval()
    x = torch.randn(1, 1, 16, 16)
    rolled = torch.roll(x, shifts=(4, 8), dims=(2, 3))  # move whole patches
    assert not torch.allclose(model(x), model(rolled), atol=1e-4)
    with torch.no_grad():
        model.pos_embed.zero_()
    torch.testing.assert_close(model(x), model(rolled), atol=1e-5, rtol=1e-4)


def test_reset_classifier():
    model = create_model("vit_digits_patch4_16")
    model.reset_classifier(3)
    assert model(torch.randn(1, 1, 16, 16)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 1, 16, 16)).shape == (1, model.embed_dim)


def test_clear_errors():
    model = create_model("vit_digits_patch4_16")
    with pytest.raises(ValueError, match=r"18×16 is not a multiple of the patch size 4×4.*16 or 20"):
        model(torch.randn(1, 1, 18, 16))
    with pytest.raises(ValueError, match="in_chans=3"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="did you mean vit_tiny_patch16_224"):
        create_model("vit_tiny_patch16_244")
    with pytest.raises(ValueError, match="pool"):
        VisionTransformer(pool="max")


@pytest.mark.parametrize("patch", [4, 8])
def test_conv_stem_tokens_look_at_a_window_centred_on_their_patch(patch):
    stem = ConvStem(patch, in_chans=1, embed_dim=16).eval()
    for module in stem.modules():  # all-positive weights: no ReLU hides a pixel's influence
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.constant_(module.weight, 0.1)
    x = torch.rand(1, 1, 4 * patch, 6 * patch, requires_grad=True)
    tokens, grid = stem.tokenize(x)
    assert grid == (4, 6) and tokens.shape == (1, 24, 16)
    row, col = 2, 3
    tokens[0, row * 6 + col].sum().backward()
    rows, cols = (x.grad[0, 0].abs().sum(dim=d).nonzero()[:, 0] for d in (1, 0))
    span = 3 * patch - 2
    assert len(rows) == len(cols) == span  # the window: 3p - 2 pixels wide (22 for p = 8)
    assert (rows[0] + rows[-1]) / 2 == row * patch + (patch - 1) / 2  # centred on the patch
    assert (cols[0] + cols[-1]) / 2 == col * patch + (patch - 1) / 2


def test_a_conv_stem_vit_has_the_patch_grid_and_refuses_other_patches():
    model = create_model("vit_digits_patch4_16", img_size=32, patch_size=8, stem="conv", pool="cls").eval()
    assert model.forward_features(torch.randn(2, 1, 32, 48)).shape == (2, 1 + 4 * 6, 64)
    assert create_model(**model.model_config).patch_embed.proj[0].kernel_size == (4, 4)  # the record rebuilds it
    with pytest.raises(ValueError, match="power-of-two patch"):
        create_model("vit_digits_patch4_16", patch_size=6, stem="conv")
    with pytest.raises(ValueError, match="stem"):
        create_model("vit_digits_patch4_16", stem="hybrid")
    with pytest.raises(ValueError, match="not a multiple of the patch size 8×8"):
        model(torch.randn(1, 1, 36, 32))
