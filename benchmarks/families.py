"""Part 9: the local attention families against global ``SelfAttention2d`` and their peers.

Every contender is one attention layer over a ``(B, C, H, W)`` grid with 1×1 (or linear) q/k/v
and output projections, B=2, C=128, 4 heads of 32:

- ``global``: :class:`visattn.SelfAttention2d` (fused kernel, O(HW) memory, O((HW)²) time);
- ``window 7/3``: :class:`visattn.WindowAttention2d` ``(window_size=7, shift=3)``;
- ``neighborhood 7``: :class:`visattn.NeighborhoodAttention2d` ``(kernel_size=7)``;
- ``halo 8/3``: :class:`visattn.HaloAttention2d` ``(block_size=8, halo_size=3)``;
- ``timm swin 7/3``: the attention of timm's ``SwinTransformerBlock`` (cyclic shift, window
  partition, ``WindowAttention``, reverse; its norm and MLP are not run), the peer of ``window``;
- ``timm halo 8/3``: timm's ``HaloAttn``, the peer of ``halo``;
- ``masked dense``: the window pattern as a materialized ``(HW)×(HW)`` masked softmax, what the
  families replace (skipped where its matrices would not fit).

The families compute what the tests prove against float64 references and the peers with copied
weights (``tests/test_local_attention.py``); here only time and memory are measured. Forward =
eval mode under ``torch.inference_mode``; forward+backward = train mode with the gate at one,
input and parameters requiring gradients, ``out.sum().backward()``. FLOPs are counted by
``visattn.profiling.count_flops`` (the masked slots of a family's tiles count: they are computed)
and divided by the float32 matrix-product peak measured in the same run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers.halo_attn import HaloAttn
from timm.models.swin_transformer import SwinTransformerBlock
from torch import Tensor, nn

from visattn import HaloAttention2d, NeighborhoodAttention2d, SelfAttention2d, WindowAttention2d
from visattn.layers.functional import attention_matrix_bytes
from visattn.profiling import count_flops

from .common import (
    Config,
    Part,
    PeakMemory,
    free_memory,
    measure,
    peak_memory_supported,
    run_in_fresh_processes,
    summary,
)
from .peak import matmul_peak
from .selfattention2d import step

NAME = "families"
TITLE = "Part 9: local attention families vs global SelfAttention2d and their peers (B=2, C=128, 4 heads of 32)"
BATCH, CHANNELS, HEADS = 2, 128, 4
GRIDS = (32, 64, 128, 192)
QUICK_GRIDS = (32, 64)
WINDOW, SHIFT, KERNEL, BLOCK, HALO = 7, 3, 7, 8, 3
#: each family, its peer (a contender computing the same pattern), and the issue's goals at 128²:
#: fwd+bwd time as a fraction of global attention's
FAMILIES = {
    "window 7/3": ("timm swin 7/3", 0.06),
    "neighborhood 7": (None, 0.25),
    "halo 8/3": ("timm halo 8/3", 0.10),
}
#: a family's peak memory may be at most this many times the global block's (itself O(HW))
MEMORY_GOAL = 4.0
#: time may grow at most as (HW)^this from 64² to 128²
EXPONENT_GOAL = 1.2
MODES = ("forward", "forward_backward")


class SwinAttention(nn.Module):
    """timm's shifted-window attention (``SwinTransformerBlock._attn``) on a ``(B, C, H, W)`` grid."""

    def __init__(self, grid: int) -> None:
        super().__init__()
        self.block = SwinTransformerBlock(
            CHANNELS, (grid, grid), num_heads=HEADS, head_dim=CHANNELS // HEADS, window_size=WINDOW, shift_size=SHIFT
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + rearrange(self.block._attn(rearrange(x, "b c h w -> b h w c")), "b h w c -> b c h w")


class MaskedDense(nn.Module):
    """The window pattern of ``window 7/3`` as a materialized masked softmax over all ``(HW)²`` pairs."""

    def __init__(self, grid: int) -> None:
        super().__init__()
        self.inner = SelfAttention2d(CHANNELS, num_heads=HEADS, qk_channels=CHANNELS, v_channels=CHANNELS)
        window = (torch.arange(grid) + (WINDOW - SHIFT)) // WINDOW  # the window index of each row/column
        cell = (window[:, None] * (grid + 1) + window[None, :]).flatten()
        self.register_buffer("bias", torch.where(cell[:, None] == cell[None, :], 0.0, -math.inf), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        m, h = self.inner, x.shape[-2]
        q, k, v = (rearrange(f(x), "b (n d) y x -> b n (y x) d", n=HEADS) for f in (m.query, m.key, m.value))
        weights = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + self.bias, dim=-1)
        y = rearrange(weights @ v, "b n (y x) d -> b (n d) y x", y=h)
        return x + m.gamma * m.out(y)


def make(name: str, grid: int, device: str) -> nn.Module:
    """The contender ``name`` for a ``grid × grid`` input, its gate at one."""
    torch.manual_seed(0)
    common = {"num_heads": HEADS, "qk_channels": CHANNELS, "v_channels": CHANNELS}
    builders: dict[str, Callable[[], nn.Module]] = {
        "global": lambda: SelfAttention2d(CHANNELS, **common),
        "window 7/3": lambda: WindowAttention2d(CHANNELS, window_size=WINDOW, shift=SHIFT, **common),
        "neighborhood 7": lambda: NeighborhoodAttention2d(CHANNELS, kernel_size=KERNEL, **common),
        "halo 8/3": lambda: HaloAttention2d(CHANNELS, block_size=BLOCK, halo_size=HALO, **common),
        "timm swin 7/3": lambda: SwinAttention(grid),
        "timm halo 8/3": lambda: HaloAttn(
            CHANNELS, CHANNELS, num_heads=HEADS, dim_head=CHANNELS // HEADS, block_size=BLOCK, halo_size=HALO
        ),
        "masked dense": lambda: MaskedDense(grid),
    }
    module = builders[name]()
    for gamma in (p for n, p in module.named_parameters() if n.endswith("gamma")):
        nn.init.ones_(gamma)
    return module.to(device)


CONTENDERS = ("global", *FAMILIES, "timm swin 7/3", "timm halo 8/3", "masked dense")


def make_input(grid: int, device: str) -> Tensor:
    return torch.randn(BATCH, CHANNELS, grid, grid, generator=torch.Generator().manual_seed(grid)).to(device)


def memory_estimate(name: str, grid: int) -> int:
    """An upper bound of a contender's fwd+bwd peak: the dense one stores four ``(B, heads, HW, HW)``
    matrices; the others a few dozen ``(B, C, H, W)`` maps (their tiles are O(HW) too)."""
    if name == "masked dense":
        return 4 * attention_matrix_bytes(BATCH, HEADS, grid * grid, grid * grid)
    return 48 * BATCH * CHANNELS * grid * grid * 4


def child(case: dict, device: str) -> dict:
    """(In a fresh process) peak memory of one contender at one grid, for each mode."""
    module, x = make(case["contender"], case["grid"], device), make_input(case["grid"], device)
    result = {}
    for mode in MODES:
        fn = step(module, x, mode)
        fn()  # caches (index tensors, kernels' pools) are built outside the peak
        free_memory()
        with PeakMemory(device) as peak:
            out = fn()
        del out
        free_memory()
        result[f"{mode}_peak_bytes"] = peak.bytes
    return result


def _time_grid(grid: int, config: Config) -> list[dict]:
    """Rows of one grid: each runnable contender's median times and its fwd+bwd FLOPs."""
    x = make_input(grid, config.device)
    rows = {name: {"grid": grid, "contender": name} for name in CONTENDERS}
    modules = {}
    for name in CONTENDERS:
        if memory_estimate(name, grid) > config.max_memory_bytes:
            rows[name]["note"] = "skipped: est. memory > --max-memory-gb"
        else:
            modules[name] = make(name, grid, config.device)
    repeats = config.repeats if grid <= 64 else min(config.repeats, 3)
    for mode in MODES:
        fns = {name: step(m, x, mode) for name, m in modules.items()}
        for name, samples in measure(fns, warmup=config.warmup, repeats=repeats, device=config.device).items():
            rows[name][f"{mode}_ms"] = summary(samples)["median_s"] * 1e3
            rows[name][f"{mode}_samples_s"] = samples
        del fns
        free_memory()
    for name, module in modules.items():
        rows[name]["forward_backward_gflop"] = count_flops(step(module, x, "forward_backward")) / 1e9
    return list(rows.values())


def run(config: Config) -> Part:
    grids = tuple(config.grids or (QUICK_GRIDS if config.quick else GRIDS))
    part = Part(
        NAME,
        TITLE,
        columns=[
            ("grid", "grid"),
            ("contender", "contender"),
            ("forward_ms", "fwd ms"),
            ("forward_backward_ms", "fwd+bwd ms"),
            ("forward_backward_peak_mb", "fwd+bwd MB"),
            ("time_vs_global", "fwd+bwd ×global"),
            ("memory_vs_global", "MB ×global"),
            ("time_vs_peer", "fwd+bwd ×peer"),
            ("peak_fraction", "of fp32 peak"),
            ("note", "note"),
        ],
    )
    peak = matmul_peak(torch.float32, (256, 512, 1024), config)
    part.extra["fp32_matmul_peak_gflops"] = peak["gflops"]
    rows: list[dict] = []
    for grid in grids:
        rows += _time_grid(grid, config)
        print(f"  [{NAME}] grid {grid}x{grid} timed", flush=True)
    if peak_memory_supported(config.device):
        measured = [r for r in rows if r.get("forward_ms") is not None]
        cases = [{"contender": r["contender"], "grid": r["grid"]} for r in measured]
        estimates = [memory_estimate(r["contender"], r["grid"]) for r in measured]
        for row, peaks in zip(measured, run_in_fresh_processes(NAME, cases, estimates, config), strict=True):
            row.update(peaks, forward_backward_peak_mb=peaks["forward_backward_peak_bytes"] / 2**20)
    _ratios(rows, peak["gflops"])
    part.rows = rows
    part.notes += [f"fp32 matrix-product peak measured in this run: {peak['gflops']:.0f} GFLOP/s"]
    part.notes += _exponent_notes(rows) + _goal_notes(rows)
    return part


def _ratios(rows: list[dict], peak_gflops: float) -> None:
    """Each row's fwd+bwd time and memory against global attention and its peer at the same grid,
    and its achieved fraction of the matrix-product peak."""
    at = {(r["grid"], r["contender"]): r for r in rows}
    for row in rows:
        glob = at[(row["grid"], "global")]
        peer_name = FAMILIES.get(row["contender"], (None, 0.0))[0]
        peer = at.get((row["grid"], peer_name), {})
        for key, other, ratio in (
            ("forward_backward_ms", glob, "time_vs_global"),
            ("forward_backward_peak_bytes", glob, "memory_vs_global"),
            ("forward_backward_ms", peer, "time_vs_peer"),
        ):
            if row.get(key) and other.get(key):
                row[ratio] = row[key] / other[key]
        if row.get("forward_backward_ms") and row.get("forward_backward_gflop"):
            row["peak_fraction"] = row["forward_backward_gflop"] / (row["forward_backward_ms"] / 1e3) / peak_gflops


def _exponent(rows: list[dict], name: str, low: int, high: int) -> float | None:
    """p of fwd+bwd time ∝ (HW)^p between the grids ``low`` and ``high``."""
    times = {r["grid"]: r.get("forward_backward_ms") for r in rows if r["contender"] == name}
    if not (times.get(low) and times.get(high)):
        return None
    return math.log(times[high] / times[low]) / math.log(high**2 / low**2)


def _exponent_notes(rows: list[dict]) -> list[str]:
    grids = sorted({r["grid"] for r in rows})
    if len(grids) < 2:
        return []
    low, high = (64, 128) if {64, 128} <= set(grids) else grids[-2:]
    fitted = {name: _exponent(rows, name, low, high) for name in CONTENDERS}
    return [
        "fwd+bwd time grows as (HW)^p from "
        f"{low}² to {high}²: " + ", ".join(f"{name} {p:.2f}" for name, p in fitted.items() if p is not None)
    ]


def _goal_notes(rows: list[dict]) -> list[str]:
    """The goals at 128×128, checked against this run."""
    at = {(r["grid"], r["contender"]): r for r in rows}
    notes = []
    for name, (peer, goal) in FAMILIES.items():
        row = at.get((128, name), {})
        checks = [
            ("time_vs_global", goal, f"fwd+bwd time <= {goal}x global"),
            ("memory_vs_global", MEMORY_GOAL, f"peak memory <= {MEMORY_GOAL:g}x global"),
        ]
        if peer:
            checks.append(("time_vs_peer", 1.0, f"fwd+bwd time <= 1.0x {peer}"))
        for key, limit, label in checks:
            if row.get(key) is not None:
                notes.append(
                    f"goal {name} 128x128 {label}: {row[key]:.3f}x {'met' if row[key] <= limit else 'NOT met'}"
                )
        exponent = _exponent(rows, name, 64, 128)
        if exponent is not None:
            ok = "met" if exponent <= EXPONENT_GOAL else "NOT met"
            notes.append(f"goal {name} time grows at most as (HW)^{EXPONENT_GOAL} (64² to 128²): {exponent:.2f} {ok}")
    return notes
