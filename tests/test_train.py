"""Training end to end on tiny configs: run folder, reproducibility, resume after SIGKILL, NaN stop, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import visattn.train.engine
from visattn import CheckpointError, create_model
from visattn.cli import main
from visattn.train.config import ConfigError, load_config
from visattn.train.engine import NonFiniteLossError, choose_precision, fit, load_run_config
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
    "data.augment.affine_degrees=5",
]
TIMING_KEYS = {"time", "images_per_s", "epoch_s", "data_s"}


def tiny(tmp_path, *extra):
    return load_config(overrides=[*TINY, f"run.out_dir={tmp_path}", *extra])


def metrics(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_run_folder_is_complete_and_reproducible(tmp_path, one_thread, capsys):
    recipe = ["train.ema_decay=0.9", "train.mixup=0.2", "train.cutmix=0.2"]
    first = fit(tiny(tmp_path, "run.name=a", *recipe))
    second = fit(tiny(tmp_path, "run.name=a", *recipe))  # same name: a new folder, a-2
    run = Path(first["run_dir"])
    assert Path(second["run_dir"]).name == "a-2"
    assert metrics(run) == metrics(second["run_dir"]), "same config and seed must give the same metrics"
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "last.pt", "best.pt", "model.safetensors", "model.json"):
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
    # model.safetensors holds the EMA weights, loadable without pickle from model.json
    info = json.loads((run / "model.json").read_text())
    config = dict(info["model_config"])
    model = create_model(config.pop("name"), **config)
    model.load_state_dict(load_file(run / "model.safetensors"))
    ema = {k.removeprefix("module."): v for k, v in last["ema"].items()}
    assert all(torch.equal(model.state_dict()[k], ema[k]) for k in ema)

    # eval command: top-1 of best.pt equals what training recorded for it
    best = load_checkpoint(run / "best.pt")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "best.pt")]) == 0
    out = capsys.readouterr().out
    assert f"top-1 {best['acc1']:.2%}" in out
    table = [line.split() for line in out.splitlines()[3:]]
    assert len(table) == 10 and sum(int(row[1]) for row in table) == 360


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
    ("fp32", "bf16", "expected"),
    [
        (0.010, 0.0085, torch.bfloat16),  # 15 % faster: bf16
        (0.010, 0.0095, None),  # 5 % faster: not worth it, fp32
        (0.010, 0.0600, None),  # emulated bf16: fp32
    ],
)
def test_auto_precision_takes_the_faster_of_two_timings(monkeypatch, fp32, bf16, expected):
    monkeypatch.setattr(visattn.train.engine, "cpu_has_native_bf16", lambda: True)
    timings = {None: fp32, torch.bfloat16: bf16}
    dtype, reason = choose_precision("auto", torch.device("cpu"), timings.__getitem__)
    assert dtype == expected
    assert f"{bf16 * 1e3:.1f} ms in bf16 and {fp32 * 1e3:.1f} ms in fp32" in reason


def test_auto_precision_skips_the_timing_without_native_bf16(monkeypatch):
    monkeypatch.setattr(visattn.train.engine, "cpu_has_native_bf16", lambda: False)

    def never(dtype):
        raise AssertionError("timed although bf16 is emulated")

    assert choose_precision("auto", torch.device("cpu"), never) == (
        None,
        "train.amp=auto: oneDNN has no native bf16 here (no AVX512-BF16/AMX), so bf16 would be emulated, slower",
    )
    assert choose_precision("bf16", torch.device("cpu"), never)[0] == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        choose_precision("fp16", torch.device("cpu"), never)


def test_first_log_line_names_the_precision_and_resume_keeps_it(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(visattn.train.engine, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(
        visattn.train.engine, "step_timer", lambda *a, **k: {None: 2.0, torch.bfloat16: 1.0}.__getitem__
    )
    overrides = [o for o in TINY if not o.startswith("train.amp")] + ["train.epochs=1", f"run.out_dir={tmp_path}"]
    fit(load_config(overrides=overrides + ["run.name=p"]))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("precision bf16: train.amp=auto: a training step took 1000.0 ms in bf16"), first
    assert load_checkpoint(tmp_path / "p" / "last.pt")["precision"] == "bf16"
    # resumed (here: for one more epoch) with timings that now favour fp32: it keeps bf16
    monkeypatch.setattr(
        visattn.train.engine, "step_timer", lambda *a, **k: {None: 1.0, torch.bfloat16: 2.0}.__getitem__
    )
    cfg, run_dir = load_run_config(tmp_path / "p", ["train.epochs=2"])
    fit(cfg, resume=run_dir)
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "precision bf16: train.amp=auto: as chosen when the run started (from last.pt)"
