"""`visattn overlay`: checkpoints with a data_config (a ViT and a CNN with SelfAttention2d),
untrained named models, and one-line errors for bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from visattn import SelfAttention2d, create_model, load_image
from visattn.cli import main
from visattn.explain.inputs import Preprocess, default_data_config
from visattn.explain.overlay import attention_overlay, attention_panels
from visattn.models import registry
from visattn.models.vit import VisionTransformer
from visattn.weights.checkpoint import save_checkpoint

DATA_CONFIG = {
    "name": "digits_canvas",
    "img_size": [16, 24],
    "in_chans": 1,
    "mean": [0.1],
    "std": [0.3],
    "num_classes": 4,
    "class_names": ["zero", "one", "two", "three"],
}
VIT_CONFIG = {
    "name": "vit_digits_patch4_16",
    "img_size": [16, 24],
    "num_classes": 4,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
}


class SmallCNNWithAttention(nn.Module):
    """conv stem (stride 2) → SelfAttention2d with pooled keys → classifier."""

    def __init__(self, num_classes: int = 4, in_chans: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 16, 3, stride=2, padding=1), nn.ReLU())
        self.attn = SelfAttention2d(16, num_heads=2, kv_pool=2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.head(self.attn(self.stem(x)))


@pytest.fixture
def registered_cnn(monkeypatch):
    """The CNN under a model name, for this test only (the registry is left as it was)."""
    monkeypatch.setitem(registry._MODELS, "cnn_with_attention_for_tests", SmallCNNWithAttention)
    return "cnn_with_attention_for_tests"


@pytest.fixture
def cat(tmp_path):
    from skimage import data

    path = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).resize((113, 75)).save(path)
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["overlay", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "pool,method", [("cls", "cls"), ("cls", "rollout"), ("mean", "grad_rollout"), ("mean", "query")]
)
def test_vit_checkpoint(tmp_path, cat, capsys, pool, method):
    config = {**VIT_CONFIG, "pool": pool}
    model = VisionTransformer(
        **{k: v for k, v in config.items() if k != "name"}, in_chans=1, patch_size=4, mlp_ratio=2.0
    )
    save_checkpoint(tmp_path / "best.pt", model, config, data_config=DATA_CONFIG)
    out = tmp_path / "out.png"
    query = ["--query", "100,70"] if method == "query" else []
    code, stdout, err = run(
        capsys, "--checkpoint", tmp_path / "best.pt", "--image", cat, "--method", method, *query, "--out", out
    )
    assert code == 0, err
    assert f"wrote {out} (113×75)" in stdout
    assert Image.open(out).size == (113, 75)  # one overlay at the picture's own resolution
    code, stdout, err = run(
        capsys, "--checkpoint", tmp_path / "best.pt", "--image", cat, "--method", method, *query, "--panels",
        "--out", out,
    )  # fmt: skip
    assert code == 0, err
    columns = {"cls": 4, "rollout": 2, "grad_rollout": 2, "query": 4}[method]  # picture, 2 heads, mean
    grid = Image.open(out)
    assert abs(grid.width / grid.height - columns) < 0.5  # one row of panels as wide as they are tall
    assert grid.width >= columns * 113  # each panel at least as wide as the picture


def test_cnn_checkpoint_query_and_received(tmp_path, cat, capsys, registered_cnn):
    model = SmallCNNWithAttention()
    nn.init.ones_(model.attn.gamma)
    data_config = {**DATA_CONFIG, "img_size": [40, 60], "in_chans": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    save_checkpoint(tmp_path / "cnn.pt", model, {"name": registered_cnn}, data_config=data_config)
    drawn = {}
    for method, extra, kwargs in (
        ("query", ["--query", "112,0"], {"query": (112.0, 0.0)}),
        ("received", ["--layer", "attn"], {"layer": "attn"}),
    ):
        code, _, err = run(
            capsys,
            "--checkpoint",
            tmp_path / "cnn.pt",
            "--image",
            cat,
            "--method",
            method,
            *extra,
            "--out",
            tmp_path / f"{method}.png",
        )
        assert code == 0, err
        # the command draws exactly what the library draws for the same checkpoint and arguments
        expected = attention_overlay(
            model.eval(),
            load_image(cat),
            method,
            preprocess=Preprocess.from_data_config(data_config),
            class_names=data_config["class_names"],
            **kwargs,
        )
        drawn[method] = Image.open(tmp_path / f"{method}.png").convert("RGB")
        assert drawn[method].size == expected.size
        assert drawn[method].tobytes() == expected.convert("RGB").tobytes()
    assert drawn["query"].tobytes() != drawn["received"].tobytes()  # two different maps
    code, _, err = run(
        capsys, "--checkpoint", tmp_path / "cnn.pt", "--image", cat, "--method", "rollout", "--out", tmp_path / "r.png"
    )
    assert code == 2 and err.count("\n") == 1
    assert "Transformer" in err and "query_map" in err and "received" in err


def test_untrained_named_model(tmp_path, cat, capsys):
    code, _, err = run(
        capsys, "--model", "vit_digits_patch4_16", "--image", cat, "--method", "rollout", "--out", tmp_path / "u.png"
    )
    assert code == 0, err
    assert Image.open(tmp_path / "u.png").mode == "RGB"


def test_bad_input_gets_one_line_errors(tmp_path, cat, capsys):
    model = VisionTransformer(
        **{k: v for k, v in VIT_CONFIG.items() if k != "name"}, in_chans=1, patch_size=4, mlp_ratio=2.0, pool="mean"
    )
    save_checkpoint(tmp_path / "best.pt", model, {**VIT_CONFIG, "pool": "mean"}, data_config=DATA_CONFIG)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "foreign.pt")
    (tmp_path / "notes.txt").write_text("hello")
    good = ["--checkpoint", tmp_path / "best.pt", "--out", tmp_path / "x.png"]
    cases = [
        ([*good, "--image", tmp_path / "missing.png", "--method", "rollout"], "does not exist"),
        ([*good, "--image", tmp_path / "notes.txt", "--method", "rollout"], "not an image"),
        (
            [
                "--checkpoint",
                tmp_path / "foreign.pt",
                "--image",
                cat,
                "--method",
                "rollout",
                "--out",
                tmp_path / "x.png",
            ],
            "not a visattn checkpoint",
        ),
        ([*good, "--image", cat, "--method", "query", "--query", "113,10"], "outside the 113×75"),
        ([*good, "--image", cat, "--method", "query"], "needs a query point"),
        ([*good, "--image", cat, "--method", "cls"], "has none.*rollout or grad_rollout"),
    ]
    for args, message in cases:
        code, _, err = run(capsys, *args)
        assert code == 2, (args, err)
        assert err.startswith("visattn overlay: error: ") and err.count("\n") == 1, err
        assert re.search(message, err), (message, err)
    assert not (tmp_path / "x.png").exists()


def peak_of_child(argv: list[str], tmp_path: Path, timeout: float = 180) -> tuple[int, float, str]:
    """Run ``argv`` as a child process: (exit status, its peak resident memory in bytes, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as err:
        child = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)
        killer = threading.Timer(timeout, child.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)  # the rusage of this child alone
        finally:
            killer.cancel()
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, usage.ru_maxrss * 1024.0, (tmp_path / "stderr.txt").read_text()  # ru_maxrss: KiB


@pytest.mark.slow
def test_a_large_picture_is_drawn_at_its_own_size_and_the_query_stays_in_its_pixels(tmp_path):
    """A 6000×4000 JPEG (24 megapixels): the overlay is a 6000×4000 PNG, made without a float
    copy of the picture (the model input comes from a copy of at most 2048 pixels, the map is
    blended a strip of rows at a time); the command needs little more memory than the same
    command on a small picture (imports and model: about 0.9 GB). The query point is a pixel of
    the full picture."""
    picture = Image.new("RGB", (6000, 4000), (30, 60, 90))
    ImageDraw.Draw(picture).ellipse((4000, 2500, 5800, 3900), fill=(250, 240, 200))
    picture.save(tmp_path / "big.jpg", quality=90)
    del picture
    query = (5990.0, 3990.0)
    argv = ["--model", "vit_digits_patch4_16", "--image", "big.jpg", "--method", "query", "--query", "5990,3990"]
    code, peak, err = peak_of_child([sys.executable, "-m", "visattn.cli", "overlay", *argv, "--out", "o.png"], tmp_path)
    assert code == 0, err
    # the same command on a 600×400 picture: what imports and the model cost on this machine
    Image.new("RGB", (600, 400), (30, 60, 90)).save(tmp_path / "small.jpg")
    base_argv = ["--model", "vit_digits_patch4_16", "--image", "small.jpg", "--method", "query", "--query", "590,390"]
    code, baseline, err = peak_of_child(
        [sys.executable, "-m", "visattn.cli", "overlay", *base_argv, "--out", "s.png"], tmp_path
    )
    assert code == 0, err
    extra = peak - baseline
    assert extra < 0.6e9, f"the 24-megapixel picture added {extra / 1e9:.2f} GB (baseline {baseline / 1e9:.2f} GB)"
    drawn = Image.open(tmp_path / "o.png").convert("RGB")
    assert drawn.size == (6000, 4000)
    small = load_image(tmp_path / "big.jpg", max_side=2048)
    assert small.size == (2048, 1365) and small.info["original_size"] == (6000, 4000)
    torch.manual_seed(0)  # the command's untrained model (--seed 0)
    model = create_model("vit_digits_patch4_16").eval()
    prep = Preprocess.from_spec(default_data_config(model))
    kwargs = {"preprocess": prep, "query": query, "original_size": (6000, 4000)}
    panels = attention_panels(model, small, "query", **kwargs)
    assert panels.marker == pytest.approx((5990 * 2048 / 6000, 3990 * 1365 / 4000))  # same relative spot
    assert "where (5990, 3990) attends" in panels.suptitle
    expected = np.asarray(attention_overlay(model, small, "query", **kwargs), dtype=np.int16)
    reduced = np.asarray(drawn.resize(small.size, Image.Resampling.BOX), dtype=np.int16)
    assert np.abs(reduced - expected).mean() < 2.0  # the same map on the same pixels, at another resolution


def test_pretrained_file_for_any_name_create_model_accepts(tmp_path, cat, capsys):
    """``--pretrained-file`` reads the files ``create_model(..., pretrained_file=...)`` reads, for a
    timm ViT name (converted exactly), a ``timm:`` CNN and visattn's own names (built, then
    loaded with every name and shape checked): the logits are those of the weights' own model."""
    import timm
    from safetensors.torch import save_file

    from visattn.weights.timm_vit import from_timm

    x = torch.randn(2, 3, 32, 48)
    peer = timm.create_model("test_resnet").eval()
    save_file(peer.state_dict(), tmp_path / "resnet.safetensors")
    loaded = create_model("timm:test_resnet", pretrained_file=tmp_path / "resnet.safetensors").eval()
    torch.testing.assert_close(loaded(x), peer(x), rtol=0, atol=0)
    own = create_model("vit_digits_patch4_16").eval()
    torch.save({"model": own.state_dict()}, tmp_path / "own.pth")
    torch.manual_seed(1)  # another random init: only the file's weights can make the logits equal
    loaded = create_model("vit_digits_patch4_16", pretrained_file=tmp_path / "own.pth").eval()
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(loaded(x), own(x), rtol=0, atol=0)
    vit = timm.create_model("test_vit").eval()
    torch.save(vit.state_dict(), tmp_path / "test_vit.pth")
    out = tmp_path / "timm.png"
    argv = ["--model", "test_vit", "--pretrained-file", tmp_path / "test_vit.pth", "--image", cat, "--method", "cls"]
    code, stdout, err = run(capsys, *argv, "--head", "1", "--out", out)
    assert code == 0, err
    config = {"img_size": [160, 160], "in_chans": 3, "mean": [0.5] * 3, "std": [0.5] * 3}  # test_vit's pretrained_cfg
    expected = attention_overlay(
        from_timm(vit), load_image(cat), "cls", preprocess=Preprocess.from_data_config(config), head=1
    )
    assert Image.open(out).convert("RGB").tobytes() == expected.tobytes()


def test_pretrained_file_reads_a_saved_folder_with_its_data_config(tmp_path, cat, capsys):
    """``--pretrained-file FOLDER``: the folder's model and its input size, mean and std (not the
    defaults for a gray model), so the overlay is the one drawn with the folder's data config."""
    from visattn import save_pretrained

    torch.manual_seed(3)
    model = create_model("vit_digits_patch4_16", embed_dim=32, depth=1, num_heads=2, img_size=24).eval()
    data = {"img_size": [24, 24], "in_chans": 1, "mean": [0.1], "std": [0.2], "num_classes": 10}
    save_pretrained(model, tmp_path / "digits", data_config={**data, "class_names": list("abcdefghij")})
    out = tmp_path / "folder.png"
    argv = ["--model", "vit_digits_patch4_16", "--pretrained-file", tmp_path / "digits", "--image", cat]
    code, _, err = run(capsys, *argv, "--method", "rollout", "--out", out)
    assert code == 0, err
    preprocess = Preprocess.from_data_config(data)
    expected = attention_overlay(model, load_image(cat), "rollout", preprocess=preprocess)
    assert Image.open(out).convert("RGB").tobytes() == expected.tobytes()
