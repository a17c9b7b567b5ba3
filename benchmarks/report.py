"""Print a results JSON of the suite as Markdown tables: ``python -m benchmarks.report FILE.json``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import markdown_table


def render(results: dict) -> str:
    """Each part's title, Markdown table and notes, in the order they ran."""
    machine = results["machine"]
    out = [
        f"Machine: {machine.get('cpu')} ({machine.get('cpu_count')} cores, "
        f"{machine.get('torch_threads')} torch threads), torch {machine.get('torch')}; "
        f"command: `{results.get('command', '')}`"
    ]
    for part in results["parts"].values():
        out += ["", f"**{part['title']}**", "", markdown_table(part["columns"], part["rows"])]
        out += [f"- {note}" for note in part["notes"]]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path, help="a bench-<device>.json written by python -m benchmarks")
    print(render(json.loads(parser.parse_args().results.read_text())))


if __name__ == "__main__":
    main()
