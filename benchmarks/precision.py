"""Part 6: a training step in fp32 and in bf16 autocast, by model size — where bf16 starts to pay.

``train.amp=auto`` on a CPU with native bf16 picks bf16 for models of at least
``visattn.train.precision.BF16_MIN_FLOPS`` forward FLOPs per image (a rule, so that a run's
precision never depends on how busy the machine is). This part measures what the threshold is
read off: one training step (forward, loss, backward, optimizer step) on a random batch, timed in
fp32 and under bf16 autocast, alternating the two, for

- every shipped ``configs/*.yaml`` (its model, batch and image size, built as ``train.py`` builds it);
- a ladder of sizes: the canvas ViT of ``configs/digits_canvas_vit.yaml`` (64×64, 8×8 tokens,
  4 blocks) at widths `LADDER_WIDTHS`, batch 64, which differ in size only.

Rows are sorted by forward MFLOP per image (`visattn.train.precision.forward_flops`, the rule's
measure); ``bf16 / fp32`` is the step-time ratio. A note says from which size up every model was
faster in bf16 here (`crossover`): set ``BF16_MIN_FLOPS`` between that and the largest size that was not.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from timm.optim import create_optimizer_v2

from visattn._utils import cpu_has_native_bf16
from visattn.train.config import load_config
from visattn.train.data import input_shape
from visattn.train.engine import build_model
from visattn.train.precision import BF16_MIN_FLOPS, choose_precision, forward_flops

from .common import REPO_ROOT, Config, Part, bf16_enabled, measure

NAME = "precision"
TITLE = "Part 6: a training step in fp32 and in bf16 autocast, by model size (the rule of train.amp=auto)"
#: widths of the size ladder (the canvas ViT, 4 blocks, 4 heads): 30 to 950 MFLOP per image
LADDER_WIDTHS = (64, 96, 128, 192, 256, 384)
QUICK_LADDER_WIDTHS = (64,)


@dataclass
class Workload:
    """One model to time: ``model_config`` for `build_model`, a batch of ``input_size`` images."""

    label: str
    model_config: dict[str, Any]
    input_size: tuple[int, int, int]
    batch: int
    opt: str = "adamw"


def workloads(quick: bool) -> list[Workload]:
    """The shipped configs (quick: the first two, batch at most 32), then the ladder."""
    found = []
    configs = sorted((REPO_ROOT / "configs").glob("*.yaml"))
    for path in configs[:2] if quick else configs:
        cfg = load_config(path)
        chans, classes, side = input_shape(cfg.data)
        model_config = {**dict(cfg.model), "num_classes": classes or 1000, "in_chans": chans}  # folder: 1000
        batch = min(cfg.train.batch_size, 32) if quick else cfg.train.batch_size
        found.append(Workload(path.stem, model_config, (chans, side, side), batch, cfg.train.opt))
    canvas = load_config(REPO_ROOT / "configs" / "digits_canvas_vit.yaml")
    for width in QUICK_LADDER_WIDTHS if quick else LADDER_WIDTHS:
        model_config = {**dict(canvas.model), "embed_dim": width, "num_heads": 4, "num_classes": 10, "in_chans": 1}
        found.append(Workload(f"canvas ViT width {width}", model_config, (1, 64, 64), 32 if quick else 64))
    return found


def _step(workload: Workload, device: str) -> tuple[Callable[[torch.dtype | None], None], int]:
    """``(step(dtype), forward FLOPs per image)`` of one workload."""
    model = build_model(workload.model_config).to(device).train()
    flops = forward_flops(model, workload.input_size)
    optimizer = create_optimizer_v2(model, opt=workload.opt, lr=1e-4)
    x = torch.randn(workload.batch, *workload.input_size, device=device)
    y = torch.randint(0, workload.model_config["num_classes"], (workload.batch,), device=device)

    def step(dtype: torch.dtype | None) -> None:
        with torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, flops


def crossover(rows: list[dict[str, Any]]) -> float | None:
    """The smallest ``mflop`` from which every row (of those with a ``ratio``) was faster in bf16
    (``ratio < 1``); ``None`` when the largest was not."""
    timed = sorted((r for r in rows if r.get("ratio") is not None), key=lambda r: r["mflop"])
    found = None
    for row in reversed(timed):
        if row["ratio"] >= 1:
            break
        found = row["mflop"]
    return found


def _rule(device: str, flops: int) -> str:
    """What ``train.amp=auto`` picks on this machine for a model of ``flops`` per image."""
    device_type = torch.device(device).type
    native = torch.cuda.is_bf16_supported() if device_type == "cuda" else cpu_has_native_bf16()
    dtype, _ = choose_precision("auto", device_type, native, flops)
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def run(config: Config) -> Part:
    part = Part(
        NAME,
        TITLE,
        columns=[
            ("model", "model"),
            ("batch", "batch"),
            ("mflop", "MFLOP/image (fwd)"),
            ("fp32_ms", "fp32 ms/step"),
            ("bf16_ms", "bf16 ms/step"),
            ("ratio", "bf16 / fp32"),
            ("faster", "faster here"),
            ("rule", "train.amp=auto picks"),
        ],
    )
    enabled, why = bf16_enabled(config)
    for workload in workloads(config.quick):
        part.rows.append(_row(workload, config, enabled))
        print(f"  [{NAME}] {workload.label}: {part.rows[-1]}", flush=True)
    part.rows.sort(key=lambda r: r["mflop"])
    _notes(part, enabled, why)
    return part


def _row(workload: Workload, config: Config, bf16: bool) -> dict[str, Any]:
    """One workload timed in fp32 (and in bf16 when ``bf16``), alternating; medians in ms."""
    step, flops = _step(workload, config.device)
    contenders = {"fp32": functools.partial(step, None)}
    if bf16:
        contenders["bf16"] = functools.partial(step, torch.bfloat16)
    samples = measure(contenders, warmup=config.warmup, repeats=config.repeats, device=config.device)
    row = {"model": workload.label, "batch": workload.batch, "mflop": flops / 1e6}
    row["rule"] = _rule(config.device, flops)
    row["fp32_ms"] = 1e3 * statistics.median(samples["fp32"])
    if bf16:
        row["bf16_ms"] = 1e3 * statistics.median(samples["bf16"])
        row["ratio"] = row["bf16_ms"] / row["fp32_ms"]
        row["faster"] = "bf16" if row["ratio"] < 1 else "fp32"
    return row


def _notes(part: Part, enabled: bool, why: str) -> None:
    if not enabled:
        part.notes.append(f"bf16 column empty: {why}")
    else:
        found = crossover(part.rows)
        here = "no size was" if found is None else f"every model from {found:.1f} MFLOP per image up was"
        part.notes.append(f"bf16 faster here: {here} (BF16_MIN_FLOPS is {BF16_MIN_FLOPS / 1e6:.0f} MFLOP)")
    part.notes.append("steps on random batches; median of the timed repeats; MFLOP: one forward pass of one image")
