"""The training-memory estimate of a config and the refusal of configs over the memory limit.

Oracles: the parameter count of the model really built, the exact linearity of a ViT in its
depth, the peak resident memory a child process measures while it really trains (its `VmHWM`, reset first), and configs
whose estimate is known to sit on either side of an explicit limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visattn import create_model
from visattn.train.budget import (
    BYTES_PER_PARAMETER,
    _measure,
    check_training_config,
    device_memory,
    model_footprint,
)
from visattn.train.config import ConfigError, config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
MODELS = [
    ({"name": "vit_digits_patch4_16", "stem": "conv", "depth": 1, "num_classes": 10, "in_chans": 1}, (1, 16, 16)),
    ({"name": "vit_digits_patch4_16", "depth": 7, "num_classes": 10, "in_chans": 1}, (1, 16, 16)),
    ({"name": "resnet18_small", "num_classes": 10, "in_chans": 3, "attention": {"at": ["layer3"]}}, (3, 32, 32)),
    ({"name": "hybrid_resnet18_small_vit", "depth": 3, "num_classes": 10, "in_chans": 3}, (3, 32, 32)),
    ({"name": "torchvision:resnet18", "num_classes": 10, "in_chans": 1}, (1, 64, 64)),
]


@pytest.mark.parametrize("model_config,input_size", MODELS, ids=[m["name"] for m, _ in MODELS])
def test_parameters_are_those_of_the_model_really_built(model_config, input_size):
    config = dict(model_config)
    real = create_model(config.pop("name"), **config)
    footprint = model_footprint(model_config, input_size)
    assert footprint.parameters == sum(p.numel() for p in real.parameters())
    assert footprint.activation_bytes > 0


def test_depth_is_extrapolated_exactly():
    config = {"name": "vit_digits_patch4_16", "depth": 6, "num_classes": 10, "in_chans": 1}
    assert model_footprint(config, (1, 32, 32)) == _measure(config, (1, 32, 32), "cpu", False)


def test_gradient_checkpointing_lowers_the_activations():
    config = {"name": "vit_digits_patch4_16", "depth": 4, "num_classes": 10, "in_chans": 1}
    plain, checkpointed = (model_footprint(config, (1, 64, 64), checkpointing=c) for c in (False, True))
    assert checkpointed.parameters == plain.parameters
    assert checkpointed.activation_bytes < plain.activation_bytes / 2


CHILD = r"""
import json, sys, torch
from visattn import create_model

config, batch, side = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
name = config.pop("name")
model = create_model(name, **config)
optimizer = torch.optim.AdamW(model.parameters())
x, y = torch.randn(batch, config["in_chans"], side, side), torch.zeros(batch, dtype=torch.long)
def status(field):  # bytes of a /proc/self/status field
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field))
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # the peak (VmHWM) restarts from the resident memory now, not from start-up's peaks
before = status("VmRSS:")
for _ in range(2):
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
print(json.dumps({"grew": status("VmHWM:") - before}))
"""


@pytest.mark.slow
def test_the_estimate_is_close_to_the_memory_training_takes():
    """1,024 tokens of 4 heads: the unfused kernel would save 16 MiB of weights per image and
    block, ten times what the fused one keeps; the estimate must count what training really
    allocates (gradients and AdamW moments after the weights, 12 bytes per parameter, and the
    activations), within a factor of 1.6 either way."""
    config = {"name": "vit_digits_patch4_16", "depth": 2, "num_classes": 10, "in_chans": 1}
    batch, side = 32, 128
    footprint = model_footprint(config, (1, side, side))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(config), str(batch), str(side)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    grew = json.loads(done.stdout)["grew"]
    expected = footprint.parameters * (BYTES_PER_PARAMETER - 4) + batch * footprint.activation_bytes
    assert 1 / 1.6 < expected / grew < 1.6, (expected / 2**20, grew / 2**20)


def estimate_of(overrides: list[str]) -> float:
    """The estimated bytes of a config, from the footprint of its model."""
    cfg = load_config(overrides=overrides)
    model = {**config_to_dict(cfg.model), "num_classes": 10, "in_chans": 1}
    return model_footprint(model, (1, 16, 16)).total_bytes(cfg.train.batch_size)


def test_the_default_job_fits_this_machine():
    check_training_config(load_config(), CPU)
    assert 0 < device_memory(CPU) <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.mark.parametrize(
    "overrides,key",
    [
        ([], "model.name=vit_digits_patch4_16"),  # nothing set away from its default: the model itself
        (["train.batch_size=4096"], "train.batch_size=4096"),
        (["model.depth=40"], "model.depth=40"),
        (["model.embed_dim=512", "model.num_heads=8"], "model.embed_dim=512"),
    ],
)
def test_a_config_over_the_limit_names_the_key_whose_default_helps_most(overrides, key):
    default = estimate_of([])
    assert estimate_of(overrides) > 4 * default or not overrides
    limit = default * (0.9 if not overrides else 2)
    with pytest.raises(ConfigError, match=rf"^{key} is too large: training needs about .* lower ") as raised:
        check_training_config(load_config(overrides=overrides), CPU, limit=limit)
    assert "\n" not in str(raised.value)
    check_training_config(load_config(overrides=overrides), CPU, limit=2 * estimate_of(overrides))


def test_the_batch_is_split_over_the_processes():
    cfg = load_config(overrides=["train.batch_size=4096"])
    limit = estimate_of(["train.batch_size=1024"]) * 1.01
    with pytest.raises(ConfigError, match="train.batch_size"):
        check_training_config(cfg, CPU, processes=2, limit=limit)
    check_training_config(cfg, CPU, processes=4, limit=limit)


@pytest.mark.parametrize("override", ["model.name=nope", "model.dept=2"])
def test_models_that_cannot_be_laid_out_are_left_to_the_build(override):
    """An unknown model or argument is not a size problem: building it reports it, as before."""
    check_training_config(load_config(overrides=[override]), CPU, limit=1e6)  # the default job needs more
