"""Print a results JSON of the suite as Markdown tables: ``python -m benchmarks.report FILE.json``.

``--readme FILE.md --section gpu`` writes them into a Markdown file instead, between the lines
``<!-- bench:gpu:start -->`` and ``<!-- bench:gpu:end -->``. The docs site renders the JSON files
of ``assets/bench/`` itself (``docs/performance.md``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from visattn._io import atomic_write_text

from .common import markdown_table


def render(results: dict) -> str:
    """Each part's title, Markdown table and notes, in the order they ran."""
    machine = results["machine"]
    device = f", {machine['gpu']}" if machine.get("gpu") else ""
    out = [
        f"Machine: {machine.get('cpu')} ({machine.get('cpu_count')} cores, "
        f"{machine.get('torch_threads')} torch threads){device}, torch {machine.get('torch')}; "
        f"measured {results.get('created', '?')}; command: `{results.get('command', '')}`"
    ]
    for part in results["parts"].values():
        out += ["", f"**{part['title']}**", "", markdown_table(part["columns"], part["rows"])]
        out += [f"- {note}" for note in part["notes"]]
    return "\n".join(out)


def replace_section(text: str, section: str, body: str) -> str:
    """``text`` with the lines between the section's start and end markers replaced by ``body``."""
    start, end = f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"the README needs exactly one {start} line and, after it, one {end} line")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a bench-<device>.json written by python -m benchmarks")
    parser.add_argument("--readme", type=Path, default=None, help="write the tables into this file's section")
    parser.add_argument("--section", default="gpu", help="the README section's marker name (default gpu)")
    args = parser.parse_args(argv)
    tables = render(json.loads(args.results.read_text()))
    if args.readme is None:
        print(tables)
        return
    atomic_write_text(args.readme, replace_section(args.readme.read_text(), args.section, tables))
    print(f"wrote the tables of {args.results} into {args.readme} (section {args.section})")


if __name__ == "__main__":
    main()
