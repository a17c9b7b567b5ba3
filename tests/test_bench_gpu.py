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

import benchmarks.__main__ as bench_main
from benchmarks import report
from benchmarks.__main__ import PARTS, SUITES, main
from benchmarks.common import results_path

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(SystemExit, match="no CUDA device is available here"):
        main(["--device", "cuda", "--only", "vit"])


def _planned_and_run(monkeypatch, capsys, argv: list[str]) -> tuple[str, object, list[str]]:
    """The dry run's text for ``argv``, and the settings and parts the same command line hands to
    the suite when it really runs (the suite itself replaced: nothing is measured)."""
    assert main([*argv, "--dry-run"]) == 0
    text = capsys.readouterr().out
    handed = []
    monkeypatch.setattr(bench_main, "run_suite", lambda config, only, command="": handed.append((config, only)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the real run checks for a GPU first
    assert main(argv) == 0
    ((config, only),) = handed
    return text, config, only


def test_gpu_suite_dry_run_prints_what_the_run_would_do_and_runs_nothing(capsys, monkeypatch, tmp_path: Path) -> None:
    text, config, only = _planned_and_run(
        monkeypatch, capsys, ["--suite", "gpu", "--device", "cuda", "--out", str(tmp_path)]
    )
    assert only == SUITES["gpu"]["only"]  # the suite's preset
    for key in ("grids", "models", "bf16", "max_memory_gb", "repeats"):
        assert getattr(config, key) == SUITES["gpu"][key], key
    for part in only:
        assert f"\n  {part}: {PARTS[part].TITLE}\n" in text
    for key, value in vars(config).items():
        assert f"\n  {key} = {value}\n" in text, key
    assert str(results_path(config)) in text and results_path(config).parent == tmp_path
    assert not list(tmp_path.iterdir())  # nothing was written


def test_command_line_options_win_over_the_suite(capsys, monkeypatch) -> None:
    argv = ["--suite", "gpu", "--device", "cpu", "--grids", "32", "--bf16", "off", "--compile"]
    text, config, _ = _planned_and_run(monkeypatch, capsys, argv)
    assert config.grids == [32] and config.bf16 == "off" and config.compile is True
    assert config.max_memory_gb == SUITES["gpu"]["max_memory_gb"]  # what the command line left out: the preset's
    for key, value in vars(config).items():
        assert f"\n  {key} = {value}\n" in text, key


@pytest.mark.slow
def test_gpu_script_dry_run_is_the_gpu_suites_with_the_options_passed_on(capsys, tmp_path: Path) -> None:
    """``bash benchmarks/gpu.sh --dry-run`` plans what ``python -m benchmarks --suite gpu --device
    cuda`` plans with the same options and ``OUT`` as its results folder, then stops: nothing written."""
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--compile", "--dry-run"],
        capture_output=True,
        text=True,
        env={
            "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
            "PYTHONPATH": str(REPO),
            "OUT": str(tmp_path),
        },
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert main(["--suite", "gpu", "--device", "cuda", "--out", str(tmp_path), "--compile", "--dry-run"]) == 0
    assert done.stdout.startswith(capsys.readouterr().out)
    assert not list(tmp_path.iterdir())


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
