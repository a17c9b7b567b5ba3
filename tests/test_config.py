"""Config loading: defaults = configs/default.yaml, layered overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import visattn.train.engine as engine
from visattn.cli import main
from visattn.train.config import ConfigError, load_config
from visattn.train.data import input_shape
from visattn.train.engine import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_the_default_job_is_configs_default_yaml(monkeypatch):
    """``python train.py`` with no arguments trains with the config ``--config configs/default.yaml``
    gives: the whole resolved config, every key (not only those the file names), is the same."""
    trained_with = []
    monkeypatch.setattr(engine, "fit", lambda cfg, **kwargs: trained_with.append(OmegaConf.to_container(cfg)))
    assert main(["train"]) == 0
    assert main(["train", "--config", str(CONFIGS / "default.yaml")]) == 0
    builtin, shipped = trained_with
    assert shipped == builtin


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_build_their_models_and_run_a_forward_pass(path):
    cfg = load_config(path)
    assert cfg.run.name == path.stem
    chans, classes, side = input_shape(cfg.data)
    model = build_model({**dict(cfg.model), "num_classes": classes, "in_chans": chans}).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, chans, side, side))
    assert logits.shape == (2, classes) and torch.isfinite(logits).all()


def test_overrides_layer_in_order():
    cfg = load_config(CONFIGS / "digits_canvas_vit.yaml", ["train.epochs=7", "model.depth=2"])
    assert cfg.train.epochs == 7 and cfg.model.depth == 2
    assert cfg.model.patch_size == 8  # from the file
    assert cfg.train.weight_decay == 0.05  # from the defaults
    assert cfg.train.epochs.__class__ is int


def test_naming_another_model_drops_the_previous_models_arguments():
    cfg = load_config(CONFIGS / "digits_canvas_vit.yaml", ["model.name=resnet18_small"])
    assert OmegaConf.to_container(cfg.model) == {"name": "resnet18_small"}


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'train.epoch'.*did you mean train.epochs\?.*Valid keys here: epochs, batch_size",
    ):
        load_config(overrides=["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"'data.augment.hfilp'.*did you mean data.augment.hflip"):
        load_config(overrides=["data.augment.hfilp=0.5"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optim'.*Valid keys here: data, model, train, run"):
        load_config(overrides=["optim.lr=1"])


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"train.learning_rate.*bad.yaml"):
        load_config(path)


def test_wrong_type_and_bad_choices():
    with pytest.raises(ConfigError, match=r"'train.epochs'.*'abc'.*Integer"):
        load_config(overrides=["train.epochs=abc"])
    with pytest.raises(ConfigError, match=r"data.name='cifar'.*did you mean 'cifar10'.*digits, digits_canvas, cifar10"):
        load_config(overrides=["data.name=cifar"])
    with pytest.raises(ConfigError, match="train.amp='fp8'.*auto, bf16, fp16, none"):
        load_config(overrides=["train.amp=fp8"])
    with pytest.raises(ConfigError, match="train.epochs must be positive"):
        load_config(overrides=["train.epochs=0"])
    with pytest.raises(ConfigError, match=r"'train.compile'.*'maybe' is not a valid bool"):
        load_config(overrides=["train.compile=maybe"])
    with pytest.raises(ConfigError, match="model.num_classes comes from the dataset"):
        load_config(overrides=["model.num_classes=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["train.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no_such_config.yaml")


@pytest.mark.parametrize("key", ["affine_degrees", "affine_translate", "affine_scale", "crop_padding"])
def test_augmentation_an_image_folder_would_ignore_is_refused_by_name(key):
    with pytest.raises(ConfigError, match=rf"data.augment.{key}=.* is not applied to image folders"):
        load_config(overrides=["data.name=imagefolder", "data.root=pictures", f"data.augment.{key}=3"])
    load_config(overrides=["data.name=digits", f"data.augment.{key}=3"])  # applied to in-memory data
    load_config(overrides=["data.name=imagefolder", "data.root=pictures", "data.augment.hflip=0.5"])
