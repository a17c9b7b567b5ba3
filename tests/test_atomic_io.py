"""The one writer (`visattn._io`): atomic, permission-keeping, clear on a full disk; and the
output rule (`check_output`) that keeps an output path from destroying an input.

A full disk is injected deterministically: a writer that puts some bytes into the temporary
file and then fails the way each real writer fails when the device is full (checked by hand on
a 256 KiB tmpfs: Python and Pillow raise ``OSError(ENOSPC)``, torch's checkpoint writer a
``RuntimeError`` from ``inline_container.cc``, safetensors an error whose text says so).
"""

from __future__ import annotations

import ast
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from visattn import _io
from visattn._io import DiskFullError, UnsafeOutputError, check_output, file_kind

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def picture() -> Image.Image:
    return Image.new("RGB", (6, 4), (200, 30, 10))


#: every writer of `_io`, as (name, write(path))
WRITERS: list[tuple[str, Callable[[Path], None]]] = [
    ("text", lambda path: _io.atomic_write_text(path, "new\n")),
    ("json", lambda path: _io.atomic_write_json(path, {"new": 1})),
    ("append", lambda path: _io.atomic_append_text(path, "new\n")),
    ("torch", lambda path: _io.atomic_torch_save({"new": torch.ones(2)}, path)),
    ("safetensors", lambda path: _io.save_safetensors(torch.nn.Linear(2, 2), path, {"format": "test"})),
    ("image", lambda path: _io.atomic_save_image(picture(), path.with_suffix(".png"))),
]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("write", [w for _, w in WRITERS], ids=[n for n, _ in WRITERS])
def test_a_new_file_gets_the_umask_mode_and_an_existing_file_keeps_its_mode(tmp_path, umask_027, write):
    fresh = tmp_path / "fresh.out"
    write(fresh)
    written = fresh if fresh.exists() else fresh.with_suffix(".png")
    assert mode(written) == 0o666 & ~0o027  # as open() makes it, not mkstemp's 0600
    existing = tmp_path / "existing.png"
    existing.write_bytes(b"")
    os.chmod(existing, 0o604)
    write(existing)
    assert mode(existing) == 0o604 and existing.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({written.name, "existing.png"})


def failing_after(count: int, error: BaseException) -> Callable[[str], None]:
    """A writer that puts ``count`` bytes into the file it is given, then raises ``error``."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(b"x" * count)
        raise error

    return write


FULL_DISK = {
    "ENOSPC": OSError(errno.ENOSPC, "No space left on device"),
    "EDQUOT": OSError(errno.EDQUOT, "Disk quota exceeded"),
    "torch": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 198336 vs 198224"),
    "safetensors": Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
}


@pytest.mark.parametrize("error", FULL_DISK.values(), ids=FULL_DISK.keys())
def test_a_full_disk_keeps_the_old_file_and_says_so_in_one_line(tmp_path, error):
    old = tmp_path / "last.pt"
    old.write_bytes(b"the old checkpoint")
    with pytest.raises(DiskFullError) as caught:
        _io.atomic_write(old, failing_after(1000, error))
    assert str(caught.value) == f"no space left on device while writing {old}"
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    assert caught.value.__cause__ is error
    assert old.read_bytes() == b"the old checkpoint"
    with pytest.raises(DiskFullError):
        _io.atomic_write(tmp_path / "fresh.png", failing_after(10, error))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no fresh file, no temporary file


def test_a_full_disk_in_torch_save_keeps_the_checkpoint(tmp_path, monkeypatch):
    old = tmp_path / "last.pt"
    _io.atomic_torch_save({"epoch": 1}, old)
    short_write = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(torch, "save", lambda obj, f: failing_after(576, short_write)(f))
    with pytest.raises(DiskFullError, match=f"^no space left on device while writing {old}$"):
        _io.atomic_torch_save({"epoch": 2}, old)
    monkeypatch.undo()
    assert _io.read_torch_file(old) == {"epoch": 1} and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("error", [ValueError("bad value"), KeyboardInterrupt(), RuntimeError("unrelated")])
def test_other_failures_pass_through_and_leave_no_temporary_file(tmp_path, error):
    old = tmp_path / "page.html"
    old.write_text("<!doctype html>old")
    with pytest.raises(type(error)) as caught:
        _io.atomic_write(old, failing_after(5, error))
    assert caught.value is error and not isinstance(caught.value, DiskFullError)
    assert old.read_text() == "<!doctype html>old" and [p.name for p in tmp_path.iterdir()] == ["page.html"]


def test_a_symbolic_link_is_written_through_and_a_pipe_is_never_replaced(tmp_path):
    (tmp_path / "real.txt").write_text("old")
    (tmp_path / "link.txt").symlink_to("real.txt")
    _io.atomic_write_text(tmp_path / "link.txt", "new")
    assert (tmp_path / "link.txt").is_symlink() and (tmp_path / "real.txt").read_text() == "new"
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(UnsafeOutputError, match="pipe.* not a regular file"):
        _io.atomic_write_text(tmp_path / "pipe", "new")
    assert stat.S_ISFIFO((tmp_path / "pipe").stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.txt", "pipe", "real.txt"]


def test_an_append_adds_a_line_to_what_is_there(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _io.atomic_append_text(path, "1\n")
    _io.atomic_append_text(path, "2\n")
    assert path.read_text() == "1\n2\n"


def test_an_image_extension_names_its_format():
    assert _io.image_format("a/b.PNG") == "PNG" and _io.image_format("x.jpg") == "JPEG"
    with pytest.raises(ValueError, match=r"'\.txt'.*use \.png"):
        _io.image_format("important.txt")


def test_file_kind_reads_the_content_not_the_name(tmp_path):
    expected = []
    for kind in ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP"):
        path = tmp_path / f"picture_{kind}.html"  # the name says HTML; the bytes do not
        picture().save(path, format=kind)
        expected.append((kind, path))
    torch.save({"w": torch.ones(1)}, tmp_path / "checkpoint.png")
    expected.append(("ZIP", tmp_path / "checkpoint.png"))
    for kind, name, data in (
        ("HTML", "page.png", b"\xef\xbb\xbf\n  <!DOCTYPE html><html>"),
        ("HTML", "bare.txt", b"<html><body>"),
        ("JSON", "summary.png", b' {"a": 1}'),
        ("text", "important.txt", "caf\u00e9 notes\n".encode()),
        ("text", "cut.txt", "caf\u00e9".encode()[:4]),  # a character cut by the 4 KiB read
        ("data", "blob.png", b"\x00\x01\x02\xff"),
        ("empty", "empty.png", b""),
        ("PDF", "doc.png", b"%PDF-1.7\n"),
    ):
        (tmp_path / name).write_bytes(data)
        expected.append((kind, tmp_path / name))
    assert [(file_kind(path), path.name) for _, path in expected] == [(kind, path.name) for kind, path in expected]


@pytest.fixture
def outputs(tmp_path) -> Path:
    picture().save(tmp_path / "photo.png")
    (tmp_path / "important.txt").write_text("do not lose this")
    (tmp_path / "old.html").write_text("<!doctype html><title>old page</title>")
    (tmp_path / "empty.html").write_bytes(b"")
    (tmp_path / "link.html").symlink_to("photo.png")
    os.link(tmp_path / "photo.png", tmp_path / "hard.html")
    return tmp_path


@pytest.mark.parametrize("out", ["photo.png", "link.html", "hard.html"])
def test_an_input_is_never_an_output_even_when_forced(outputs, out):
    for force in (False, True):
        with pytest.raises(UnsafeOutputError, match=rf"^{outputs / out} is the input {outputs / 'photo.png'}"):
            check_output(outputs / out, "HTML", [outputs / "nothere.png", None, outputs / "photo.png"], force=force)


def test_an_existing_file_of_another_kind_needs_force(outputs):
    with pytest.raises(UnsafeOutputError, match=r"important.txt exists and holds text, not an HTML page.*--force"):
        check_output(outputs / "important.txt", "HTML", force_hint="--force")
    with pytest.raises(
        UnsafeOutputError, match=r"old.html exists and holds an HTML page, not a PNG picture.*force=True"
    ):
        check_output(outputs / "old.html", "PNG")
    check_output(outputs / "important.txt", "HTML", force=True)
    check_output(outputs / "old.html", "HTML")  # a page over a page
    check_output(outputs / "photo.png", "PNG", [outputs / "important.txt"])  # a PNG over a PNG
    check_output(outputs / "empty.html", "PNG")  # nothing to lose
    check_output(outputs / "new.png", "PNG", [outputs / "photo.png"])
    with pytest.raises(UnsafeOutputError, match="is a folder"):
        check_output(outputs, "PNG", force=True)


#: calls that write a file, and the position of the argument that names it (``None``: the object)
WRITE_CALLS = {"save": 0, "savefig": 0, "write_text": None, "write_bytes": None, "dump": 1, "tofile": 0}
#: writes outside `_io` that are not files of the project: a kernel control file
NOT_FILES = {("benchmarks/common.py", 'Path("/proc/self/clear_refs").write_text("5")')}


def unsafe_writes(path: Path) -> list[str]:
    """Calls in ``path`` that write a file directly instead of through `visattn._io`: a write to
    the temporary path an atomic writer hands over (``tmp``) or to an in-memory ``buffer`` is fine."""
    source = path.read_text()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in WRITE_CALLS):
            continue
        owner = node.func.value
        position = 1 if isinstance(owner, ast.Name) and owner.id == "torch" else WRITE_CALLS[node.func.attr]
        target = owner if position is None else (node.args[position] if len(node.args) > position else None)
        if isinstance(target, ast.Name) and target.id in ("tmp", "buffer"):
            continue
        where, text = str(path.relative_to(ROOT)), ast.get_source_segment(source, node)
        if (where, text) not in NOT_FILES:
            found.append(f"{where}:{node.lineno}: {text}")
    return found


def test_no_file_is_written_around_the_atomic_writer():
    sources = [*(ROOT / "visattn").rglob("*.py"), ROOT / "train.py", *(ROOT / "benchmarks").rglob("*.py")]
    sources = [path for path in sources if path.name != "_io.py"]
    found = [hit for path in sources for hit in unsafe_writes(path)]
    found += [
        f"{path.relative_to(ROOT)}: {line.strip()}"
        for path in sources
        for line in path.read_text().splitlines()
        if "open(" in line and any(f'"{mode}' in line for mode in ("w", "a", "x", "r+"))
    ]
    assert not found, "write these through visattn._io:\n" + "\n".join(found)
