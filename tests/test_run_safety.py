"""Run folders and resume: claimed atomically, resumed from last.pt's config, never clobbered.

Each test trains at most a couple of one-block epochs on the digits; a trained run is made once
per module and copied into each test that changes it.
"""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import visattn.train.engine as engine
from visattn import CheckpointError
from visattn._io import DiskFullError
from visattn.cli import main
from visattn.train.config import ConfigError, config_to_dict, load_config
from visattn.train.engine import TrainingInterrupted, fit
from visattn.train.resume import RESUME_OVERRIDES, load_run_config
from visattn.weights.checkpoint import load_checkpoint

from .test_train import ROOT, TINY, child_env, metrics

ONE_EPOCH = [*TINY, "train.epochs=1", "run.progress=lines"]


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


@pytest.mark.slow
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


def test_a_run_without_last_pt_says_it_holds_no_state(run, capsys):
    (run / "last.pt").unlink()
    with pytest.raises(CheckpointError) as caught:
        load_run_config(run)
    message = str(caught.value)
    assert "holds no training state" in message and "best.pt can be evaluated" in message
    assert "first epoch" not in message and "has a best.pt but no last.pt" in message
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["train", "--resume", str(run)]) == 2
    assert capsys.readouterr().err == f"visattn train: error: {message}\n"
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # best.pt kept, nothing written
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


# --- a full disk: injected at the writer of one file, the way each writer fails -------------------

SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 198336 vs 198224"


def disk_full_at(monkeypatch, name: str, call: int = 1) -> None:
    """The ``call``-th write of the run file ``name`` stores 100 bytes and then fails as a full
    disk makes its writer fail: torch's checkpoint writer with its short-write ``RuntimeError``,
    text files with ``OSError(ENOSPC)``."""
    real_save, real_write_text, calls = torch.save, Path.write_text, [0]

    def failing(target) -> bool:
        if not Path(target).name.startswith(f".{name}."):  # the atomic writer's temporary file
            return False
        calls[0] += 1
        if calls[0] != call:
            return False
        with open(target, "wb") as handle:
            handle.write(b"x" * 100)
        return True

    def save(obj, target, *args, **kwargs):
        if failing(target):
            raise RuntimeError(SHORT_WRITE)
        return real_save(obj, target, *args, **kwargs)

    def write_text(path, text, *args, **kwargs):
        if failing(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(Path, "write_text", write_text)


def test_a_full_disk_in_epoch_2_keeps_epoch_1_and_the_run_resumes(tmp_path, monkeypatch, capsys, one_thread):
    disk_full_at(monkeypatch, "last.pt", call=2)
    run = tmp_path / "full"
    assert main(["train", *TINY, f"run.out_dir={tmp_path}", "run.name=full"]) == 2
    assert capsys.readouterr().err == (
        f"visattn train: error: no space left on device while writing {run / 'last.pt'}; the last complete "
        f"checkpoint {run / 'last.pt'} is kept: free space, then continue with --resume {run}\n"
    )
    monkeypatch.undo()
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and not list(run.glob("*.tmp"))
    assert main(["train", "--resume", str(run)]) == 0
    assert [row["epoch"] for row in metrics(run)] == [1, 2]


@pytest.mark.parametrize("name", ["config.yaml", "metrics.jsonl", "last.pt"])
def test_a_full_disk_before_the_first_checkpoint_leaves_no_folder(tmp_path, monkeypatch, capsys, name, one_thread):
    disk_full_at(monkeypatch, name)
    assert main(["train", *ONE_EPOCH, f"run.out_dir={tmp_path}", "run.name=full"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"visattn train: error: no space left on device while writing {tmp_path / 'full' / name}; ")
    assert err.endswith(f"nothing to resume ({tmp_path / 'full'} was removed)\n") and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_a_run_stopped_between_last_pt_and_best_pt_resumes_and_writes_best_pt(tmp_path, monkeypatch, one_thread):
    disk_full_at(monkeypatch, "best.pt")
    with pytest.raises(DiskFullError, match=r"best.pt; the last complete checkpoint .*last.pt is kept"):
        fit(load_config(overrides=[*ONE_EPOCH, f"run.out_dir={tmp_path}", "run.name=r"]))
    monkeypatch.undo()
    run = tmp_path / "r"
    # the model folder (config.json, model.safetensors) is written just before best.pt
    assert sorted(p.name for p in run.iterdir()) == [
        "config.json",
        "config.yaml",
        "last.pt",
        "metrics.jsonl",
        "model.safetensors",
    ]
    last = load_checkpoint(run / "last.pt")
    assert last["best_epoch"] == last["epoch"] == 1
    cfg, run_dir = load_run_config(run)  # no epoch left to train: only what resuming itself writes
    fit(cfg, resume=run_dir)
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == 1 and best["acc1"] == last["best_acc1"]
    assert all(torch.equal(best["model"][k], v) for k, v in last["model"].items())


# --- one process per run folder ---------------------------------------------------------------------

#: a real training process that resumes RUN and waits for a line on stdin before each epoch
HOLDER = r"""
import sys
import visattn.train.engine as engine
from visattn.train.resume import load_run_config

real = engine.train_one_epoch

def train_one_epoch(*args, **kwargs):
    print("training", flush=True)
    sys.stdin.readline()
    return real(*args, **kwargs)

engine.train_one_epoch = train_one_epoch
cfg, run_dir = load_run_config(sys.argv[1], ["train.epochs=2"])
engine.fit(cfg, resume=run_dir)
"""


def holding(run: Path) -> subprocess.Popen:
    """A process training in ``run`` (it holds the lock), stopped before its epoch."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)],
        env=child_env(),
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    while not lines or lines[-1] != "training\n":
        lines.append(proc.stdout.readline())
        assert lines[-1], "".join(lines)  # ended before it trained
    return proc


def resume_process(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--resume", str(run), "train.epochs=2"],
        env=child_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_second_process_cannot_train_in_a_run_folder_in_use(run):
    holder = holding(run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    second = resume_process(run)
    assert (second.returncode, second.stderr) == (
        2,
        f"visattn train: error: {run} is in use by another training process (PID {holder.pid}, which holds "
        f"{run / '.lock'}); wait for it to end, or stop it, then try again\n",
    )
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    out, _ = holder.communicate("\n", timeout=300)
    assert holder.returncode == 0, out
    assert [row["epoch"] for row in metrics(run)] == [1, 2]  # one process's epochs, not 2, 2
    assert not (run / ".lock").exists()


@pytest.mark.slow
def test_the_lock_ends_with_its_process(run):
    holder = holding(run)
    holder.kill()  # SIGKILL: no clean-up runs
    holder.communicate(timeout=60)
    assert (run / ".lock").read_text() == f"{holder.pid}\n"  # left behind, locking nothing
    resumed = resume_process(run)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [row["epoch"] for row in metrics(run)] == [1, 2] and not (run / ".lock").exists()


# --- SIGTERM is Ctrl-C -----------------------------------------------------------------------------


def terminated_at(tmp_path: Path, line: str) -> tuple[subprocess.CompletedProcess, Path]:
    """A real ``train.py`` sent SIGTERM once it prints ``line`` (a step's log line)."""
    args = [*TINY, "train.epochs=50", "run.progress=lines", "run.log_every=1", f"run.out_dir={tmp_path}", "run.name=t"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        env={**child_env(), "PYTHONUNBUFFERED": "1"},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    while not seen or not seen[-1].startswith(line):
        seen.append(proc.stdout.readline())
        assert seen[-1], "".join(seen) + proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(seen) + out, err), tmp_path / "t"


@pytest.mark.slow
def test_sigterm_keeps_the_checkpoint_and_names_the_run_to_resume(tmp_path):
    done, run = terminated_at(tmp_path, "  epoch 2 step 1/")  # logged after epoch 1's checkpoint
    assert (done.returncode, done.stderr) == (
        143,
        f"visattn train: stopped by SIGTERM; continue the run with --resume {run}\n",
    ), done.stdout
    epochs = load_checkpoint(run / "last.pt")["epoch"]
    assert epochs >= 1 and [row["epoch"] for row in metrics(run)] == list(range(1, epochs + 1))
    assert not list(run.glob("*.tmp")) and not (run / ".lock").exists()
    load_run_config(run)  # resumable


@pytest.mark.slow
def test_sigterm_before_the_first_checkpoint_keeps_no_folder(tmp_path):
    done, run = terminated_at(tmp_path, "  epoch 1 step 1/")
    assert (done.returncode, done.stderr) == (
        143,
        f"visattn train: stopped by SIGTERM before the first checkpoint; nothing to resume ({run} was not kept)\n",
    ), done.stdout
    assert not list(tmp_path.iterdir())
