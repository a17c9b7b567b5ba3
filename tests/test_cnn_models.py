"""Model sources (torchvision:, timm:) and resnet18_small: channels, heads, weights, errors."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

import visattn
from visattn import SelfAttention2d, attention_sites, create_model


def test_contract_example_from_the_brief():
    model = visattn.create_model(
        "torchvision:resnet18",
        num_classes=10,
        in_chans=1,
        pretrained=False,
        attention={"at": ["layer3", "layer4"], "num_heads": 4},
    )
    assert isinstance(model, torchvision.models.ResNet)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 10
    assert [model.layer3_attn.channels, model.layer4_attn.channels] == [256, 512]
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)

    atto = create_model(
        "timm:convnext_atto", num_classes=4, in_chans=2, attention={"at": "stages.2", "preset": "sagan"}
    )
    assert isinstance(atto.stages_2_attn, SelfAttention2d) and atto.stages_2_attn.kv_pool == 2
    assert atto(torch.randn(2, 2, 64, 64)).shape == (2, 4)


@pytest.mark.parametrize("in_chans", [1, 5])
def test_in_chans_adapts_the_first_kernel_as_timm_does(in_chans):
    torch.manual_seed(0)
    rgb = create_model("torchvision:resnet18")
    torch.manual_seed(0)
    model = create_model("torchvision:resnet18", in_chans=in_chans)
    w = rgb.conv1.weight
    # timm's adapt_input_conv: one channel = the sum over RGB; more = RGB repeated × 3 / in_chans
    expected = w.sum(1, keepdim=True) if in_chans == 1 else w.repeat(1, 2, 1, 1)[:, :in_chans] * (3 / in_chans)
    torch.testing.assert_close(model.conv1.weight, expected)
    assert model.eval()(torch.randn(1, in_chans, 32, 32)).shape == (1, 1000)


def test_pretrained_torchvision_from_the_local_cache_and_a_new_head(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    saved = torchvision.models.resnet18().state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(saved, tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1])
    model = create_model("torchvision:resnet18", pretrained=True, num_classes=7, in_chans=1)
    assert model.fc.out_features == 7
    torch.testing.assert_close(model.layer2[0].conv1.weight, saved["layer2.0.conv1.weight"])
    torch.testing.assert_close(model.conv1.weight, saved["conv1.weight"].sum(1, keepdim=True))


def test_pretrained_offline_error_says_where_the_file_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(OSError, match=r"resnet18-f37072fd\.pth.*hub/checkpoints"):
        create_model("torchvision:resnet18", pretrained=True)


def test_pretrained_timm_from_a_local_file(tmp_path):
    reference = timm.create_model("resnet18", num_classes=1000)
    path = tmp_path / "resnet18.safetensors"
    save_file(reference.state_dict(), path)
    model = create_model("timm:resnet18", pretrained=True, num_classes=3, pretrained_cfg_overlay={"file": str(path)})
    torch.testing.assert_close(model.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert model.fc.out_features == 3


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown torchvision classification model 'resnet19'"):
        create_model("torchvision:resnet19")
    with pytest.raises(ValueError, match="unknown timm model 'convnext_attoo'"):
        create_model("timm:convnext_attoo")


def test_resnet18_small_is_torchvision_resnet18_with_a_small_stem():
    model = create_model(
        "resnet18_small", num_classes=10, in_chans=1, attention={"at": ["layer3", "layer4"], "num_heads": 2}
    )
    assert isinstance(model, ResNet)
    reference = torchvision.models.resnet18(num_classes=10)
    # torchvision's keys (plus the blocks'); only the stem's kernel differs
    keys = set(model.state_dict()) - {k for k in model.state_dict() if "_attn." in k}
    assert keys == set(reference.state_dict())
    assert model.conv1.weight.shape == (64, 1, 3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert all(isinstance(b, BasicBlock) for b in model.layer1)
    grids = {s.path: (s.channels, s.height, s.width) for s in attention_sites(model, (1, 32, 32))}
    assert [grids[f"layer{i}"] for i in range(1, 5)] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
    x = torch.randn(2, 1, 32, 32)
    model.eval()
    plain = create_model("resnet18_small", num_classes=10, in_chans=1).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    assert torch.equal(model(x), plain(x))  # the blocks start as the identity here too
