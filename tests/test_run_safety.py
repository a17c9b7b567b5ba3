"""Run folders and resume: claimed atomically, resumed from last.pt's config, never clobbered.

Each test trains at most a couple of one-block epochs on the digits; a trained run is made once
per module and copied into each test that changes it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import visattn.train.engine as engine
from visattn.cli import main
from visattn.train.config import ConfigError, config_to_dict, load_config
from visattn.train.engine import RESUME_OVERRIDES, TrainingInterrupted, fit, load_run_config
from visattn.weights.checkpoint import CheckpointError, load_checkpoint

from .test_train import ROOT, TINY, child_env, metrics

ONE_EPOCH = [*TINY, "train.epochs=1", "run.progress=lines"]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished one-epoch run (``train.epochs=1``), shared read-only by the tests below."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("trained")
        return Path(fit(load_config(overrides=[*ONE_EPOCH, f"run.out_dir={out}", "run.name=r"]))["run_dir"])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the trained run folder."""
    return Path(shutil.copytree(trained, tmp_path / "runs" / "r"))


def test_a_run_started_while_another_builds_gets_its_own_folder(tmp_path, monkeypatch, one_thread):
    # the second run starts while the first is building its data (after it chose its name):
    # with a name checked early but a folder made late, both would write into runs/x
    build, inner = engine.build_datasets, {}

    def build_and_start_another(cfg):
        if not inner:
            inner["started"] = True
            inner["result"] = fit(load_config(overrides=[*ONE_EPOCH, f"run.out_dir={tmp_path}", "run.name=x"]))
        return build(cfg)

    monkeypatch.setattr(engine, "build_datasets", build_and_start_another)
    outer = fit(load_config(overrides=[*ONE_EPOCH, f"run.out_dir={tmp_path}", "run.name=x"]))
    assert {Path(outer["run_dir"]).name, Path(inner["result"]["run_dir"]).name} == {"x", "x-2"}
    assert Path(outer["run_dir"]).name == "x", "the folder belongs to the run that chose the name first"
    for folder in (tmp_path / "x", tmp_path / "x-2"):
        assert [row["epoch"] for row in metrics(folder)] == [1]


def test_two_runs_started_together_with_one_name_end_in_two_folders(tmp_path):
    args = [*ONE_EPOCH, f"run.out_dir={tmp_path}", "run.name=same"]
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args],
            env=child_env(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same", "same-2"]
    for folder in tmp_path.iterdir():
        assert [row["epoch"] for row in metrics(folder)] == [1]  # one run's lines each, not interleaved
        assert load_checkpoint(folder / "last.pt")["epoch"] == 1
    finals = sorted(line.rsplit(" ", 1)[-1] for out in outputs for line in out.splitlines() if "final test" in line)
    assert finals == sorted(str(folder) for folder in tmp_path.iterdir())


def test_an_emptied_config_yaml_resumes_with_the_saved_config(run, one_thread):
    saved = load_checkpoint(run / "last.pt")["config"]
    (run / "config.yaml").write_text("")
    cfg, run_dir = load_run_config(run, ["train.epochs=2"])
    assert cfg.model.embed_dim == 32 and cfg.train.lr == 3e-3  # the run's, not the defaults (64, 2e-3)
    result = fit(cfg, resume=run_dir)
    assert result["epoch"] == 2 and [row["epoch"] for row in metrics(run)] == [1, 2]
    written = config_to_dict(OmegaConf.load(run / "config.yaml"))
    assert written["model"] == saved["model"] and written["train"] == {**saved["train"], "epochs": 2}


@pytest.mark.parametrize(
    ("override", "key"),
    [("train.opt=sgd", "train.opt"), ("model.depth=2", "model.depth"), ("data.name=fake", "data.name")],
)
def test_a_refused_override_names_the_key_and_writes_nothing(run, override, key, capsys):
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(ConfigError, match=rf"^{key} cannot change on resume .*only {RESUME_OVERRIDES[0]}"):
        load_run_config(run, [override])
    assert main(["train", "--resume", str(run), override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    load_run_config(run)  # a plain resume still works


def test_fit_refuses_a_changed_config_on_resume_too(run):
    cfg = load_config(overrides=[*ONE_EPOCH, "train.lr=0.1", f"run.out_dir={run.parent}", "run.name=r"])
    before = (run / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match="train.lr cannot change on resume"):
        fit(cfg, resume=run)
    assert (run / "config.yaml").read_bytes() == before


def test_train_epochs_below_the_epochs_done_is_refused(run, tmp_path):
    cfg, _ = load_run_config(run, ["train.epochs=1"])  # as many as done: allowed
    assert cfg.train.epochs == 1
    fit(load_config(overrides=[*ONE_EPOCH, "train.epochs=2", f"run.out_dir={tmp_path}", "run.name=two"]))
    with pytest.raises(ConfigError, match=r"train.epochs=1 but .*already trained 2 epochs"):
        load_run_config(tmp_path / "two", ["train.epochs=1"])


def test_a_partial_metrics_line_and_leftover_tmp_files_are_cleaned_on_resume(run, one_thread):
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 2, "step": 44, "train_loss": 2.2')  # killed mid-write
    (run / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    cfg, run_dir = load_run_config(run, ["train.epochs=2"])
    fit(cfg, resume=run_dir)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert not list(run.glob("*.tmp"))


def test_an_unreadable_metrics_line_before_the_last_names_the_file(run):
    lines = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text("{broken\n" + lines)
    cfg, run_dir = load_run_config(run, ["train.epochs=2"])
    with pytest.raises(CheckpointError, match=r"metrics.jsonl line 1 is not valid JSON"):
        fit(cfg, resume=run_dir)


def test_a_run_without_last_pt_says_it_holds_no_state(run):
    (run / "last.pt").unlink()
    with pytest.raises(CheckpointError) as caught:
        load_run_config(run)
    message = str(caught.value)
    assert "holds no training state" in message and "best.pt can be evaluated" in message
    assert "first epoch" not in message
    (run / "best.pt").unlink()
    with pytest.raises(CheckpointError, match="holds no training state.*delete the folder"):
        load_run_config(run)
    with pytest.raises(CheckpointError, match="not a run folder"):
        load_run_config(run.parent)


def test_a_run_that_fails_while_setting_up_leaves_no_folder(tmp_path):
    with pytest.raises(ValueError, match="train.batch_size=5000 is larger"):
        fit(load_config(overrides=[*ONE_EPOCH, "train.batch_size=5000", f"run.out_dir={tmp_path}"]))
    assert not list(tmp_path.iterdir())


def interrupt_in_epoch(monkeypatch, epoch: int) -> None:
    real = engine.train_one_epoch

    def train_one_epoch(*args, **kwargs):
        if kwargs["epoch"] + 1 == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", train_one_epoch)


def test_ctrl_c_names_the_run_to_resume(tmp_path, monkeypatch, capsys, one_thread):
    interrupt_in_epoch(monkeypatch, 2)
    code = main(["train", *TINY, f"run.out_dir={tmp_path}", "run.name=c"])
    err = capsys.readouterr().err
    assert code == 130 and err == f"visattn train: interrupted; continue the run with --resume {tmp_path / 'c'}\n"
    assert load_checkpoint(tmp_path / "c" / "last.pt")["epoch"] == 1
    with pytest.raises(TrainingInterrupted) as caught:  # the library names the folder too
        fit(load_config(overrides=[*TINY, f"run.out_dir={tmp_path}", "run.name=c"]))
    assert caught.value.run_dir == tmp_path / "c-2" and caught.value.resumable


def test_ctrl_c_before_the_first_checkpoint_keeps_no_folder(tmp_path, monkeypatch, capsys):
    interrupt_in_epoch(monkeypatch, 1)
    assert main(["train", *TINY, f"run.out_dir={tmp_path}", "run.name=c"]) == 130
    assert "nothing to resume" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
