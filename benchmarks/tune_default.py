"""The default job's tuning table: `python train.py` with a few recipes, several seeds each.

Every run is a fresh process (wall time from process start, as a user sees it); the table gives
the held-out accuracy per seed, the mean and the spread, and the wall time per run:

    python -m benchmarks.tune_default                         # the candidates below, seeds 0-2
    python -m benchmarks.tune_default --only default --seeds 0 1 2 3 4
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.tune_default --only default

``--json FILE`` also writes the table as a measurement file for the docs (`docs/tools/render.py`'s
schema: command, machine with its CPU model and vector extensions, threads, versions, rows) with
every run's accuracy, wall time and precision under ``samples``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

from visattn._io import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent

#: name → overrides on the default config (``default`` is the shipped recipe as it is); a few
#: recipes of the tuning that chose the default, to re-measure them in fresh processes
CANDIDATES: dict[str, list[str]] = {
    "default": [],
    "the previous default (linear patches, 2 blocks, 60 epochs, lr 3e-3)": [
        "model.stem=patch",
        "model.depth=2",
        "train.epochs=60",
        "train.lr=3e-3",
    ],
    "conv stem, 2 blocks, 60 epochs, lr 3e-3 (over budget)": ["model.depth=2", "train.epochs=60", "train.lr=3e-3"],
    "default, 50 epochs": ["train.epochs=50"],
    "default, lr 3e-3, weight decay 0.1": ["train.lr=3e-3", "train.weight_decay=0.1"],
    "default without the weight average (EMA)": ["train.ema_decay=0"],
    "default, weight decay 0.1, no EMA": ["train.weight_decay=0.1", "train.ema_decay=0"],
    "default, EMA 0.99": ["train.ema_decay=0.99"],
}


def run_once(overrides: list[str], seed: int, out_dir: str) -> dict:
    """One ``python train.py`` in a fresh process: ``{"acc1", "wall_s", "precision"}`` (the held-out
    accuracy of the final epoch: of the EMA weights when the run keeps an EMA)."""
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *overrides,
        f"train.seed={seed}",
        f"run.out_dir={out_dir}",
        f"run.name=seed{seed}",
        "run.progress=lines",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    rows = [json.loads(line) for line in (Path(out_dir) / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
    precision = next(
        line.split(":")[0].split()[-1] for line in done.stdout.splitlines() if line.startswith("precision")
    )
    accuracy = rows[-1].get("ema_test_acc1", rows[-1]["test_acc1"])  # with EMA, its weights are the result
    return {"acc1": accuracy, "wall_s": wall, "precision": precision}


def select(keys: list[str]) -> dict[str, list[str]]:
    """The candidates named by ``keys``: the one of that exact name, else every one starting with it."""
    chosen: dict[str, list[str]] = {}
    for key in keys:
        names = [key] if key in CANDIDATES else [n for n in CANDIDATES if n.startswith(key)]
        if not names:
            raise SystemExit(f"tune_default: no candidate {key!r}; candidates: {', '.join(map(repr, CANDIDATES))}")
        chosen.update((n, CANDIDATES[n]) for n in names)
    return chosen


#: the CPU flags a measurement names: what decides which kernels run
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
#: the environment variables that change which kernels and how many threads the runs use
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")


def machine() -> dict:
    """The CPU model, its vector extensions among `VECTOR_FLAGS`, the cores and the load now."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    lines = cpuinfo.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    isa = ", ".join(flag.upper() for flag in VECTOR_FLAGS if flag in flags) or "no AVX2"
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return {"cpu": model, "isa": isa, "cores": os.cpu_count(), "load": f"load average {load} at the start"}


def measurement_file(seeds: list[int], results: dict[str, list[dict]], command: str, started_on: dict) -> dict:
    """The runs of every candidate as one measurement file for the docs; ``started_on``: `machine()`
    before the first run."""
    env = " ".join(f"{k}={os.environ[k]}" for k in KERNEL_ENV if k in os.environ)
    columns = [["recipe", "recipe"], *[[f"seed{s}", f"seed {s}"] for s in seeds]]
    columns += [["mean", "mean ± sd"], ["min", "min"], ["wall", "wall s, mean (max)"], ["precision", "precision"]]
    rows = []
    for name, runs in results.items():
        accs, walls = [100 * r["acc1"] for r in runs], [r["wall_s"] for r in runs]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        row = {"recipe": name, **{f"seed{s}": f"{a:.2f} %" for s, a in zip(seeds, accs, strict=True)}}
        row.update(mean=f"{statistics.mean(accs):.2f} ± {spread:.2f} %", min=f"{min(accs):.2f} %")
        row.update(wall=f"{statistics.mean(walls):.1f} ({max(walls):.1f})", precision=runs[0]["precision"])
        rows.append(row)
    return {
        "title": f"The default job over seeds {', '.join(map(str, seeds))}" + (f" ({env})" if env else ""),
        "command": f"{env} {command}".strip(),
        "machine": {**started_on, "load": f"{started_on['load']}, {machine()['load'].split(' at ')[0]} at the end"},
        "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
        "columns": columns,
        "rows": rows,
        "notes": [
            "Each seed is a fresh `python train.py train.seed=S` process; wall time from process start to exit "
            "(the explorer page at the end included); accuracy is the held-out top-1 of the final epoch."
        ],
        "samples": results,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", help="candidate names (a name, or the start of names)")
    parser.add_argument("--json", type=Path, help="also write the table as a docs measurement file")
    args = parser.parse_args(argv)
    results: dict[str, list[dict]] = {}
    started_on = machine()
    chosen = select(args.only) if args.only else CANDIDATES
    print(
        "| recipe | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean ± sd | min | wall s (max) | precision |"
    )
    print("|---|" + "---|" * (len(args.seeds) + 4))
    for name, overrides in chosen.items():
        with tempfile.TemporaryDirectory() as out_dir:
            runs = [run_once(overrides, seed, out_dir) for seed in args.seeds]
        results[name] = runs
        accs = [100 * r["acc1"] for r in runs]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        walls = [r["wall_s"] for r in runs]
        print(
            f"| {name} | "
            + " | ".join(f"{a:.2f}" for a in accs)
            + f" | {statistics.mean(accs):.2f} ± {spread:.2f} | {min(accs):.2f} | "
            + f"{statistics.mean(walls):.1f} ({max(walls):.1f}) | {runs[0]['precision']} |",
            flush=True,
        )
    if args.json is not None:
        command = "python -m benchmarks.tune_default " + " ".join(argv if argv is not None else sys.argv[1:])
        atomic_write_json(args.json, measurement_file(args.seeds, results, command, started_on))


if __name__ == "__main__":
    main()
