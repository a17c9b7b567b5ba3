"""The benchmark suite: it runs, writes valid JSON and plots, compares like with like, and its
peak-memory probe measures what is allocated. No timing is asserted."""

from __future__ import annotations

import json
import math
import mmap
from pathlib import Path

import pytest
import torch

from benchmarks import selfattention2d, vit
from benchmarks.__main__ import PARTS, main
from benchmarks.common import PeakMemory, peak_memory_supported

MB = 2**20


def test_quick_suite_runs_and_writes_valid_json(tmp_path: Path) -> None:
    assert main([
        "--quick", "--grids", "8", "--models", "vit_tiny_patch4_32", "--repeats", "1",
        "--warmup", "0", "--threads", "1", "--device", "cpu", "--out", str(tmp_path),
    ]) == 0
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

    part2 = doc["parts"]["vit"]
    timed = [r for r in part2["rows"] if r.get("ratio") is not None]
    assert {r["mode"] for r in timed} == set(vit.MODES)
    for row in timed:
        assert row["max_abs_logit_difference"] < 1e-4
        assert math.isclose(row["ratio"], row["visattn_img_s"] / row["timm_img_s"])

    part3 = doc["parts"]["peak"]
    assert part3["extra"]["matmul_peak"]["float32"]["gflops"] > 0
    vit_rows = [r for r in part3["rows"] if r["workload"].startswith("vit_")]
    for workload in {r["workload"] for r in vit_rows}:
        flops = {r["contender"]: r["gflop"] for r in vit_rows if r["workload"] == workload}
        assert flops["visattn"] == flops["timm"] > 0  # identical hyper-parameters, identical work
    for plot in part1["plots"] + part3["plots"]:
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
