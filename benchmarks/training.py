"""Part 5: training throughput of ``train.py`` itself, and its scaling from 1 to 2 processes.

Each job runs the shipped ``train.py`` in a subprocess on a shipped config, shortened with
``train.epochs=N``, into a temporary run folder; images/s is read back from the run's
``metrics.jsonl`` (the engine's own count: training images of all processes over the training
loop's seconds, evaluation excluded) as the median over the epochs after the first (the first
pays one-off costs: allocator growth, oneDNN primitive creation). The 2-process job is
``python -m torch.distributed.run --standalone --nproc_per_node 2 train.py ...`` (= ``torchrun``;
gloo on CPU) with the same global batch (``train.batch_size`` is split over the processes).

Threads: each job sets ``OMP_NUM_THREADS`` itself (``--threads`` sets only the suite's own
process). The default config runs as 1 process × 1 thread (the baseline of the speed-up column),
1 process × all cores, and 2 processes × (cores ÷ 2) threads: the last two use the same cores.
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
    """One ``train.py`` run: a shipped config, shortened, on ``processes`` × ``threads``."""

    config: str  # a file under configs/
    processes: int
    threads: int  # OMP_NUM_THREADS of each process
    epochs: int
    overrides: tuple[str, ...] = ()

    @property
    def slug(self) -> str:
        return f"{Path(self.config).stem}-{self.processes}p{self.threads}t"


def jobs(quick: bool) -> list[Job]:
    """The jobs of a run: the default config on 1 and 2 processes; the CNN-with-attention one on
    1 process, 1 thread and all cores (its epochs are ~20× longer, so 2 epochs, 1 timed)."""
    if quick:
        return [Job("configs/default.yaml", 1, 1, 2, QUICK_OVERRIDES)]
    cores = os.cpu_count() or 1
    return [
        Job("configs/default.yaml", 1, 1, 3),
        Job("configs/default.yaml", 1, cores, 3),
        Job("configs/default.yaml", 2, max(1, cores // 2), 3),
        Job("configs/digits_resnet_attn.yaml", 1, 1, 2),
        Job("configs/digits_resnet_attn.yaml", 1, cores, 2),
    ]


def command(job: Job, run_root: Path) -> list[str]:
    """The command line of ``job``, writing its run folder to ``run_root / job.slug``."""
    script = str(REPO_ROOT / "train.py")
    launcher = (
        [sys.executable, script]
        if job.processes == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={job.processes}",
            script,
        ]
    )
    return [
        *launcher,
        "--config",
        str(REPO_ROOT / job.config),
        f"train.epochs={job.epochs}",
        f"run.out_dir={run_root}",
        f"run.name={job.slug}",
        "run.progress=lines",
        *job.overrides,
    ]


def run_job(job: Job, run_root: Path) -> dict:
    """Run ``job`` to the end; its per-epoch metrics and how long the whole process took."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(job.threads),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(command(job, run_root), cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise RuntimeError(f"train.py job {job.slug} failed (exit code {done.returncode}):\n{tail}")
    lines = (run_root / job.slug / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line) for line in lines if line.strip()]
    return {"wall_s": wall, "loadavg": load, "epochs": epochs}


def images_per_s(epochs: list[dict]) -> float:
    """Median images/s over the epochs after the first (the only one if there is one)."""
    timed = epochs[1:] or epochs
    return statistics.median(e["images_per_s"] for e in timed)


def run(config: Config) -> Part:
    part = Part(
        NAME,
        TITLE,
        columns=[
            ("config", "config"),
            ("processes", "processes"),
            ("threads", "threads/process"),
            ("batch", "global batch"),
            ("epochs_timed", "epochs timed"),
            ("images_per_s", "img/s"),
            ("speedup", "×(1 process, 1 thread)"),
            ("wall_s", "wall s"),
            ("loadavg", "load avg"),
        ],
    )
    if config.device != "cpu":
        part.notes.append(f"train.py runs on its own device choice (train.device=auto), not --device {config.device}")
    with tempfile.TemporaryDirectory(prefix="visattn-bench-train-") as tmp:
        for job in jobs(config.quick):
            result = run_job(job, Path(tmp))
            run_config = (Path(tmp) / job.slug / "config.yaml").read_text()
            part.rows.append(
                {
                    "config": Path(job.config).stem + (" (quick: fake data)" if job.overrides else ""),
                    "processes": job.processes,
                    "threads": job.threads,
                    "batch": _global_batch(run_config),
                    "epochs_timed": max(1, len(result["epochs"]) - 1),
                    "images_per_s": images_per_s(result["epochs"]),
                    "wall_s": result["wall_s"],
                    "loadavg": result["loadavg"],
                    "epochs": result["epochs"],
                    "command": _shown(job),
                }
            )
            print(f"  [{NAME}] {job.slug}: {part.rows[-1]['images_per_s']:.0f} img/s", flush=True)
    add_speedups(part.rows)
    part.notes += [
        f"{r['config']}, {r['processes']} process(es) x {r['threads']} thread(s): {r['command']}" for r in part.rows
    ]
    part.notes += _scaling_notes(part.rows)
    if config.quick:
        part.notes.append("quick mode: one tiny 1-process job, torchrun not run")
    return part


def add_speedups(rows: list[dict]) -> None:
    """``speedup``: each row's images/s over its config's 1-process × 1-thread row (when there is one)."""
    single = {r["config"]: r["images_per_s"] for r in rows if r["processes"] == r["threads"] == 1}
    for row in rows:
        if row["config"] in single:
            row["speedup"] = row["images_per_s"] / single[row["config"]]


def _shown(job: Job) -> str:
    """``job``'s command as a user types it in the repository root."""
    words = [
        "python" if w == sys.executable else w.replace(str(REPO_ROOT) + os.sep, "") for w in command(job, Path("RUNS"))
    ]
    return " ".join([f"OMP_NUM_THREADS={job.threads}", *words])


def _global_batch(run_config: str) -> int:
    """``train.batch_size`` from a run folder's resolved ``config.yaml``."""
    return OmegaConf.create(run_config).train.batch_size


def _scaling_notes(rows: list[dict]) -> list[str]:
    """The speed-ups of the default config: more threads, more processes on the same cores."""
    by_shape = {(r["processes"], r["threads"]): r for r in rows if r["config"] == "default"}
    cores = os.cpu_count() or 1
    one, threaded = by_shape.get((1, 1)), by_shape.get((1, cores))
    split = by_shape.get((2, max(1, cores // 2)))
    if not (one and threaded and split) or cores == 1:
        return []
    return [
        f"default on {cores} cores: 1 process x {cores} threads ran {threaded['speedup']:.2f}x the images/s of "
        f"1 process x 1 thread; 2 processes x {split['threads']} thread(s) ran {split['speedup']:.2f}x, i.e. "
        f"{split['images_per_s'] / threaded['images_per_s']:.2f}x the 1-process job on the same cores",
        "why: intra-op threads meet at a barrier in every parallelized operator, which costs most for a "
        "tiny model (microseconds of work per operator) and when other programs hold some of the cores "
        "(each wait can last a scheduler time slice); processes meet once a step, in the gloo all-reduce "
        "of the gradients. Neither adds cores: where the cores are already busy, 2 processes cannot "
        "beat 1 thread by much",
    ]
