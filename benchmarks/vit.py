"""Part 2: visattn ``VisionTransformer`` against timm's, identical hyper-parameters and weights.

For each model the timm twin is built with the same hyper-parameters, its weights are loaded
into the visattn model (strict: every name maps one to one) and the logits are compared before
timing. Inference = eval mode under ``torch.inference_mode``; training step = train mode,
cross-entropy, backward, AdamW step, ``zero_grad(set_to_none=True)``. bf16 runs under
``torch.autocast`` (the weights stay fp32), as a training script would use it. With ``--compile``
both models are also run through ``torch.compile`` (default options, the same for both; the
warm-up call compiles) and compared with each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visattn import create_model

from .common import Config, Part, bf16_enabled, free_memory, measure, summary

NAME = "vit"
TITLE = "Part 2: visattn VisionTransformer vs timm VisionTransformer (same hyper-parameters, images/s)"
#: model name → (batch size, timm constructor keywords); the patch-16 ones are timm's own names
MODELS: dict[str, tuple[int, dict]] = {
    "vit_tiny_patch16_224": (8, dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)),
    "vit_small_patch16_224": (8, dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)),
    "vit_base_patch16_224": (8, dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)),
    "vit_tiny_patch4_32": (32, dict(img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=12, num_heads=3)),
}
QUICK_MODELS = ("vit_tiny_patch4_32",)
#: the models a run measures unless ``--models`` says otherwise (ViT-B/16 is for the GPU suite)
DEFAULT_MODELS = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_tiny_patch4_32")
MODES = ("inference", "train_step")


def make_pair(name: str, device: str) -> dict[str, nn.Module]:
    """``{"visattn": ..., "timm": ...}``: the same model in both libraries with the same weights."""
    torch.manual_seed(0)
    theirs = timm.models.VisionTransformer(**MODELS[name][1])
    ours = create_model(name)
    ours.load_state_dict(theirs.state_dict())
    return {"visattn": ours.to(device), "timm": theirs.to(device)}


def make_batch(name: str, device: str, batch: int | None = None) -> tuple[Tensor, Tensor]:
    """Random images ``(B, 3, H, W)`` at the model's size and random labels ``(B,)``."""
    batch = batch or MODELS[name][0]
    kwargs = MODELS[name][1]
    size = kwargs.get("img_size", 224)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, kwargs.get("num_classes", 1000), (batch,), generator=gen)
    return x.to(device), y.to(device)


def autocast(device: str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.split(":")[0], dtype=dtype)


def step(model: nn.Module, x: Tensor, y: Tensor, mode: str, dtype: torch.dtype, device: str) -> Callable[[], object]:
    """One inference forward, or one training step (forward, loss, backward, AdamW step)."""
    if mode == "inference":

        def infer() -> Tensor:
            model.eval()
            with torch.inference_mode(), autocast(device, dtype):
                return model(x)

        return infer

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> float:
        model.train()
        with autocast(device, dtype):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return train_step


def logits_difference(pair: dict[str, nn.Module], name: str, device: str) -> float:
    x, _ = make_batch(name, device, batch=1)
    with torch.inference_mode():
        return (pair["visattn"].eval()(x) - pair["timm"].eval()(x)).abs().max().item()


def _rows(name: str, pair: dict[str, nn.Module], compiled: bool, dtypes: list, config: Config) -> list[dict]:
    """One row per dtype and mode: both libraries' images/s, timed against each other."""
    batch = MODELS[name][0] if not config.quick else min(MODELS[name][0], 8)
    x, y = make_batch(name, config.device, batch)
    models = {lib: torch.compile(m) for lib, m in pair.items()} if compiled else pair
    rows = []
    for dtype in dtypes:
        for mode in MODES:
            fns = {lib: step(m, x, y, mode, dtype, config.device) for lib, m in models.items()}
            samples = measure(fns, warmup=config.warmup, repeats=config.repeats, device=config.device)
            row = {
                "model": name,
                "dtype": str(dtype).removeprefix("torch."),
                "mode": mode,
                "compiled": "torch.compile" if compiled else "eager",
                "batch": batch,
            }
            for lib, s in samples.items():
                row[f"{lib}_img_s"] = batch / summary(s)["median_s"]
                row[f"{lib}_samples_s"] = s
            row["ratio"] = row["visattn_img_s"] / row["timm_img_s"]
            rows.append(row)
            del fns
            free_memory()
    return rows


def run(config: Config) -> Part:
    names = list(config.models or (QUICK_MODELS if config.quick else DEFAULT_MODELS))
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown} for the ViT benchmark; choose from {sorted(MODELS)}")
    use_bf16, why_not = bf16_enabled(config)
    dtypes = [torch.float32] + ([torch.bfloat16] if use_bf16 else [])
    part = Part(
        NAME,
        TITLE,
        columns=[
            ("model", "model"),
            ("dtype", "dtype"),
            ("mode", "mode"),
            ("compiled", "compiled"),
            ("batch", "batch"),
            ("visattn_img_s", "visattn img/s"),
            ("timm_img_s", "timm img/s"),
            ("ratio", "visattn/timm"),
            ("note", "note"),
        ],
    )
    differences = []
    for name in names:
        pair = make_pair(name, config.device)
        differences.append(logits_difference(pair, name, config.device))
        for compiled in (False, True) if config.compile else (False,):
            part.rows += _rows(name, pair, compiled, dtypes, config)
        if not use_bf16:
            part.rows.append({"model": name, "dtype": "bfloat16", "mode": "-", "note": why_not})
        print(f"  [{NAME}] {name} done", flush=True)
    ratios = [r["ratio"] for r in part.rows if r.get("ratio") is not None]
    if ratios:
        part.notes.append(
            f"visattn/timm throughput ratio: min {min(ratios):.2f}, max {max(ratios):.2f} (goal >= 1.0; "
            "differences within a few % are noise on a shared machine)"
        )
    part.extra["max_abs_logit_difference"] = max(differences)
    part.notes.append(f"weights copied from timm into visattn (strict load); logits agree to {max(differences):.1e}")
    return part
