"""Markdown for the docs pages that are generated at build time: measured tables and the command line.

A page asks for generated content with a marker line, which :func:`expand` replaces::

    <!-- render: measurement docs/data/default_job.json -->   a measured table (schema below)
    <!-- render: bench assets/bench/bench-cpu.json -->        every part of a `python -m benchmarks` run
    <!-- render: bench-or-missing assets/bench/bench-cuda.json -->  the same, or how to produce it
    <!-- render: evaluate-maps docs/data/pointing_game.json -->  `visattn evaluate-maps` results
    <!-- render: cli -->                                      `visattn --help` and every sub-command

A measurement file (``docs/data/*.json``) holds one table and where it was measured::

    {"title": ..., "command": "python -m ...", "machine": {"cpu": ..., "isa": ..., "cores": 2,
     "load": ...}, "threads": 2, "versions": {"torch": ...}, "columns": [[key, header], ...],
     "rows": [{key: value, ...}], "notes": [...]}

Every table is preceded by a line that names its command and machine. Paths are relative to the
repository root. Nothing here imports torch except the ``cli`` marker (it builds the parsers).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!-- render: (?P<kind>[\w-]+)(?: (?P<arg>\S+))? -->$", re.M)


def expand(markdown: str) -> str:
    """``markdown`` with every ``<!-- render: ... -->`` line replaced by what it asks for."""

    def replace(match: re.Match) -> str:
        kind, arg = match.group("kind"), match.group("arg")
        if kind not in RENDERERS:
            raise ValueError(f"unknown render marker {kind!r}; known: {', '.join(RENDERERS)}")
        return RENDERERS[kind](arg)

    return MARKER.sub(replace, markdown)


def load(path: str | Path) -> dict:
    return json.loads((ROOT / path).read_text())


# --- numbers and tables --------------------------------------------------------------------------


def fmt(value: object) -> str:
    """A table cell: floats to 3 significant digits (whole numbers from 100 on), ``–`` for missing."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    return str(value).replace("|", "\\|")


def table(columns: Sequence[Sequence[str]], rows: Sequence[dict]) -> str:
    """A Markdown table of ``rows`` (dicts) under ``columns`` (key, header); empty columns are dropped."""
    used = [(key, header) for key, header in columns if any(row.get(key) is not None for row in rows)]
    lines = ["| " + " | ".join(header for _, header in used) + " |", "|" + "---|" * len(used)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(key)) for key, _ in used) + " |")
    return "\n".join(lines)


def machine_line(data: dict) -> str:
    """``**Command:** ... **Machine:** ...`` for a measurement file."""
    machine = data["machine"]
    cpu = machine["cpu"] + (f" ({machine['isa']})" if machine.get("isa") else "")
    parts = [machine.get("gpu"), cpu, f"{machine['cores']} cores" if machine.get("cores") else None]
    if data.get("threads") is not None:
        threads = data["threads"]
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}" if isinstance(threads, int) else threads)
    parts += [machine.get("memory"), machine.get("load")]
    versions = ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items())
    commands = data["command"] if isinstance(data["command"], list) else [data["command"]]
    return (
        f"**Command:** {' ; '.join(f'`{c}`' for c in commands)}  \n"
        f"**Machine:** {', '.join(p for p in parts if p)}" + (f"  \n**Software:** {versions}" if versions else "")
    )


# --- renderers --------------------------------------------------------------------------------------


def measurement(arg: str) -> str:
    """One measurement file: its title, command and machine, the table, the notes, the data link."""
    data = load(arg)
    out = [f"**{data['title']}**", "", machine_line(data), "", table(data["columns"], data["rows"])]
    if data.get("notes"):
        out += [""] + [f"- {note}" for note in data["notes"]]
    out += ["", f"Data: `{arg}`."]
    return "\n".join(out)


def _bench_machine(results: dict) -> str:
    m = results["machine"]
    isa = f"ATen CPU capability {m['cpu_capability']}" if m.get("cpu_capability") else None
    bf16 = None if "mkldnn_bf16" not in m else f"native bf16 {'yes' if m['mkldnn_bf16'] else 'no'}"
    gpu = m.get("gpu")
    load_avg = m.get("loadavg_start")
    parts = [
        m.get("cpu"),
        gpu,
        f"{m['cpu_count']} cores" if m.get("cpu_count") else None,
        f"{m['torch_threads']} torch threads" if m.get("torch_threads") else None,
        isa,
        bf16,
        f"load average {load_avg[0]:.2f} at the start" if load_avg else None,
    ]
    versions = ", ".join(f"{k} {m[k]}" for k in ("torch", "timm", "python") if m.get(k))
    settings = results.get("settings", {})
    how = ", ".join(f"{k} {settings[k]}" for k in ("warmup", "repeats") if k in settings)
    return (
        f"**Command:** `{results.get('command', '')}` (measured {results.get('created', '?')[:10]})  \n"
        f"**Machine:** {', '.join(p for p in parts if p)}  \n"
        f"**Software:** {versions}" + (f"; {how} (median of the repeats)" if how else "")
    )


def bench(arg: str) -> str:
    """Every part of a ``python -m benchmarks`` results file, each with its command and machine."""
    results = load(arg)
    out = []
    for part in results["parts"].values():
        out += [f"**{part['title']}**", "", _bench_machine(results), "", table(part["columns"], part["rows"])]
        out += [""] + [f"- {note}" for note in part.get("notes", [])] + [""]
    out.append(f"Data: `{arg}` (every sample); `python -m benchmarks.report {arg}` prints these tables.")
    return "\n".join(out)


def bench_or_missing(arg: str) -> str:
    if (ROOT / arg).is_file():
        return bench(arg)
    return (
        f"No figures: `{arg}` does not exist. `bash benchmarks/gpu.sh` on a machine with a CUDA GPU "
        "writes it, and the next `mkdocs build` renders it here."
    )


def _interval(cell: dict | None, percent: bool = False) -> str | None:
    if cell is None:
        return None
    if cell["low"] == cell["high"] == cell["mean"]:
        return fmt(round(cell["mean"], 2))
    if percent:
        return f"{cell['mean'] * 100:.1f} % [{cell['low'] * 100:.1f}, {cell['high'] * 100:.1f}]"
    return f"{cell['mean']:.3f} [{cell['low']:.3f}, {cell['high']:.3f}]"


def evaluate_maps(arg: str) -> str:
    """The ``visattn evaluate-maps`` results of several checkpoints, with their command and machine."""
    meta = load(arg)
    rows, cascade = [], []
    for run in meta["runs"]:
        result = load(run["file"])
        model = f"{run['model']} ({result['accuracy'] * 100:.2f} %)"
        for i, (method, cells) in enumerate(result["rows"].items()):
            rows.append(
                {
                    "model": model if i == 0 else "",
                    "map": f"`{method}`" if method not in result["baselines"] else f"{method} (baseline)",
                    "pointing": _interval(cells.get("pointing"), percent=True),
                    "deletion": _interval(cells.get("deletion")),
                    "insertion": _interval(cells.get("insertion")),
                    "rho_last": _interval(cells.get("randomization")),
                    "rho_all": _interval(cells.get("randomization_all")),
                }
            )
        for i, (method, steps) in enumerate(result["randomization"].items()):
            if method in result["baselines"]:
                continue
            row = {"model": run["model"] if i == 0 else "", "map": f"`{method}`"}
            row |= {f"s{k}": round(v, 2) for k, v in enumerate(steps["mean_rho"])}
            cascade.append(row)
        step_names = steps["steps"]
    columns = [
        ("model", "model"),
        ("map", "map"),
        ("pointing", "pointing ↑"),
        ("deletion", "deletion AUC ↓"),
        ("insertion", "insertion AUC ↑"),
        ("rho_last", "ρ last block ↓"),
        ("rho_all", "ρ all ↓"),
    ]
    steps_columns = [("model", "model"), ("map", "map")] + [(f"s{k}", f"+ {s}") for k, s in enumerate(step_names)]
    return "\n".join(
        [
            f"**{meta['title']}**",
            "",
            machine_line(meta),
            "",
            table(columns, rows),
            "",
            "Mean ρ after each step of the randomization test (`+ X` adds X to what is re-initialized):",
            "",
            machine_line(meta),
            "",
            table(steps_columns, cascade),
            "",
            *[f"- {note}" for note in meta.get("notes", [])],
            "",
            "Data: " + ", ".join(f"`{run['file']}`" for run in meta["runs"]) + f"; `{arg}`.",
        ]
    )


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            return {name: (helps.get(name, ""), sub) for name, sub in action.choices.items()}
    return {}


def cli(arg: str | None = None) -> str:
    """``visattn --help`` and each sub-command's ``--help``, from the parsers themselves."""
    os.environ["COLUMNS"] = "100"
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.__main__ import build_parser as bench_parser
    from visattn.cli import build_parser

    parser = build_parser()
    out = ["## `visattn`", "", "```text", parser.format_help().rstrip(), "```"]
    for name, (summary, sub) in _subparsers(parser).items():
        out += ["", f"## `visattn {name}`", "", f"{summary[0].upper()}{summary[1:]}." if summary else "", ""]
        if name == "bench":
            sub = bench_parser()
            sub.prog = "visattn bench"
            out += ["The same as `python -m benchmarks` (run from a source checkout).", ""]
        if name == "train":
            out += ["`python train.py ARGS` is `visattn train ARGS`.", ""]
        out += ["```text", sub.format_help().rstrip(), "```"]
    return "\n".join(out)


RENDERERS = {
    "measurement": measurement,
    "bench": bench,
    "bench-or-missing": bench_or_missing,
    "evaluate-maps": evaluate_maps,
    "cli": cli,
}
