"""`visattn overlay` and `visattn explore` (and the library functions behind them) never destroy
an input, replace only a file of the same kind unless forced, and leave the old file whole when
the disk fills up (injected: a writer that stores a few bytes, then fails with ``ENOSPC``)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visattn import create_model
from visattn._io import UnsafeOutputError, file_kind
from visattn.cli import main
from visattn.explain import evaluate
from visattn.explain.explore import explore
from visattn.explain.inputs import Preprocess, default_data_config
from visattn.explain.overlay import attention_overlay
from visattn.train import run_folder

MODEL = ["--model", "vit_digits_patch4_16"]


@pytest.fixture
def files(tmp_path) -> Path:
    """A picture, links to it, an older overlay, an older page and a text file."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "pic.png")
    (tmp_path / "link.png").symlink_to("pic.png")
    os.link(tmp_path / "pic.png", tmp_path / "hard.png")
    Image.new("RGB", (5, 5)).save(tmp_path / "old.png")
    (tmp_path / "old.html").write_text("<!doctype html><title>an older page</title>")
    (tmp_path / "important.txt").write_text("do not lose this")
    (tmp_path / "page.png").write_text("<!doctype html><title>a page named .png</title>")
    return tmp_path


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def overlay(files: Path, out: str, *extra: str) -> list[str]:
    return [
        "overlay",
        *MODEL,
        "--method",
        "rollout",
        "--image",
        str(files / "pic.png"),
        "--out",
        str(files / out),
        *extra,
    ]


def explore_page(files: Path, out: str, *extra: str) -> list[str]:
    return ["explore", *MODEL, "--image", str(files / "pic.png"), "--out", str(files / out), *extra]


@pytest.mark.parametrize("out", ["pic.png", "link.png", "hard.png"])
@pytest.mark.parametrize("command", [overlay, explore_page], ids=["overlay", "explore"])
def test_an_output_that_is_the_picture_is_refused_even_with_force(files, capsys, command, out):
    before = contents(files)
    for force in ([], ["--force"]):
        assert main(command(files, out, *force)) == 2
        err = capsys.readouterr().err
        assert f"--out {files / out} is the input {files / 'pic.png'}" in err and err.count("\n") == 1, err
    assert contents(files) == before


def test_a_picture_replaces_a_picture_and_other_kinds_need_force(files, capsys):
    os.chmod(files / "old.png", 0o640)
    assert main(overlay(files, "old.png")) == 0, capsys.readouterr().err
    assert Image.open(files / "old.png").size == (40, 30) and stat.S_IMODE((files / "old.png").stat().st_mode) == 0o640
    for out, kind in (("page.png", "an HTML page"), ("important.txt", None)):
        before = (files / out).read_bytes()
        assert main(overlay(files, out)) == 2
        err = capsys.readouterr().err
        assert (f"holds {kind}" if kind else "'.txt'") in err and err.count("\n") == 1, err
        assert (files / out).read_bytes() == before
    assert main(overlay(files, "page.png", "--force")) == 0
    assert file_kind(files / "page.png") == "PNG"


def test_a_page_replaces_a_page_and_other_kinds_need_force(files, capsys):
    assert main(explore_page(files, "old.html")) == 0, capsys.readouterr().err
    assert "an older page" not in (files / "old.html").read_text()
    for out in ("important.txt", "old.png"):
        before = (files / out).read_bytes()
        assert main(explore_page(files, out)) == 2
        err = capsys.readouterr().err
        assert f"--out {files / out} exists and holds " in err and "--force" in err and err.count("\n") == 1, err
        assert (files / out).read_bytes() == before
    assert main(explore_page(files, "important.txt", "--force")) == 0
    assert file_kind(files / "important.txt") == "HTML"


def test_the_library_functions_refuse_their_inputs_too(files):
    model = create_model("vit_digits_patch4_16").eval()
    with pytest.raises(UnsafeOutputError, match="link.png is the input"):
        explore(model, [files / "pic.png"], files / "link.png")
    with pytest.raises(UnsafeOutputError, match="holds text, not an HTML page.*force=True"):
        explore(model, [files / "pic.png"], files / "important.txt")
    with Image.open(files / "pic.png") as picture:
        preprocess = Preprocess.from_spec(default_data_config(model))
        with pytest.raises(UnsafeOutputError, match="link.png is the input"):
            attention_overlay(model, picture, "rollout", preprocess=preprocess, out=files / "link.png", force=True)
    metrics = files / "metrics.jsonl"
    metrics.write_text('{"epoch": 1, "train_loss": 2.0, "test_loss": 2.1, "test_acc1": 0.3}\n')
    with pytest.raises(UnsafeOutputError, match="metrics.jsonl is the input"):
        run_folder.plot_curves(metrics, metrics, force=True)
    with pytest.raises(UnsafeOutputError, match="important.txt exists and holds text, not a PNG picture"):
        evaluate.plot_curves({"curves": {}}, files / "important.txt")
    assert (files / "important.txt").read_text() == "do not lose this"
    run_folder.plot_curves(metrics, files / "old.png")  # a PNG over a PNG
    assert file_kind(files / "old.png") == "PNG" and Image.open(files / "old.png").size != (5, 5)


def full_disk_after(count: int):
    """A stand-in for ``Image.save(path)`` and ``Path.write_text``: ``count`` bytes reach the file, then ENOSPC."""

    def write(owner, *args, **kwargs):
        with open(owner if isinstance(owner, Path) else args[0], "wb") as handle:
            handle.write(b"\x89PNG" + b"x" * count)
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


@pytest.mark.parametrize(
    ("command", "out", "writer"),
    [(overlay, "old.png", (Image.Image, "save")), (explore_page, "old.html", (Path, "write_text"))],
    ids=["overlay", "explore"],
)
def test_a_full_disk_keeps_the_old_output_and_makes_no_new_one(files, capsys, monkeypatch, command, out, writer):
    monkeypatch.setattr(*writer, full_disk_after(100))
    before = contents(files)
    for name in (out, f"new{Path(out).suffix}"):
        assert main(command(files, name)) == 2
        assert capsys.readouterr().err == (
            f"visattn {command(files, name)[0]}: error: no space left on device while writing {files / name}\n"
        )
    assert contents(files) == before  # the old output whole, no new file, no temporary file
