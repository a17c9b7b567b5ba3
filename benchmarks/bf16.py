"""Part 8: attention in bf16 — the fused kernel, visattn's query-chunked path and timm.

Two kinds of workload, each timed forward and forward+backward, alternating the contenders:

- ``SelfAttention2d`` at 32×32 and 64×64 (part 1's block: B=4, C=256, q/k/v 32, timm's
  ``NonLocalAttn`` arithmetic) under bf16 autocast: visattn with the path ``"auto"`` picks, with
  the fused kernel and with the chunked path forced, against visattn in fp32 and timm in bf16.
  Peak memory of forward+backward per case in a fresh process.
- attention alone, ``(BH, N, d)`` of a ViT-S/16 layer (batch 8) and of the 32² and 64² grids:
  the fused kernel in fp32 and bf16 and the chunked path in bf16 — the measurements behind
  ``functional.attention``'s choice.

The issue's goals for ``SelfAttention2d`` 64×64 forward+backward on a CPU with native bf16: at
most 0.5× its own fp32 time, at most 0.3× timm's bf16 time, peak memory at most 2× the fused
path's. The notes say whether this run met them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visattn.layers.chunked import chunked_attention
from visattn.layers.functional import attention_backend
from visattn.profiling import attention_kernels

from . import selfattention2d
from .common import (
    Config,
    Part,
    PeakMemory,
    bf16_enabled,
    free_memory,
    measure,
    peak_memory_supported,
    run_in_fresh_processes,
    summary,
)

NAME = "bf16"
TITLE = "Part 8: attention in bf16 — fused kernel, chunked path, timm (SelfAttention2d B=4, C=256, q/k/v 32)"
GRIDS = (32, 64)
QUICK_GRIDS = (16,)
#: contender → (module of part 1, autocast dtype or None, visattn attention backend)
BLOCK_CONTENDERS: dict[str, tuple[str, torch.dtype | None, str]] = {
    "visattn fp32": ("visattn", None, "auto"),
    "visattn bf16": ("visattn", torch.bfloat16, "auto"),
    "visattn bf16 fused": ("visattn", torch.bfloat16, "fused"),
    "visattn bf16 chunked": ("visattn", torch.bfloat16, "chunked"),
    "timm bf16": ("timm", torch.bfloat16, "auto"),
}
#: attention alone: label → (batch·heads, tokens, head dim)
ATTENTION_SHAPES = {"ViT-S/16 layer, batch 8": (48, 197, 64), "32x32 grid": (4, 1024, 32), "64x64 grid": (4, 4096, 32)}
QUICK_ATTENTION_SHAPES = {"ViT-S/16 layer, batch 8": (48, 197, 64)}
TIME_GOAL_VS_FP32, TIME_GOAL_VS_TIMM, MEMORY_GOAL_VS_FUSED = 0.5, 0.3, 2.0


def _settings(dtype: torch.dtype | None, backend: str, device: str) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(attention_backend(backend))
    if dtype is not None:
        stack.enter_context(torch.autocast(device.split(":")[0], dtype=dtype))
    return stack


def block_step(contender: str, modules: dict[str, nn.Module], x: Tensor, mode: str, device: str) -> Callable:
    """Part 1's step of the contender's module, under its dtype and attention backend."""
    module, dtype, backend = BLOCK_CONTENDERS[contender]
    fn = selfattention2d.step(modules[module], x, mode)

    def run() -> object:
        with _settings(dtype, backend, device):
            return fn()

    return run


def attention_step(path: str, dtype: torch.dtype, shape: tuple[int, int, int], mode: str, device: str) -> Callable:
    """Attention alone: ``path`` (``"fused"`` or ``"chunked"``) on random ``(BH, N, d)`` inputs."""
    bh, n, d = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(bh, n, d, generator=gen).to(device, dtype).requires_grad_(mode != "forward") for _ in "qkv")

    def run() -> Tensor:
        with torch.inference_mode() if mode == "forward" else contextlib.nullcontext():
            if path == "chunked":
                out = chunked_attention(q, k, v, d**-0.5)
            else:
                out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
            if mode != "forward":
                out.backward(torch.ones_like(out))
            return out.detach()

    return run


def child(case: dict, device: str) -> dict:
    """(In a fresh process) peak memory of one contender's forward+backward at one grid."""
    modules = selfattention2d.make_contenders(device=device)
    x, warm = selfattention2d.make_input(case["grid"], device), selfattention2d.make_input(8, device)
    block_step(case["contender"], modules, warm, "forward_backward", device)()
    fn = block_step(case["contender"], modules, x, "forward_backward", device)
    with PeakMemory(device) as peak:
        out = fn()
    del out
    return {"forward_backward_peak_bytes": peak.bytes}


def _time(fns: dict[str, dict[str, Callable]], config: Config, rows: dict[str, dict]) -> None:
    """Time each mode's contenders against each other; median ms into ``rows``."""
    for mode, contenders in fns.items():
        samples = measure(contenders, warmup=config.warmup, repeats=config.repeats, device=config.device)
        for name, s in samples.items():
            rows[name][f"{mode}_ms"] = summary(s)["median_s"] * 1e3
            rows[name][f"{mode}_samples_s"] = s
        free_memory()


def _block_rows(grid: int, config: Config) -> list[dict]:
    modules = selfattention2d.make_contenders(device=config.device)
    x = selfattention2d.make_input(grid, config.device)
    label = f"SelfAttention2d {grid}x{grid}"
    rows = {name: {"workload": label, "grid": grid, "contender": name} for name in BLOCK_CONTENDERS}
    timm_bytes = selfattention2d.memory_estimate("timm", "forward_backward", grid, [])
    names = [n for n in BLOCK_CONTENDERS if not (n.startswith("timm") and timm_bytes > config.max_memory_bytes)]
    if "timm bf16" not in names:
        rows["timm bf16"]["kernels"] = "skipped: est. memory > --max-memory-gb"
    for name in names:
        fn = block_step(name, modules, x, "forward_backward", config.device)
        fn()  # for "auto": the one-time measurement of the paths, outside the profile
        ran = attention_kernels(fn)
        rows[name]["kernels"] = ", ".join(sorted(ran)) or "bmm (timm)"
    modes = selfattention2d.MODES
    _time({m: {n: block_step(n, modules, x, m, config.device) for n in names} for m in modes}, config, rows)
    for name in names:
        row = rows[name]
        row["vs_fp32"] = row["forward_backward_ms"] / rows["visattn fp32"]["forward_backward_ms"]
        if "timm bf16" in names:
            row["vs_timm"] = row["forward_backward_ms"] / rows["timm bf16"]["forward_backward_ms"]
    return list(rows.values())


def _attention_rows(label: str, shape: tuple[int, int, int], config: Config) -> list[dict]:
    contenders = {"fused fp32": ("fused", torch.float32), "fused bf16": ("fused", torch.bfloat16)}
    contenders["chunked bf16"] = ("chunked", torch.bfloat16)
    rows = {name: {"workload": f"attention {label} {shape}", "contender": name} for name in contenders}
    fns = {
        m: {n: attention_step(path, dtype, shape, m, config.device) for n, (path, dtype) in contenders.items()}
        for m in selfattention2d.MODES
    }
    _time(fns, config, rows)
    for row in rows.values():
        row["vs_fp32"] = row["forward_backward_ms"] / rows["fused fp32"]["forward_backward_ms"]
    return list(rows.values())


def _measure_memory(rows: list[dict], config: Config) -> None:
    if not peak_memory_supported(config.device):
        return
    block = [r for r in rows if "grid" in r and r.get("forward_ms") is not None]
    cases = [{"contender": r["contender"], "grid": r["grid"]} for r in block]
    estimates = [selfattention2d.memory_estimate("timm", "forward_backward", r["grid"], []) for r in block]
    for row, peak in zip(block, run_in_fresh_processes(NAME, cases, estimates, config), strict=True):
        row.update(peak, forward_backward_peak_mb=peak["forward_backward_peak_bytes"] / 2**20)
    fused = {r["grid"]: r for r in block if r["contender"] == "visattn bf16 fused"}
    for row in block:
        # at tiny grids the fused path's peak can fall below the measurement's granularity (0 bytes)
        reference = fused[row["grid"]]["forward_backward_peak_bytes"]
        row["memory_vs_fused"] = row["forward_backward_peak_bytes"] / reference if reference else None


def _goal_notes(rows: list[dict]) -> list[str]:
    """The issue's goals at the largest grid run, for the chunked path and for visattn bf16 ("auto")."""
    block = [r for r in rows if "grid" in r]
    if not block:
        return []
    grid = max(r["grid"] for r in block)
    at = {r["contender"]: r for r in block if r["grid"] == grid}
    notes = []
    for name in ("visattn bf16", "visattn bf16 chunked"):
        row = at[name]
        checks = [
            ("fwd+bwd time", row.get("vs_fp32"), TIME_GOAL_VS_FP32, "x its own fp32"),
            ("fwd+bwd time", row.get("vs_timm"), TIME_GOAL_VS_TIMM, "x timm bf16"),
            ("peak memory", row.get("memory_vs_fused"), MEMORY_GOAL_VS_FUSED, "x the fused path"),
        ]
        for what, value, goal, unit in checks:
            if value is None:
                continue
            verdict = "met" if value <= goal else "NOT met"
            notes.append(f"goal {grid}x{grid} {name}: {what} <= {goal}{unit}: {value:.2f} {verdict}")
    return notes


def run(config: Config) -> Part:
    part = Part(
        NAME,
        TITLE,
        columns=[
            ("workload", "workload"),
            ("contender", "contender"),
            ("forward_ms", "fwd ms"),
            ("forward_backward_ms", "fwd+bwd ms"),
            ("vs_fp32", "fwd+bwd ×fp32"),
            ("vs_timm", "fwd+bwd ×timm bf16"),
            ("forward_backward_peak_mb", "fwd+bwd MB"),
            ("memory_vs_fused", "MB ×fused"),
            ("kernels", "attention kernels"),
        ],
    )
    use_bf16, why_not = bf16_enabled(config)
    if not use_bf16:
        part.notes.append(f"skipped: {why_not}")
        return part
    rows: list[dict] = []
    for grid in config.grids or (QUICK_GRIDS if config.quick else GRIDS):
        rows += _block_rows(grid, config)
        print(f"  [{NAME}] SelfAttention2d {grid}x{grid} timed", flush=True)
    _measure_memory(rows, config)
    for label, shape in (QUICK_ATTENTION_SHAPES if config.quick else ATTENTION_SHAPES).items():
        rows += _attention_rows(label, shape, config)
        print(f"  [{NAME}] attention {label} timed", flush=True)
    part.rows = rows
    part.notes += _goal_notes(rows)
    part.notes.append(
        "'visattn bf16' is functional.attention's own choice (attention_backend('auto'): measured once per shape); "
        "the attention-only rows are what that choice is made from"
    )
    return part
