"""Part 6: fp32 against bf16 autocast for a training step of every shipped config.

For each ``configs/*.yaml`` the model is built as ``train.py`` builds it (dataset channels and
classes, the config's model keywords) and one training step (forward, loss, backward, optimizer
step) on a random batch of the config's batch size and image size is timed in fp32 and under
bf16 autocast, alternating the two. The last column is what ``train.amp=auto`` would choose here
(bf16 only when at least 10 % faster; see ``visattn.train.engine.choose_precision``).
"""

from __future__ import annotations

import functools
import statistics
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2

from visattn.train.config import load_config
from visattn.train.data import input_shape
from visattn.train.engine import BF16_MIN_GAIN, build_model

from .common import REPO_ROOT, Config, Part, bf16_enabled, measure

NAME = "precision"
TITLE = "Part 6: a training step of each shipped config in fp32 and in bf16 autocast"


def _step(config_path: Path, device: str, quick: bool):
    """``(step(dtype), batch size)`` for one shipped config."""
    cfg = load_config(config_path)
    chans, classes, side = input_shape(cfg.data)
    classes = classes or 1000  # an image folder: ImageNet-sized head
    batch = min(cfg.train.batch_size, 32) if quick else cfg.train.batch_size
    model = build_model({**dict(cfg.model), "num_classes": classes, "in_chans": chans}).to(device).train()
    optimizer = create_optimizer_v2(model, opt=cfg.train.opt, lr=1e-4)
    x = torch.randn(batch, chans, side, side, device=device)
    y = torch.randint(0, classes, (batch,), device=device)

    def step(dtype: torch.dtype | None) -> None:
        with torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, batch


def run(config: Config) -> Part:
    part = Part(
        NAME,
        TITLE,
        columns=[
            ("config", "config"),
            ("batch", "batch"),
            ("fp32_ms", "fp32 ms/step"),
            ("bf16_ms", "bf16 ms/step"),
            ("ratio", "bf16 / fp32"),
            ("auto", "train.amp=auto picks"),
        ],
    )
    enabled, why = bf16_enabled(config)
    configs = sorted((REPO_ROOT / "configs").glob("*.yaml"))
    for path in configs[:2] if config.quick else configs:
        step, batch = _step(path, config.device, config.quick)
        contenders = {"fp32": functools.partial(step, None)}
        if enabled:
            contenders["bf16"] = functools.partial(step, torch.bfloat16)
        samples = measure(contenders, warmup=config.warmup, repeats=config.repeats, device=config.device)
        row = {"config": path.stem, "batch": batch, "fp32_ms": 1e3 * statistics.median(samples["fp32"])}
        if enabled:
            row["bf16_ms"] = 1e3 * statistics.median(samples["bf16"])
            row["ratio"] = row["bf16_ms"] / row["fp32_ms"]
            row["auto"] = "bf16" if row["ratio"] < BF16_MIN_GAIN else "fp32"
        part.rows.append(row)
        print(f"  [{NAME}] {path.stem}: {row}", flush=True)
    if not enabled:
        part.notes.append(f"bf16 column empty: {why}")
    part.notes.append("steps on random batches of the config's batch and image size; median of the timed repeats")
    return part
