"""The GPU suite's CPU-side logic: the preset, the dry run, the clear error without CUDA, the
report step, and the docs' performance page that renders the suite's JSON. Nothing here needs (or
uses) a GPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import report
from benchmarks.__main__ import SUITES, main

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(SystemExit, match="no CUDA device is available here"):
        main(["--device", "cuda", "--only", "vit"])


def test_gpu_suite_dry_run_prints_the_preset_and_runs_nothing(capsys, tmp_path: Path) -> None:
    assert main(["--suite", "gpu", "--device", "cuda", "--dry-run", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for part in SUITES["gpu"]["only"]:
        assert f"\n  {part}: Part" in text
    assert "grids = [64, 96, 128, 192, 256]" in text and "bf16 = on" in text
    assert "models = ['vit_small_patch16_224', 'vit_base_patch16_224']" in text
    assert f"writes: {tmp_path / 'bench-cuda.json'}" in text
    assert not list(tmp_path.iterdir())  # nothing was written


def test_command_line_options_win_over_the_suite(capsys) -> None:
    main(["--suite", "gpu", "--device", "cpu", "--grids", "32", "--bf16", "off", "--compile", "--dry-run"])
    text = capsys.readouterr().out
    assert "grids = [32]" in text and "bf16 = off" in text and "compile = True" in text
    assert "max_memory_gb = 40.0" in text  # from the preset


def test_gpu_script_dry_run() -> None:
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "--suite gpu --device cuda" in done.stdout and "renders on docs/performance.md" in done.stdout


def _results() -> dict:
    columns = [["model", "model"], ["ratio", "visattn/timm"]]
    part = {"title": "Part 2: ViTs", "columns": columns, "rows": [{"model": "vit_b", "ratio": 1.02}], "notes": ["n"]}
    machine = {"cpu": "x", "cpu_count": 16, "torch_threads": 16, "torch": "2.14", "gpu": "NVIDIA H100"}
    return {"created": "now", "command": "python -m benchmarks --suite gpu", "machine": machine, "parts": {"vit": part}}


def test_report_writes_the_tables_between_the_markers(tmp_path: Path) -> None:
    results = tmp_path / "bench-cuda.json"
    results.write_text(json.dumps(_results()))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:gpu:start -->\nnot measured\n<!-- bench:gpu:end -->\nafter\n")
    report.main([str(results), "--readme", str(readme), "--section", "gpu"])
    text = readme.read_text()
    assert "not measured" not in text and text.startswith("intro\n") and text.endswith("\nafter\n")
    assert "| vit_b | 1.02 |" in text and "NVIDIA H100" in text
    report.main([str(results), "--readme", str(readme)])  # again: the section is replaced, not appended
    assert readme.read_text() == text


def test_report_refuses_a_readme_without_its_markers(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="bench:gpu:start"):
        report.replace_section("no markers here", "gpu", "tables")


def test_the_performance_page_renders_the_gpu_results(tmp_path: Path) -> None:
    """docs/performance.md renders assets/bench/bench-cuda.json when it exists, and says how to make it."""
    page = (REPO / "docs" / "performance.md").read_text()
    assert "<!-- render: bench-or-missing assets/bench/bench-cuda.json -->" in page
    render = _docs_render()
    results = tmp_path / "bench-cuda.json"
    results.write_text(json.dumps(_results()))
    text = render.bench_or_missing(str(results))
    assert "| vit_b | 1.02 |" in text and "NVIDIA H100" in text and "python -m benchmarks --suite gpu" in text
    assert "bash benchmarks/gpu.sh" in render.bench_or_missing(str(tmp_path / "missing.json"))


def _docs_render():
    spec = importlib.util.spec_from_file_location("docs_render", REPO / "docs" / "tools" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
