"""Files written atomically and read safely: the only place visattn touches the disk for its
checkpoints, weights and run files.

- :func:`atomic_write` — write to a temporary file in the target's folder, flush and fsync it,
  then rename it over the target: a kill at any moment leaves the old file or the new one.
- :func:`read_torch_file` — ``torch.load(weights_only=True)``: tensors and plain values only,
  so a malicious pickle cannot run code; every failure becomes one :class:`CheckpointError`.
- `load_image` — the one picture loader of training, evaluation and explaining: a regular file
  only (never a FIFO or device), EXIF orientation applied, every PIL mode turned into RGB the
  same way (`to_rgb`); every failure becomes one `ImageFileError` naming the file.

A leaf: imports nothing of visattn.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import save_file

__all__ = [
    "BACKGROUND",
    "CheckpointError",
    "ImageFileError",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "load_image",
    "read_torch_file",
    "save_safetensors",
    "to_rgb",
    "verify_image",
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


# --- pictures: the one loader of training, evaluation and explaining ----------------------------


class ImageFileError(ValueError):
    """A picture file is missing, not a regular file, or not a picture PIL can decode."""


#: the colour that transparent pixels are composited on (white, as Hugging Face's `convert_to_rgb`)
BACKGROUND = (255, 255, 255)

#: PIL modes of 16-bit and 32-bit integer pictures (16-bit PNG, TIFF), which PIL's `convert` clips at 255
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

#: what `os.stat` says a path is, for files that are not regular (reading them blocks or never ends)
_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def load_image(path: str | os.PathLike, max_side: int | None = None) -> Image.Image:
    """A picture file as an RGB PIL image: EXIF orientation applied, then `to_rgb`.

    `max_side`: decode a larger picture reduced so that its longer side is at most this many
    pixels (aspect kept): JPEG is decoded at 1/2, 1/4 or 1/8 scale (`Image.draft`), other
    formats are reduced right after decoding (`Image.thumbnail`), so no full-size copy is ever
    converted. `info["original_size"]` of the result is the `(W, H)` of the whole picture (as
    oriented), for giving points in pixels of the original.

    Raises `ImageFileError` naming the file when it is missing, not a regular file (checked
    before it is opened: a FIFO or `/dev/zero` would block or never end), refused as a
    decompression bomb, or not a picture PIL can decode (truncated, corrupt, another format).
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side}")
    with _decoding(path) as handle, Image.open(handle) as image:
        full = image.size
        if max_side is not None and max(full) > max_side:
            scale = max_side / max(full)
            image.draft(None, (max(1, round(full[0] * scale)), max(1, round(full[1] * scale))))
            image.thumbnail((max_side, max_side))
        image.load()
        reduced = image.size
        picture = to_rgb(ImageOps.exif_transpose(image))
    turned = picture.size != reduced  # EXIF turned it a quarter turn
    picture.info["original_size"] = (full[1], full[0]) if turned else full
    return picture


def verify_image(path: str | os.PathLike) -> None:
    """Raise `ImageFileError` unless `path` is a regular file that PIL recognizes and whose
    structure (headers, checksums) it verifies, without decoding the pixels: the quick check of
    a folder of pictures. A file that passes may still fail in `load_image` (a JPEG cut short)."""
    with _decoding(path) as handle, Image.open(handle) as image:
        image.verify()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL picture as RGB, the same way for training and for explaining.

    - 16-bit gray (modes `I;16*`, or `I` holding 16-bit values): value / 257, rounded, to 8 bits
      (PIL's own `convert` clips such pictures at 255, turning them white);
    - transparency (RGBA, LA, PA, a palette or gray with a transparent colour): composited on
      `BACKGROUND` (white), so a transparent pixel is white whatever colour it stores;
    - CMYK, 1-bit, gray, palette, YCbCr: PIL's `convert("RGB")` (CMYK without an ICC profile:
      R = (255 − C)(255 − K) / 255, rounded).
    """
    if image.mode in _WIDE_MODES:
        values = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8))
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    return image.convert("RGB")


@contextmanager
def _decoding(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """The opened regular file `path`; anything PIL raises while reading it becomes one
    `ImageFileError` naming the file (PIL raises many types for bad files)."""
    handle = _open_regular_file(path)
    try:
        with handle:
            yield handle
    except Image.DecompressionBombError as err:
        raise ImageFileError(
            f"{path} is refused as a possible decompression bomb: {' '.join(str(err).split())} "
            "(raise PIL.Image.MAX_IMAGE_PIXELS from Python if the picture is genuine)"
        ) from err
    except Exception as err:
        reason = " ".join(str(err).split())
        raise ImageFileError(
            f"{path} is not an image that PIL can read ({type(err).__name__}{': ' + reason if reason else ''}); "
            "give a PNG, JPEG or another format PIL opens"
        ) from err


def _open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """`path` opened for reading, refused unless it is a regular file: checked before opening
    it, and again on the opened file (opened non-blocking, should a FIFO take its place)."""
    try:
        _refuse_irregular(path, os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise ImageFileError(f"image {path} does not exist") from None
    except OSError as err:
        raise ImageFileError(f"image {path} cannot be opened: {err.strerror or err}") from None
    handle = os.fdopen(fd, "rb")
    try:
        _refuse_irregular(path, os.fstat(fd).st_mode)
    except ImageFileError:
        handle.close()
        raise
    return handle


def _refuse_irregular(path: str | os.PathLike, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
    if kind == "a folder":
        raise ImageFileError(f"image {path} is a folder; give one picture file (PNG, JPEG, ...)")
    raise ImageFileError(f"image {path} is {kind}, not a picture file; give a regular file (PNG, JPEG, ...)")
