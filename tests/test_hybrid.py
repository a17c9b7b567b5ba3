"""HybridViT: CNN stages → 1×1 projection → the ViT's blocks; oracle: torchvision's FX extractor."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from einops import rearrange
from torchvision.models.feature_extraction import create_feature_extractor

from visattn import HybridViT, SelfAttention2d, create_model, insert_attention

from .helpers import assert_every_parameter_gets_gradient, explicit_attention

SMALL = dict(embed_dim=64, depth=2, num_heads=4)


def test_registered_hybrid_non_square_forward_backward():
    model = create_model("hybrid_resnet18_small_vit", num_classes=7, depth=2)
    assert model.patch_size == (4, 4) and model.grid_size == (8, 8)
    x = torch.randn(2, 3, 32, 48)
    assert model.grid_for(32, 48) == (8, 12)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 1 + 8 * 12, 192)  # class token + the resampled grid
    model.eval()
    fused = model(x)
    with explicit_attention(model):
        torch.testing.assert_close(model(x), fused, atol=1e-5, rtol=1e-4)
    model.train()
    model(x).logsumexp(-1).sum().backward()
    assert fused.shape == (2, 7) and torch.isfinite(fused).all()
    assert_every_parameter_gets_gradient(model)


def test_tokens_are_the_cnn_stage_output_projected():
    cnn = torchvision.models.resnet18().eval()
    oracle = create_feature_extractor(copy.deepcopy(cnn), return_nodes={"layer3": "grid"})
    model = HybridViT(cnn, "layer3", img_size=64, **SMALL).eval()
    x = torch.randn(2, 3, 80, 48)
    tokens, grid = model.patch_embed.tokenize(x)
    with torch.no_grad():
        expected = model.patch_embed.proj(oracle(x)["grid"])
    assert grid == (5, 3)
    torch.testing.assert_close(tokens, rearrange(expected, "b d h w -> b (h w) d"))
    # the CNN keeps its keys under patch_embed.backbone, and its weights (no ViT re-init)
    backbone_sd = model.patch_embed.backbone.state_dict()
    assert "layer3.1.bn2.running_var" in backbone_sd and "layer4.0.conv1.weight" not in backbone_sd
    assert all(torch.equal(v, cnn.state_dict()[k]) for k, v in backbone_sd.items())


def test_named_timm_and_torchvision_backbones_keep_their_linear_weights():
    torch.manual_seed(0)
    convnext = torchvision.models.convnext_tiny()
    before = copy.deepcopy(convnext.features[1][0].block[3].weight)  # an nn.Linear inside a CNBlock
    model = HybridViT(convnext, "features.3", img_size=64, **SMALL)
    assert torch.equal(model.patch_embed.backbone.get_submodule("features.1.0.block.3").weight, before)
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, 1000)

    atto = HybridViT("timm:convnext_atto", "stages.1", img_size=64, in_chans=2, num_classes=3, **SMALL)
    assert atto.grid_size == (8, 8) and atto(torch.randn(2, 2, 48, 64)).shape == (2, 3)


def test_attention_inserted_in_the_backbone_comes_along():
    model = HybridViT(
        "torchvision:resnet18",
        "layer3",
        img_size=64,
        num_classes=3,
        **SMALL,
        backbone_kwargs={"attention": {"at": ["layer2"], "num_heads": 2}},
    )
    blocks = [n for n, m in model.named_modules() if isinstance(m, SelfAttention2d)]
    assert blocks == ["patch_embed.backbone.layer2_attn"]
    assert "patch_embed.backbone.layer2_attn.gamma" in model.state_dict()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert model.patch_embed.backbone.layer2_attn.gamma.grad.abs() > 0


def test_hybrid_with_an_attention_model_given_as_a_module():
    cnn = torchvision.models.resnet18()
    insert_attention(cnn, "layer1")
    model = HybridViT(cnn, "layer2", img_size=32, **SMALL)
    assert model.patch_embed.backbone.layer1_attn is cnn.layer1_attn


def test_errors():
    with pytest.raises(ValueError, match="does not simply run its children in order up to 'fc'"):
        HybridViT("torchvision:resnet18", "fc", img_size=64, **SMALL)
    with pytest.raises(ValueError, match="no child 'layer9'"):
        HybridViT("torchvision:resnet18", "layer9", img_size=64, **SMALL)
    with pytest.raises(ValueError, match="drop patch_size"):
        HybridViT("torchvision:resnet18", "layer3", patch_size=16, **SMALL)
    model = HybridViT("resnet18_small", "layer2", img_size=32, in_chans=1, **SMALL)
    with pytest.raises(ValueError, match=r"build the model with in_chans=3"):
        model(torch.randn(1, 3, 32, 32))
