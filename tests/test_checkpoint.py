"""Checkpoints round-trip, refuse foreign or truncated files, never unpickle code, and treat the
config they store as data: nothing in it reads files, reaches the network or builds a model
larger than the weights stored with it."""

from __future__ import annotations

import pickle

import pytest
import torch

from visattn import CheckpointError, create_model
from visattn.weights import checkpoint as checkpoint_module
from visattn.weights.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from visattn.weights.stored_config import config_for_weights


def test_round_trip(tmp_path):
    model = create_model("vit_digits_patch4_16", num_classes=4).eval()
    save_checkpoint(tmp_path / "m.pt", model, {"name": "vit_digits_patch4_16", "num_classes": 4}, epoch=3)
    assert load_checkpoint(tmp_path / "m.pt")["epoch"] == 3
    restored = model_from_checkpoint(tmp_path / "m.pt")
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(restored(x), model(x))
    assert not list(tmp_path.glob(".*tmp")), "temporary file left behind"


class Exploit:
    """Unpickling this creates the file ``marker``: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the hand-made pickle below
def test_refuses_foreign_truncated_and_unsafe_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a visattn checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    model = create_model("vit_digits_patch4_16")
    save_checkpoint(tmp_path / "ok.pt", model, {"name": "vit_digits_patch4_16"})
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "cut.pt")
    marker = tmp_path / "code-ran"
    payload = pickle.dumps({"format": "visattn-checkpoint", "x": Exploit(marker)})
    (tmp_path / "evil.pt").write_bytes(payload)
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists(), "loading the checkpoint ran the pickled code"
    pickle.loads(payload)  # the control: a plain unpickler does run it
    assert marker.exists()


# --- a checkpoint's stored config is data, not instructions --------------------------------

SMALL = {"name": "vit_digits_patch4_16", "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 10}


def small_checkpoint(path, model_config=SMALL, **extra):
    """A checkpoint of the small ViT whose stored ``model_config`` is replaced by ``model_config``."""
    model = create_model(**SMALL)
    save_checkpoint(path, model, model_config, **extra)
    return model


#: (a stored model_config, the key or words its refusal must name)
HOSTILE_CONFIGS = [
    ({**SMALL, "name": "test_vit", "checkpoint_path": "{tmp}/other.pth"}, "'checkpoint_path'"),
    ({**SMALL, "name": "test_vit", "pretrained_cfg_overlay": {"file": "{tmp}/other.pth"}}, "'pretrained_cfg_overlay'"),
    ({"name": "timm:test_resnet", "pretrained_cfg": {"url": "https://example.com/w.pth"}}, "'pretrained_cfg'"),
    ({"name": "torchvision:resnet18", "weights": "DEFAULT"}, "'weights'"),
    ({**SMALL, "name": "hf:facebook/dinov2-small"}, "hf:"),
    ({**SMALL, "name": "hf:{tmp}"}, "hf:"),
    ({**SMALL, "name": "{tmp}/model"}, "model_config['name']"),
    ({**SMALL, "name": "elsewhere:vit"}, "elsewhere:vit"),
    ({**SMALL, "name": 7}, "model_config['name']"),
    ({**SMALL, "cache_dir": "{tmp}"}, "'cache_dir'"),
    ({"name": "timm:test_resnet", "device": "cpu"}, "'device'"),  # would allocate for real during the size check
    ({**SMALL, "open_file": "{tmp}/x"}, "['open_file'] is not an argument"),
    ({**SMALL, "act_layer": "{tmp}/gelu.py"}, "'act_layer'"),
    ({**SMALL, "act_layer": "https://example.com/gelu"}, "'act_layer'"),
    ({**SMALL, "pool": ["mean", {"nested": "../up"}]}, "'pool'"),
    ({**SMALL, "pretrained": "yes"}, "'pretrained'"),
    ({**SMALL, "pretrained_file": 3}, "'pretrained_file'"),
    ({**SMALL, "num_heads": torch.tensor(2)}, "'num_heads'"),
    ({**SMALL, "name": "hybrid_resnet18_small_vit", "backbone": "hf:facebook/dinov2-small"}, "'backbone'"),
    (
        {**SMALL, "name": "hybrid_resnet18_small_vit", "backbone_kwargs": {"checkpoint_path": "/w.pth"}},
        "'checkpoint_path'",
    ),
]


@pytest.mark.parametrize(("stored", "named"), HOSTILE_CONFIGS, ids=[words for _, words in HOSTILE_CONFIGS])
def test_a_stored_config_that_would_read_files_or_the_network_is_refused(tmp_path, monkeypatch, stored, named):
    """Refused by an allow-list before any model is built (no create_model call for real)."""
    stored = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in stored.items()}
    small_checkpoint(tmp_path / "hostile.pt", stored)
    built = []
    monkeypatch.setattr(checkpoint_module, "create_model", lambda *a, **k: built.append(a))
    with pytest.raises(CheckpointError) as refused:
        model_from_checkpoint(tmp_path / "hostile.pt")
    message = str(refused.value)
    assert str(tmp_path / "hostile.pt") in message and named.format(tmp=tmp_path) in message, message
    assert "\n" not in message and not built


def test_the_starting_weights_training_records_are_ignored_not_read(tmp_path):
    """``pretrained`` and ``pretrained_file`` say where a run started; its checkpoint holds the
    weights, so a name with pretrained weights on the hub and a file that does not exist rebuild
    the saved model exactly, offline."""
    peer = create_model("test_vit", num_classes=3).eval()
    stored = {"name": "test_vit", "num_classes": 3, "pretrained": True, "pretrained_file": str(tmp_path / "gone.pth")}
    save_checkpoint(tmp_path / "tuned.pt", peer, stored)
    x = torch.randn(2, 3, *peer.img_size)
    assert torch.equal(model_from_checkpoint(tmp_path / "tuned.pt")(x), peer(x))


@pytest.mark.parametrize(
    "stored",
    [
        {**SMALL, "embed_dim": 8192, "depth": 64, "num_heads": 8},  # 51 G parameters: killed for memory before
        {**SMALL, "depth": 100_000},  # small blocks, but so many that building them takes hours
        {**SMALL, "embed_dim": 4096, "num_heads": 8},  # one block: builds on meta, 200 M parameters
        {**SMALL, "img_size": 16 * 4096},  # a learned position table for 16 M patches
    ],
    ids=["wide and deep", "deep", "wide", "large positions"],
)
def test_a_model_larger_than_its_weights_is_refused_before_it_is_built(tmp_path, monkeypatch, stored):
    small_checkpoint(tmp_path / "edited.pt", stored)
    built = []
    monkeypatch.setattr(checkpoint_module, "create_model", lambda *a, **k: built.append(a))
    with pytest.raises(CheckpointError, match="edited.pt") as refused:
        model_from_checkpoint(tmp_path / "edited.pt")
    assert "model_config" in str(refused.value) and not built


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        ("resnet18_small", {"attention": {"at": ["layer3"], "num_heads": 4, "input_size": [3, 40_000, 40_000]}}),
        ("hybrid_resnet18_small_vit", {"depth": 1, "pos_embed": "sincos", "img_size": 20_000}),
    ],
    ids=["attention input_size", "hybrid img_size"],
)
def test_a_dry_run_at_a_huge_stored_input_size_is_refused_before_it_is_built(tmp_path, monkeypatch, name, stored):
    """Weights that fit, but a build that would run the CNN once on a 40,000² (20,000²) picture."""
    fitting = {key: value for key, value in stored.items() if key not in ("img_size",)}
    if "attention" in fitting:
        fitting["attention"] = {k: v for k, v in fitting["attention"].items() if k != "input_size"}
    save_checkpoint(tmp_path / "dry.pt", create_model(name, **fitting), {"name": name, **stored})
    built = []
    monkeypatch.setattr(checkpoint_module, "create_model", lambda *a, **k: built.append(a))
    with pytest.raises(CheckpointError, match=r"dry.pt: building the model of its model_config computes a tensor"):
        model_from_checkpoint(tmp_path / "dry.pt")
    assert not built


def test_the_size_check_compares_every_tensor_with_the_file(tmp_path):
    """The meta-device model must hold exactly the stored tensors: one missing tensor, one extra,
    or one of another shape is refused and named."""
    model = create_model(**SMALL)
    weights = model.state_dict()
    config = {**SMALL, "in_chans": 1}
    for edit, named in (
        (lambda w: w.pop("head.weight"), "missing 'head.weight'"),
        (lambda w: w.__setitem__("extra", torch.zeros(1)), "unexpected 'extra'"),
        (lambda w: w.__setitem__("head.bias", torch.zeros(11)), "'head.bias' is [10] in the model, [11] in the file"),
    ):
        edited = dict(weights)
        edit(edited)
        with pytest.raises(CheckpointError, match="the weights do not fit") as refused:
            config_for_weights(config, edited, "f.pt")
        assert named in str(refused.value)
    assert config_for_weights(config, weights, "f.pt") == config


#: (field, stored value, words the refusal must name)
BAD_FIELDS = [
    ("data_config", {"class_names": 10}, "data_config['class_names']"),
    ("data_config", {"class_names": list(range(10))}, "data_config['class_names']"),
    ("data_config", {"class_names": ["a", "b"], "num_classes": 3}, "data_config['class_names']"),
    ("data_config", {"class_names": ["a", "b"]}, "the model's head has 10 classes"),
    ("data_config", {"num_classes": True}, "data_config['num_classes']"),
    ("data_config", {"img_size": "16"}, "data_config['img_size']"),
    ("data_config", {"img_size": [16, 0]}, "data_config['img_size']"),
    ("data_config", {"std": [0.0]}, "data_config['std']"),
    ("data_config", {"mean": [float("nan")]}, "data_config['mean']"),
    ("data_config", ["not", "a", "dict"], "'data_config' must be a dict"),
    ("config", "train.epochs=3", "'config' must be a dict"),
    ("model_config", ["vit_digits_patch4_16"], "'model_config' must be a dict"),
    ("model", {"head.weight": [1.0, 2.0]}, "'model' must map parameter names to tensors"),
    ("version", "1", "'version'"),
]


@pytest.mark.parametrize(("field", "value", "named"), BAD_FIELDS, ids=[f"{f} {n}" for f, _, n in BAD_FIELDS])
def test_fields_of_the_wrong_type_are_refused_when_loaded(tmp_path, field, value, named):
    small_checkpoint(tmp_path / "fields.pt")
    state = torch.load(tmp_path / "fields.pt", weights_only=True)
    state[field] = value
    torch.save(state, tmp_path / "fields.pt")
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(tmp_path / "fields.pt")
    assert str(tmp_path / "fields.pt") in str(refused.value) and named in str(refused.value), str(refused.value)


#: one model of every source a checkpoint may name, small (the check must not refuse any of them)
EVERY_SOURCE = [
    ({**SMALL, "stem": "conv", "pos_embed": "sincos"}, (1, 16, 16)),
    ({"name": "hybrid_resnet18_small_vit", "embed_dim": 32, "depth": 1, "num_heads": 2}, (3, 32, 32)),
    (
        {"name": "hybrid_resnet18_small_vit", "depth": 1, "backbone_kwargs": {"attention": {"at": ["layer2"]}}},
        (3, 32, 32),
    ),
    ({"name": "resnet18_small", "num_classes": 4, "attention": {"at": ["layer3"], "num_heads": 4}}, (3, 32, 32)),
    ({"name": "torchvision:resnet18", "in_chans": 1, "attention": {"at": ["layer2"], "preset": "sagan"}}, (1, 64, 64)),
    ({"name": "timm:test_resnet", "num_classes": 3, "drop_path_rate": 0.1}, (3, 64, 64)),
    ({"name": "test_vit", "num_classes": 3, "in_chans": 1, "pretrained": False}, (1, 160, 160)),
]


@pytest.mark.parametrize(("stored", "shape"), EVERY_SOURCE, ids=[c["name"] for c, _ in EVERY_SOURCE])
def test_checkpoints_of_every_source_still_round_trip(tmp_path, stored, shape):
    arguments = {k: v for k, v in stored.items() if k not in ("name", "pretrained")}
    model = create_model(stored["name"], **arguments).eval()
    save_checkpoint(tmp_path / "m.pt", model, stored)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(model_from_checkpoint(tmp_path / "m.pt")(x), model(x))
