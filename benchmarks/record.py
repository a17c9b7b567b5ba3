"""Part 4: what recording attention costs — a forward inside ``record_attention`` against a plain one.

- ViT-S/16 at 224 (batch 1): every layer recorded (``record_attention(vit)``) against the plain
  forward, which runs the fused kernel. Goal: at most 1.5× the time.
- ``SelfAttention2d(64)`` (B=1, one head, 8-channel q/k) on a 128×128 grid: three query points
  recorded (``record_attention(block, queries=[...])``) against the plain forward. The output
  still comes from the fused kernel; only three rows of weights are computed. Goal: at most 2× the
  peak memory.
- For contrast, every query recorded on a 64×64 grid (the full ``(HW)²`` matrix, 64 MiB), and at
  128×128 only its size (``visattn.layers.functional.attention_matrix_bytes``: 1 GiB), never built.

Forward = eval mode under ``torch.inference_mode``; a recording call opens ``record_attention``,
runs the model and keeps the recording alive until the call returns, so its peak memory includes
the weights it keeps. Times alternate the contenders of a workload in one process; peak memory is
measured per case in a fresh process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from visattn import SelfAttention2d, create_model, record_attention
from visattn.layers.functional import attention_matrix_bytes
from visattn.profiling import attention_kernels

from .common import (
    Config,
    Part,
    PeakMemory,
    fixed_mmap_threshold,
    free_memory,
    measure,
    peak_memory_supported,
    run_in_fresh_processes,
    summary,
)

NAME = "record"
TITLE = "Part 4: the cost of recording attention (record_attention vs a plain forward, B=1)"
CHANNELS = 64  # SelfAttention2d(64): one head, 8-channel q/k, 64-channel values
NUM_POINTS = 3
#: no recording; NUM_POINTS query cells (SelfAttention2d only); every layer and every query
CONTENDERS = ("plain", "few queries", "all")
#: a batch-1 ViT's activations are a few hundred KiB each: below 1 MiB glibc would serve them
#: from its resident heap and the peak would not see them (see common.fixed_mmap_threshold)
MMAP_THRESHOLD = 64 << 10
VIT_TIME_GOAL = 1.5
FEW_QUERIES_MEMORY_GOAL = 2.0


@dataclass(frozen=True)
class Workload:
    """One model on one input, and the contenders run on it (``estimated``: sized, not run)."""

    model: str  # a visattn model name, or "SelfAttention2d"
    side: int  # input image side in pixels (the grid side for SelfAttention2d)
    contenders: tuple[str, ...]
    estimated: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        if self.model == "SelfAttention2d":
            return f"SelfAttention2d({CHANNELS}) {self.side}x{self.side}"
        return f"{self.model} b1"


def workloads(quick: bool) -> list[Workload]:
    """The workloads of a run (quick: the tiny ViT and a 32×32 grid)."""
    if quick:
        return [
            Workload("vit_tiny_patch16_224", 224, ("plain", "all")),
            Workload("SelfAttention2d", 32, ("plain", "few queries", "all")),
            Workload("SelfAttention2d", 128, (), estimated=("all",)),
        ]
    return [
        Workload("vit_small_patch16_224", 224, ("plain", "all")),
        Workload("SelfAttention2d", 128, ("plain", "few queries"), estimated=("all",)),
        Workload("SelfAttention2d", 64, ("plain", "few queries", "all")),
    ]


def query_points(side: int) -> list[tuple[int, int]]:
    """``NUM_POINTS`` (x, y) pixels of a ``side × side`` image: a corner, the centre, an edge."""
    return [(1, 1), (side // 2, side // 2), (side - 1, 0)]


def build(workload: Workload, device: str) -> tuple[nn.Module, Tensor]:
    """The model (eval mode, seeded weights) and one random input ``(1, C, side, side)``."""
    torch.manual_seed(0)
    if workload.model == "SelfAttention2d":
        model, channels = SelfAttention2d(CHANNELS), CHANNELS
    else:
        model, channels = create_model(workload.model), 3
    x = torch.randn(1, channels, workload.side, workload.side, generator=torch.Generator().manual_seed(0))
    return model.eval().to(device), x.to(device)


def forward(model: nn.Module, x: Tensor, contender: str) -> Callable[[], object]:
    """One inference forward; for a recording contender inside ``record_attention``.

    Returns ``(output, recording)`` so the recorded weights are alive until the caller drops them.
    """
    if contender == "plain":

        def plain() -> tuple[Tensor, None]:
            with torch.inference_mode():
                return model(x), None

        return plain
    options = {"queries": query_points(x.shape[-1])} if contender == "few queries" else {}

    def recorded() -> tuple[Tensor, object]:
        with torch.inference_mode(), record_attention(model, **options) as recording:
            out = model(x)
        return out, recording

    return recorded


def recorded_bytes(workload: Workload, contender: str) -> int:
    """Bytes of the weights a ``SelfAttention2d`` contender keeps, sized without running it."""
    if contender == "plain":
        return 0
    cells = workload.side**2
    return attention_matrix_bytes(1, 1, NUM_POINTS if contender == "few queries" else cells, cells)


def _memory_estimate(workload: Workload, contender: str) -> int:
    """A generous bound on a case's peak, for scheduling fresh processes side by side."""
    if workload.model == "SelfAttention2d":
        return 12 * CHANNELS * workload.side**2 * 4 + 2 * recorded_bytes(workload, contender)
    return 512 * 2**20


def child(case: dict, device: str) -> dict:
    """(In a fresh process) peak memory of one contender on one workload, after one warm-up call."""
    fixed_mmap_threshold(MMAP_THRESHOLD)
    workload = Workload(**case["workload"])
    model, x = build(workload, device)
    fn = forward(model, x, case["contender"])
    fn()  # libraries initialize their pools and caches outside the peak
    free_memory()
    with PeakMemory(device) as peak:
        result = fn()
    del result
    return {"peak_bytes": peak.bytes}


def _describe(recording) -> dict:
    """How many modules were recorded, their weights' shapes and the bytes they keep."""
    shapes = sorted({tuple(r.weights.shape) for r in recording.values()})
    kept = sum(r.weights.numel() * r.weights.element_size() for r in recording.values())
    return {"layers": len(recording), "shapes": [list(s) for s in shapes], "bytes": kept}


def run(config: Config) -> Part:
    part = Part(
        NAME,
        TITLE,
        columns=[
            ("workload", "workload"),
            ("contender", "recording"),
            ("ms", "fwd ms"),
            ("time_ratio", "time ×plain"),
            ("peak_mb", "peak MB"),
            ("memory_ratio", "MB ×plain"),
            ("recorded_mb", "kept MB"),
            ("note", "note"),
        ],
    )
    part.extra.update(kernels={}, recorded={})
    rows: list[dict] = []
    for workload in workloads(config.quick):
        label = workload.label
        if workload.contenders:
            model, x = build(workload, config.device)
            fns = {name: forward(model, x, name) for name in workload.contenders}
            part.extra["kernels"][label] = {name: sorted(attention_kernels(fn)) for name, fn in fns.items()}
            part.extra["recorded"][label] = {name: _describe(fn()[1]) for name, fn in fns.items() if name != "plain"}
            recorded = part.extra["recorded"][label]
            samples = measure(fns, warmup=config.warmup, repeats=config.repeats, device=config.device)
            for name, s in samples.items():
                rows.append(
                    {
                        "workload": label,
                        "side": workload.side,
                        "contender": name,
                        "ms": summary(s)["median_s"] * 1e3,
                        "samples_s": s,
                        "recorded_bytes": recorded[name]["bytes"] if name in recorded else 0,
                        "case": {"workload": vars(workload), "contender": name},
                    }
                )
            del fns, model, x
            free_memory()
        for name in workload.estimated:
            rows.append(
                {
                    "workload": label,
                    "side": workload.side,
                    "contender": name,
                    "recorded_bytes": recorded_bytes(workload, name),
                    "note": "not run: size of the weights alone (attention_matrix_bytes)",
                }
            )
        print(f"  [{NAME}] {label} timed", flush=True)
    measured = [r for r in rows if "case" in r]
    if peak_memory_supported(config.device):
        cases = [r["case"] for r in measured]
        estimates = [_memory_estimate(Workload(**c["workload"]), c["contender"]) for c in cases]
        for row, result in zip(measured, run_in_fresh_processes(NAME, cases, estimates, config), strict=True):
            row["peak_bytes"] = result["peak_bytes"]
        print(f"  [{NAME}] peak memory measured ({len(cases)} fresh processes)", flush=True)
    else:
        part.notes.append("peak memory not measured: needs Linux /proc/self/clear_refs or CUDA")
    _finish_rows(rows)
    part.rows = rows
    part.notes += _kernel_notes(part.extra["kernels"]) + _goal_notes(rows)
    return part


def _finish_rows(rows: list[dict]) -> None:
    """Megabytes and the ratios to the plain forward of the same workload."""
    plain = {r["workload"]: r for r in rows if r["contender"] == "plain"}
    for row in rows:
        row["recorded_mb"] = row["recorded_bytes"] / 2**20
        if row.get("peak_bytes") is not None:
            row["peak_mb"] = row["peak_bytes"] / 2**20
        base = plain.get(row["workload"])
        if base is None:
            continue
        if row.get("ms") is not None:
            row["time_ratio"] = row["ms"] / base["ms"]
        if row.get("peak_bytes") is not None and base.get("peak_bytes"):
            row["memory_ratio"] = row["peak_bytes"] / base["peak_bytes"]


def _kernel_notes(kernels: dict[str, dict[str, list[str]]]) -> list[str]:
    return [
        f"{label}: attention kernels "
        + "; ".join(f"{name}: {', '.join(k) or 'none (explicit weights)'}" for name, k in by_name.items())
        for label, by_name in kernels.items()
    ]


def _goal_notes(rows: list[dict]) -> list[str]:
    """The issue's goals, checked against this run."""
    notes = []
    for row in rows:
        if row["workload"].startswith("vit_") and row["contender"] == "all" and row.get("time_ratio"):
            ok = row["time_ratio"] <= VIT_TIME_GOAL
            notes.append(
                f"goal {row['workload']} record all layers <= {VIT_TIME_GOAL}x the plain time: "
                f"{row['time_ratio']:.2f}x {'met' if ok else 'NOT met'}"
            )
    few = [r for r in rows if r["contender"] == "few queries" and r.get("memory_ratio")]
    if few:
        row = max(few, key=lambda r: r["side"])  # the largest grid run
        ok = row["memory_ratio"] <= FEW_QUERIES_MEMORY_GOAL
        notes.append(
            f"goal {row['workload']} record {NUM_POINTS} queries <= {FEW_QUERIES_MEMORY_GOAL}x the plain "
            f"peak memory: {row['memory_ratio']:.2f}x {'met' if ok else 'NOT met'}"
        )
    return notes
