"""save_pretrained / load_pretrained: identical round trips, and clear errors for foreign or tampered files."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import visattn
from visattn import CheckpointError, VisionTransformer, create_model, from_timm, load_pretrained
from visattn.weights.hub import CONFIG_NAME, WEIGHTS_NAME


@pytest.fixture
def converted() -> VisionTransformer:
    """A converted timm ViT with registers, layer scale, qk-norm, tanh GELU and mean pooling."""
    peer = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        reg_tokens=2,
        init_values=0.1,
        qk_norm=True,
        act_layer="gelu_tanh",
        global_pool="avg",
        num_classes=7,
    )
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return from_timm(peer).eval()


def test_round_trip_is_identical(converted, tmp_path):
    visattn.save_pretrained(converted, tmp_path / "model")
    loaded = load_pretrained(tmp_path / "model")
    x = torch.randn(2, 3, 32, 48)
    assert torch.equal(loaded(x), converted(x))
    assert loaded.config == converted.config and loaded.pretrained_cfg == converted.pretrained_cfg
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left
    meta = json.loads((tmp_path / "model" / CONFIG_NAME).read_text())
    assert meta["format"] == "visattn-pretrained" and meta["config"]["act_layer"] == "gelu_tanh"


def test_round_trip_of_a_visattn_model_after_a_new_head(tmp_path):
    model = create_model("vit_digits_patch4_16", pos_embed="sincos", img_size=[16, 20]).eval()
    model.reset_classifier(3)
    visattn.save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    x = torch.randn(2, 1, 16, 20)
    assert loaded.num_classes == 3 and torch.equal(loaded(x), model(x))
    visattn.save_pretrained(model, tmp_path)  # overwriting works
    assert torch.equal(load_pretrained(tmp_path)(x), model(x))


def test_custom_callables_cannot_be_saved(tmp_path):
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, act_layer=nn.SiLU)
    with pytest.raises(ValueError, match="act_layer=.*SiLU.*cannot be written to JSON"):
        visattn.save_pretrained(model, tmp_path)
    with pytest.raises(TypeError, match="VisionTransformer"):
        visattn.save_pretrained(nn.Linear(2, 2), tmp_path)


def _edit_config(directory, **changes) -> None:
    path = directory / CONFIG_NAME
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "config":
            meta["config"].update(value)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(format="something-else"), "not a visattn pretrained config"),
        (dict(version=99), "format version 99"),
        (dict(architecture="ResNet"), "architecture 'ResNet'"),
        (dict(config={"hidden_size": 8}), "does not build a VisionTransformer.*hidden_size"),
        (dict(config={"act_layer": "swish2"}), "does not build a VisionTransformer.*unknown activation 'swish2'"),
        (dict(config={"depth": 3}), "missing: blocks.2"),
        (dict(config={"embed_dim": 64, "num_heads": 4}), "wrong shape: cls_token"),
    ],
)
def test_tampered_config(converted, tmp_path, changes, message):
    visattn.save_pretrained(converted, tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(tmp_path)


def test_tampered_or_foreign_weights(converted, tmp_path):
    visattn.save_pretrained(converted, tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    state = load_file(weights)
    state["head.weight"] = state["head.weight"][:3]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"wrong shape: head.weight \(3, 192\)"):
        load_pretrained(tmp_path)

    save_file(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).state_dict(), str(weights))
    with pytest.raises(CheckpointError, match="do not belong together"):  # a timm state dict, no registers/layer scale
        load_pretrained(tmp_path)

    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(tmp_path)

    weights.unlink()
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_NAME} does not exist"):
        load_pretrained(tmp_path)


def test_not_a_saved_folder(tmp_path):
    with pytest.raises(CheckpointError, match=f"{CONFIG_NAME} does not exist"):
        load_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pretrained(tmp_path)
    torch.save({"x": torch.zeros(1)}, tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match="is a file.*pretrained_file"):
        load_pretrained(tmp_path / "weights.pth")
