"""Small helpers shared across layers: pairs, a dry forward pass in eval mode, argument and input checks,
native bf16, SIGTERM handled like Ctrl-C.

A leaf: imports nothing of visattn.
"""

from __future__ import annotations

import numbers
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
    "ArgumentError",
    "Terminated",
    "autocast_enabled",
    "check_grid_values",
    "check_images",
    "check_probabilities",
    "check_range",
    "cpu_has_native_bf16",
    "dry_forward",
    "eval_mode",
    "human_bytes",
    "require_finite",
    "sigterm_raises",
    "to_pair",
]


def to_pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``7`` → ``(7, 7)``; ``(h, w)`` or ``[h, w]`` → ``(h, w)``."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class ArgumentError(ValueError):
    """A constructor argument outside its valid range; ``argument`` is its name (``"num_heads"``),
    so that a caller holding the arguments in a config can name the config key."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument


def check_range(
    name: str,
    value: Any,
    *,
    at_least: float | None = None,
    above: float | None = None,
    below: float | None = None,
    integer: bool = False,
    pair: bool = False,
) -> None:
    """Raise an ``ArgumentError`` naming ``name``, its value and its valid range unless ``value`` is a
    number (an ``int`` with ``integer``; never a ``bool``) with ``value >= at_least``,
    ``value > above`` and ``value < below`` (each bound only when given). With ``pair``, an
    ``(h, w)`` tuple or list of two such numbers is valid too (``img_size``, ``patch_size``).

    ``check_range("num_heads", 0, at_least=1, integer=True)`` raises
    ``num_heads=0 is not valid: it must be an integer >= 1``.
    """
    kind = numbers.Integral if integer else numbers.Real
    items = list(value) if pair and isinstance(value, (tuple, list)) and len(value) == 2 else [value]
    # two passes: the bounds compare only numbers, and (typed Any) not as `numbers.Real`, whose
    # stubs lack `>=` and `>`
    valid = all(isinstance(item, kind) and not isinstance(item, bool) for item in items) and all(
        (at_least is None or item >= at_least) and (above is None or item > above) and (below is None or item < below)
        for item in items
    )
    if not valid:
        bounds = [
            f"{sign} {bound:g}" for sign, bound in ((">=", at_least), (">", above), ("<", below)) if bound is not None
        ]
        wanted = f"{'an integer' if integer else 'a number'} {' and '.join(bounds)}".rstrip()
        raise ArgumentError(
            name, f"{name}={value!r} is not valid: it must be {wanted}" + (", or a pair (h, w) of them" if pair else "")
        )


def check_probabilities(**rates: float) -> None:
    """Raise an ``ArgumentError`` naming the argument unless each rate (``attn_drop=0.1``) is in ``[0, 1)``."""
    for name, rate in rates.items():
        check_range(name, rate, at_least=0, below=1)


def human_bytes(n: float) -> str:
    """Bytes with a binary prefix: ``150.1 KiB``, ``3.6 EiB``."""
    if n < 1024:
        return f"{n:.0f} B"
    for prefix in ("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"):
        n /= 1024
        if n < 1024 or prefix == "Ei":
            break
    return f"{n:.1f} {prefix}B"


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


def check_images(x: Tensor, in_chans: int, weight: Tensor | None = None) -> None:
    """Raise a clear error unless ``x`` is a batch of images ``(B, in_chans, H, W)`` with the
    values ``check_grid_values`` asks for (``weight``: the first weight they meet)."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f"expected images (B, {in_chans}, H, W), got {tuple(x.shape)}"
            + (f"; build the model with in_chans={x.shape[1]}" if x.dim() == 4 else "")
        )
    check_grid_values(x, weight, "the model")


def autocast_enabled(device: torch.device) -> bool:
    """Whether an autocast region is open for ``device``'s type (only CPU and CUDA have one)."""
    return device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)


def check_grid_values(x: Tensor, weight: Tensor | None, owner: str) -> None:
    """Raise a ``ValueError`` unless the ``(B, C, H, W)`` input ``x`` of ``owner`` is floating point,
    of ``weight``'s dtype (any floating dtype inside an autocast region) and at least 1×1.

    Only dtypes and sizes are read, so the check is the same under ``torch.compile``."""
    if not x.is_floating_point():
        raise ValueError(f"{owner} needs a floating-point input, got {x.dtype}; convert it with x.float()")
    if weight is not None and x.dtype != weight.dtype and not autocast_enabled(x.device):
        raise ValueError(
            f"{owner} has {weight.dtype} weights but got a {x.dtype} input; convert one to the other "
            f"(x.to({weight.dtype}) or model.to({x.dtype}))"
        )
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        raise ValueError(f"{owner} got an empty grid {tuple(x.shape)}: height and width must be at least 1")


def require_finite(values: Tensor | np.ndarray, what: str, hint: str) -> None:
    """Raise a one-line `ValueError` unless every value is finite: `"{what}: 3 of 24 values are NaN or
    infinite; {hint}"` (`what` names the values, `hint` the likely cause or the fix). Any shape."""
    values = torch.as_tensor(values)
    if values.is_floating_point() and not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"{what}: {bad} of {values.numel()} values are NaN or infinite; {hint}")
