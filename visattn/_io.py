"""Files written atomically and read safely: the only place visattn touches the disk for its
outputs, checkpoints, weights and run files.

- `atomic_write` — write to a temporary file in the target's folder, fsync it, then rename it
  over the target: a kill, an error or a full disk at any moment leaves the old file or the new
  one, never a part of either, and no temporary file. An existing target keeps its permission
  bits; a new file gets `0o666 & ~umask`, as `open` would give it. A full disk (or quota) raises
  `DiskFullError`, naming the file.
- `check_output` — the rule for a user-named output path: never one of the inputs, and an
  existing file is replaced only by one of the same kind (judged from its first bytes) unless
  forced.
- `read_torch_file` — `torch.load(weights_only=True)`: tensors and plain values only,
  so a malicious pickle cannot run code; every failure becomes one `CheckpointError`.
- `load_image` — the one picture loader of training, evaluation and explaining: a regular file
  only (never a FIFO or device), EXIF orientation applied, every PIL mode turned into RGB the
  same way (`to_rgb`); every failure becomes one `ImageFileError` naming the file.

A leaf: imports nothing of visattn.
"""

from __future__ import annotations

import codecs
import errno
import json
import os
import pickle
import secrets
import stat
import zipfile
from collections.abc import Callable, Iterable, Iterator
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
    "DiskFullError",
    "ImageFileError",
    "UnsafeOutputError",
    "atomic_append_text",
    "atomic_save_image",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "check_output",
    "file_kind",
    "image_format",
    "load_image",
    "read_torch_file",
    "save_safetensors",
    "to_rgb",
    "verify_image",
]


class CheckpointError(ValueError):
    """A file is missing, truncated, unsafe, or not what it should be."""


class DiskFullError(OSError):
    """The disk (or the user's quota) filled up while ``path`` was written; the file that was there
    before is unchanged and no temporary file is left. ``hint`` says what was kept."""

    def __init__(self, path: str | os.PathLike, hint: str = "") -> None:
        message = f"no space left on device while writing {path}" + (f"; {hint}" if hint else "")
        super().__init__(errno.ENOSPC, message)
        self.path = Path(path)

    def __str__(self) -> str:
        return self.strerror or ""  # always set by __init__; OSError types it optional


class UnsafeOutputError(ValueError):
    """An output path that is one of the inputs, a folder, or an existing file of another kind."""


#: what the writers below report when the disk is full: errno values, and the text of writers
#: that do not raise ``OSError`` (torch's checkpoint writer reports a short write as
#: ``[enforce fail at inline_container.cc:...] unexpected pos``; safetensors' as its own error)
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
_TORCH_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed writing")


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
        return True
    text = str(err)
    torch_writer = isinstance(err, RuntimeError) and "inline_container" in text
    return any(m in text for m in _FULL_MESSAGES) or (torch_writer and any(m in text for m in _TORCH_SHORT_WRITE))


def _new_temporary(target: Path) -> tuple[Path, int]:
    """An empty file beside ``target``, created exclusively with ``0o666 & ~umask`` (as ``open``
    would), and the permission bits it must have: ``target``'s if ``target`` exists (a regular
    file: a folder, device or pipe is never replaced), else those it was created with."""
    keep = None
    if target.exists():
        if not target.is_file():
            raise UnsafeOutputError(f"{target} is not a regular file (a folder, device or pipe); it is not replaced")
        keep = stat.S_IMODE(target.stat().st_mode)
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # another writer's name: draw again
            continue
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode) if keep is None else keep
            os.fchmod(fd, mode)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        return tmp, mode


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(temporary_path)`` in ``path``'s folder, sync it to disk, rename it over ``path``.

    ``write`` may open the temporary path itself (safetensors, torch, Pillow); the file is fsynced
    after it returns, so the rename never publishes data that is not on the disk yet. A symbolic
    link at ``path`` is written through (the link stays, its target is replaced); a hard link is
    not (the other names keep the old file). Any failure removes the temporary file and leaves
    ``path`` as it was; a full disk raises `DiskFullError`.
    """
    target = Path(os.path.realpath(path))
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp, mode = _new_temporary(target)
        write(str(tmp))
        os.chmod(tmp, mode)  # again: a writer may have made the file anew (safetensors does, 0600)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if _is_disk_full(err):
            raise DiskFullError(path) from err
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` through `atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors(module: torch.nn.Module, path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """``module``'s state dict as a safetensors file (no pickle), written through `atomic_write`."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through `atomic_write`."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` through `atomic_write`."""
    atomic_write_text(path, json.dumps(obj, indent=2))


def atomic_append_text(path: str | os.PathLike, text: str) -> None:
    """``path``'s text (none if it does not exist) followed by ``text``, written through
    `atomic_write`: a failed append leaves the file as it was, not with half a line."""
    path = Path(path)
    before = path.read_text(encoding="utf-8") if path.exists() else ""
    atomic_write_text(path, before + text)


def image_format(path: str | os.PathLike) -> str:
    """The Pillow format named by ``path``'s extension (``.png`` → ``"PNG"``, ``.jpg`` → ``"JPEG"``);
    an extension Pillow cannot write raises ``ValueError``."""
    Image.init()
    suffix = Path(path).suffix.lower()
    picture_format = Image.registered_extensions().get(suffix)
    if picture_format is None or picture_format not in Image.SAVE:
        raise ValueError(f"{path}: no picture format is known for the extension {suffix!r}; use .png or .jpg")
    return picture_format


def atomic_save_image(image: Image.Image, path: str | os.PathLike, **params: Any) -> None:
    """``image.save`` to ``path`` through `atomic_write`, in the format of its extension."""
    picture_format = image_format(path)
    atomic_write(path, lambda tmp: image.save(tmp, format=picture_format, **params))


#: first bytes of the kinds of file `file_kind` recognizes (Pillow's format names for pictures)
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"%PDF-", "PDF"),
    (b"PK\x03\x04", "ZIP"),
)
_DESCRIPTIONS = {
    "empty": "nothing",
    "HTML": "an HTML page",
    "JSON": "JSON",
    "text": "text",
    "ZIP": "a ZIP archive (such as a PyTorch checkpoint)",
    "PDF": "a PDF document",
    "data": "binary data of an unknown kind",
}


def _text_kind(head: bytes) -> str:
    """``"HTML"``, ``"JSON"``, ``"text"`` or ``"data"`` for the first bytes of a file that has no signature."""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at the end is fine
    except UnicodeDecodeError:
        return "data"
    if "\x00" in text:
        return "data"
    start = text.lstrip("\ufeff \t\r\n").lower()
    if start.startswith(("<!doctype html", "<html")):
        return "HTML"
    return "JSON" if start.startswith(("{", "[")) else "text"


def file_kind(path: str | os.PathLike) -> str:
    """What an existing file holds, judged from its first 4 KiB, not its name: ``"empty"``, a
    picture format (``"PNG"``, ``"JPEG"``, ``"GIF"``, ``"WEBP"``, ``"TIFF"``, ``"BMP"``), ``"PDF"``,
    ``"ZIP"`` (PyTorch checkpoints are ZIP files), ``"HTML"``, ``"JSON"``, ``"text"`` or ``"data"``."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if not head:
        return "empty"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return kind
    return _text_kind(head)


def _described(kind: str) -> str:
    return _DESCRIPTIONS.get(kind, f"a {kind} picture")


def check_output(
    path: str | os.PathLike,
    kind: str,
    inputs: Iterable[str | os.PathLike | None] = (),
    *,
    force: bool = False,
    force_hint: str = "force=True",
) -> None:
    """Raise `UnsafeOutputError` unless writing a file of ``kind`` (a `file_kind` name) to
    ``path`` is safe. The rule:

    - ``path`` is never an existing folder, device or pipe, and never one of the existing ``inputs`` — the same
      file by device and inode, so a symbolic link or a hard link to an input is refused too;
      ``force`` does not change this;
    - an existing file at ``path`` is replaced only when it is empty or holds the same kind of
      file (a PNG over a PNG, an HTML page over an HTML page), judged from its content by
      `file_kind`; anything else needs ``force`` (``force_hint`` names it in the message).
    """
    path = Path(path)
    if not path.exists():
        return
    if not path.is_file():
        kind_of = "a folder" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise UnsafeOutputError(f"{path} is {kind_of}; give the path of a file to write")
    for source in inputs:
        if source is not None and Path(source).exists() and os.path.samefile(path, source):
            same = "" if Path(source) == path else " (through a link)"
            raise UnsafeOutputError(
                f"{path} is the input {source}{same}: writing there would destroy it; choose another output path"
            )
    found = file_kind(path)
    if found not in ("empty", kind) and not force:
        raise UnsafeOutputError(
            f"{path} exists and holds {_described(found)}, not {_described(kind)}: it is not replaced; "
            f"choose another output path, or pass {force_hint} to replace it"
        )


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
