"""Image folders that cannot lie: every picture counted once, under one class, read by the one loader.

A folder of class folders (`root/cat/*.jpg`) is indexed once, when the dataset is built:

- hidden files and folders (names that start with `.`: `.DS_Store`, `._x.png`,
  `.ipynb_checkpoints`) are skipped;
- links are followed, but every folder is read once: a link to a folder already read (a loop
  such as `ln -s .. cat/loop`), to the dataset root or to a folder above it, is skipped;
- a picture is counted once by its real path (one reached through two paths of its class counts
  once); a picture or folder reached from two class folders is an error naming both paths;
- every file is checked with `visattn._io.verify_image`: unreadable ones are dropped (or refused
  with `data.strict`).

Each kind of skip is one warning with the count and a few names.

While a run reads the pictures, one that can no longer be read (deleted, truncated, replaced by
a FIFO) is dropped from its batch, never replaced by another picture and never given another's
label, and counted by `UnreadableImages`: a training epoch stops when more than
`MAX_UNREADABLE_PERCENT` (1 %) of its pictures fail, a held-out evaluation at the first one.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch import Tensor
from torch.utils.data import default_collate
from torchvision import datasets as tv_datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from .._io import ImageFileError, load_image, verify_image

__all__ = [
    "MAX_UNREADABLE_PERCENT",
    "CheckedImageFolder",
    "ImageBatch",
    "UnreadableImages",
    "UnreadableImagesError",
    "build_image_folders",
    "collate_readable",
]

#: the share of a training epoch's pictures (in percent, rounded down) that may fail to read
#: before the run stops; a held-out evaluation allows none
MAX_UNREADABLE_PERCENT = 1

#: how many paths a message names before it says "and N more"
NAMES_SHOWN = 5


def _few(paths: Sequence[str]) -> str:
    """`a, b, c` or `a, b, c, d, e and 7 more`."""
    shown = ", ".join(str(p) for p in paths[:NAMES_SHOWN])
    return shown + (f" and {len(paths) - NAMES_SHOWN} more" if len(paths) > NAMES_SHOWN else "")


# --- indexing: every picture once, under one class --------------------------------------------


@dataclass
class _Walk:
    """What indexing a folder of class folders has seen so far.

    `folders` maps the real path of every folder read (and of the root and the folders above
    it, under class `""`) to `(class, path it was reached by)`; `pictures` does the same for
    pictures. The lists gather what was skipped, for the warnings.
    """

    folders: dict[str, tuple[str, str]] = field(default_factory=dict)
    pictures: dict[str, tuple[str, str]] = field(default_factory=dict)
    hidden: list[str] = field(default_factory=list)
    loops: list[str] = field(default_factory=list)
    repeats: list[str] = field(default_factory=list)

    def enter(self, path: str, name: str) -> bool:
        """Whether to read the folder `path` for class `name`: not when it was read already."""
        return self._first(self.folders, path, name, self.loops, "folder")

    def count(self, path: str, name: str) -> bool:
        """Whether `path` is a new picture of class `name`: not when it was counted already."""
        return self._first(self.pictures, path, name, self.repeats, "picture")

    @staticmethod
    def _first(seen: dict[str, tuple[str, str]], path: str, name: str, skipped: list[str], kind: str) -> bool:
        real = os.path.realpath(path)
        if real not in seen:
            seen[real] = (name, path)
            return True
        owner, first = seen[real]
        if owner and owner != name:
            raise ValueError(
                f"{kind} {real} is reached from two class folders: {owner!r} (as {first}) and {name!r} "
                f"(as {path}); a picture belongs to one class, so remove the link or copy that puts it in both"
            )
        skipped.append(path)
        return False


def index_image_folder(root: Path, class_to_idx: dict[str, int]) -> tuple[list[tuple[str, int]], list[str]]:
    """`(path, label)` of every picture under the class folders of `root`, as the module says,
    and one note per kind of skip (hidden, loops, repeats) with the count and a few names."""
    walk = _Walk()
    real_root = Path(os.path.realpath(root))
    for folder in (real_root, *real_root.parents):  # a link to any of them is a loop
        walk.folders[str(folder)] = ("", str(folder))
    walk.hidden += [entry.path for entry in os.scandir(root) if entry.name.startswith(".")]
    for name in class_to_idx:  # two class folders that are one folder: an error in `enter`
        if not walk.enter(str(root / name), name):
            raise ValueError(
                f"class folder {root / name} leads to {os.path.realpath(root / name)}, a folder that holds the "
                "dataset (a loop); remove that link"
            )
    samples = [sample for name, label in class_to_idx.items() for sample in _walk_class(root / name, label, walk)]
    skipped = (
        (walk.hidden, "hidden file(s) and folder(s)"),
        (walk.loops, "folder link(s) to a folder already read (a loop, or a second way in)"),
        (walk.repeats, "second path(s) to a picture already counted (counted once)"),
    )
    return samples, [f"skipping {len(paths)} {what} under {root}: {_few(paths)}" for paths, what in skipped if paths]


def _walk_class(folder: Path, label: int, walk: _Walk) -> list[tuple[str, int]]:
    """The new pictures under one class folder, following links into folders not read yet."""
    name = folder.name
    samples = []
    for here, folders, files in os.walk(folder, onerror=_unlistable, followlinks=True):
        keep = []
        for sub in sorted(folders):
            path = os.path.join(here, sub)
            if sub.startswith("."):
                walk.hidden.append(path)
            elif walk.enter(path, name):
                keep.append(sub)
        folders[:] = keep
        for file in sorted(files):
            path = os.path.join(here, file)
            if file.startswith("."):
                walk.hidden.append(path)
            elif has_file_allowed_extension(file, IMG_EXTENSIONS) and walk.count(path, name):
                samples.append((path, label))
    # torchvision's order (folder, then file name), so that held-out splits stay as they were
    return sorted(samples, key=lambda sample: (os.path.dirname(sample[0]), os.path.basename(sample[0])))


def _unlistable(err: OSError) -> None:
    raise ValueError(f"cannot list the folder {err.filename}: {err.strerror}; make it readable or remove it")


# --- the dataset ---------------------------------------------------------------------------


class CheckedImageFolder(tv_datasets.ImageFolder):
    """`torchvision.datasets.ImageFolder` indexed by `index_image_folder`, read by
    `visattn._io.load_image` (RGB, EXIF orientation applied).

    Every file is checked once when built (`verify_image`): unreadable ones are dropped, or raise
    `ValueError` when `strict`. Each kind of skip is one warning with the count and a few names.
    `samples` (a subset of an already checked folder's `samples`) skips the indexing and the check.

    `dataset[i]` raises `ImageFileError` when its picture can no longer be read. A `DataLoader`
    fetches a batch through `__getitems__`, which drops such pictures and names them on the list it
    returns; `collate_readable` keeps the names with the batch, and `UnreadableImages` counts them.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable | None = None,
        strict: bool = False,
        samples: list[tuple[str, int]] | None = None,
    ) -> None:
        self._given, self._strict = samples, strict
        self._notes: list[str] = []
        super().__init__(str(root), transform=transform, loader=load_image)
        for note in self._notes:
            warnings.warn(note, stacklevel=2)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        """The folders of `directory` whose names do not start with `.`, sorted."""
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise ValueError(f"image folder {directory} has no class folders; put the pictures in {directory}/CLASS/")
        return classes, {name: index for index, name in enumerate(classes)}

    def make_dataset(
        self, directory: str | Path, class_to_idx: dict[str, int], *args: Any, **kwargs: Any
    ) -> list[tuple[str, int]]:
        """The checked samples (torchvision's `extensions` and `is_valid_file` are not used)."""
        if self._given is not None:  # a split of an already checked folder
            return self._given
        samples, self._notes = index_image_folder(Path(directory), class_to_idx)
        bad = [path for path, _ in samples if not _readable(path)]
        if bad and self._strict:
            raise ValueError(f"{len(bad)} unreadable image file(s) under {directory}: {_few(bad)}")
        if bad:
            self._notes.append(f"skipping {len(bad)} unreadable image file(s) under {directory}: {_few(bad)}")
            unreadable = set(bad)
            samples = [sample for sample in samples if sample[0] not in unreadable]
        found = {label for _, label in samples}
        empty = [name for name, label in class_to_idx.items() if label not in found]
        if empty:
            raise ValueError(
                f"class folder(s) {', '.join(map(repr, empty))} under {directory} hold no readable pictures "
                f"({', '.join(IMG_EXTENSIONS)}); add pictures or remove the folder(s)"
            )
        return samples

    def __getitems__(self, indices: Sequence[int]) -> ReadSamples:
        """The samples at `indices` whose pictures could be read; the others are named on the
        returned list's `unreadable`."""
        read = ReadSamples()
        for index in indices:
            try:
                read.append(self[index])
            except ImageFileError as err:
                read.unreadable.append((self.samples[index][0], str(err)))
        return read


def _readable(path: str) -> bool:
    try:
        verify_image(path)
        return True
    except ImageFileError:
        return False


# --- batches without the unreadable pictures, and their count ---------------------------------


class ReadSamples(list):
    """The samples of a batch that could be read; `unreadable` holds `(path, reason)` of the others."""

    def __init__(self) -> None:
        super().__init__()
        self.unreadable: list[tuple[str, str]] = []


class ImageBatch(tuple):
    """A batch `(x, y)` that also names the pictures dropped from it (`unreadable`: `(path,
    reason)` pairs). Unpacks as `x, y`; crosses from `DataLoader` workers and through pinning
    with its names."""

    unreadable: tuple[tuple[str, str], ...]

    def __new__(cls, x: Tensor, y: Tensor, unreadable: Iterable[tuple[str, str]] = ()) -> ImageBatch:
        batch = super().__new__(cls, (x, y))
        batch.unreadable = tuple(unreadable)
        return batch

    def __reduce__(self) -> tuple[type, tuple[Tensor, Tensor, tuple[tuple[str, str], ...]]]:
        return ImageBatch, (self[0], self[1], self.unreadable)

    def pin_memory(self) -> ImageBatch:
        """What `DataLoader(pin_memory=True)` calls: the tensors pinned, the names kept."""
        return ImageBatch(self[0].pin_memory(), self[1].pin_memory(), self.unreadable)


def collate_readable(samples: Sequence[tuple[Any, int]]) -> ImageBatch:
    """`default_collate` of the readable samples, with the names of the dropped ones
    (`ReadSamples.unreadable`); an empty batch when none could be read."""
    unreadable = getattr(samples, "unreadable", ())
    if not samples:
        return ImageBatch(torch.empty(0), torch.empty(0, dtype=torch.long), unreadable)
    x, y = default_collate(list(samples))
    return ImageBatch(x, y, unreadable)


class UnreadableImagesError(ValueError):
    """More pictures of a pass could not be read than it allows."""


class UnreadableImages:
    """Counts and names the pictures that a pass over a loader dropped because they could not be
    read, and stops the pass as soon as there are more than `allowed`.

    Args:
        what: the pass, for messages (`"training epoch 3"`).
        allowed: how many pictures may fail.
        rule: why that many, for messages.
    """

    def __init__(self, what: str, allowed: int, rule: str) -> None:
        self.what, self.allowed, self.rule = what, allowed, rule
        self.unreadable: list[tuple[str, str]] = []

    @classmethod
    def training(cls, epoch: int, pictures: int) -> UnreadableImages:
        """Training epoch `epoch` of `pictures` may lose `MAX_UNREADABLE_PERCENT` of them, rounded down."""
        allowed = pictures * MAX_UNREADABLE_PERCENT // 100
        return cls(f"training epoch {epoch}", allowed, f"{MAX_UNREADABLE_PERCENT} % of its {pictures} pictures")

    @classmethod
    def held_out(cls) -> UnreadableImages:
        """A held-out evaluation may lose none: its accuracy must be over the whole held-out set."""
        return cls("the held-out evaluation", 0, "an accuracy needs every held-out picture")

    def batches(self, loader: Iterable, distributed: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of `loader` that hold pictures, counting the unreadable ones (the
        `unreadable` of an `ImageBatch`). An empty batch is skipped, or, when `distributed`
        (every process must take the same number of steps), stops the pass."""
        for batch in loader:
            self.unreadable += getattr(batch, "unreadable", ())
            if len(self.unreadable) > self.allowed:
                raise UnreadableImagesError(
                    f"stopping: {len(self.unreadable)} picture(s) of {self.what} could not be read, more than the "
                    f"{self.allowed} allowed ({self.rule}): {self.names()}; restore or remove them "
                    f"(the first: {self.unreadable[0][1]})"
                )
            if len(batch[1]) == 0 and distributed:
                raise UnreadableImagesError(
                    f"stopping: no picture of a batch of {self.what} could be read ({self.names()}), and the "
                    "processes of a distributed run must take the same steps"
                )
            if len(batch[1]):
                yield batch

    def names(self) -> str:
        """The paths of the unreadable pictures so far, a few of them."""
        return _few([path for path, _ in self.unreadable])

    def summary(self) -> str:
        """One line: how many pictures were skipped, how many may be, and which."""
        count = len(self.unreadable)
        return f"skipped {count} unreadable picture(s) of {self.what} (at most {self.allowed}): {self.names()}"


# --- the splits of an image folder -------------------------------------------------------------


def build_image_folders(cfg: Any, size: tuple[int, int]) -> tuple[CheckedImageFolder, CheckedImageFolder, list[str]]:
    """`(train, held-out, class names)` of the `data` section `cfg` of an image folder: its
    `train` and `val` (or `test`) folders, or a stratified `data.val_fraction` split of it."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; set data.root to a folder of class sub-folders")
    aug = cfg.augment

    def transform(train: bool) -> Callable:
        return create_transform(
            size,
            is_training=train,
            hflip=aug.hflip,
            auto_augment=aug.auto_augment,
            re_prob=aug.re_prob,
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
        )

    val_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and val_dir is not None:
        train = CheckedImageFolder(root / "train", transform(True), cfg.strict)
        test = CheckedImageFolder(val_dir, transform(False), cfg.strict)
        if train.classes != test.classes:
            raise ValueError(f"class folders differ between {root / 'train'} and {val_dir}")
        _check_disjoint(train, test)
        return train, test, train.classes
    from sklearn.model_selection import train_test_split

    full = CheckedImageFolder(root, None, cfg.strict)
    _check_split(full, root, cfg.val_fraction)
    train_idx, test_idx = train_test_split(
        np.arange(len(full)), test_size=cfg.val_fraction, stratify=full.targets, random_state=cfg.split_seed
    )
    train = CheckedImageFolder(root, transform(True), samples=[full.samples[i] for i in sorted(train_idx)])
    test = CheckedImageFolder(root, transform(False), samples=[full.samples[i] for i in sorted(test_idx)])
    return train, test, full.classes


def _check_disjoint(train: CheckedImageFolder, test: CheckedImageFolder) -> None:
    """Refuse a held-out folder that holds a training picture (the same file, through a link)."""
    trained = {os.path.realpath(path): path for path, _ in train.samples}
    real = {path: os.path.realpath(path) for path, _ in test.samples}
    both = [f"{path} (= {trained[real[path]]})" for path in real if real[path] in trained]
    if both:
        raise ValueError(
            f"{len(both)} held-out picture(s) are training pictures too: {_few(both)}; "
            "remove the links that put them in both folders"
        )


def _check_split(folder: CheckedImageFolder, root: Path, val_fraction: float) -> None:
    """Refuse a folder that a stratified `val_fraction` split cannot divide, naming the class."""
    if len(folder.classes) < 2:
        raise ValueError(
            f"image folder {root} has {len(folder.classes)} class folder(s); a classifier needs at least 2"
        )
    counts = np.bincount(folder.targets, minlength=len(folder.classes))
    for name, count in zip(folder.classes, counts, strict=True):
        if count < 2:
            raise ValueError(
                f"class {name!r} in {root} has {count} image(s): a held-out split (data.val_fraction) needs at least "
                f"2 per class; add images or give {root}/train and {root}/val folders"
            )
    test_size = int(np.ceil(val_fraction * len(folder.targets)))
    if test_size < len(folder.classes) or len(folder.targets) - test_size < len(folder.classes):
        raise ValueError(
            f"data.val_fraction={val_fraction} of the {len(folder.targets)} images in {root} holds {test_size}, but "
            f"both splits need one image of each of the {len(folder.classes)} classes; change data.val_fraction"
        )
