"""Small helpers shared across layers: pairs, a dry forward pass in eval mode, input checks, native bf16,
SIGTERM handled like Ctrl-C.

A leaf: imports nothing of visattn.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "Terminated",
    "check_images",
    "cpu_has_native_bf16",
    "dry_forward",
    "eval_mode",
    "require_finite",
    "sigterm_raises",
    "to_pair",
]


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


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception (see `sigterm_raises`): a `KeyboardInterrupt`, so that it is handled
    as Ctrl-C is; ``signum`` tells the two apart (a plain `KeyboardInterrupt` has none: SIGINT)."""

    signum = signal.SIGTERM


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While open, SIGTERM raises `Terminated` in the main thread instead of ending the process at
    once, so that what Ctrl-C runs runs too: ``finally`` blocks, temporary files removed, a run's
    folder kept with its checkpoint or released. Further SIGTERMs are ignored while the first is
    handled; the previous handler is restored on exit. Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


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
