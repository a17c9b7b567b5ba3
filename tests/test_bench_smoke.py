"""The benchmark suite: it runs, writes valid JSON and plots, compares like with like, and its
peak-memory probe measures what is allocated. No timing is asserted."""

from __future__ import annotations

import json
import math
import mmap
import os
from pathlib import Path

import pytest
import torch

from benchmarks import bf16, families, precision, record, selfattention2d, training, vit
from benchmarks.__main__ import PARTS, main
from benchmarks.common import PeakMemory, peak_memory_supported
from visattn._utils import cpu_has_native_bf16
from visattn.layers.functional import attention_matrix_bytes
from visattn.profiling import CHUNKED_KERNELS
from visattn.train.precision import BF16_MIN_FLOPS

MB = 2**20


@pytest.mark.slow
def test_quick_suite_runs_and_writes_valid_json(tmp_path: Path) -> None:
    assert (
        main(
            [
                "--quick",
                "--grids",
                "8",
                "--models",
                "vit_tiny_patch4_32",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--threads",
                "1",
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    doc = json.loads((tmp_path / "bench-cpu-quick.json").read_text())
    assert set(doc["parts"]) == set(PARTS) and doc["machine"]["torch"] == torch.__version__

    part1 = doc["parts"]["selfattention2d"]
    assert part1["extra"]["max_abs_difference_between_contenders"] < 1e-4  # the same function
    assert part1["extra"]["visattn_attention_kernels"] == ["aten::_scaled_dot_product_flash_attention_for_cpu"]
    assert {r["contender"] for r in part1["rows"]} == set(selfattention2d.CONTENDERS)
    for row in part1["rows"]:
        assert row["grid"] == "8x8" and row["forward_ms"] > 0 and row["forward_backward_ms"] > 0
        if peak_memory_supported("cpu"):
            assert isinstance(row["forward_backward_peak_bytes"], int)

    families_part = doc["parts"]["families"]
    assert {r["contender"] for r in families_part["rows"]} == set(families.CONTENDERS)
    for row in families_part["rows"]:
        assert row["grid"] == 8 and row["forward_backward_ms"] > 0 and row["forward_backward_gflop"] > 0
        assert math.isclose(
            row["time_vs_global"] * families_part["rows"][0]["forward_backward_ms"], row["forward_backward_ms"]
        )

    part2 = doc["parts"]["vit"]
    timed = [r for r in part2["rows"] if r.get("ratio") is not None]
    assert {r["mode"] for r in timed} == set(vit.MODES)
    assert part2["extra"]["max_abs_logit_difference"] < 1e-4
    for row in timed:
        assert row["compiled"] == "eager"
        assert math.isclose(row["ratio"], row["visattn_img_s"] / row["timm_img_s"])

    part3 = doc["parts"]["peak"]
    assert part3["extra"]["matmul_peak"]["float32"]["gflops"] > 0
    vit_rows = [r for r in part3["rows"] if r["workload"].startswith("vit_")]
    for workload in {r["workload"] for r in vit_rows}:
        flops = {r["contender"]: r["gflop"] for r in vit_rows if r["workload"] == workload}
        assert flops["visattn"] == flops["timm"] > 0  # identical hyper-parameters, identical work
    for plot in part1["plots"] + part3["plots"]:
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    _check_record_part(doc["parts"]["record"])
    _check_train_part(doc["parts"]["train"])
    _check_precision_part(doc["parts"]["precision"])
    _check_grad_checkpointing_part(doc["parts"]["grad_checkpointing"])
    _check_bf16_part(doc["parts"]["bf16"])


def _check_bf16_part(part: dict) -> None:
    """Part 8 ran every contender with the kernels it names, or said why bf16 was skipped."""
    if not part["rows"]:
        assert part["notes"][0].startswith("skipped: no native bf16")
        return
    block = {r["contender"]: r for r in part["rows"] if r["workload"] == "SelfAttention2d 8x8"}
    assert set(block) == set(bf16.BLOCK_CONTENDERS)
    assert block["visattn bf16 chunked"]["kernels"] == ", ".join(sorted(CHUNKED_KERNELS))
    assert block["visattn bf16 fused"]["kernels"] == "aten::_scaled_dot_product_flash_attention_for_cpu"
    for row in block.values():
        fp32, timm = block["visattn fp32"]["forward_backward_ms"], block["timm bf16"]["forward_backward_ms"]
        assert math.isclose(row["vs_fp32"], row["forward_backward_ms"] / fp32)
        assert math.isclose(row["vs_timm"], row["forward_backward_ms"] / timm)
    alone = [r for r in part["rows"] if r["workload"].startswith("attention ")]
    assert {r["contender"] for r in alone} == {"fused fp32", "fused bf16", "chunked bf16"}


def _check_record_part(part: dict) -> None:
    """Part 4 recorded what it says, the plain forwards ran the fused kernel, the bytes add up."""
    vit_label, grid_label = (w.label for w in record.workloads(quick=True)[:2])
    kernels, recorded = part["extra"]["kernels"], part["extra"]["recorded"]
    assert (
        kernels[vit_label]["plain"]
        == kernels[grid_label]["plain"]
        == ["aten::_scaled_dot_product_flash_attention_for_cpu"]
    )
    assert (
        kernels[grid_label]["few queries"] == kernels[grid_label]["plain"]
    )  # the output still comes from the fused kernel
    assert kernels[vit_label]["all"] == kernels[grid_label]["all"] == []  # explicit weights, not the kernel
    assert recorded[vit_label]["all"]["layers"] == 12  # vit_tiny: 12 blocks, 3 heads, 1 + 14² tokens
    assert recorded[vit_label]["all"]["shapes"] == [[1, 3, 197, 197]]
    cells = 32 * 32
    assert recorded[grid_label]["few queries"]["shapes"] == [[1, 1, record.NUM_POINTS, cells]]
    assert recorded[grid_label]["all"]["shapes"] == [[1, 1, cells, cells]]
    rows = {(r["workload"], r["contender"]): r for r in part["rows"]}
    assert rows[(grid_label, "all")]["recorded_bytes"] == attention_matrix_bytes(1, 1, cells, cells)
    estimate = rows[("SelfAttention2d(64) 128x128", "all")]
    assert estimate["recorded_bytes"] == 2**30 and estimate.get("ms") is None  # sized, never built
    for (workload, _), row in rows.items():
        if row.get("ms") is not None:
            assert math.isclose(row["time_ratio"], row["ms"] / rows[(workload, "plain")]["ms"])
            if peak_memory_supported("cpu"):  # the kept weights are alive at the end of the measured call
                assert row["peak_bytes"] >= row["recorded_bytes"]
    assert any(note.startswith("goal SelfAttention2d(64) 32x32 record 3 queries") for note in part["notes"])


def _check_train_part(part: dict) -> None:
    """Part 5 ran train.py to the end and read its images/s back from metrics.jsonl."""
    (row,) = part["rows"]
    assert (
        row["processes"] == row["threads"] == 1 and row["batch"] == 16 and [e["epoch"] for e in row["epochs"]] == [1, 2]
    )
    assert row["images_per_s"] == row["epochs"][1]["images_per_s"] > 0  # the first epoch is not timed


def test_speedups_are_against_each_configs_one_process_one_thread_row() -> None:
    rows = [
        {"config": "a", "processes": 1, "threads": 1, "images_per_s": 100.0},
        {"config": "a", "processes": 2, "threads": 1, "images_per_s": 150.0},
        {"config": "b", "processes": 1, "threads": 2, "images_per_s": 80.0},
        {"config": "b", "processes": 1, "threads": 1, "images_per_s": 40.0},
        {"config": "c", "processes": 1, "threads": 2, "images_per_s": 10.0},
    ]
    training.add_speedups(rows)
    assert [r.get("speedup") for r in rows] == [1.0, 1.5, 2.0, 1.0, None]


def _check_precision_part(part: dict) -> None:
    """Part 6 timed the quick workloads, sorted by size; the ratio, the faster precision and the
    rule's pick follow from the numbers."""
    rows = part["rows"]
    assert sorted(r["model"] for r in rows) == sorted(w.label for w in precision.workloads(quick=True))
    assert [r["mflop"] for r in rows] == sorted(r["mflop"] for r in rows)
    native = cpu_has_native_bf16()
    for row in rows:
        assert row["fp32_ms"] > 0 and row["batch"] == 32 and row["mflop"] > 0
        assert row["rule"] == ("bf16" if native and row["mflop"] * 1e6 >= BF16_MIN_FLOPS else "fp32")
        if "bf16_ms" in row:
            assert math.isclose(row["ratio"], row["bf16_ms"] / row["fp32_ms"])
            assert row["faster"] == ("bf16" if row["ratio"] < 1 else "fp32")


def test_precision_workloads_are_the_shipped_configs_then_a_ladder_of_widths() -> None:
    quick = precision.workloads(quick=True)
    configs = sorted(p.stem for p in Path("configs").glob("*.yaml"))
    assert [w.label for w in quick] == [*configs[:2], "canvas ViT width 64"]
    full = precision.workloads(quick=False)
    ladder = [w for w in full if w.label.startswith("canvas ViT")]
    assert [w.model_config["embed_dim"] for w in ladder] == list(precision.LADDER_WIDTHS)
    assert {w.input_size for w in ladder} == {(1, 64, 64)} and [w.label for w in full[: len(configs)]] == configs


@pytest.mark.parametrize(
    ("ratios", "expected"),
    [
        ({2: 1.1, 30: 0.95, 40: 1.2, 300: 0.6, 900: 0.4}, 300),  # faster from 300 up; 30 alone does not count
        ({2: 0.9, 30: 0.8}, 2),
        ({2: 0.9, 30: 1.0}, None),  # the largest was not faster: no size from which bf16 pays
        ({}, None),
    ],
)
def test_the_crossover_is_the_smallest_size_from_which_every_model_was_faster_in_bf16(ratios, expected) -> None:
    rows = [{"mflop": mflop, "ratio": ratio} for mflop, ratio in reversed(ratios.items())]
    rows.append({"mflop": 5000})  # not timed in bf16: left out
    assert precision.crossover(rows) == expected


def _check_grad_checkpointing_part(part: dict) -> None:
    """Part 7 measured both contenders; recomputing the blocks' activations lowers the step's peak."""
    rows = {r["checkpointing"]: r for r in part["rows"]}
    assert set(rows) == {"off", "on"} and rows["on"]["batch"] == 4
    assert math.isclose(rows["on"]["time_ratio"], rows["on"]["ms"] / rows["off"]["ms"])
    if peak_memory_supported("cpu"):
        assert 0 < rows["on"]["peak_bytes"] < rows["off"]["peak_bytes"]


def test_train_part_scales_the_default_config_with_torchrun_at_the_same_global_batch() -> None:
    default = [job for job in training.jobs(quick=False) if job.config == "configs/default.yaml"]
    assert {job.overrides for job in default} == {()}  # the shipped config, only shortened
    cores = os.cpu_count() or 1
    shapes = {(job.processes, job.threads) for job in default}
    assert shapes == {(1, 1), (1, cores), (2, max(1, cores // 2))}  # baseline; same cores, 1 vs 2 processes
    double = next(job for job in default if job.processes == 2)
    words = training.command(double, Path("runs"))
    assert words[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert "train.batch_size" not in " ".join(words)  # the config's global batch, split over the processes


def test_nonlocal_contenders_compute_timms_function_in_train_mode_too() -> None:
    blocks = selfattention2d.make_contenders(channels=32)
    x = torch.randn(2, 32, 6, 5)
    expected = blocks["timm"].train()(x)
    for name in ("visattn", "materialized"):
        torch.testing.assert_close(blocks[name].train()(x), expected, atol=1e-5, rtol=1e-5)
    assert blocks["visattn"].v_channels == blocks["timm"].g.out_channels == 8


def _touched_mapping(nbytes: int) -> mmap.mmap:
    """An anonymous mapping with every page written: how a fresh process (whose allocator maps
    every block over 1 MiB, see ``benchmarks.common``) gets a large tensor's memory."""
    mapping = mmap.mmap(-1, nbytes)
    for offset in range(0, nbytes, mmap.PAGESIZE):
        mapping[offset] = 1
    return mapping


@pytest.mark.skipif(not peak_memory_supported("cpu"), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_sees_an_allocation_and_resets_between_blocks() -> None:
    with PeakMemory("cpu") as big:
        _touched_mapping(64 * MB).close()
    with PeakMemory("cpu") as smaller:
        _touched_mapping(40 * MB).close()
    # the kernel updates its RSS counters in batches: allow a fraction of a MB either way
    assert 63 * MB <= big.bytes < 72 * MB
    assert 39 * MB <= smaller.bytes < 48 * MB  # not the earlier 64 MB: the high-water mark was reset


def test_unknown_part_is_a_clear_error() -> None:
    with pytest.raises(SystemExit, match="unknown part"):
        main(["--only", "nonexistent"])


def test_tune_default_selects_an_exact_name_before_names_that_start_with_it():
    from benchmarks.tune_default import CANDIDATES, select

    assert list(select(["default"])) == ["default"]
    assert len(select(["default,"])) >= 2 and all(name.startswith("default,") for name in select(["default,"]))
    previous = {name for name in CANDIDATES if name.startswith("the previous")}
    assert len(previous) == 1 and set(select(["default", "the previous"])) == {"default"} | previous
    with pytest.raises(SystemExit, match="no candidate 'nope'"):
        select(["nope"])
