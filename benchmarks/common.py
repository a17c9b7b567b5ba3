"""What every benchmark part shares: the run configuration, alternating timing, peak memory in a
fresh process, the machine description, tables and plots.

A part is a module with ``NAME``, ``TITLE`` and ``run(config) -> Part``; see ``__main__.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import multiprocessing
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from visattn._io import atomic_write
from visattn._utils import cpu_has_native_bf16

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"


@dataclass
class Config:
    """How a run measures; set from the command line (``python -m benchmarks --help``)."""

    device: str = "cpu"
    quick: bool = False
    warmup: int = 1
    repeats: int = 5
    threads: int | None = None
    max_memory_gb: float = 6.0
    bf16: str = "auto"  # "auto" | "on" | "off"
    grids: Sequence[int] | None = None  # part 1 override
    models: Sequence[str] | None = None  # part 2 override
    plots: bool = True
    out: Path = DEFAULT_OUT
    compile: bool = False  # parts 2 and 3: also torch.compile both ViTs

    @property
    def max_memory_bytes(self) -> int:
        return int(self.max_memory_gb * 2**30)


def results_path(config: Config) -> Path:
    """Where a run writes its JSON: ``<out>/bench-<device>[-quick].json``."""
    return config.out / f"bench-{config.device.split(':')[0]}{'-quick' if config.quick else ''}.json"


@dataclass
class Part:
    """One part's results: rows of a table (JSON-ready dicts) and how to print them."""

    name: str
    title: str
    columns: list[tuple[str, str]]  # (row key, printed header)
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def table(self) -> str:
        """The rows as a fixed-width text table (missing values print as ``-``)."""
        headers = [h for _, h in self.columns]
        cells = [[_fmt(row.get(key)) for key, _ in self.columns] for row in self.rows]
        widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
        return "\n".join(lines)

    def markdown(self) -> str:
        """The rows as a Markdown table (for the README)."""
        return markdown_table(self.columns, self.rows)

    def to_json(self) -> dict:
        return asdict(self)


def markdown_table(columns: Sequence[tuple[str, str]], rows: Sequence[dict]) -> str:
    """``columns`` (row key, header) and JSON rows as a Markdown table; missing values print as ``–``."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = ["–" if row.get(key) is None else _fmt(row.get(key)) for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        magnitude = abs(value)
        return f"{value:.3g}" if magnitude < 100 else f"{value:.0f}"
    return str(value)


# --- devices and timing ----------------------------------------------------------------------


def synchronize(device: str) -> None:
    """Wait for queued kernels (CUDA is asynchronous; the CPU is not)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def measure(
    contenders: dict[str, Callable[[], object]], *, warmup: int, repeats: int, device: str
) -> dict[str, list[float]]:
    """Seconds per call of each contender, alternating them in one process.

    Every contender is warmed up ``warmup`` times, then each round times every contender once;
    the starting contender rotates from round to round, so none always runs right after the
    same neighbour. Returns all ``repeats`` samples per contender (report their median).
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for i in range(len(names)):
            name = names[(round_ + i) % len(names)]
            start = time.perf_counter()
            contenders[name]()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    """Median, min and max seconds of a list of timings."""
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples)}


def bf16_enabled(config: Config) -> tuple[bool, str]:
    """Whether bf16 cases run, and why not when they do not.

    ``auto`` runs them on CUDA and on CPUs whose oneDNN has native bf16 (AVX-512 BF16 / AMX);
    elsewhere PyTorch falls back to scalar bf16 matrix products, 10–100× slower than fp32, and the
    cases would take minutes each without saying anything about visattn.
    """
    if config.bf16 == "on":
        return True, ""
    if config.bf16 == "off":
        return False, "bf16 off (--bf16 off)"
    if config.device.startswith("cuda"):
        return True, ""
    if cpu_has_native_bf16():
        return True, ""
    return False, "no native bf16 on this CPU (oneDNN bf16 unsupported): skipped, --bf16 on forces it"


def machine_info(device: str) -> dict:
    """The machine and software a result was measured on, and how busy the CPU was."""
    info = {
        "device": device,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "loadavg_start": list(os.getloadavg()),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def free_memory() -> None:
    """Collect garbage so tensors of a finished case are gone before the next one starts."""
    gc.collect()


# --- peak memory in a fresh process ----------------------------------------------------------


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


class PeakMemory:
    """The peak memory a block of code adds, in this process.

    CPU (Linux): writing ``5`` to ``/proc/self/clear_refs`` resets the resident-set high-water
    mark ``VmHWM`` to the current ``VmRSS``; the peak is ``VmHWM`` after the block minus that
    baseline. (``getrusage``'s ``ru_maxrss`` cannot be reset and is inherited across
    fork+exec, so it is not used.) The kernel folds the current RSS into ``VmHWM`` when memory is
    unmapped, which is why :func:`run_in_fresh_processes` makes every block over 1 MiB a mapping
    of its own. CUDA: ``torch.cuda`` peak statistics, reset the same way.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.bytes = 0

    def __enter__(self) -> PeakMemory:
        free_memory()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self._base = _status_kib("VmHWM") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_kib("VmHWM") * 1024
        self.bytes = peak - self._base


def peak_memory_supported(device: str) -> bool:
    """Whether :class:`PeakMemory` works here (CUDA, or Linux with a resettable ``VmHWM``)."""
    if device.startswith("cuda"):
        return True
    return Path("/proc/self/clear_refs").exists() and Path("/proc/self/status").exists()


def fixed_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Make glibc ``mmap`` every allocation over ``nbytes`` (default 1 MiB) and unmap it when freed.

    By default glibc raises its mmap threshold after large frees and then serves large blocks
    from a heap that it keeps resident, so a warm-up's freed memory would be silently reused
    (or fragment the heap) and the high-water mark would not be the bytes the case needs.
    :func:`run_in_fresh_processes` sets 1 MiB; a case whose tensors are smaller (a batch-1 ViT)
    lowers it so they are counted too.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-3, nbytes)  # M_MMAP_THRESHOLD


def _child_entry(module: str, case: dict, device: str, threads: int | None, conn) -> None:
    try:
        fixed_mmap_threshold()
        if threads:
            torch.set_num_threads(threads)
        conn.send(("ok", importlib.import_module(f"benchmarks.{module}").child(case, device)))
    except BaseException:  # report any failure to the parent instead of dying silently
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_in_fresh_processes(
    module: str, cases: list[dict], estimates: list[int], config: Config, jobs: int | None = None
) -> list[dict]:
    """Run ``benchmarks.<module>.child(case, device)`` for each case, each in a fresh process.

    The processes are forked from a *forkserver* that has imported torch, timm and visattn but
    run nothing, so each case starts from the same clean state without paying the imports again.
    Peak memory is per process, so cases run side by side (at most ``jobs``, default the CPU
    count, 1 on CUDA) as long as their estimated peaks (``estimates``, bytes) fit in
    ``--max-memory-gb`` together; nothing is timed meanwhile. Returns each case's dict, in order.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "timm", "visattn", f"benchmarks.{module}"])
    jobs = jobs or (1 if config.device.startswith("cuda") else max(1, os.cpu_count() or 1))
    pending = list(range(len(cases)))
    running: dict[int, tuple[multiprocessing.process.BaseProcess, object]] = {}
    results: list[dict | None] = [None] * len(cases)
    while pending or running:
        in_use = sum(estimates[i] for i in running)
        while (
            pending
            and len(running) < jobs
            and (not running or in_use + estimates[pending[0]] <= config.max_memory_bytes)
        ):
            i = pending.pop(0)
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child_entry, args=(module, cases[i], config.device, config.threads, send))
            proc.start()
            send.close()
            running[i] = (proc, receive)
            in_use += estimates[i]
        for i, (proc, receive) in list(running.items()):
            if not receive.poll(0.05):
                continue
            try:
                status, value = receive.recv()
            except EOFError:  # it died before answering (e.g. killed for memory)
                status, value = "error", "the process ended without a result"
            proc.join()
            del running[i]
            if status != "ok":
                for other, _ in running.values():
                    other.kill()
                raise RuntimeError(
                    f"benchmark child for {module} {cases[i]} failed (exit code {proc.exitcode}):\n{value}"
                )
            results[i] = value
    return results


# --- plots -----------------------------------------------------------------------------------


def save_figure(fig, config: Config, stem: str) -> str:
    """Write a matplotlib figure to ``<out>/<stem>-<device>.png``; return the path."""
    import matplotlib.pyplot as plt

    config.out.mkdir(parents=True, exist_ok=True)
    path = config.out / f"{stem}-{config.device.split(':')[0]}{'-quick' if config.quick else ''}.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    return str(path)
