"""Part 5: training throughput of ``train.py`` itself, and its scaling from 1 to 2 processes.

Each job runs the shipped ``train.py`` in a subprocess on a shipped config, shortened with
``train.epochs=N``, into a temporary run folder; images/s is read back from the run's
``metrics.jsonl`` (the engine's own count: training images of all processes over the training
loop's seconds, evaluation excluded) as the median over the epochs after the first (the first
pays one-off costs: allocator growth, oneDNN primitive creation). The 2-process job is
``python -m torch.distributed.run --standalone --nproc_per_node 2 train.py ...`` (= ``torchrun``;
gloo on CPU) with the same global batch (``train.batch_size`` is split over the processes).

Threads: ``OMP_NUM_THREADS`` = the CPU count ÷ processes, so a 1-process and a 2-process job
use the same cores (``--threads`` sets only the suite's own process and does not apply here).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from .common import REPO_ROOT, Config, Part

NAME = "train"
TITLE = "Part 5: training throughput of train.py (images/s from metrics.jsonl), 1 and 2 processes"
#: quick mode: the default model on 64 fake 16×16 images, 2 epochs, one process (no torchrun)
QUICK_OVERRIDES = ("data.name=fake", "data.fake_size=64", "data.img_size=16", "train.batch_size=16")


@dataclass(frozen=True)
class Job:
    """One ``train.py`` run: a shipped config, shortened, on ``processes`` processes."""

    config: str  # a file under configs/
    processes: int
    epochs: int
    overrides: tuple[str, ...] = ()

    @property
    def slug(self) -> str:
        return f"{Path(self.config).stem}-{self.processes}p"


def jobs(quick: bool) -> list[Job]:
    """The jobs of a run: the default config on 1 and 2 processes, the CNN-with-attention one."""
    if quick:
        return [Job("configs/default.yaml", 1, 2, QUICK_OVERRIDES)]
    return [Job("configs/default.yaml", 1, 3), Job("configs/default.yaml", 2, 3),
            Job("configs/digits_resnet_attn.yaml", 1, 2)]


def threads_per_process(job: Job) -> int:
    """``OMP_NUM_THREADS`` for each process of ``job``: the machine's cores shared out."""
    return max(1, (os.cpu_count() or 1) // job.processes)


def command(job: Job, run_root: Path) -> list[str]:
    """The command line of ``job``, writing its run folder to ``run_root / job.slug``."""
    script = str(REPO_ROOT / "train.py")
    launcher = [sys.executable, script] if job.processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={job.processes}", script]
    return [*launcher, "--config", str(REPO_ROOT / job.config), f"train.epochs={job.epochs}",
            f"run.out_dir={run_root}", f"run.name={job.slug}", "run.progress=lines", *job.overrides]


def run_job(job: Job, run_root: Path) -> dict:
    """Run ``job`` to the end; its per-epoch metrics and how long the whole process took."""
    threads = threads_per_process(job)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(command(job, run_root), cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise RuntimeError(f"train.py job {job.slug} failed (exit code {done.returncode}):\n{tail}")
    lines = (run_root / job.slug / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line) for line in lines if line.strip()]
    return {"threads": threads, "wall_s": wall, "loadavg": load, "epochs": epochs}


def images_per_s(epochs: list[dict]) -> float:
    """Median images/s over the epochs after the first (the only one if there is one)."""
    timed = epochs[1:] or epochs
    return statistics.median(e["images_per_s"] for e in timed)


def run(config: Config) -> Part:
    part = Part(NAME, TITLE, columns=[
        ("config", "config"), ("processes", "processes"), ("threads", "threads/process"),
        ("batch", "global batch"), ("epochs_timed", "epochs timed"), ("images_per_s", "img/s"),
        ("speedup", "×1 process"), ("wall_s", "wall s"), ("loadavg", "load avg"),
    ])
    if config.device != "cpu":
        part.notes.append(f"train.py runs on its own device choice (train.device=auto), not --device {config.device}")
    with tempfile.TemporaryDirectory(prefix="visattn-bench-train-") as tmp:
        for job in jobs(config.quick):
            result = run_job(job, Path(tmp))
            run_config = (Path(tmp) / job.slug / "config.yaml").read_text()
            part.rows.append({
                "config": Path(job.config).stem + (" (quick: fake data)" if job.overrides else ""),
                "processes": job.processes, "threads": result["threads"],
                "batch": _global_batch(run_config), "epochs_timed": max(1, len(result["epochs"]) - 1),
                "images_per_s": images_per_s(result["epochs"]), "wall_s": result["wall_s"],
                "loadavg": result["loadavg"], "epochs": result["epochs"],
                "command": _shown(job, result["threads"]),
            })
            print(f"  [{NAME}] {job.slug}: {part.rows[-1]['images_per_s']:.0f} img/s", flush=True)
    single = {r["config"]: r["images_per_s"] for r in part.rows if r["processes"] == 1}
    for row in part.rows:
        if row["config"] in single:
            row["speedup"] = row["images_per_s"] / single[row["config"]]
    part.notes += [f"{r['config']}, {r['processes']} process(es): {r['command']}" for r in part.rows]
    part.notes += _scaling_notes(part.rows)
    if config.quick:
        part.notes.append("quick mode: one tiny 1-process job, torchrun not run")
    return part


def _shown(job: Job, threads: int) -> str:
    """``job``'s command as a user types it in the repository root."""
    words = ["python" if w == sys.executable else w.replace(str(REPO_ROOT) + os.sep, "")
             for w in command(job, Path("RUNS"))]
    return " ".join([f"OMP_NUM_THREADS={threads}", *words])


def _global_batch(run_config: str) -> int:
    """``train.batch_size`` from a run folder's resolved ``config.yaml``."""
    return OmegaConf.create(run_config).train.batch_size


def _scaling_notes(rows: list[dict]) -> list[str]:
    notes = []
    for row in rows:
        if row["processes"] > 1 and row.get("speedup") is not None:
            notes.append(
                f"{row['config']}: {row['processes']} processes x {row['threads']} thread(s) ran "
                f"{row['speedup']:.2f}x the images/s of 1 process x {row['processes'] * row['threads']} threads "
                f"on {os.cpu_count()} cores: the same cores do the same arithmetic either way, and "
                "data parallelism adds a gloo all-reduce of every gradient per step and a second "
                "Python process; it pays where processes get cores (or GPUs) of their own"
            )
    return notes
