"""timm's feature and memory interface: ``forward_intermediates``, ``prune_intermediate_layers``
and ``set_grad_checkpointing``. Oracles: timm's own models with the same weights, and the same
model without checkpointing."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import timm
import torch
from timm.layers import HybridEmbed as TimmHybridEmbed
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import nn

from visattn import HybridViT, VisionTransformer, from_timm, load_pretrained, record_attention, save_pretrained
from visattn.explain.maps import rollout
from visattn.train.config import ConfigError, load_config
from visattn.train.engine import enable_grad_checkpointing, fit

from .test_train import metrics, tiny

TOL = dict(atol=1e-5, rtol=0)
SMALL = dict(embed_dim=32, depth=4, num_heads=2, num_classes=5)


def _timm_vit(**kwargs) -> nn.Module:
    """A small timm ViT with a class token and 2 registers on a non-square 4×6 grid."""
    args = dict(img_size=(32, 48), patch_size=8, reg_tokens=2, dynamic_img_size=True, **SMALL)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**args, **kwargs}).eval()


def _tiny_cnn() -> nn.Module:
    """A stride-4 CNN stem: (B, 3, H, W) → (B, 16, H/4, W/4)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1)
    ).eval()


def _hybrid_pair() -> tuple[nn.Module, HybridViT]:
    """timm's VisionTransformer with its HybridEmbed around a CNN, and visattn's HybridViT around a
    copy of the same CNN, holding the same weights (timm's names are visattn's)."""
    cnn = _tiny_cnn()
    embed = partial(TimmHybridEmbed, backbone=copy.deepcopy(cnn))
    peer = TimmVisionTransformer(
        img_size=(32, 48), patch_size=1, embed_layer=embed, reg_tokens=1, dynamic_img_size=True, **SMALL
    ).eval()
    model = HybridViT(cnn, None, img_size=(32, 48), reg_tokens=1, **SMALL).eval()
    model.load_state_dict(peer.state_dict())
    return peer, model


INTERMEDIATE_CASES = [
    {},
    dict(indices=2, norm=True),
    dict(indices=[-1, 1], output_fmt="NLC", return_prefix_tokens=True),
    dict(indices=[0, 2], stop_early=True, intermediates_only=True),
    dict(indices=(3,), output_dict=True, return_prefix_tokens=True),
]


@pytest.mark.parametrize("kwargs", INTERMEDIATE_CASES, ids=lambda kw: ",".join(kw) or "defaults")
@torch.no_grad()
def test_forward_intermediates_equal_timms(kwargs):
    peer = _timm_vit()
    model = from_timm(peer)
    for hybrid_peer, hybrid in [(peer, model), _hybrid_pair()]:
        for size in [(32, 48), (40, 24)]:  # the native non-square grid, and resampled positions
            x = torch.randn(2, 3, *size)
            ours = hybrid.forward_intermediates(x, **kwargs)
            torch.testing.assert_close(ours, hybrid_peer.forward_intermediates(x, **kwargs), **TOL)
    maps = model.forward_intermediates(torch.randn(2, 3, 32, 48), indices=1, intermediates_only=True)
    assert [m.shape for m in maps] == [(2, 32, 4, 6)]  # only the patches: registers kept apart


@torch.no_grad()
def test_forward_intermediates_with_mean_pooling_and_no_prefix():
    peer = _timm_vit(class_token=False, reg_tokens=0, global_pool="avg")  # fc_norm: norm is Identity
    model = from_timm(peer)
    x = torch.randn(1, 3, 32, 48)
    kwargs = dict(indices=[1, 3], norm=True, return_prefix_tokens=True)
    torch.testing.assert_close(model.forward_intermediates(x, **kwargs), peer.forward_intermediates(x, **kwargs))


@torch.no_grad()
def test_prune_intermediate_layers_as_timm_and_saved(tmp_path):
    peer = _timm_vit()
    model = from_timm(peer)
    assert model.prune_intermediate_layers([1], prune_norm=True) == peer.prune_intermediate_layers([1], prune_norm=True)
    assert len(model.blocks) == 2 and model.num_classes == 0
    x = torch.randn(2, 3, 32, 48)
    torch.testing.assert_close(model.forward_intermediates(x), peer.forward_intermediates(x), **TOL)
    save_pretrained(model, tmp_path)  # the config describes the pruned model
    torch.testing.assert_close(load_pretrained(tmp_path).forward_intermediates(x), model.forward_intermediates(x))


def test_bad_arguments_are_named():
    model = from_timm(_timm_vit())
    x = torch.randn(1, 3, 32, 48)
    with pytest.raises(ValueError, match="last 5 blocks; this model has 4"):
        model.forward_intermediates(x, indices=5)
    with pytest.raises(ValueError, match="from -4 to 3"):
        model.forward_intermediates(x, indices=[4])
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC'"):
        model.forward_intermediates(x, output_fmt="NHWC")


# --- gradient checkpointing ------------------------------------------------------------------


def _calls(module: nn.Module) -> list[int]:
    """A list that grows by one each time ``module`` runs forward."""
    seen: list[int] = []
    module.register_forward_pre_hook(lambda *args: seen.append(1))
    return seen


def _gradients(model: nn.Module, x: torch.Tensor, checkpointing: bool) -> tuple[dict, int]:
    model = copy.deepcopy(model).train()
    model.set_grad_checkpointing(checkpointing)
    runs = _calls(model.blocks[0])
    torch.manual_seed(1)  # the same drop-path and dropout draws for both
    model(x).logsumexp(-1).sum().backward()
    return {n: p.grad for n, p in model.named_parameters()}, len(runs)


@pytest.mark.parametrize("kind", ["vit", "hybrid"])
def test_grad_checkpointing_gives_the_same_gradients(kind):
    torch.set_default_dtype(torch.float64)
    try:
        common = dict(drop_path_rate=0.2, attn_drop_rate=0.1, reg_tokens=1, **SMALL)
        if kind == "vit":
            model = VisionTransformer(img_size=(16, 24), patch_size=8, **common)
        else:
            model = HybridViT(_tiny_cnn(), None, img_size=(16, 24), **common)
        x = torch.randn(3, 3, 16, 24)
        plain, runs_plain = _gradients(model, x, checkpointing=False)
        checkpointed, runs_checkpointed = _gradients(model, x, checkpointing=True)
    finally:
        torch.set_default_dtype(torch.float32)
    assert (runs_plain, runs_checkpointed) == (1, 2)  # recomputed in the backward pass
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-12, rtol=1e-10, msg=name)


def test_checkpointing_leaves_inference_and_recording_alone():
    model = VisionTransformer(img_size=16, patch_size=8, **SMALL).eval()
    model.set_grad_checkpointing()
    runs = _calls(model.blocks[0])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model(x)
    assert len(runs) == 1  # no checkpoint without gradients
    with record_attention(model) as plain:
        model(x)
    # a recorded block is not checkpointed: recomputed in the backward pass, it would record again,
    # in reverse order, and the recording would no longer be the forward pass's
    with record_attention(model) as rec:
        model(x).sum().backward()
    assert list(rec) == [f"blocks.{i}.attn" for i in range(4)] and len(runs) == 3
    torch.testing.assert_close(rollout(rec), rollout(plain))


def test_train_config_key(tmp_path):
    assert load_config(overrides=["train.grad_checkpointing=true"]).train.grad_checkpointing is True
    with pytest.raises(ConfigError, match="grad_checkpointing"):
        load_config(overrides=["train.grad_checkpointing=maybe"])
    vit = VisionTransformer(img_size=16, patch_size=8, **SMALL)
    enable_grad_checkpointing(vit, "vit")
    assert vit.grad_checkpointing
    resnet = timm.create_model("resnet18", pretrained=False)
    enable_grad_checkpointing(resnet, "timm:resnet18")  # timm's models have it too
    with pytest.raises(ValueError, match="torchvision:resnet18.*has no set_grad_checkpointing"):
        enable_grad_checkpointing(nn.Linear(2, 2), "torchvision:resnet18")


def test_training_with_grad_checkpointing_follows_the_same_path(tmp_path, monkeypatch):
    """``train.grad_checkpointing=true`` turns it on, and one epoch gives the metrics of a run without."""
    enabled = []
    original = VisionTransformer.set_grad_checkpointing
    monkeypatch.setattr(
        VisionTransformer,
        "set_grad_checkpointing",
        lambda self, on=True: (enabled.append((next(self.parameters()).device.type, on)), original(self, on)),
    )
    runs = [fit(tiny(tmp_path, "train.epochs=1", f"train.grad_checkpointing={on}")) for on in ("false", "true")]
    assert [on for device, on in enabled if device != "meta"] == [True]  # the model trained (not the size estimate's)
    plain, checkpointed = (metrics(run["run_dir"])[0] for run in runs)
    for key in ("train_loss", "test_loss", "test_acc1"):
        assert checkpointed[key] == pytest.approx(plain[key], rel=1e-4), key
