"""The one model format: `save_pretrained` / `load_pretrained` / `create_model(name, pretrained_file=...)`.

The oracle of a round trip is the saved model itself: the loaded one's outputs equal its outputs
exactly, for every kind of model `create_model` builds. A folder is untrusted data: an edited
`config.json` is refused with one line that names the file, before the model is built.
"""

from __future__ import annotations

import inspect
import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from visattn import (
    CheckpointError,
    VisionTransformer,
    create_model,
    from_timm,
    insert_attention,
    load_pretrained,
    save_pretrained,
)
from visattn.data_spec import DataSpec
from visattn.weights.checkpoint import save_checkpoint
from visattn.weights.hub import CONFIG_NAME, WEIGHTS_NAME

DIGITS = dict(embed_dim=32, depth=1, num_heads=2)  # a small vit_digits_patch4_16
DATA = {"name": "digits", "img_size": [16, 16], "in_chans": 1, "mean": [0.3], "std": [0.4], "num_classes": 10}


def _perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """`model` in eval mode with every parameter moved off its initial value (a zero-initialized
    attention gate included), so that only loaded weights reproduce its outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def _assert_same_outputs(saved: nn.Module, loaded: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(loaded(x), saved(x))


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
    return _perturbed(from_timm(peer))


@pytest.fixture
def digits(tmp_path):
    """A small digits ViT saved with a data config: `(model, folder)`."""
    model = _perturbed(create_model("vit_digits_patch4_16", **DIGITS))
    save_pretrained(model, tmp_path / "digits", data_config={**DATA, "class_names": list("abcdefghij")})
    return model, tmp_path / "digits"


# --- round trips ---------------------------------------------------------------------------------


def test_round_trip_of_a_converted_vit(converted, tmp_path):
    save_pretrained(converted, tmp_path / "model")
    loaded = load_pretrained(tmp_path / "model")
    _assert_same_outputs(converted, loaded, torch.randn(2, 3, 32, 48))
    assert not loaded.training and loaded.model_config == converted.model_config
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files
    meta = json.loads((tmp_path / "model" / CONFIG_NAME).read_text())
    assert meta["format"] == "visattn-pretrained" and meta["version"] == 2
    assert meta["model_config"]["name"] == "vision_transformer" and meta["model_config"]["act_layer"] == "gelu_tanh"
    # the data config is taken from the converted model's pretrained_cfg (timm's mean, std, input size)
    assert meta["data_config"] == {"mean": [0.5] * 3, "std": [0.5] * 3, "in_chans": 3, "img_size": [224, 224]}
    assert {k: loaded.pretrained_cfg[k] for k in ("mean", "std", "input_size")} == {
        k: list(converted.pretrained_cfg[k]) for k in ("mean", "std", "input_size")
    }


def test_round_trip_of_an_own_vit_after_a_new_head_and_pruning(tmp_path):
    model = create_model("vit_digits_patch4_16", pos_embed="sincos", img_size=[16, 20])
    model.reset_classifier(3)
    _perturbed(model)
    save_pretrained(model, tmp_path)
    x = torch.randn(2, 1, 16, 20)
    _assert_same_outputs(model, load_pretrained(tmp_path), x)
    assert model.model_config == {
        "name": "vit_digits_patch4_16",
        "pos_embed": "sincos",
        "img_size": [16, 20],
        "num_classes": 3,
    }
    model.prune_intermediate_layers([1], prune_norm=True)
    save_pretrained(model, tmp_path)  # overwriting works; the record says depth=2, no norms, no head
    _assert_same_outputs(model, load_pretrained(tmp_path), x)


def test_round_trip_of_a_hybrid(tmp_path):
    model = _perturbed(create_model("hybrid_resnet18_small_vit", num_classes=4, **DIGITS))
    save_pretrained(model, tmp_path)
    _assert_same_outputs(model, load_pretrained(tmp_path), torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet18_small", dict(num_classes=5, attention={"at": ["layer3"], "num_heads": 2})),
        ("timm:test_resnet", dict(num_classes=4, in_chans=1, attention={"at": ["layer2"], "preset": "sagan"})),
    ],
    ids=["registered", "timm source"],
)
def test_round_trip_of_a_cnn_with_inserted_attention(tmp_path, name, kwargs):
    model = _perturbed(create_model(name, **kwargs))
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    assert any("attn" in key for key in loaded.state_dict())
    _assert_same_outputs(model, loaded, torch.randn(2, kwargs.get("in_chans", 3), 32, 32))


def test_version_1_folders_are_read(tmp_path):
    """A folder of the first format: a VisionTransformer's arguments (all of them, as written by
    visattn 0.1) and its pretrained_cfg."""
    arguments = {k: p.default for k, p in inspect.signature(VisionTransformer).parameters.items()}
    arguments.update(img_size=[16, 16], patch_size=8, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2)
    arguments["act_layer"] = "gelu"
    model = _perturbed(VisionTransformer(**arguments))
    save_file(model.state_dict(), tmp_path / WEIGHTS_NAME)
    pretrained_cfg = {"mean": [0.2], "std": [0.3], "input_size": [1, 16, 16], "source": "timm:x"}
    meta = {"format": "visattn-pretrained", "version": 1, "architecture": "VisionTransformer"}
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**meta, "config": arguments, "pretrained_cfg": pretrained_cfg}))
    loaded = load_pretrained(tmp_path)
    _assert_same_outputs(model, loaded, torch.randn(2, 1, 16, 16))
    assert loaded.pretrained_cfg == {"mean": [0.2], "std": [0.3], "input_size": [1, 16, 16]}


def test_the_data_spec_is_stored_as_training_wrote_it_and_older_data_configs_still_load(digits, tmp_path):
    model, folder = digits
    written = {**DATA, "class_names": list("abcdefghij")}
    spec = DataSpec.from_dict(written)
    save_pretrained(model, tmp_path / "spec", data_config=spec)
    for saved in (folder, tmp_path / "spec"):  # from the dict and from the spec: the same file
        stored = json.loads((saved / CONFIG_NAME).read_text())["data_config"]
        assert stored == written and list(stored) == list(written)
    assert (tmp_path / "spec" / CONFIG_NAME).read_bytes() == (folder / CONFIG_NAME).read_bytes()
    # an earlier save_pretrained took any of the keys: such a folder loads and keeps its class names
    _edit(folder, data_config=None)
    _edit(folder, data_config={"class_names": list("abcdefghij")})
    assert load_pretrained(folder).pretrained_cfg == {"label_names": list("abcdefghij")}
    # a pretrained_cfg without a mean and std (a transformers model's) describes no input: none is written
    model.pretrained_cfg = {"input_size": [1, 16, 16], "source": "transformers:x"}
    save_pretrained(model, tmp_path / "no_stats")
    assert json.loads((tmp_path / "no_stats" / CONFIG_NAME).read_text())["data_config"] is None


# --- create_model(name, pretrained_file=...) -----------------------------------------------------


def test_create_model_reads_a_folder_with_its_stored_arguments(digits):
    model, folder = digits
    x = torch.randn(2, 1, 16, 16)
    loaded = create_model("vit_digits_patch4_16", pretrained_file=folder)
    assert loaded.model_config == {"name": "vit_digits_patch4_16", **DIGITS}
    _assert_same_outputs(model, loaded.eval(), x)
    assert loaded.pretrained_cfg["label_names"] == list("abcdefghij") and loaded.pretrained_cfg["input_size"] == [
        1,
        16,
        16,
    ]
    regularized = create_model("vit_digits_patch4_16", pretrained_file=folder, drop_path_rate=0.1)  # an override
    assert regularized.model_config["drop_path_rate"] == 0.1
    _assert_same_outputs(model, regularized.eval(), x)  # no drop path in eval mode
    with pytest.raises(ValueError, match=r"the arguments num_classes change the model .*reset_classifier\(N\)"):
        create_model("vit_digits_patch4_16", pretrained_file=folder, num_classes=3)
    with pytest.raises(
        ValueError, match="does not fit the architecture 'vit_tiny_patch4_32'.*describes a model 'vit_digits_patch4_16'"
    ):
        create_model("vit_tiny_patch4_32", pretrained_file=folder)


def test_create_model_reads_checkpoints_and_state_dicts(digits, tmp_path):
    model, folder = digits
    x = torch.randn(2, 1, 16, 16)
    save_checkpoint(tmp_path / "best.pt", model, model.model_config, data_config=DATA)
    _assert_same_outputs(model, create_model("vit_digits_patch4_16", pretrained_file=tmp_path / "best.pt").eval(), x)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(folder / WEIGHTS_NAME), bare)  # a state dict: the arguments must be given
    _assert_same_outputs(model, create_model("vit_digits_patch4_16", pretrained_file=bare, **DIGITS).eval(), x)
    with pytest.raises(
        ValueError, match=r"bare.safetensors does not fit the architecture 'vit_digits_patch4_16'.*missing"
    ):
        create_model("vit_digits_patch4_16", pretrained_file=bare)


def test_pretrained_for_an_own_name_is_one_clear_error():
    with pytest.raises(ValueError) as refused:
        create_model("vit_digits_patch4_16", pretrained=True)
    message = str(refused.value)
    assert "no published weights (nothing is downloaded)" in message and "pretrained_file=" in message
    assert "\n" not in message


# --- what cannot be saved ------------------------------------------------------------------------


def test_a_model_that_cannot_be_described_is_refused(tmp_path):
    by_hand = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"not built by visattn.create_model: build it with create_model\(NAME"):
        save_pretrained(by_hand, tmp_path)
    with pytest.raises(ValueError, match="not built by visattn.create_model"):
        save_pretrained(nn.Linear(2, 2), tmp_path)
    with pytest.raises(ValueError, match=r"model_config\['act_layer'\] = .*SiLU.* cannot be written to JSON"):
        save_pretrained(create_model("vit_digits_patch4_16", act_layer=nn.SiLU), tmp_path)
    changed = create_model("resnet18_small")
    insert_attention(changed, ["layer3"], input_size=(3, 32, 32))  # after creation: the record does not say so
    with pytest.raises(ValueError, match=r"unexpected 'layer3_attn.*attention=\{\.\.\.\} rather than insert_attention"):
        save_pretrained(changed, tmp_path)
    with pytest.raises(ValueError, match=r"data_config\['std'\] must be a list of positive numbers"):
        save_pretrained(create_model("vit_digits_patch4_16"), tmp_path, data_config={"std": [0.0]})
    assert list(tmp_path.iterdir()) == []  # nothing was written


# --- untrusted folders ---------------------------------------------------------------------------


def _edit(folder, **changes) -> None:
    """Change `config.json`: a dict updates the dict it replaces, unless it holds another model name."""
    path = folder / CONFIG_NAME
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(meta.get(key), dict) and "name" not in value:
            meta[key].update(value)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


EDITS = [
    (
        "bigger model",
        dict(model_config={"embed_dim": 4096, "depth": 24, "num_heads": 16}),
        "refused before building it",
    ),
    (
        "reads a file",
        dict(model_config={"pretrained_cfg_overlay": {"file": "/etc/passwd"}}),
        "loads weights from a file",
    ),
    (
        "checkpoint_path",
        dict(model_config={"name": "timm:test_resnet", "checkpoint_path": "w.pth"}),
        "'checkpoint_path'",
    ),
    ("hf name", dict(model_config={"name": "hf:facebook/dinov2-small"}), "hf: names read a folder"),
    ("path as a value", dict(model_config={"pos_embed": "../../etc/passwd"}), "not plain text"),
    ("unknown key", dict(model_config={"open_file": 1}), "'open_file'] is not an argument"),
    ("model config", dict(model_config=[1, 2]), "field 'model_config' must be a dict"),
    (
        "class names",
        dict(data_config={"class_names": [1, 2]}),
        "data_config['class_names'] must be a list of strings",
    ),
    (
        "data config typo",
        dict(data_config={"img_sise": [16, 16]}),
        "data_config has the unknown key(s) 'img_sise'; the known keys are name, img_size",
    ),
    ("mean per channel", dict(data_config={"mean": [0.3, 0.3]}), "data_config['mean'] holds 2 value(s)"),
    ("format", dict(format="something-else"), "not a visattn pretrained config"),
    ("version", dict(version=99), "format version 99"),
]


@pytest.mark.parametrize(("changes", "named"), [e[1:] for e in EDITS], ids=[e[0] for e in EDITS])
def test_an_edited_config_is_refused_with_one_line(digits, changes, named):
    _, folder = digits
    _edit(folder, **changes)
    loaders = [lambda: load_pretrained(folder)]
    if "name" not in changes.get("model_config", {}):  # create_model reads a folder of its own name only
        loaders.append(lambda: create_model("vit_digits_patch4_16", pretrained_file=folder))
    for load in loaders:
        with pytest.raises(CheckpointError) as refused:
            load()
        message = str(refused.value)
        assert "\n" not in message and named in message or pytest.fail(message)
        assert str(folder / CONFIG_NAME) in message, message


def test_tampered_or_foreign_weights(converted, tmp_path):
    save_pretrained(converted, tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    state = load_file(weights)
    state["head.weight"] = state["head.weight"][:3]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"'head.weight' is \[7, 192\] in the model, \[3, 192\] in the file"):
        load_pretrained(tmp_path)

    save_file(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).state_dict(), str(weights))
    with pytest.raises(CheckpointError, match="missing 'reg_token'"):  # a timm state dict without registers
        load_pretrained(tmp_path)

    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(tmp_path)

    weights.unlink()
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_NAME} does not exist"):
        load_pretrained(tmp_path)


def test_not_a_saved_folder(tmp_path):
    with pytest.raises(CheckpointError, match=f"{CONFIG_NAME} does not exist; a folder written by save_pretrained"):
        load_pretrained(tmp_path)
    torch.save({"x": torch.zeros(1)}, tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match=r"this run folder is older: write one with visattn.save_pretrained\("):
        load_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(CheckpointError, match="a transformers folder loads with create_model"):
        load_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"is a file; .*create_model\(NAME, pretrained_file=PATH\)"):
        load_pretrained(tmp_path / "best.pt")
