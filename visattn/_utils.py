"""Small helpers shared across layers: pairs, a dry forward pass in eval mode, input checks, native bf16.

A leaf: imports nothing of visattn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["check_images", "cpu_has_native_bf16", "dry_forward", "eval_mode", "require_finite", "to_pair"]


def to_pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``7`` → ``(7, 7)``; ``(h, w)`` or ``[h, w]`` → ``(h, w)``."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matrix products natively on this CPU (AVX512-BF16 or AMX).

    Asked of oneDNN rather than read from the CPU flags, so that ``ONEDNN_MAX_CPU_ISA=AVX2``
    (which emulates bf16 on any CPU) is seen too.
    """
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for a dry run (BatchNorm statistics untouched); each module's flag restored."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag


def dry_forward(
    model: nn.Module, input_size: tuple[int, ...], call: Callable[[Tensor], Any] | None = None, random: bool = False
) -> Any:
    """``call(x)`` (default ``model(x)``) on one ``(1, *input_size)`` image in eval mode without
    gradients, on the model's device and floating dtype. The image is zeros, or seeded normal
    noise with ``random``."""
    param = next(model.parameters(), None)
    if random:
        x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
    else:
        x = torch.zeros(1, *input_size)
    if param is not None:
        x = x.to(param.device, param.dtype if param.is_floating_point() else None)
    with torch.no_grad(), eval_mode(model):
        return (call or model)(x)


def check_images(x: Tensor, in_chans: int) -> None:
    """Raise a clear error unless ``x`` is a batch of images ``(B, in_chans, H, W)``."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f"expected images (B, {in_chans}, H, W), got {tuple(x.shape)}"
            + (f"; build the model with in_chans={x.shape[1]}" if x.dim() == 4 else "")
        )


def require_finite(values: Tensor | np.ndarray, what: str, hint: str) -> None:
    """Raise a one-line `ValueError` unless every value is finite: `"{what}: 3 of 24 values are NaN or
    infinite; {hint}"` (`what` names the values, `hint` the likely cause or the fix). Any shape."""
    values = torch.as_tensor(values)
    if values.is_floating_point() and not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"{what}: {bad} of {values.numel()} values are NaN or infinite; {hint}")
