"""One training process per run folder: an OS lock on ``RUN/.lock`` that ends with its process.

`lock_run_folder` takes an exclusive `fcntl.flock` on the lock file and writes the holder's
PID into it; a second process asking for the same folder gets `RunFolderBusy` naming the folder
and that PID. The kernel drops the lock when the holder exits, however it exits (a crash or
``kill -9`` included), so a lock file left behind by a dead process locks nothing. The lock
file is written in place, not through the atomic writer: replacing it would replace the locked
file. POSIX only (``fcntl``).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

__all__ = ["LOCK_NAME", "RunFolderBusy", "RunLock", "lock_run_folder"]

LOCK_NAME = ".lock"


class RunFolderBusy(RuntimeError):
    """Another process trains in the run folder (it holds the folder's lock)."""


class RunLock:
    """The lock of one run folder, held until `release` (or the end of a ``with`` block)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (in that order: a process that opened the file
        meanwhile sees it is gone and starts over). Calling it again does nothing."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()


def _holder(fd: int) -> str:
    """The PID written in an open lock file (``"unknown"`` while its holder has not written it yet)."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return text if text.isdigit() else "unknown"


def lock_run_folder(run_dir: str | os.PathLike) -> RunLock:
    """Lock ``run_dir`` for this process, or raise `RunFolderBusy` naming the folder and the PID of
    the process that holds it. The lock file is created with ``0o666 & ~umask``."""
    path = Path(run_dir) / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunFolderBusy(
                f"{run_dir} is in use by another training process (PID {holder}, which holds {path}); "
                "wait for it to end, or stop it, then try again"
            ) from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):  # not removed by a holder releasing it meanwhile
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunLock(path, fd)
