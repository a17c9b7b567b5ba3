"""Part 3: achieved GFLOP/s of each path against this machine's measured matrix-product peak.

The peak is the best median GFLOP/s of square ``torch.mm`` products in the same dtype, measured
in the same run. FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode`
(matrix products, convolutions and the attention kernels, forward and backward; element-wise
work such as softmax and normalization counts as zero, which is why memory-bound paths sit far
below the peak).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import selfattention2d, vit
from .common import Config, Part, bf16_enabled, free_memory, measure, save_figure, summary

NAME = "peak"
TITLE = "Part 3: achieved GFLOP/s against the measured matrix-product peak"
MATMUL_SIZES = (1024, 2048)
QUICK_MATMUL_SIZES = (512, 1024)
#: without native bf16 (scalar fallback, < 1 GFLOP/s) a 2048³ product would take a minute
SLOW_BF16_SIZES = (256, 512)
QUICK_SLOW_BF16_SIZES = (128, 256)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as PyTorch's flop counter sees them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


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


def _workloads(config: Config, dtypes: list[torch.dtype]) -> list[tuple[str, str, dict[str, Callable[[], object]]]]:
    """(workload, dtype, {contender: fn}) groups whose contenders are timed against each other."""
    groups = []
    grid = 32 if config.quick else 64
    x = selfattention2d.make_input(grid, config.device)
    blocks = selfattention2d.make_contenders(device=config.device)
    for mode in selfattention2d.MODES:
        groups.append(
            (
                f"SelfAttention2d {grid}x{grid} {mode}",
                "float32",
                {name: selfattention2d.step(m, x, mode) for name, m in blocks.items()},
            )
        )
    name = "vit_tiny_patch4_32" if config.quick else "vit_small_patch16_224"
    pair = vit.make_pair(name, config.device)
    images, labels = vit.make_batch(name, config.device, batch=8)
    for dtype in dtypes:
        for mode in vit.MODES:
            groups.append(
                (
                    f"{name} b8 {mode}",
                    str(dtype).removeprefix("torch."),
                    {lib: vit.step(m, images, labels, mode, dtype, config.device) for lib, m in pair.items()},
                )
            )
    return groups


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
    for workload, dtype, fns in _workloads(config, dtypes):
        flops = {name: count_flops(fn) for name, fn in fns.items()}
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
