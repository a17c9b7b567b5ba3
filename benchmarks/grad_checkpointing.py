"""Part 7: gradient checkpointing — peak memory and time of one ViT training step with and without it.

``python -m benchmarks --only grad_checkpointing``: ViT-S/16 at 224, batches 8 and 32
(``--quick``: the 32×32 ViT-Ti, batch 4). A training step is part 2's: train mode, cross-entropy, backward, AdamW step,
``zero_grad(set_to_none=True)``, fp32. Peak memory: each case in a fresh process (one at a time),
after one warm-up step (which allocates AdamW's state), the high-water mark of the measured step
above what the process held before it (:class:`benchmarks.common.PeakMemory`: resident memory on
Linux, allocated memory on CUDA); the weights, AdamW's state and the batch are held before, so the
peak is the step's activations, gradients and temporaries. Time: the two contenders alternate in
this process (median of the repeats). Only ratios measured in the same run are comparable.
"""

from __future__ import annotations

import torch

from visattn import create_model

from . import vit
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

NAME = "grad_checkpointing"
TITLE = "Part 7: gradient checkpointing (one fp32 training step with and without set_grad_checkpointing)"
CONTENDERS = {"off": False, "on": True}
#: (model, batch sizes), and with --quick
CASES = ("vit_small_patch16_224", (8, 32))
QUICK_CASES = ("vit_tiny_patch4_32", (4,))
MB = 2**20


def _train_step(model_name: str, batch: int, checkpointing: bool, device: str):
    """One training step of ``model_name`` on a fixed batch (the same weights for both contenders)."""
    torch.manual_seed(0)
    model = create_model(model_name).to(device)
    model.set_grad_checkpointing(checkpointing)
    images, labels = vit.make_batch(model_name, device, batch=batch)
    return vit.step(model, images, labels, "train_step", torch.float32, device)


def child(case: dict, device: str) -> dict:
    """(In a fresh process) the peak memory of one training step, after a warm-up step."""
    fixed_mmap_threshold(64 << 10)  # count the small per-block tensors too
    step = _train_step(case["model"], case["batch"], case["checkpointing"], device)
    step()
    free_memory()
    with PeakMemory(device) as peak:
        step()
    return {"peak_bytes": peak.bytes}


def run(config: Config) -> Part:
    model_name, batches = QUICK_CASES if config.quick else CASES
    part = Part(
        NAME,
        TITLE,
        columns=[
            ("model", "model"),
            ("batch", "batch"),
            ("checkpointing", "checkpointing"),
            ("peak_mb", "step peak MB"),
            ("memory_ratio", "peak ×off"),
            ("ms", "step ms"),
            ("time_ratio", "time ×off"),
        ],
    )
    for batch in batches:
        steps = {label: _train_step(model_name, batch, on, config.device) for label, on in CONTENDERS.items()}
        seconds = measure(steps, warmup=config.warmup, repeats=config.repeats, device=config.device)
        del steps
        free_memory()
        peaks = {label: None for label in CONTENDERS}
        if peak_memory_supported(config.device):
            cases = [dict(model=model_name, batch=batch, checkpointing=on) for on in CONTENDERS.values()]
            results = run_in_fresh_processes(NAME, cases, [0] * len(cases), config, jobs=1)
            peaks = {label: r["peak_bytes"] for label, r in zip(CONTENDERS, results, strict=True)}
        base_s = summary(seconds["off"])["median_s"]
        for label in CONTENDERS:
            median_s = summary(seconds[label])["median_s"]
            row = dict(model=model_name, batch=batch, checkpointing=label, ms=median_s * 1e3)
            row["time_ratio"] = median_s / base_s
            if peaks[label] is not None:
                row.update(peak_bytes=peaks[label], peak_mb=peaks[label] / MB)
                row["memory_ratio"] = peaks[label] / peaks["off"]
            part.rows.append(row)
    return part
