"""Part 3: achieved GFLOP/s of each path against this machine's measured matrix-product peak.

The peak is the best median GFLOP/s of square ``torch.mm`` products in the same dtype, measured
in the same run. FLOPs are counted by :func:`visattn.profiling.count_flops`: PyTorch's
:class:`~torch.utils.flop_counter.FlopCounterMode` (matrix products and convolutions, forward and
backward), with attention counted by formula (``visattn.profiling.attention_flops``: the two
matrix products of the materialized arithmetic, twice that for the backward) wherever the counter
misses or miscounts the operator — it sees 0 FLOPs in the CPU flash kernel. So every contender of
a workload counts the same work (checked: a note says so, or names the difference); recomputation
and element-wise work (softmax, normalization) count as zero and show as lower GFLOP/s.
Compiled contenders (``--compile``) are counted on their eager twins: the same work.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from visattn.layers.functional import attention_backend
from visattn.profiling import count_flops

from . import selfattention2d, vit
from .common import Config, Part, bf16_enabled, free_memory, measure, save_figure, summary

NAME = "peak"
TITLE = "Part 3: achieved GFLOP/s against the measured matrix-product peak"
MATMUL_SIZES = (1024, 2048)
QUICK_MATMUL_SIZES = (512, 1024)
#: without native bf16 (scalar fallback, < 1 GFLOP/s) a 2048³ product would take a minute
SLOW_BF16_SIZES = (256, 512)
QUICK_SLOW_BF16_SIZES = (128, 256)


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...], config: Config) -> dict:
    """Best median GFLOP/s of ``n×n @ n×n`` over ``sizes``."""
    best = {"gflops": 0.0}
    for n in sizes:
        a = torch.randn(n, n, device=config.device).to(dtype)
        b = torch.randn(n, n, device=config.device).to(dtype)
        samples = measure(
            {"mm": lambda a=a, b=b: torch.mm(a, b)}, warmup=1, repeats=config.repeats, device=config.device
        )["mm"]
        gflops = 2 * n**3 / summary(samples)["median_s"] / 1e9
        if gflops > best["gflops"]:
            best = {"gflops": gflops, "size": n}
    return best


def _with_backend(fn: Callable[[], object], backend: str, dtype: torch.dtype, device: str) -> Callable[[], object]:
    """``fn`` under an attention backend and, for bf16, autocast."""

    def run() -> object:
        with attention_backend(backend), vit.autocast(device, dtype):
            return fn()

    return run


def _attention_workloads(config: Config, dtypes: list[torch.dtype]) -> list[tuple]:
    """Part 1's block, fp32: the three contenders; bf16: visattn's choice, its chunked path, timm."""
    grid = 32 if config.quick else 64
    x = selfattention2d.make_input(grid, config.device)
    blocks = selfattention2d.make_contenders(device=config.device)
    groups = []
    for dtype in dtypes:
        names = {"visattn": ("visattn", "auto"), "timm": ("timm", "auto")}
        if dtype == torch.float32:
            names["materialized"] = ("materialized", "auto")
        else:
            names["visattn chunked"] = ("visattn", "chunked")
        for mode in selfattention2d.MODES:
            fns = {
                name: _with_backend(selfattention2d.step(blocks[m], x, mode), backend, dtype, config.device)
                for name, (m, backend) in names.items()
            }
            groups.append((f"SelfAttention2d {grid}x{grid} {mode}", dtype, fns, None))
    return groups


def _vit_workloads(config: Config, dtypes: list[torch.dtype]) -> list[tuple]:
    """visattn and timm ViTs, eager, and compiled (``--compile``) with their eager twins' FLOPs."""
    name = "vit_tiny_patch4_32" if config.quick else "vit_small_patch16_224"
    pair = vit.make_pair(name, config.device)
    compiled = {lib: torch.compile(m) for lib, m in pair.items()} if config.compile else {}
    images, labels = vit.make_batch(name, config.device, batch=8)
    groups = []
    for dtype in dtypes:
        for mode in vit.MODES:
            eager = {lib: vit.step(m, images, labels, mode, dtype, config.device) for lib, m in pair.items()}
            groups.append((f"{name} b8 {mode}", dtype, eager, None))
            if compiled:
                fns = {lib: vit.step(m, images, labels, mode, dtype, config.device) for lib, m in compiled.items()}
                groups.append((f"{name} b8 {mode} compiled", dtype, fns, eager))
    return groups


def _flops(fns: dict[str, Callable[[], object]], eager: dict | None, part: Part, workload: str) -> dict[str, int]:
    """FLOPs per contender (compiled ones: their eager twin's); a note when contenders disagree."""
    flops = {name: count_flops((eager or fns)[name]) for name in fns}
    if len(set(flops.values())) > 1:
        part.notes.append(f"{workload}: contenders count different FLOPs {flops} (not the same work?)")
    return flops


def run(config: Config) -> Part:
    use_bf16, why_not = bf16_enabled(config)
    part = Part(
        NAME,
        TITLE,
        columns=[
            ("workload", "workload"),
            ("dtype", "dtype"),
            ("contender", "contender"),
            ("gflop", "GFLOP/call"),
            ("ms", "ms"),
            ("gflops", "GFLOP/s"),
            ("percent_of_peak", "% of peak"),
        ],
    )
    sizes = QUICK_MATMUL_SIZES if config.quick else MATMUL_SIZES
    bf16_native = config.device.startswith("cuda") or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    slow_sizes = QUICK_SLOW_BF16_SIZES if config.quick else SLOW_BF16_SIZES
    peaks = {
        "float32": matmul_peak(torch.float32, sizes, config),
        "bfloat16": matmul_peak(torch.bfloat16, sizes if bf16_native else slow_sizes, config),
    }
    part.extra["matmul_peak"] = peaks
    for dtype, peak in peaks.items():
        part.notes.append(f"{dtype} matmul peak: {peak['gflops']:.1f} GFLOP/s ({peak['size']}x{peak['size']} mm)")
    dtypes = [torch.float32] + ([torch.bfloat16] if use_bf16 else [])
    if not use_bf16:
        part.notes.append(f"bf16 workloads: {why_not}")
    groups = _attention_workloads(config, dtypes) + _vit_workloads(config, dtypes)
    for workload, dtype_, fns, eager in groups:
        dtype = str(dtype_).removeprefix("torch.")
        flops = _flops(fns, eager, part, f"{workload} {dtype}")
        samples = measure(fns, warmup=config.warmup, repeats=config.repeats, device=config.device)
        for name, s in samples.items():
            seconds = summary(s)["median_s"]
            gflops = flops[name] / seconds / 1e9
            part.rows.append(
                {
                    "workload": workload,
                    "dtype": dtype,
                    "contender": name,
                    "gflop": flops[name] / 1e9,
                    "ms": seconds * 1e3,
                    "gflops": gflops,
                    "percent_of_peak": 100 * gflops / peaks[dtype]["gflops"],
                    "samples_s": s,
                }
            )
        del fns
        free_memory()
        print(f"  [{NAME}] {workload} {dtype} done", flush=True)
    if not any("count different FLOPs" in note for note in part.notes):
        part.notes.append("every contender of a workload counts the same FLOPs (attention by formula)")
    if config.plots:
        part.plots.append(_plot(part, config))
    return part


def _plot(part: Part, config: Config) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['workload']} {r['dtype']}\n{r['contender']}" for r in part.rows]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) + 1.2))
    ax.barh(range(len(labels)), [r["percent_of_peak"] for r in part.rows])
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("% of measured matmul peak (same dtype)")
    ax.set_title(f"{TITLE} — {config.device}", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    return save_figure(fig, config, NAME)
