"""Run the benchmark suite: ``python -m benchmarks [--quick] [--only PART,...] [--device cuda]``.

Prints one table per part and writes ``<out>/bench-<device>[-quick].json`` (machine, settings,
every sample) and PNG plots next to it. ``--suite gpu`` is the GPU preset (``benchmarks/gpu.sh``
runs it; the docs' performance page renders its JSON); ``--dry-run`` prints what a run would do and stops.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

import torch

from visattn._io import atomic_write_text

from . import bf16, families, grad_checkpointing, peak, precision, record, selfattention2d, training, vit
from .common import DEFAULT_OUT, Config, machine_info, results_path

#: the parts in the order they run; a new part is a module with NAME, TITLE and run(config)
PARTS: dict[str, ModuleType] = {
    module.NAME: module
    for module in (selfattention2d, vit, peak, record, training, precision, grad_checkpointing, bf16, families)
}
#: settings a run takes unless the command line gives them; a suite overrides some
DEFAULTS = {"only": None, "grids": None, "models": None, "bf16": "auto", "max_memory_gb": 6.0, "repeats": None}
#: presets: what matters on a GPU — flash SDPA for SelfAttention2d at 64² to 256², ViT-S/B
#: inference and training in bf16 (and fp32), the achieved fraction of peak, recording cost.
#: The CPU-only parts (train.py processes and threads, shipped configs' precision) are left out.
SUITES = {
    "cpu": {},
    "gpu": {
        "only": ["selfattention2d", "bf16", "vit", "peak", "record"],
        "grids": [64, 96, 128, 192, 256],
        "models": ["vit_small_patch16_224", "vit_base_patch16_224"],
        "bf16": "on",
        "max_memory_gb": 40.0,
        "repeats": 10,
    },
}


def _csv(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        return [kind(item) for item in text.split(",") if item]

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", type=_csv(str), default=None, help=f"comma-separated parts to run (default: all of {','.join(PARTS)})"
    )
    parser.add_argument(
        "--suite",
        choices=sorted(SUITES),
        default="cpu",
        help="a preset of parts and sizes; gpu: parts selfattention2d,bf16,vit,peak,record at grids 64..256, "
        "ViT-S/B, bf16 on (options given on the command line win)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer sizes and repeats (grids up to 64x64, the 32x32 ViT only, one tiny train.py job)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per contender (default 5, quick 3, suite gpu 10)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per contender first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        default=None,
        help="skip (and estimate) cases expected to need more than this (default 6, suite gpu 40)",
    )
    parser.add_argument(
        "--bf16",
        choices=("auto", "on", "off"),
        default=None,
        help="bf16 autocast cases; auto = only where the hardware has native bf16",
    )
    parser.add_argument("--grids", type=_csv(int), default=None, help="part 1 grid sides, e.g. 16,32,64")
    parser.add_argument("--models", type=_csv(str), default=None, help=f"part 2 models (from {','.join(vit.MODELS)})")
    parser.add_argument(
        "--compile", action="store_true", help="parts vit and peak: also run both ViTs through torch.compile"
    )
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    parser.add_argument("--dry-run", action="store_true", help="print the parts and settings of the run; run nothing")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options the command line left out from the suite's preset, then the defaults."""
    preset = SUITES[args.suite]
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, default))
    return args


def config_from_args(args: argparse.Namespace, *, need_device: bool = True) -> Config:
    if need_device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            f"--device {args.device}: no CUDA device is available here (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); run on a machine with a GPU, or use --device cpu "
            "(--dry-run prints the plan without a GPU)"
        )
    unknown = [p for p in args.only or [] if p not in PARTS]
    if unknown:
        raise SystemExit(f"--only: unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    return Config(
        device=args.device,
        quick=args.quick,
        warmup=args.warmup,
        repeats=args.repeats or (3 if args.quick else 5),
        threads=args.threads,
        max_memory_gb=args.max_memory_gb,
        bf16=args.bf16,
        grids=args.grids,
        models=args.models,
        plots=args.plots,
        out=args.out,
        compile=args.compile,
    )


def plan(config: Config, only: Sequence[str] | None, command: str) -> str:
    """What a run of ``command`` would do: its parts and settings, and where it writes."""
    lines = [f"dry run of: {command}", "parts:"]
    lines += [f"  {name}: {PARTS[name].TITLE}" for name in only or PARTS]
    lines.append("settings:")
    lines += [f"  {key} = {value}" for key, value in vars(config).items()]
    lines.append(f"writes: {results_path(config)}")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        lines.append("note: no CUDA device here; the real run stops with an error")
    return "\n".join(lines)


def run_suite(config: Config, only: Sequence[str] | None = None, command: str = "") -> dict:
    """Run the chosen parts; print their tables; write and return the JSON document."""
    if config.threads:
        torch.set_num_threads(config.threads)
    info = machine_info(config.device)
    busy = info["loadavg_start"][0] > 0.5
    print(
        f"visattn benchmarks on {info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads)"
        f"{', ' + info.get('gpu', '') if config.device.startswith('cuda') else ''}; torch {info['torch']}; "
        f"load average {info['loadavg_start'][0]:.1f}{' (busy: timings are noisy)' if busy else ''}"
    )
    doc = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": info,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(config).items()},
        "parts": {},
    }
    for name in only or PARTS:
        module = PARTS[name]
        print(f"\n== {module.TITLE}", flush=True)
        start = time.perf_counter()
        part = module.run(config)
        doc["parts"][name] = {**part.to_json(), "seconds": time.perf_counter() - start}
        print(part.table())
        for note in part.notes:
            print(f"  * {note}")
        for plot in part.plots:
            print(f"  plot: {plot}")
    doc["machine"]["loadavg_end"] = list(os.getloadavg())
    config.out.mkdir(parents=True, exist_ok=True)
    path = results_path(config)
    atomic_write_text(path, json.dumps(doc, indent=1))
    print(f"\nresults: {path}")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = resolve(build_parser().parse_args(argv))
    command = " ".join(["python -m benchmarks", *argv])
    config = config_from_args(args, need_device=not args.dry_run)
    if args.dry_run:
        print(plan(config, args.only, command))
        return 0
    run_suite(config, args.only, command=command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
