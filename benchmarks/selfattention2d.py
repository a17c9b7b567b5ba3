"""Part 1: ``SelfAttention2d`` against a materialized reference and timm's ``NonLocalAttn``.

All three contenders compute the same function with the same weights (checked before timing):
timm 1.0's ``NonLocalAttn(256)`` arithmetic, i.e. θ/φ/g 1×1 convolutions with bias at
``make_divisible(C/8, 8) = 32`` channels each (so the **value width is 32**, like the query/key
width), ``softmax(θᵀφ · C^-1/2)`` (timm scales by the *input* width ``C``, not by the 32-channel
head), output 1×1 convolution ``z`` with bias, BatchNorm, residual ``x + BN(z(y))``.

- ``visattn``: :class:`visattn.SelfAttention2d` configured to that arithmetic; the fused kernel.
- ``materialized``: the SAGAN / non-local code path written out here (``bmm`` → ``softmax`` →
  ``bmm``), which stores the ``(HW)×(HW)`` matrix.
- ``timm``: ``timm.layers.NonLocalAttn``, which stores it too.

Forward = eval mode under ``torch.inference_mode``; forward+backward = train mode, input and
parameters requiring gradients (the block sits inside a network), ``out.sum().backward()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import NonLocalAttn
from torch import Tensor, nn

from visattn import SelfAttention2d
from visattn.layers.functional import attention_matrix_bytes
from visattn.profiling import FUSED_KERNELS, attention_kernels

from .common import (
    Config,
    Part,
    PeakMemory,
    free_memory,
    measure,
    peak_memory_supported,
    run_in_fresh_processes,
    save_figure,
    summary,
)

NAME = "selfattention2d"
TITLE = "Part 1: SelfAttention2d vs materialized vs timm NonLocalAttn (B=4, C=256, q/k/v 32, 1 head)"
BATCH, CHANNELS = 4, 256
GRIDS = (16, 32, 64, 96, 128)
QUICK_GRIDS = (16, 32, 64)
CONTENDERS = ("visattn", "materialized", "timm")
MODES = ("forward", "forward_backward")
#: matrices of (HW)² alive at once, assumed before anything is measured (a safe upper bound)
ASSUMED_LIVE_MATRICES = {"forward": 2, "forward_backward": 4}
#: (B, C, H, W) feature maps alive at once in the fused path (an upper bound; it stores no matrix)
ASSUMED_FEATURE_MAPS = 8
_TIMM_TO_VISATTN = {"t.": "query.", "p.": "key.", "g.": "value.", "z.": "out.", "norm.": "out_norm."}


class MaterializedAttention2d(nn.Module):
    """The SAGAN / non-local block as its papers' code writes it (BigGAN ``layers.Attention``).

    Same parameters and names as the ``visattn`` contender; the ``(B, HW, HW)`` weights are
    formed with ``bmm`` and stored, as in every peer implementation.
    """

    def __init__(self, channels: int, width: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.query = nn.Conv2d(channels, width, 1)
        self.key = nn.Conv2d(channels, width, 1)
        self.value = nn.Conv2d(channels, width, 1)
        self.out = nn.Conv2d(width, channels, 1)
        self.out_norm = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        theta = self.query(x).flatten(2)  # (B, d, N)
        phi = self.key(x).flatten(2)  # (B, d, N)
        g = self.value(x).flatten(2)  # (B, dv, N)
        beta = F.softmax(torch.bmm(theta.transpose(1, 2) * self.scale, phi), dim=-1)  # (B, N, N)
        o = torch.bmm(g, beta.transpose(1, 2)).view(b, -1, h, w)
        return x + self.out_norm(self.out(o))


def make_contenders(channels: int = CHANNELS, device: str = "cpu") -> dict[str, nn.Module]:
    """The three contenders with identical weights (timm's init, BatchNorm weight set to one)."""
    torch.manual_seed(0)
    theirs = NonLocalAttn(channels)
    nn.init.ones_(theirs.norm.weight)  # timm starts it at zero: the block would output x alone
    width, scale = theirs.t.out_channels, theirs.scale
    state = {
        next(new + key[len(old) :] for old, new in _TIMM_TO_VISATTN.items() if key.startswith(old)): value
        for key, value in theirs.state_dict().items()
    }
    ours = SelfAttention2d(
        channels,
        num_heads=1,
        qk_channels=width,
        v_channels=width,
        scale=scale,
        out_norm="batchnorm",
        gate=None,
    )
    ours.load_state_dict(state)
    materialized = MaterializedAttention2d(channels, width, scale)
    materialized.load_state_dict(state)
    return {name: m.to(device) for name, m in (("visattn", ours), ("materialized", materialized), ("timm", theirs))}


def check_same_function(contenders: dict[str, nn.Module], channels: int, device: str) -> float:
    """Largest difference between the contenders' outputs on one small input (eval mode)."""
    x = torch.randn(2, channels, 12, 10, device=device)
    with torch.inference_mode():
        outs = [m.eval()(x) for m in contenders.values()]
    return max((o - outs[0]).abs().max().item() for o in outs[1:])


def step(module: nn.Module, x: Tensor, mode: str) -> Callable[[], Tensor]:
    """One forward (eval, inference mode) or forward+backward (train) of ``module`` on ``x``."""
    if mode == "forward":

        def forward() -> Tensor:
            module.eval()
            with torch.inference_mode():
                return module(x)

        return forward

    leaf = x.detach().requires_grad_(True)

    def forward_backward() -> Tensor:
        module.train()
        module.zero_grad(set_to_none=True)
        leaf.grad = None
        out = module(leaf)
        out.sum().backward()
        return out.detach()

    return forward_backward


def make_input(grid: int, device: str, batch: int = BATCH, channels: int = CHANNELS) -> Tensor:
    return torch.randn(batch, channels, grid, grid, generator=torch.Generator().manual_seed(grid)).to(device)


def matrix_bytes(grid: int, batch: int = BATCH) -> int:
    """Bytes of one float32 ``(B, HW, HW)`` weight matrix."""
    return attention_matrix_bytes(batch, 1, grid * grid, grid * grid)


def memory_estimate(contender: str, mode: str, grid: int, measured: list[dict]) -> int:
    """Peak bytes ``contender`` would need at ``grid``.

    A materializing contender: calibrated on the largest grid measured for the same contender
    and mode (peak / matrix bytes there, times the matrix bytes here); before any measurement,
    the safe upper bound :data:`ASSUMED_LIVE_MATRICES`. The fused one: the upper bound
    :data:`ASSUMED_FEATURE_MAPS` (its memory grows with ``H·W``, not its square).
    """
    if contender == "visattn":
        return ASSUMED_FEATURE_MAPS * BATCH * CHANNELS * grid * grid * 4
    known = [
        r
        for r in measured
        if r["contender"] == contender and r.get(f"{mode}_peak_bytes") and not r.get("memory_estimated")
    ]
    if known:
        ref = max(known, key=lambda r: r["grid"])
        ratio = ref[f"{mode}_peak_bytes"] / matrix_bytes(ref["grid"])
        return int(ratio * matrix_bytes(grid))
    return ASSUMED_LIVE_MATRICES[mode] * matrix_bytes(grid)


def child(case: dict, device: str) -> dict:
    """(In a fresh process) peak memory of one contender at one grid, for each mode."""
    module = make_contenders(CHANNELS, device)[case["contender"]]
    x, warm = make_input(case["grid"], device), make_input(8, device)
    result = {}
    for mode in MODES:
        step(module, warm, mode)()  # libraries initialize their pools and caches outside the peak
        fn = step(module, x, mode)
        with PeakMemory(device) as peak:
            out = fn()
        del out
        free_memory()
        result[f"{mode}_peak_bytes"] = peak.bytes
    return result


def _measure_memory(rows: list[dict], config: Config) -> None:
    """Peak memory of each row's case, each in a fresh process (several at a time, untimed)."""
    cases = [{"contender": r["contender"], "grid": r["grid"]} for r in rows]
    estimates = [memory_estimate(r["contender"], "forward_backward", r["grid"], []) for r in rows]
    for row, peaks in zip(rows, run_in_fresh_processes(NAME, cases, estimates, config), strict=True):
        row.update(peaks)
    print(f"  [{NAME}] peak memory measured ({len(cases)} fresh processes)", flush=True)


def _grid_repeats(grid: int, config: Config) -> int:
    return config.repeats if grid <= 64 else min(config.repeats, 3)


def run(config: Config) -> Part:
    grids = tuple(config.grids or (QUICK_GRIDS if config.quick else GRIDS))
    memory_grids = grids[-1:] if config.quick else grids
    measure_memory = peak_memory_supported(config.device)
    contenders = make_contenders(CHANNELS, config.device)
    part = Part(
        NAME,
        TITLE,
        columns=[
            ("grid", "grid"),
            ("contender", "contender"),
            ("forward_ms", "fwd ms"),
            ("forward_backward_ms", "fwd+bwd ms"),
            ("forward_peak_mb", "fwd MB"),
            ("forward_backward_peak_mb", "fwd+bwd MB"),
            ("time_vs_timm", "fwd+bwd ×timm"),
            ("memory_vs_timm", "MB ×timm"),
            ("note", "note"),
        ],
    )
    part.extra["max_abs_difference_between_contenders"] = check_same_function(contenders, CHANNELS, config.device)
    part.notes.append(
        "same function, same weights: timm NonLocalAttn arithmetic (q/k/v widths 32 = make_divisible(C/8), "
        "scale C^-1/2, z conv + BatchNorm + residual); outputs agree to "
        f"{part.extra['max_abs_difference_between_contenders']:.1e}"
    )
    kernels = attention_kernels(step(contenders["visattn"], make_input(16, config.device), "forward_backward"))
    part.extra["visattn_attention_kernels"] = sorted(kernels)
    part.notes.append(
        f"attention kernel run by visattn (training forward): {', '.join(sorted(kernels))}"
        + ("" if kernels and kernels <= FUSED_KERNELS else "  <-- NOT the fused kernel")
    )
    rows: list[dict] = []
    for grid in grids:
        x = make_input(grid, config.device)
        grid_rows = {name: {"grid": grid, "contender": name} for name in CONTENDERS}
        runnable = {}
        for name in CONTENDERS:
            if memory_estimate(name, "forward_backward", grid, rows) > config.max_memory_bytes:
                grid_rows[name]["note"] = "skipped: est. memory > --max-memory-gb"
                grid_rows[name]["memory_estimated"] = True
            else:
                runnable[name] = contenders[name]
        for mode in MODES:
            fns = {name: step(m, x, mode) for name, m in runnable.items()}
            samples = measure(fns, warmup=config.warmup, repeats=_grid_repeats(grid, config), device=config.device)
            for name, s in samples.items():
                stats = summary(s)
                grid_rows[name][f"{mode}_ms"] = stats["median_s"] * 1e3
                grid_rows[name][f"{mode}_samples_s"] = s
            del fns
            free_memory()
        rows.extend(grid_rows.values())
        print(f"  [{NAME}] grid {grid}x{grid} timed", flush=True)
    if measure_memory:
        _measure_memory([r for r in rows if r["grid"] in memory_grids and "memory_estimated" not in r], config)
        for row in rows:
            if row.get("memory_estimated"):
                for mode in MODES:
                    row[f"{mode}_peak_bytes"] = memory_estimate(row["contender"], mode, row["grid"], rows)
    _finish_rows(rows)
    part.rows = rows
    part.notes += _growth_notes(rows) + _goal_notes(rows)
    if not measure_memory:
        part.notes.append("peak memory not measured: needs Linux /proc/self/clear_refs or CUDA")
    if config.plots:
        part.plots.append(_plot(rows, config))
    return part


def _finish_rows(rows: list[dict]) -> None:
    """Megabytes, ratios to timm at the same grid, and the estimated marks."""
    for row in rows:
        for mode in MODES:
            if row.get(f"{mode}_peak_bytes") is not None:
                row[f"{mode}_peak_mb"] = row[f"{mode}_peak_bytes"] / 2**20
        if row.get("memory_estimated"):
            row["note"] = f"{row.get('note', '')} (MB estimated)".strip()
        row["matrix_bytes"] = matrix_bytes(row["grid"])
    by_grid = {(r["grid"], r["contender"]): r for r in rows}
    for row in rows:
        timm_row = by_grid[(row["grid"], "timm")]
        if row.get("forward_backward_ms") and timm_row.get("forward_backward_ms"):
            row["time_vs_timm"] = row["forward_backward_ms"] / timm_row["forward_backward_ms"]
        if row.get("forward_backward_peak_bytes") and timm_row.get("forward_backward_peak_bytes"):
            row["memory_vs_timm"] = row["forward_backward_peak_bytes"] / timm_row["forward_backward_peak_bytes"]
    for row in rows:
        row["grid"], row["grid_side"] = f"{row['grid']}x{row['grid']}", row["grid"]


def _growth_notes(rows: list[dict]) -> list[str]:
    """How each cost grows with the number of cells: the exponent p of cost ∝ (H·W)^p between
    the two largest grids measured (time: 2 for every contender; memory: 1 fused, 2 materialized)."""
    notes = []
    for name in CONTENDERS:
        for key, label in (("forward_backward_ms", "fwd+bwd time"), ("forward_backward_peak_bytes", "fwd+bwd memory")):
            pts = [
                (r["grid_side"] ** 2, r[key])
                for r in rows
                if r["contender"] == name and r.get(key) and not (key.endswith("bytes") and r.get("memory_estimated"))
            ]
            if len(pts) >= 2:
                (n1, v1), (n2, v2) = sorted(pts)[-2:]
                notes.append(
                    f"{name} {label} grows as (HW)^{math.log(v2 / v1) / math.log(n2 / n1):.2f} "
                    f"(from {int(n1**0.5)}² to {int(n2**0.5)}²)"
                )
    return notes


def _goal_notes(rows: list[dict]) -> list[str]:
    """The issue's goals, checked against this run."""
    notes = []
    at = {(r["grid_side"], r["contender"]): r for r in rows}
    ours64 = at.get((64, "visattn"))
    if ours64 and ours64.get("time_vs_timm") is not None:
        ok = ours64["time_vs_timm"] <= 0.4
        notes.append(
            f"goal 64x64 fwd+bwd time <= 0.4x timm: {ours64['time_vs_timm']:.2f}x {'met' if ok else 'NOT met'}"
        )
    if ours64 and ours64.get("memory_vs_timm") is not None:
        ok = ours64["memory_vs_timm"] <= 0.25
        notes.append(
            f"goal 64x64 fwd+bwd memory <= 0.25x timm: {ours64['memory_vs_timm']:.2f}x {'met' if ok else 'NOT met'}"
        )
    ours128 = at.get((128, "visattn"))
    if ours128 and ours128.get("forward_backward_peak_bytes") is not None:
        gb = ours128["forward_backward_peak_bytes"] / 2**30
        notes.append(f"goal 128x128 fwd+bwd < 0.5 GB: {gb:.2f} GB {'met' if gb < 0.5 else 'NOT met'}")
    return notes


def _plot(rows: list[dict], config: Config) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [
        ("forward_ms", "forward time (ms)"),
        ("forward_backward_ms", "forward+backward time (ms)"),
        ("forward_backward_peak_mb", "forward+backward peak memory (MB)"),
    ]
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name in CONTENDERS:
            pts = [
                (r["grid_side"] ** 2, r[key], bool(r.get("memory_estimated")) and key.endswith("_mb"))
                for r in rows
                if r["contender"] == name and r.get(key) is not None
            ]
            if not pts:
                continue
            (line,) = ax.plot([p[0] for p in pts if not p[2]], [p[1] for p in pts if not p[2]], "o-", label=name)
            est = [p for p in pts if p[2]]
            if est:  # dashed from the last measured point to the estimates
                est = [p for p in pts if not p[2]][-1:] + est
                ax.plot(
                    [p[0] for p in est],
                    [p[1] for p in est],
                    "x--",
                    color=line.get_color(),
                    label=f"{name} (estimated, not run)",
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("grid cells H·W")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{TITLE} — {config.device}", fontsize=10)
    return save_figure(fig, config, NAME)
