"""Files written atomically and read safely: the only place visattn touches the disk for its
checkpoints, weights and run files.

- :func:`atomic_write` — write to a temporary file in the target's folder, flush and fsync it,
  then rename it over the target: a kill at any moment leaves the old file or the new one.
- :func:`read_torch_file` — ``torch.load(weights_only=True)``: tensors and plain values only,
  so a malicious pickle cannot run code; every failure becomes one :class:`CheckpointError`.

A leaf: imports nothing of visattn.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

__all__ = [
    "CheckpointError",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "read_torch_file",
    "save_safetensors",
]


class CheckpointError(ValueError):
    """A file is missing, truncated, unsafe, or not what it should be."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)`` in ``path``'s folder, sync it to disk, rename it over ``path``.

    ``write`` may open the temporary path itself (safetensors, torch); the file is fsynced after
    it returns, so the rename never publishes data that is not on the disk yet.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors(module: torch.nn.Module, path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """``module``'s state dict as a safetensors file (no pickle), written through :func:`atomic_write`."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` through :func:`atomic_write`."""
    atomic_write_text(path, json.dumps(obj, indent=2))


def read_torch_file(path: str | os.PathLike, map_location: str | torch.device = "cpu", what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)``; a missing, truncated, corrupt or unsafe file raises
    :class:`CheckpointError` naming the file and ``what`` it should have been."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"{path} is not a loadable {what} (truncated, corrupt, or it holds objects other than "
            f"tensors and plain values, which are refused for safety): {reason}"
        ) from err
