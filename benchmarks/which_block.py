"""Which attention block should a user pick? ``configs/digits_canvas_resnet_attn.yaml`` with each
``model.attention.block``: held-out accuracy over seeds, seconds per epoch, and the pointing game
of the ``received`` maps (``visattn evaluate-maps``: does the cell that receives the most attention
lie on the real digit of the canvas?).

The block sits after ``layer2`` of torchvision's ResNet-18, an 8×8 grid of 128 channels, so the
local families get windows smaller than the grid (window 4 shifted 2, neighborhood 3, halo blocks
of 4 with a halo of 1): each cell attends 16, 9 and 36 of the 64 cells where global attention
attends all of them::

    python -m benchmarks.which_block                      # seeds 0 1 2, all blocks
    python -m benchmarks.which_block --seeds 0 --only window --json docs/data/which_block.json
    python -m benchmarks.which_block --jobs 2             # two runs at a time (a GPU, many cores)

Every run is a fresh ``python train.py`` process (on CUDA when there is a GPU); the accuracy is
the final epoch's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import timm
import torch

from visattn._io import atomic_write_json

from .tune_default import ROOT, machine

CONFIG = "configs/digits_canvas_resnet_attn.yaml"
#: each block and the options it gets on the 8×8 grid after layer2
BLOCKS: dict[str, list[str]] = {
    "global": ["model.attention.block=global"],
    "window 4, shift 2": [
        "model.attention.block=window",
        "model.attention.window_size=4",
        "model.attention.shift=2",
    ],
    "neighborhood 3": ["model.attention.block=neighborhood", "model.attention.kernel_size=3"],
    "halo 4/1": ["model.attention.block=halo", "model.attention.block_size=4", "model.attention.halo_size=1"],
}


def run_once(overrides: list[str], seed: int, out_dir: Path) -> dict:
    """One training run and the pointing game of its maps: accuracy, seconds per epoch, pointing."""
    run_dir = out_dir / f"seed{seed}"
    train = [sys.executable, str(ROOT / "train.py"), "--config", CONFIG, *overrides, f"train.seed={seed}"]
    train += [f"run.out_dir={out_dir}", f"run.name=seed{seed}", "run.progress=lines", "run.explorer=false"]
    done = subprocess.run(train, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(train)} failed:\n{done.stdout}\n{done.stderr}")
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluate = [sys.executable, "-m", "visattn", "evaluate-maps", "--checkpoint", str(run_dir / "last.pt")]
    evaluate += ["--methods", "received", "--metrics", "pointing", "--out", str(run_dir / "maps")]
    done = subprocess.run(evaluate, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(evaluate)} failed:\n{done.stdout}\n{done.stderr}")
    scores = json.loads((run_dir / "maps.json").read_text())
    return {
        "acc1": epochs[-1]["test_acc1"],
        "epoch_s": epochs[-1]["time"] / len(epochs),  # `time` counts from the start of training
        "pointing": _pointing(scores),
    }


def _pointing(scores: dict) -> float:
    """The pointing-game hit rate of the received maps in an evaluate-maps JSON."""
    return float(scores["rows"]["received"]["pointing"]["mean"])


def where() -> dict:
    """The machine: the CPU (and its load) of `tune_default.machine`, and the GPU the runs use, if any."""
    info = machine()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(results: dict[str, list[dict]], seeds: list[int], command: str, started_on: dict, jobs: int = 1) -> dict:
    """The measurement file for the docs (`docs/tools/render.py`'s schema)."""
    rows = []
    for name, runs in results.items():
        accs = [100 * r["acc1"] for r in runs]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append(
            {
                "block": name,
                "accuracy": f"{statistics.mean(accs):.2f} ± {spread:.2f} %",
                "seeds": ", ".join(f"{a:.2f}" for a in accs),
                "epoch": f"{statistics.mean(r['epoch_s'] for r in runs):.2f}",
                "pointing": f"{100 * statistics.mean(r['pointing'] for r in runs):.1f} %",
            }
        )
    return {
        "title": f"Which block? digits_canvas_resnet_attn with each model.attention.block, seeds {seeds}",
        "command": command,
        "machine": {**started_on, "load": f"{started_on['load']}, {machine()['load'].split(' at ')[0]} at the end"},
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
        "columns": [
            ["block", "block (after layer2, 8×8 grid)"],
            ["accuracy", "held-out accuracy, mean ± sd"],
            ["seeds", "per seed"],
            ["epoch", "s / epoch"],
            ["pointing", "pointing game (received)"],
        ],
        "rows": rows,
        "notes": [
            "Each run is a fresh `python train.py configs/digits_canvas_resnet_attn.yaml model.attention.block=...`; "
            "accuracy of the final epoch; pointing game of `visattn evaluate-maps --methods received` on its last.pt.",
            f"{jobs} training run(s) at a time.",
        ],
        "samples": results,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", help="blocks to run (the start of their names)")
    parser.add_argument("--json", type=Path, help="also write the table as a docs measurement file")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at a time (default 1)")
    args = parser.parse_args(argv)
    chosen = {n: o for n, o in BLOCKS.items() if not args.only or any(n.startswith(k) for k in args.only)}
    started_on = where()
    print("| block | accuracy | per seed | s / epoch | pointing game |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out_dir, ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            name: [pool.submit(run_once, overrides, seed, Path(out_dir) / name.split()[0]) for seed in args.seeds]
            for name, overrides in chosen.items()
        }
        results = {name: [future.result() for future in runs] for name, runs in futures.items()}
    for name in results:
        row = table({name: results[name]}, args.seeds, "", started_on)["rows"][0]
        print(f"| {name} | {row['accuracy']} | {row['seeds']} | {row['epoch']} | {row['pointing']} |", flush=True)
    if args.json is not None:
        command = "python -m benchmarks.which_block " + " ".join(argv if argv is not None else sys.argv[1:])
        atomic_write_json(args.json, table(results, args.seeds, command, started_on, args.jobs))


if __name__ == "__main__":
    main()
