"""Image folders that cannot lie: hidden files, link loops, pictures reached twice, files that
vanish or stop decoding while a run reads them (with and without DataLoader workers)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms.v2.functional import pil_to_tensor

from visattn.train.config import load_config
from visattn.train.data import build_datasets, held_out_pictures
from visattn.train.engine import evaluate, fit
from visattn.train.imagefolder import (
    CheckedImageFolder,
    UnreadableImages,
    UnreadableImagesError,
    collate_readable,
)

COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255)}  # a picture's colour says its class


def data_cfg(root, *overrides):
    return load_config(overrides=["data.name=imagefolder", f"data.root={root}", "data.img_size=16", *overrides]).data


def make_folder(root: Path, per_class: int = 6, noise: bool = False) -> list[Path]:
    """`root/cat` red and `root/dog` blue pictures (random ones with `noise`); their paths."""
    rng = np.random.default_rng(0)
    paths = []
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) if noise else np.full((8, 8, 3), colour, np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
            paths.append(root / name / f"{i}.png")
    return paths


def cut_jpeg(path: Path) -> None:
    """A JPEG whose header is intact (it passes the check when the folder is built) but whose
    pixels are cut short (it fails when it is read)."""
    noise = np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 3 // 5])


def real_paths(dataset) -> list[str]:
    return [os.path.realpath(path) for path, _ in dataset.samples]


def built(cfg):
    """`build_datasets(cfg)` and the messages of the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, test, data_config = build_datasets(cfg)
    return train, test, data_config, [str(w.message) for w in caught]


# --- what a folder holds -----------------------------------------------------------------------


def test_hidden_files_and_folders_are_skipped_and_named(tmp_path):
    written = make_folder(tmp_path)
    make_folder(tmp_path / ".ipynb_checkpoints")  # would be a third class
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "cat" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS resource fork
    make_folder(tmp_path / "dog" / ".thumbnails")
    train, test, data_config, messages = built(data_cfg(tmp_path, "data.val_fraction=0.5"))
    assert data_config.class_names == ("cat", "dog")
    assert sorted(real_paths(train) + real_paths(test)) == sorted(os.path.realpath(p) for p in written)
    [message] = messages
    assert message.startswith(f"skipping 4 hidden file(s) and folder(s) under {tmp_path}: ")
    for name in (".ipynb_checkpoints", ".DS_Store", "._0.png", ".thumbnails"):
        assert name in message


@pytest.mark.parametrize("layout", ["one folder", "train and val folders"])
def test_a_link_loop_counts_every_picture_once(tmp_path, layout):
    """Twelve random pictures and `ln -s .. cat/loop` once gave 324 train / 168 test pictures and
    98.8 % accuracy on noise; every picture is now counted once, and in one split."""
    if layout == "one folder":
        written = make_folder(tmp_path, noise=True)
        loops = [tmp_path / "cat" / "loop", tmp_path / "dog" / "self"]
        targets = ["..", "."]
    else:
        written = make_folder(tmp_path / "train", 4, noise=True) + make_folder(tmp_path / "val", 2, noise=True)
        loops = [tmp_path / "train" / "cat" / "loop", tmp_path / "val" / "dog" / "up"]
        targets = ["../..", "../../.."]  # to the dataset root, and above it
    for link, target in zip(loops, targets, strict=True):
        os.symlink(target, link)
    train, test, _, messages = built(data_cfg(tmp_path, "data.val_fraction=0.5"))
    assert len(train) + len(test) == 12 and not set(real_paths(train)) & set(real_paths(test))
    assert sorted(real_paths(train) + real_paths(test)) == sorted(os.path.realpath(p) for p in written)
    assert all(
        any("folder link(s) to a folder already read" in m and str(link) in m for m in messages) for link in loops
    )


def test_a_picture_reached_twice_in_its_class_counts_once(tmp_path):
    written = make_folder(tmp_path, 3)
    outside = tmp_path.parent / f"{tmp_path.name}-more"
    written += make_folder(outside, 2)[:2]  # two more cats, outside the dataset
    os.symlink(tmp_path / "cat" / "0.png", tmp_path / "cat" / "alias.png")
    os.symlink(outside / "cat", tmp_path / "cat" / "more")
    os.symlink(outside / "cat", tmp_path / "cat" / "more_again")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = CheckedImageFolder(tmp_path)
    assert sorted(real_paths(folder)) == sorted(os.path.realpath(p) for p in written)
    assert [label for _, label in folder.samples].count(0) == 5
    assert sorted(str(w.message).split(": ")[-1] for w in caught) == [
        str(tmp_path / "cat" / "alias.png"),
        str(tmp_path / "cat" / "more_again"),
    ]


@pytest.mark.parametrize(
    ("link", "target", "names"),
    [
        ("dog/stolen.png", "cat/0.png", ["cat/0.png", "dog/stolen.png"]),
        ("dog/cats", "cat", ["'cat'", "dog/cats"]),
        ("kitty", "cat", ["'cat'", "'kitty'"]),
        ("cat/dogs", "dog/sub", ["cat/dogs", "dog/sub"]),
    ],
    ids=["picture", "folder", "class folder", "a folder read first for the other class"],
)
def test_a_picture_reached_from_two_classes_is_an_error_naming_both(tmp_path, link, target, names):
    make_folder(tmp_path, 3)
    make_folder(tmp_path / "dog" / "sub", 1)
    os.symlink(tmp_path / target, tmp_path / link)
    with pytest.raises(ValueError, match="reached from two class folders") as caught:
        CheckedImageFolder(tmp_path)
    assert all(name in str(caught.value) for name in names), caught.value


def test_a_class_folder_that_leads_back_to_the_dataset_is_refused(tmp_path):
    make_folder(tmp_path / "data", 2)
    os.symlink("..", tmp_path / "data" / "up")  # a "class" holding the dataset and what is beside it
    with pytest.raises(ValueError, match=r"class folder .*data/up leads to .*, a folder that holds the dataset"):
        CheckedImageFolder(tmp_path / "data")


def test_a_held_out_folder_sharing_a_training_picture_is_refused(tmp_path):
    make_folder(tmp_path / "train", 3)
    make_folder(tmp_path / "val", 2)
    os.symlink(tmp_path / "train" / "dog" / "2.png", tmp_path / "val" / "dog" / "leak.png")
    with pytest.raises(ValueError, match=r"1 held-out picture\(s\) are training pictures too: .*val/dog/leak.png"):
        build_datasets(data_cfg(tmp_path))


def test_unreadable_files_are_dropped_with_one_warning_or_refused_when_strict(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    os.mkfifo(tmp_path / "dog" / "pipe.png")  # never opened: it would block
    cfg = data_cfg(tmp_path, "data.val_fraction=0.5")
    train, test, data_config, messages = built(cfg)
    assert messages == [f"skipping 2 unreadable image file(s) under {tmp_path}: {tmp_path}/dog/broken.jpg, "
                        f"{tmp_path}/dog/pipe.png"]  # fmt: skip
    assert len(train) + len(test) == 12 and sorted(label for _, label in test.samples) == [0, 0, 0, 1, 1, 1]
    assert test[0][0].shape == (3, 16, 16)
    cfg.strict = True
    with pytest.raises(ValueError, match=r"2 unreadable image file\(s\).*broken.jpg"):
        build_datasets(cfg)


def test_train_and_val_folders(tmp_path):
    make_folder(tmp_path / "train", 3)
    make_folder(tmp_path / "val", 2)
    train, test, _ = build_datasets(data_cfg(tmp_path))
    assert (len(train), len(test)) == (6, 4)


# --- pictures that stop being readable while a run reads them -------------------------------


class MeanColour(nn.Module):
    """Says "cat" for red pictures and "dog" for blue ones."""

    def forward(self, x):
        return torch.stack([x[:, 0].mean((1, 2)), x[:, 2].mean((1, 2))], dim=1) * 10


@pytest.mark.parametrize("workers", [0, 1])
def test_a_held_out_set_that_lost_its_dogs_stops_the_evaluation(tmp_path, workers):
    """Deleting every dog picture once gave a held-out set of cats and "100.00 %", exit 0: the
    missing pictures were replaced by the next sample, with that sample's label."""
    make_folder(tmp_path / "train", 2)
    make_folder(tmp_path / "val", 3)
    _, test, _ = build_datasets(data_cfg(tmp_path))
    loader = DataLoader(test, batch_size=4, num_workers=workers, collate_fn=collate_readable)
    assert evaluate(MeanColour(), loader, num_classes=2)["acc1"] == 1.0
    for path in (tmp_path / "val" / "dog").iterdir():
        path.unlink()
    with pytest.raises(UnreadableImagesError) as caught:
        evaluate(MeanColour(), loader, num_classes=2)
    message = str(caught.value)
    assert "\n" not in message and "of the held-out evaluation could not be read" in message
    assert f"{tmp_path}/val/dog/0.png" in message and "does not exist" in message


@pytest.mark.parametrize("workers", [0, 1])
def test_an_epoch_skips_unreadable_pictures_and_never_gives_their_labels_away(tmp_path, workers):
    """Up to 1 % of an epoch's pictures may fail: each is dropped from its batch and named; every
    picture that arrives has its own label (its colour says which); one more failure stops the run."""
    make_folder(tmp_path, 100)
    folder = CheckedImageFolder(tmp_path, transform=pil_to_tensor)
    loader = DataLoader(folder, batch_size=16, shuffle=True, num_workers=workers, collate_fn=collate_readable)
    gone = [tmp_path / "cat" / "7.png", tmp_path / "dog" / "3.png"]
    for path in gone:
        path.unlink()
    skips = UnreadableImages.training(1, len(folder))
    seen = {0: 0, 1: 0}
    for x, y in skips.batches(loader):
        red = x[:, 0, 0, 0] == 255
        assert torch.equal(red, y == 0) and torch.equal(x[:, 2, 0, 0] == 255, y == 1)
        for label in (0, 1):
            seen[label] += int((y == label).sum())
    assert seen == {0: 99, 1: 99}
    assert sorted(path for path, _ in skips.unreadable) == sorted(str(p) for p in gone)
    assert skips.summary().startswith("skipped 2 unreadable picture(s) of training epoch 1 (at most 2): ")
    (tmp_path / "cat" / "8.png").unlink()
    with pytest.raises(UnreadableImagesError, match=r"3 picture\(s\) of training epoch 1 could not be read, more "
                       r"than the 2 allowed \(1 % of its 200 pictures\)"):  # fmt: skip
        list(UnreadableImages.training(1, len(folder)).batches(loader))


def test_a_run_names_the_pictures_it_skipped_in_its_log(tmp_path, capsys, one_thread):
    """A JPEG cut short passes the check when the folder is built and fails every time it is read
    (201 training pictures in 3 whole batches: every one is read)."""
    make_folder(tmp_path / "data" / "train", 100)
    make_folder(tmp_path / "data" / "val", 2)
    cut_jpeg(tmp_path / "data" / "train" / "dog" / "cut.jpg")
    overrides = ["model.embed_dim=16", "model.depth=1", "model.num_heads=2", "train.epochs=1", "train.amp=none"]
    cfg = load_config(
        overrides=[
            *overrides,
            "train.batch_size=67",
            "train.warmup_epochs=0",
            f"run.out_dir={tmp_path / 'runs'}",
            "data.name=imagefolder",
            f"data.root={tmp_path / 'data'}",
            "data.img_size=16",
        ]
    )
    result = fit(cfg)
    out = capsys.readouterr().out
    cut = tmp_path / "data" / "train" / "dog" / "cut.jpg"
    assert f"  skipped 1 unreadable picture(s) of training epoch 1 (at most 2): {cut}\n" in out
    [epoch_line] = [line for line in out.splitlines() if line.startswith("epoch   1/1")]
    assert epoch_line.endswith(" unreadable 1 skipped")
    [row] = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert row["train_unreadable"] == 1


def test_held_out_pictures_of_a_folder_are_its_files_one_class_after_the_other(tmp_path):
    make_folder(tmp_path / "train")
    make_folder(tmp_path / "val", per_class=3)
    _, test, _, _ = built(data_cfg(tmp_path))
    val = tmp_path / "val"
    expected = [val / "cat/0.png", val / "dog/0.png", val / "cat/1.png", val / "dog/1.png", val / "cat/2.png"]
    assert [os.path.realpath(p) for p in held_out_pictures(test, 5)] == [os.path.realpath(p) for p in expected]
