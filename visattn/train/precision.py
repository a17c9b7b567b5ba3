"""The precision a run trains in: a rule of the hardware and the model's size, not a stopwatch.

``train.amp`` = ``none``, ``bf16`` or ``fp16`` (CUDA only) force one. ``auto`` (the default)
follows `choose_precision`:

- on CUDA: bf16 where the device supports it, else fp32;
- on a CPU: bf16 only where oneDNN runs bf16 matrix products natively (AVX512-BF16 or AMX;
  elsewhere they are emulated, 6-10x slower than fp32) *and* the model does at least
  `BF16_MIN_FLOPS` per image in its forward pass (`forward_flops`); a smaller model spends
  more on the casts than the matrix units save.

The same config on the same machine therefore trains in the same precision every time, however
busy the machine is. A resumed ``auto`` run keeps the precision it started with (stored in
``last.pt``). Step times behind the threshold are measured by ``python -m benchmarks --only precision``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from .._utils import cpu_has_native_bf16, dry_forward
from ..profiling import count_flops
from .distributed import Processes, from_main

__all__ = [
    "BF16_MIN_FLOPS",
    "DTYPE_NAMES",
    "autocast",
    "choose_precision",
    "forward_flops",
    "run_precision",
]

#: ``train.amp=auto`` on a CPU with native bf16 picks bf16 for models of at least this many
#: forward FLOPs per image (`forward_flops`). Read off ``python -m benchmarks --only precision``,
#: which prints the bf16/fp32 step-time ratio of models of increasing size (2 threads): on the
#: AMD EPYC (Zen 4, AVX512-BF16, no AMX) the shipped configs of 2.4-31 MFLOP per image took
#: 1.14-2.07x their fp32 step time in bf16, those of 278-1116 MFLOP 0.40-0.67x; on the Intel Xeon
#: with AMX models up to 112 MFLOP took 1.14-1.9x, those from 245 MFLOP 0.43-0.87x. The
#: threshold lies between on both (docs/data/precision.json, docs/data/precision_xeon.json).
BF16_MIN_FLOPS = 200e6

#: the name of each autocast dtype (``None``: no autocast, fp32), as logs and ``last.pt`` say it
DTYPE_NAMES: dict[torch.dtype | None, str] = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
_FORCED = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def choose_precision(
    amp: str, device_type: str, native_bf16: bool, flops_per_image: float | None = None
) -> tuple[torch.dtype | None, str]:
    """The autocast dtype for ``train.amp`` (``None``: fp32) and the reason, for the log.

    Args:
        amp: ``auto``, ``none``, ``bf16`` or ``fp16``.
        device_type: ``"cuda"`` or ``"cpu"``.
        native_bf16: whether the device runs bf16 natively (`torch.cuda.is_bf16_supported`;
            on a CPU `visattn._utils.cpu_has_native_bf16`).
        flops_per_image: the model's forward FLOPs per image (`forward_flops`); needed only
            for ``auto`` on a CPU with native bf16.

    Raises:
        ValueError: ``fp16`` on a CPU, or ``flops_per_image`` missing where it decides.
    """
    if amp in _FORCED:
        if amp == "fp16" and device_type != "cuda":
            raise ValueError("train.amp=fp16 needs CUDA; use train.amp=bf16 or none on CPU")
        return _FORCED[amp], f"train.amp={amp}"
    if device_type == "cuda":
        support = "with" if native_bf16 else "without"
        return (torch.bfloat16 if native_bf16 else None), f"train.amp=auto on a CUDA device {support} bf16 support"
    if not native_bf16:
        return (
            None,
            "train.amp=auto: oneDNN has no native bf16 here (no AVX512-BF16/AMX), so bf16 would be emulated, slower",
        )
    if flops_per_image is None:
        raise ValueError("train.amp=auto on a CPU with native bf16 decides by the model's FLOPs per image; give them")
    size = f"the model does {flops_per_image / 1e6:.1f} MFLOP per image"
    threshold = f"{BF16_MIN_FLOPS / 1e6:.0f} MFLOP"
    if flops_per_image >= BF16_MIN_FLOPS:
        return torch.bfloat16, f"train.amp=auto: native bf16 on this CPU and {size}, at least {threshold}"
    return None, (
        f"train.amp=auto: native bf16 on this CPU, but {size}, under the {threshold} from which bf16 is faster"
    )


def forward_flops(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """FLOPs of one forward pass of ``model`` on one ``input_size`` image (`visattn.profiling.count_flops`
    of a dry run in eval mode: counted, not timed, so the same model always gives the same number)."""
    return count_flops(lambda: dry_forward(model, input_size))


def run_precision(
    amp: str, model: nn.Module, input_size: tuple[int, ...], procs: Processes, state: dict[str, Any] | None = None
) -> tuple[torch.dtype | None, str]:
    """`choose_precision` for this machine and ``model`` (on the main process, shared with every
    process of the run). A resumed ``auto`` run (``state``: its ``last.pt``) keeps the precision
    it started with, so that it continues the same arithmetic even on other hardware."""
    if amp != "auto":  # forced: the same in every process, whatever the hardware
        return choose_precision(amp, procs.device.type, native_bf16=False)
    if state is not None and state.get("precision") in _DTYPES:
        return _DTYPES[state["precision"]], "train.amp=auto: as chosen when the run started (from last.pt)"
    choice: list[Any] = [None, ""]
    if procs.is_main:
        device_type = procs.device.type
        native = torch.cuda.is_bf16_supported() if device_type == "cuda" else cpu_has_native_bf16()
        flops = forward_flops(model, input_size) if device_type == "cpu" and native else None
        choice = list(choose_precision(amp, device_type, native, flops))
    dtype, reason = from_main(choice, procs)
    return dtype, reason


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``'s type; nothing for ``None`` (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
