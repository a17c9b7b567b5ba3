"""Training end to end on tiny configs: run folder, reproducibility, resume after SIGKILL, NaN stop, DDP."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import visattn.train.engine
import visattn.train.precision
from visattn import CheckpointError, create_model, load_pretrained
from visattn.cli import _write_run_explorer, main
from visattn.explain.explore import read_page_data
from visattn.explain.inputs import Preprocess
from visattn.train.config import ConfigError, load_config
from visattn.train.data import build_datasets, held_out_pictures
from visattn.train.engine import NonFiniteLossError, fit
from visattn.train.precision import BF16_MIN_FLOPS, choose_precision, forward_flops
from visattn.train.resume import load_run_config
from visattn.weights.checkpoint import load_checkpoint, model_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.embed_dim=32",
    "model.depth=1",
    "model.num_heads=2",
    "train.epochs=2",
    "train.batch_size=64",
    "train.warmup_epochs=1",
    "train.lr=3e-3",
    "train.amp=none",
    "train.ema_decay=0",  # the default job's weight average would lag over 2 epochs
    "data.augment.affine_degrees=5",
]
TIMING_KEYS = {"time", "images_per_s", "epoch_s", "data_s"}


def tiny(tmp_path, *extra):
    return load_config(overrides=[*TINY, f"run.out_dir={tmp_path}", *extra])


def metrics(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def test_run_folder_is_complete_and_reproducible(tmp_path, one_thread, capsys):
    recipe = ["train.ema_decay=0.9", "train.mixup=0.2", "train.cutmix=0.2"]
    first = fit(tiny(tmp_path, "run.name=a", *recipe))
    second = fit(tiny(tmp_path, "run.name=a", *recipe))  # same name: a new folder, a-2
    run = Path(first["run_dir"])
    assert Path(second["run_dir"]).name == "a-2"
    assert metrics(run) == metrics(second["run_dir"]), "same config and seed must give the same metrics"
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "curves.png",
        "last.pt",
        "best.pt",
        "model.safetensors",
        "config.json",
    ):
        assert (run / name).is_file(), name
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2] and {"train_loss", "test_acc1", "ema_test_acc1", "lr"} <= set(rows[0])
    assert load_config(base=__import__("omegaconf").OmegaConf.load(run / "config.yaml")).train.ema_decay == 0.9

    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == 2 and last["model_config"] == {
        "name": "vit_digits_patch4_16",
        "stem": "conv",
        "embed_dim": 32,
        "depth": 1,
        "num_heads": 2,
        "num_classes": 10,
        "in_chans": 1,
    }
    assert set(last["data_config"]) == {"name", "img_size", "in_chans", "mean", "std", "num_classes", "class_names"}
    assert {"optimizer", "scheduler", "ema", "step", "best_acc1"} <= set(last)
    # the run folder is a model folder: its model predicts what best.pt's model (the EMA weights) predicts
    best_model = model_from_checkpoint(run / "best.pt")
    folder_model = load_pretrained(run)
    x = torch.randn(8, last["data_config"]["in_chans"], *last["data_config"]["img_size"])
    with torch.no_grad():
        assert torch.equal(folder_model(x), best_model(x))
    saved = json.loads((run / "config.json").read_text())
    assert saved["model_config"] == last["model_config"] and saved["data_config"] == json.loads(
        json.dumps(last["data_config"])
    )
    assert folder_model.pretrained_cfg["label_names"] == last["data_config"]["class_names"]

    # eval command: top-1 of best.pt equals what training recorded for it
    best = load_checkpoint(run / "best.pt")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "best.pt")]) == 0
    out = capsys.readouterr().out
    assert f"top-1 {best['acc1']:.2%}" in out
    table = [line.split() for line in out.splitlines()[3:]]
    assert len(table) == 10 and sum(int(row[1]) for row in table) == 360


def test_the_run_folder_holds_the_best_model_not_the_last(tmp_path, monkeypatch, one_thread):
    """Scores that fall after the first epoch: the folder keeps epoch 1's model, best.pt's."""
    evaluate = visattn.train.engine.evaluate
    scores = iter([0.9, 0.1])

    def falling(*args, **kwargs):
        return {**evaluate(*args, **kwargs), "acc1": next(scores)}

    monkeypatch.setattr(visattn.train.engine, "evaluate", falling)
    run = Path(fit(tiny(tmp_path))["run_dir"])
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert best["epoch"] == 1 and last["epoch"] == 2
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        logits = load_pretrained(run)(x)
        assert torch.equal(logits, model_from_checkpoint(best)(x))
        assert not torch.equal(logits, model_from_checkpoint(last)(x))


@pytest.mark.slow
def test_default_config_shortened_learns(tmp_path, one_thread):
    # the default recipe and model, 8 epochs instead of 55
    result = fit(load_config(overrides=["train.epochs=8", "train.warmup_epochs=1", f"run.out_dir={tmp_path}"]))
    assert result["test_acc1"] > 0.4, result  # chance is 0.1


def run_train(args, env, **kwargs):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def child_env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    args = [*TINY, "train.batch_size=32", "train.ema_decay=0.9"]  # 2 epochs of 44 steps
    # the reference runs in a process like the killed one: same threads, same kernels
    reference = run_train([*args, f"run.out_dir={tmp_path / 'ref'}", "run.name=r"], child_env())
    assert reference.wait(timeout=300) == 0, reference.stdout.read()
    reference.stdout.close()

    proc = run_train([*args, f"run.out_dir={tmp_path / 'killed'}", "run.name=r"], child_env())
    run = tmp_path / "killed" / "r"
    deadline = time.monotonic() + 300
    while not (run / "last.pt").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed mid-run"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert load_checkpoint(run / "last.pt")["epoch"] == 1

    resumed = run_train(["--resume", str(run)], child_env())
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed" in out
    assert metrics(run) == metrics(tmp_path / "ref" / "r")


def test_resume_refuses_a_broken_checkpoint(tmp_path, one_thread):
    run = Path(fit(tiny(tmp_path, "train.epochs=1"))["run_dir"])
    cfg, run_dir = load_run_config(run)
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_run_config(run)
    with pytest.raises(CheckpointError, match="truncated"):
        fit(cfg, resume=run_dir)
    with pytest.raises(CheckpointError, match="not a run folder"):
        load_run_config(tmp_path)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, one_thread):
    build = visattn.train.engine.build_datasets

    class PoisonAfterOneEpoch(torch.utils.data.Dataset):
        def __init__(self, dataset):
            self.dataset, self.calls = dataset, 0

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, index):
            self.calls += 1
            x, y = self.dataset[index]
            return (x * float("nan") if self.calls > len(self.dataset) else x), y

    def poisoned(cfg):
        train, test, data_config = build(cfg)
        return PoisonAfterOneEpoch(train), test, data_config

    monkeypatch.setattr(visattn.train.engine, "build_datasets", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 23 \(epoch 2\).*last good state is .*last.pt"):
        fit(tiny(tmp_path, "run.name=nan", "train.epochs=3"))
    assert load_checkpoint(tmp_path / "nan" / "last.pt")["epoch"] == 1
    model_from_checkpoint(tmp_path / "nan" / "last.pt")


def test_config_errors_reach_the_command_line(capsys):
    assert main(["train", "train.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("visattn train: error: unknown config key 'train.epoch'") and err.count("\n") == 1
    assert "did you mean train.epochs" in err
    with pytest.raises(ConfigError):
        load_config(overrides=["train.epoch=3"])
    with pytest.raises(ValueError, match="does not take an argument"):
        fit(load_config(overrides=["model.dept=2", "train.epochs=1"]))


@pytest.mark.slow
def test_two_process_ddp_run_trains_and_writes_one_folder(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "train.py"),
        *TINY,
        "train.epochs=3",
        "train.batch_size=32",
        f"run.out_dir={tmp_path}",
        "run.name=ddp",
    ]
    done = subprocess.run(cmd, env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]
    rows = metrics(tmp_path / "ddp")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # every test image counted exactly once across the two processes
    assert all(abs(r["test_acc1"] * 360 - round(r["test_acc1"] * 360)) < 1e-6 for r in rows)
    assert rows[-1]["test_acc1"] > 0.2  # chance is 0.1
    assert done.stdout.count("final test accuracy") == 1  # only rank 0 prints


def test_cifar_vit_recipe_runs_end_to_end_on_fake_images(tmp_path, one_thread):
    # configs/cifar10_vit.yaml's full recipe (crop, flip, RandAugment, random erasing, Mixup/CutMix,
    # EMA, drop path) on 64 fake 32x32 images with a one-block model
    cfg = load_config(
        ROOT / "configs" / "cifar10_vit.yaml",
        [
            "data.name=fake",
            "data.fake_size=64",
            "data.workers=0",
            "model.depth=1",
            "model.embed_dim=32",
            "model.num_heads=2",
            "train.epochs=2",
            "train.batch_size=32",
            "train.warmup_epochs=1",
            f"run.out_dir={tmp_path}",
        ],
    )
    result = fit(cfg)
    assert result["epoch"] == 2 and "ema_test_acc1" in result
    assert torch.isfinite(torch.tensor(result["train_loss"]))
    assert Path(result["run_dir"]).name == "cifar10_vit"


@pytest.mark.parametrize(
    ("amp", "device", "native", "flops", "expected"),
    [
        ("auto", "cuda", True, None, torch.bfloat16),
        ("auto", "cuda", False, None, None),
        ("auto", "cpu", False, 1e12, None),  # emulated bf16 loses whatever the size
        ("auto", "cpu", True, BF16_MIN_FLOPS, torch.bfloat16),
        ("auto", "cpu", True, BF16_MIN_FLOPS - 1, None),
        ("auto", "cpu", True, 0, None),
        ("bf16", "cpu", False, None, torch.bfloat16),  # forced: the hardware is not asked
        ("none", "cuda", True, None, None),
        ("fp16", "cuda", False, None, torch.float16),
    ],
)
def test_precision_is_a_rule_of_the_hardware_and_the_model_size(amp, device, native, flops, expected):
    dtype, reason = choose_precision(amp, device, native, flops)
    assert dtype == expected and reason.startswith(f"train.amp={amp}")
    assert choose_precision(amp, device, native, flops) == (dtype, reason)  # nothing measured: the same answer


def test_the_precision_reason_names_the_size_and_the_threshold():
    small = choose_precision("auto", "cpu", True, 2.44e6)[1]
    large = choose_precision("auto", "cpu", True, 1.5e9)[1]
    threshold = f"{BF16_MIN_FLOPS / 1e6:.0f} MFLOP"
    assert "2.4 MFLOP per image" in small and f"under the {threshold}" in small
    assert "1500.0 MFLOP per image" in large and f"at least {threshold}" in large
    emulated = choose_precision("auto", "cpu", False)[1]
    assert "no native bf16" in emulated and "emulated" in emulated


def test_precision_refuses_fp16_on_a_cpu_and_a_missing_size():
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        choose_precision("fp16", "cpu", True)
    with pytest.raises(ValueError, match="FLOPs per image"):
        choose_precision("auto", "cpu", True)


def test_the_model_size_is_counted_not_timed():
    # a linear map of 12 inputs to 5 outputs: 12 * 5 multiply-adds, 2 FLOPs each, per image
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    assert forward_flops(model, (3, 2, 2)) == 2 * 12 * 5
    model.train()
    forward_flops(model, (3, 2, 2))
    assert model.training  # counted on a dry run in eval mode; the model's mode is kept


def test_first_log_line_names_the_precision_and_resume_keeps_it(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(visattn.train.precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(visattn.train.precision, "BF16_MIN_FLOPS", 1.0)  # the tiny model counts as large
    overrides = [o for o in TINY if not o.startswith("train.amp")] + ["train.epochs=1", f"run.out_dir={tmp_path}"]
    fit(load_config(overrides=overrides + ["run.name=p"]))
    first = capsys.readouterr().out.splitlines()[0]
    assert re.fullmatch(
        r"precision bf16: train\.amp=auto: native bf16 on this CPU and the model does \d+\.\d MFLOP per image, "
        r"at least 0 MFLOP",
        first,
    ), first
    assert load_checkpoint(tmp_path / "p" / "last.pt")["precision"] == "bf16"
    # resumed (here: for one more epoch) where the rule now says fp32: it keeps bf16
    monkeypatch.setattr(visattn.train.precision, "BF16_MIN_FLOPS", 1e15)
    cfg, run_dir = load_run_config(tmp_path / "p", ["train.epochs=2"])
    fit(cfg, resume=run_dir)
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "precision bf16: train.amp=auto: as chosen when the run started (from last.pt)"


def decoded(src: str) -> np.ndarray:
    """The grey levels of a picture the explorer page embeds as a data URL."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("L"))


def test_the_train_command_ends_with_where_the_run_folders_model_looks_in_held_out_digits(tmp_path, capsys, one_thread):
    args = [*TINY, "train.ema_decay=0.9", f"run.out_dir={tmp_path}", "run.name=e"]
    assert main(["train", *args, "train.epochs=1", "run.explorer=false"]) == 0
    run = tmp_path / "e"
    assert capsys.readouterr().out.splitlines()[-1].startswith("final test accuracy")
    assert not (run / "explorer.html").exists()
    assert main(["train", "--resume", str(run), "train.epochs=2", "run.explorer=true"]) == 0  # allowed on resume
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"where the model looks in 8 held-out pictures ({(run / 'explorer.html').stat().st_size / 1e6:.2f} MB): "
        f"{run / 'explorer.html'}"
    )
    shown = read_page_data(run / "explorer.html")["images"]
    _, test, data_config = build_datasets(load_config(overrides=args).data)
    expected = held_out_pictures(test, 8)
    assert [decoded(image["src"]).tolist() for image in shown] == [np.asarray(p).tolist() for p in expected]
    # the run folder's model (the best epoch's EMA weights here), as load_pretrained reads it, gives the class scores
    model = load_pretrained(run)
    with torch.no_grad():
        probs = model(Preprocess.from_spec(data_config)(expected[0])[None]).softmax(-1)[0]
    top = probs.sort(descending=True)
    assert [p["label"] for p in shown[0]["predictions"]] == [str(i) for i in top.indices[:5].tolist()]
    assert [p["p"] for p in shown[0]["predictions"]] == pytest.approx(top.values[:5].tolist(), abs=1e-6)


def test_no_explorer_page_for_noise_or_for_a_model_without_attention(tmp_path, capsys):
    _, noise, noise_config = build_datasets(load_config(overrides=["data.name=fake", "data.fake_size=8"]).data)
    _write_run_explorer(tmp_path, create_model("vit_tiny_patch4_32", num_classes=10), noise, noise_config)
    _, digits, digits_config = build_datasets(load_config().data)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    cnn(torch.zeros(1, 1, 16, 16))
    _write_run_explorer(tmp_path, cnn, digits, digits_config)
    out = capsys.readouterr().out
    assert out.startswith("no explorer page: Sequential has no visattn attention modules") and out.count("\n") == 1
    assert not list(tmp_path.iterdir())
