"""The default job's measurement file: what `python -m benchmarks.tune_default --json FILE` writes
for the docs, checked against the runs it was given and rendered by the docs' renderer."""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.tune_default import measurement_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "tools"))
import render  # noqa: E402  the docs' own renderer


def test_the_measurement_file_holds_every_run_and_renders_with_its_machine(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for kernels in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):  # as CI's second pass sets them
        monkeypatch.delenv(kernels, raising=False)
    runs = [
        {"acc1": 0.99, "wall_s": 20.0, "precision": "fp32"},
        {"acc1": 0.985, "wall_s": 24.0, "precision": "fp32"},
        {"acc1": 1.0, "wall_s": 22.0, "precision": "fp32"},
    ]
    machine = {"cpu": "a CPU", "isa": "AVX2", "cores": 2, "load": "load average 0.10, 0.20, 0.30 at the start"}
    data = measurement_file([0, 1, 2], {"default": runs}, "python -m benchmarks.tune_default --only default", machine)
    (row,) = data["rows"]
    assert [row[f"seed{s}"] for s in range(3)] == ["99.00 %", "98.50 %", "100.00 %"]
    assert row["mean"] == "99.17 ± 0.76 %" and row["min"] == "98.50 %" and row["wall"] == "22.0 (24.0)"
    assert data["samples"] == {"default": runs} and data["threads"] == 1
    assert data["command"] == "OMP_NUM_THREADS=1 python -m benchmarks.tune_default --only default"
    text = render.table(data["columns"], data["rows"]) + render.machine_line(data)
    assert "99.17 ± 0.76 %" in text and "a CPU (AVX2)" in text and "1 thread" in text
    assert data["machine"]["load"].startswith("load average 0.10, 0.20, 0.30 at the start, load average")
