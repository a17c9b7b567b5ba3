"""Run the benchmark suite: ``python -m benchmarks [--quick] [--only PART,...] [--device cuda]``.

Prints one table per part and writes ``<out>/bench-<device>[-quick].json`` (machine, settings,
every sample) and PNG plots next to it.
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

from . import grad_checkpointing, peak, precision, record, selfattention2d, training, vit
from .common import DEFAULT_OUT, Config, machine_info

#: the parts in the order they run; a new part is a module with NAME, TITLE and run(config)
PARTS: dict[str, ModuleType] = {
    module.NAME: module for module in (selfattention2d, vit, peak, record, training, precision, grad_checkpointing)
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
        "--quick",
        action="store_true",
        help="fewer sizes and repeats (grids up to 64x64, the 32x32 ViT only, one tiny train.py job)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per contender (default 5, quick 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per contender first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        default=6.0,
        help="skip (and estimate) cases expected to need more than this (default 6)",
    )
    parser.add_argument(
        "--bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help="bf16 autocast cases; auto = only where the hardware has native bf16",
    )
    parser.add_argument("--grids", type=_csv(int), default=None, help="part 1 grid sides, e.g. 16,32,64")
    parser.add_argument("--models", type=_csv(str), default=None, help=f"part 2 models (from {','.join(vit.MODELS)})")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here; use --device cpu")
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
    )


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
    path = config.out / f"bench-{config.device.split(':')[0]}{'-quick' if config.quick else ''}.json"
    path.write_text(json.dumps(doc, indent=1))
    print(f"\nresults: {path}")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    run_suite(config_from_args(args), args.only, command=" ".join(["python -m benchmarks", *argv]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
