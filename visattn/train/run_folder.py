"""The run folder (``runs/NAME``): claimed, locked, released, and the files that grow with the run.

A new run claims its folder with an exclusive ``mkdir`` (``NAME``, else ``NAME-2``, ``NAME-3`` ...)
before anything is built, so two runs never share one; a resumed run takes the folder it is
given. While the run trains the folder is locked (`visattn.train.lock`): another process that
asks for it fails with `RunFolderBusy` naming this one's PID. A new run that fails or is
interrupted before its first checkpoint leaves no folder behind (nor the parent folders made for
it). Under ``torchrun`` only the main process claims, locks and writes; the others learn the folder
from it.

Besides the checkpoints (`visattn.train.checkpoints`) the folder holds ``config.yaml``,
``metrics.jsonl`` (one JSON line per epoch, appended atomically; cut back to the checkpoint's
epoch on resume) and ``curves.png`` (`plot_curves`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._io import CheckpointError, DiskFullError, atomic_append_text, atomic_write, atomic_write_text, check_output
from .distributed import Processes, from_main
from .lock import lock_run_folder

__all__ = [
    "TrainingInterrupted",
    "append_metrics",
    "claimed_run_folder",
    "clean_for_resume",
    "plot_curves",
    "preload_plotting",
]

#: what a new run writes before its first checkpoint: removed with the folder when it stops there
_EARLY_FILES = ("config.yaml", "metrics.jsonl", "curves.png")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during `fit`: ``run_dir`` is the run's folder, ``resumable`` whether it
    holds a ``last.pt``, ``signum`` the signal (`signal.SIGINT` or `signal.SIGTERM`)."""

    def __init__(self, run_dir: Path, resumable: bool, signum: int = signal.SIGINT) -> None:
        super().__init__(str(run_dir))
        self.run_dir, self.resumable, self.signum = run_dir, resumable, signum


@contextlib.contextmanager
def claimed_run_folder(
    out_dir: str | os.PathLike,
    name: str,
    resume: str | os.PathLike | None,
    procs: Processes,
    curves_after: tuple[type[BaseException], ...] = (),
) -> Iterator[Path]:
    """The run's folder, claimed (``out_dir/name``, or the folder of ``resume``) and locked while open.

    An exception that ends the run is raised as one that says what was kept: Ctrl-C and SIGTERM
    as `TrainingInterrupted`, a full disk as `DiskFullError` naming the checkpoint to resume
    from; a new run's folder without a checkpoint is removed first. After one of ``curves_after``
    the curves of the epochs done are drawn.
    """
    absolute = Path(out_dir).absolute()
    new_folders = [folder for folder in (absolute, *absolute.parents) if not folder.exists()]  # deepest first
    run_dir, lock = _agreed_run_dir(Path(out_dir), name, resume, procs)
    try:
        with lock:
            yield run_dir
    except BaseException as err:
        if procs.is_main and resume is None:
            _release(run_dir, new_folders)
        if procs.is_main and isinstance(err, curves_after) and (run_dir / "metrics.jsonl").is_file():
            plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
        stopped = _stopped(err, run_dir)
        if stopped is err:
            raise
        raise stopped from err


def _stopped(err: BaseException, run_dir: Path) -> BaseException:
    """The exception to raise after ``err`` stopped the run in ``run_dir``: ``err`` itself, or one
    that says what was kept (`TrainingInterrupted` for Ctrl-C and SIGTERM, `DiskFullError`)."""
    resumable = (run_dir / "last.pt").is_file()
    if isinstance(err, KeyboardInterrupt) and not isinstance(err, TrainingInterrupted):
        return TrainingInterrupted(run_dir, resumable, getattr(err, "signum", signal.SIGINT))
    if isinstance(err, DiskFullError):
        if resumable:
            last = run_dir / "last.pt"
            kept = f"the last complete checkpoint {last} is kept: free space, then continue with --resume {run_dir}"
        else:
            gone = "" if run_dir.exists() else f" ({run_dir} was removed)"
            kept = f"the run stopped before its first checkpoint, so there is nothing to resume{gone}"
        return DiskFullError(err.path, kept)
    return err


def _agreed_run_dir(
    out_dir: Path, name: str, resume: str | os.PathLike | None, procs: Processes
) -> tuple[Path, contextlib.AbstractContextManager]:
    """The main process claims the folder and locks it; the other processes agree on it, and fail
    with the main one when it cannot have it. Returns the folder and its lock (a do-nothing
    context in the other processes)."""
    run_dir, failure = Path(), None
    lock: contextlib.AbstractContextManager = contextlib.nullcontext()
    if procs.is_main:
        try:
            run_dir = _resumed_folder(resume) if resume is not None else _new_folder(out_dir / name)
            lock = lock_run_folder(run_dir)
        except Exception as err:  # raised below, once the other processes know
            failure = err
    shared_dir, shared_failure = from_main([str(run_dir), None if failure is None else str(failure)], procs)
    if failure is not None:
        raise failure
    if shared_failure is not None:
        raise RuntimeError(f"rank 0 could not claim the run folder: {shared_failure}")
    return Path(shared_dir), lock


def _resumed_folder(resume: str | os.PathLike) -> Path:
    """The folder of ``--resume`` (a run folder, or a checkpoint in one)."""
    path = Path(resume)
    run_dir = path.parent if path.is_file() else path
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist; --resume takes the folder train.py wrote")
    return run_dir


def _new_folder(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3`` ... : the first made by an exclusive ``mkdir``, so a new
    run never shares a folder, even with a run of the same name started at the same moment."""
    base.parent.mkdir(parents=True, exist_ok=True)
    number = 1
    while True:
        path = base if number == 1 else base.with_name(f"{base.name}-{number}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            number += 1


def _release(run_dir: Path, new_folders: list[Path]) -> None:
    """Remove a new run's folder if it holds no checkpoint (the run failed or stopped before one),
    and the empty ``new_folders`` (deepest first) that were made for it."""
    if not run_dir.is_dir() or any((run_dir / name).exists() for name in ("last.pt", "best.pt")):
        return
    for name in _EARLY_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for leftover in run_dir.glob("*.tmp"):
        leftover.unlink(missing_ok=True)
    for folder in (run_dir, *new_folders):
        try:
            folder.rmdir()
        except OSError:  # something else is in it: keep it and its parents
            return


def append_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """One line of ``metrics.jsonl``: ``metrics`` without its per-class tensors."""
    row = {k: v for k, v in metrics.items() if "per_class" not in k}
    atomic_append_text(run_dir / "metrics.jsonl", json.dumps(row) + "\n")


def clean_for_resume(run_dir: Path, epochs_done: int) -> None:
    """Before a resumed run continues: drop the lines of ``metrics.jsonl`` of epochs after the
    checkpoint and the temporary files of atomic writes cut short by a kill."""
    _truncate_metrics(run_dir / "metrics.jsonl", epochs_done)
    for leftover in run_dir.glob("*.tmp"):
        leftover.unlink(missing_ok=True)


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop lines of epochs after the checkpoint (written before a kill, then redone) and an
    incomplete last line (a kill mid-write); any other unreadable line raises `CheckpointError`."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # cut short by a kill: that epoch is redone
                break
            raise CheckpointError(f"{path} line {number} is not valid JSON ({err}); fix or delete that line") from None
        if row.get("epoch", 0) <= epochs_done:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def plot_curves(metrics_path: Path, out_path: Path, force: bool = False) -> None:
    """Loss and accuracy per epoch from ``metrics.jsonl`` into a PNG (matplotlib's ``Figure``:
    no pyplot, no display, no global state). ``out_path`` is never ``metrics_path``, and replaces
    an existing file only if it is a PNG or empty, or with ``force`` (`visattn._io.check_output`)."""
    from matplotlib.figure import Figure

    check_output(out_path, "PNG", [metrics_path], force=force)

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key in ("train_loss", "test_loss", "ema_test_loss"):
        if key in rows[0]:
            ax_loss.plot(epochs, [r[key] for r in rows], label=key)
    for key in ("test_acc1", "ema_test_acc1"):
        if key in rows[0]:
            ax_acc.plot(epochs, [100 * r[key] for r in rows], label=key)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="held-out accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def preload_plotting() -> None:
    """Import matplotlib in a background thread while the model trains (half a second that would
    otherwise be spent after the last epoch, before ``curves.png`` can be drawn)."""
    threading.Thread(target=importlib.import_module, args=("matplotlib.figure",), daemon=True).start()
