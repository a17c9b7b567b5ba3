"""Hugging Face transformers ViTs converted to visattn: the peer itself (same weights) is the oracle.

Every peer is a small random-weight model (nothing is downloaded), built and compared in float64,
with its parameters perturbed away from their initialization, so a weight mapped to the wrong
place (norm1 ↔ norm2, both all-ones at init; q ↔ k) changes the output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import visattn
from visattn import create_model, from_transformers, load_pretrained, record_attention, save_pretrained
from visattn.cli import main
from visattn.explain.maps import cls_attention, rollout
from visattn.weights.errors import PretrainedUnavailableError, UnsupportedModelError

transformers = None  # the module, once the first test here runs (the fixture below)


@pytest.fixture(scope="module", autouse=True)
def _transformers():
    """transformers (the ``hf`` extra; without it these tests skip), imported when this module's
    first test runs rather than while pytest collects, which every xdist worker does (seconds)."""
    global transformers
    transformers = pytest.importorskip("transformers")


EXACT = dict(atol=1e-12, rtol=0)  # float64, same arithmetic
#: ViT and DeiT resample positions in the model's dtype, visattn (timm) in float32
RESAMPLED = dict(atol=1e-6, rtol=0)
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_labels=5)


@pytest.fixture(autouse=True)
def _float64():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


@torch.no_grad()
def _peer(cls: type, config, attn_implementation: str = "sdpa") -> nn.Module:
    """``cls(config)`` perturbed, in eval mode. ``"eager"`` attention returns its weights (ViT's
    eager softmax runs in float32 even in a float64 model; DINOv2's in the model's dtype)."""
    config._attn_implementation = attn_implementation
    model = cls(config)
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _vit_config(**kwargs):
    return transformers.ViTConfig(**SMALL, intermediate_size=64, image_size=40, patch_size=8, **kwargs)


def _deit_config():
    return transformers.DeiTConfig(**SMALL, intermediate_size=48, image_size=32, patch_size=8)


def _dinov2_registers_config(**kwargs):
    return transformers.Dinov2WithRegistersConfig(
        **SMALL, mlp_ratio=2, image_size=28, patch_size=7, num_register_tokens=3, **kwargs
    )


PEERS = [
    ("ViTForImageClassification", _vit_config),
    ("ViTModel", lambda: _vit_config(hidden_act="gelu_new")),
    ("DeiTForImageClassificationWithTeacher", _deit_config),
    ("DeiTForImageClassification", _deit_config),
    ("DeiTModel", _deit_config),
    (
        "Dinov2ForImageClassification",
        lambda: transformers.Dinov2Config(**SMALL, mlp_ratio=2, image_size=28, patch_size=7),
    ),
    ("Dinov2WithRegistersForImageClassification", _dinov2_registers_config),
    ("Dinov2WithRegistersModel", _dinov2_registers_config),
]


def _compare(peer: nn.Module, model: visattn.VisionTransformer, x: torch.Tensor, tol: dict) -> None:
    kwargs = {"interpolate_pos_encoding": True} if peer.config.model_type in ("vit", "deit") else {}
    with torch.no_grad():
        out = peer(pixel_values=x, **kwargs)
        if hasattr(out, "logits"):
            torch.testing.assert_close(model(x), out.logits, **tol)
        else:
            torch.testing.assert_close(model.forward_features(x), out.last_hidden_state, **tol)


@pytest.mark.parametrize(("name", "make_config"), PEERS, ids=[name for name, _ in PEERS])
def test_peer_outputs_equal_at_native_and_other_sizes(name, make_config):
    config = make_config()
    peer = _peer(getattr(transformers, name), config)
    model = from_transformers(peer)
    assert not model.training and model.pretrained_cfg["source"] == f"transformers:{name}"
    side, patch = config.image_size, config.patch_size
    _compare(peer, model, torch.randn(2, 3, side, side), EXACT)  # a non-224 native size
    resampled = RESAMPLED if config.model_type in ("vit", "deit") else EXACT
    _compare(peer, model, torch.randn(2, 3, side - patch, side + 2 * patch), resampled)  # non-square
    if name.startswith("DeiT"):  # the distillation token is a prefix token, kept off the grid
        assert model.num_prefix_tokens == 2
        assert (model.dist_token is not None) == (name != "DeiTForImageClassification")


def test_deit_with_teacher_averages_its_two_heads(tmp_path):
    peer = _peer(transformers.DeiTForImageClassificationWithTeacher, _deit_config())
    model = from_transformers(peer)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = peer(pixel_values=x)
        tokens = model.forward_features(x)
        torch.testing.assert_close(model.head(tokens[:, 0]), out.cls_logits, **EXACT)
        torch.testing.assert_close(model.head_dist(tokens[:, 1]), out.distillation_logits, **EXACT)
    save_pretrained(model, tmp_path)  # the distillation token and head are part of the saved config
    torch.testing.assert_close(load_pretrained(tmp_path)(x), out.logits, **EXACT)
    model.reset_classifier(3)  # both heads are replaced
    assert model(x).shape == (2, 3) and model.head_dist.out_features == 3


def test_dinov2_registers_stay_off_the_grid_and_the_maps():
    config = _dinov2_registers_config()
    peer = _peer(transformers.Dinov2WithRegistersModel, config, "eager")
    model = from_transformers(peer)
    assert model.num_prefix_tokens == 1 + 3 and model.reg_token.shape == (1, 3, 32)
    x = torch.randn(2, 3, 21, 35)  # a 3×5 grid
    with torch.no_grad():
        theirs = peer(pixel_values=x, output_attentions=True).attentions
        with record_attention(model) as rec:
            model(x)
    for (path, record), weights in zip(rec.items(), theirs, strict=True):
        torch.testing.assert_close(record.weights, weights, **EXACT, msg=path)
    heads = cls_attention(rec)  # class token → the 15 patches, registers left out
    assert heads.shape == (2, 4, 3, 5)
    torch.testing.assert_close(heads, theirs[-1][:, :, 0, 4:].reshape(2, 4, 3, 5), **EXACT)
    maps = model.forward_intermediates(x, indices=1)[1][0]
    assert maps.shape == (2, 32, 3, 5)


def test_dinov2_classifier_reads_class_token_and_patch_mean():
    peer = _peer(transformers.Dinov2WithRegistersForImageClassification, _dinov2_registers_config())
    model = from_transformers(peer)
    assert model.pool == "cls_mean" and model.head.in_features == 64
    with pytest.raises(ValueError, match="dist_token=True reads the class and distillation tokens"):
        visattn.create_model(**{**model.model_config, "dist_token": True})
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad(), record_attention(model) as rec:
        model(x)
    assert rec["blocks.1.attn"].pool == "cls_mean"
    expected = (rollout(rec, readout="cls") + rollout(rec, readout="mean")) / 2
    torch.testing.assert_close(rollout(rec), expected)


@pytest.mark.parametrize("head", [True, False], ids=["ForImageClassification", "Model"])
def test_state_dicts_under_both_namings(head, tmp_path):
    """The file's names (``encoder.layer.N.attention.attention.query``) and the in-memory ones."""
    cls = transformers.ViTForImageClassification if head else transformers.Dinov2WithRegistersModel
    peer = _peer(cls, _vit_config() if head else _dinov2_registers_config())
    peer.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert any(".attention.attention.query." in k for k in saved)
    x = torch.randn(2, 3, 28 + 12 * head, 28 + 12 * head)
    expected = from_transformers(peer)
    for state in (saved, peer.state_dict()):
        model = from_transformers(state, config=peer.config.to_dict())
        assert model.training  # a state dict converts in train mode, as from_timm's
        model.eval()
        torch.testing.assert_close(model.forward_features(x), expected.forward_features(x), **EXACT)
    with pytest.raises(ValueError, match="config=AutoConfig.from_pretrained"):
        from_transformers(saved)


REFUSED = [
    (lambda: transformers.Dinov2Config(**SMALL, use_swiglu_ffn=True), "use_swiglu_ffn=True"),
    (lambda: transformers.Dinov2Config(**SMALL, drop_path_rate=0.1), "drop_path_rate=0.1"),
    (lambda: _vit_config(hidden_act="relu"), "hidden_act='relu'"),
    (lambda: _vit_config(hidden_dropout_prob=0.1), "hidden_dropout_prob=0.1"),
]


@pytest.mark.parametrize(("make_config", "feature"), REFUSED, ids=[f for _, f in REFUSED])
def test_unsupported_features_are_named(make_config, feature):
    config = make_config()
    cls = transformers.Dinov2Model if config.model_type == "dinov2" else transformers.ViTModel
    with pytest.raises(UnsupportedModelError, match=feature.replace("(", r"\(")):
        from_transformers(cls(config))


def test_other_architectures_are_refused_by_name():
    mae = transformers.ViTMAEModel(transformers.ViTMAEConfig(**SMALL, intermediate_size=64, image_size=32))
    with pytest.raises(UnsupportedModelError, match="ViTMAEModel is not a convertible.*Dinov2WithRegistersModel"):
        from_transformers(mae)
    with pytest.raises(ValueError, match="carries its config"):
        from_transformers(transformers.ViTModel(_vit_config()), config={})


def test_model_folder_through_create_model(tmp_path):
    peer = _peer(transformers.Dinov2WithRegistersForImageClassification, _dinov2_registers_config())
    peer.save_pretrained(tmp_path / "dinov2")
    model = create_model(f"hf:{tmp_path / 'dinov2'}").eval()
    assert model.pretrained_cfg["source"] == f"hf:{tmp_path / 'dinov2'}"
    _compare(peer, model, torch.randn(2, 3, 28, 42), EXACT)
    fine_tune = create_model(f"hf:{tmp_path / 'dinov2'}", num_classes=3, in_chans=1)
    assert fine_tune.training and fine_tune(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    torch.testing.assert_close(  # in_chans=1 sums the RGB filters, as timm does (in float32)
        fine_tune.patch_embed.proj.weight, model.patch_embed.proj.weight.sum(1, keepdim=True), **RESAMPLED
    )


def test_command_line_reads_hf_folders_and_names_a_missing_extra(tmp_path, monkeypatch, capsys):
    _peer(transformers.ViTForImageClassification, _vit_config()).save_pretrained(tmp_path)
    assert main(["demo", "--model", f"hf:{tmp_path}"]) == 0
    assert "input (2, 3, 40, 40) -> logits (2, 5)" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    assert main(["demo", "--model", f"hf:{tmp_path}"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("visattn demo: error: Hugging Face models need the transformers package: pip install")


def test_hub_id_offline_without_cache_says_what_to_download(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PretrainedUnavailableError, match=r"hf download facebook/dinov2-small.*hf:path/to/dinov2-small"):
        create_model("hf:facebook/dinov2-small")


def test_bad_names_and_missing_transformers(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        create_model(f"hf:{tmp_path / 'nothing'}")
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        create_model(f"hf:{tmp_path}")
    with pytest.raises(ValueError, match="loads its own weights"):
        create_model(f"hf:{tmp_path}", pretrained_file="x.safetensors")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'visattn\[hf\]'"):
        create_model(f"hf:{Path(tmp_path)}")
