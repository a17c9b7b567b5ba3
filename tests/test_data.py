"""Datasets: digits split, the cluttered canvas, CIFAR's pickle format, fake images (folders: test_imagefolder)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from visattn.train.config import load_config
from visattn.train.data import build_datasets, held_out_pictures, input_shape
from visattn.train.digits import DigitsCanvas, _build_canvases, digits_images, digits_split


def data_cfg(*overrides):
    return load_config(overrides=list(overrides)).data


def test_digits_split_is_stratified_fixed_and_disjoint():
    train, test = digits_split(0)
    labels = load_digits().target
    assert len(train) == 1437 and len(test) == 360 and not set(train) & set(test)
    assert set(train) | set(test) == set(range(1797))
    share = np.bincount(labels[test], minlength=10) / np.bincount(labels, minlength=10)
    assert np.all(np.abs(share - 0.2) < 0.02)
    assert np.array_equal(digits_split(0)[1], test)


def test_digits_images_are_sklearns_digits():
    x, y = digits_images("test", size=8)
    reference = load_digits()
    index = digits_split(0)[1]
    assert torch.equal(x[:, 0], torch.from_numpy(reference.images[index] / 16.0).float())
    assert torch.equal(y, torch.from_numpy(reference.target[index]))
    up, _ = digits_images("test", size=16)
    assert up.shape == (360, 1, 16, 16)
    assert torch.allclose(up[:, 0].double(), bilinear_reference(x[:, 0].double(), 2), atol=1e-6)


def bilinear_reference(images: torch.Tensor, scale: int) -> torch.Tensor:
    """Half-pixel-centre bilinear upscaling written out (rows, then columns), float64."""

    def along(a: torch.Tensor, dim: int) -> torch.Tensor:
        n = a.shape[dim]
        src = torch.clamp((torch.arange(n * scale, dtype=torch.float64) + 0.5) / scale - 0.5, min=0)
        lo = src.floor().long()
        hi = torch.clamp(lo + 1, max=n - 1)
        w = src - lo
        shape = [1] * a.dim()
        shape[dim] = -1
        return a.index_select(dim, lo) * (1 - w).view(shape) + a.index_select(dim, hi) * w.view(shape)

    return along(along(images, -2), -1)


def test_default_dataset_config():
    train, test, data_config = build_datasets(data_cfg())
    assert (len(train), len(test)) == (1437, 360)
    x, y = test[0]
    assert x.shape == (1, 16, 16) and isinstance(y, int)
    assert set(data_config.to_dict()) == {"name", "img_size", "in_chans", "mean", "std", "num_classes", "class_names"}
    assert data_config.img_size == (16, 16) and data_config.in_chans == 1 and data_config.num_classes == 10
    assert data_config.name == "digits" and data_config.class_names == tuple("0123456789")
    # test images are only normalized: undoing it gives the upscaled digits back
    raw = test.raw_image(0)
    assert torch.allclose(x * data_config.std[0] + data_config.mean[0], raw, atol=1e-6)


def test_canvas_boxes_hold_the_source_digit_and_clutter_is_other_ink():
    canvas = DigitsCanvas("test", canvas_size=48, seed=3, copies=1)
    digits8, labels = digits_images("test", size=8)
    assert len(canvas) == 360 and canvas.boxes.dtype == torch.long and canvas.boxes.shape == (360, 4)
    assert torch.equal(canvas.labels, labels)
    clutter_ink, digit_ink = [], []
    for i in range(0, 360, 7):
        x0, y0, x1, y1 = canvas.boxes[i].tolist()
        assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
        image = canvas.raw_image(i)[0]
        inside = image[y0:y1, x0:x1]
        # oracle: the source digit, upscaled 2x or 3x, cropped to its ink, rounded to 8 bits
        crops = []
        for scale in (2, 3):
            up = bilinear_reference(digits8[i, 0].double(), scale).float()
            rows, cols = torch.nonzero(up > 0.05, as_tuple=True)
            crops.append(up[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1])
        assert any(c.shape == inside.shape and torch.allclose(c, inside, atol=1 / 255 + 1e-6) for c in crops)
        # nothing else within 2 px of the box; clutter outside it
        ring = image[max(0, y0 - 2) : y1 + 2, max(0, x0 - 2) : x1 + 2].clone()
        ring[
            y0 - max(0, y0 - 2) : y0 - max(0, y0 - 2) + (y1 - y0), x0 - max(0, x0 - 2) : x0 - max(0, x0 - 2) + (x1 - x0)
        ] = 0
        assert not ring.any()
        digit_ink.append(inside.sum())
        clutter_ink.append(image.sum() - inside.sum())
    # clutter carries ink comparable to the digit (the generator aims for at least as much)
    assert 0.8 < np.mean(clutter_ink) / np.mean(digit_ink) < 2.0
    x, y = canvas[0]
    assert x.shape == (1, 48, 48) and y == int(labels[0])


def test_canvas_is_deterministic_and_seeded():
    a = DigitsCanvas("test", canvas_size=40, seed=1, copies=1)
    b = DigitsCanvas("test", canvas_size=40, seed=2, copies=1)
    images, _, boxes = _build_canvases.__wrapped__("test", 40, 1, 1)  # rebuilt, not the cached copy
    assert torch.equal(images, a.images) and torch.equal(boxes, a.boxes)
    assert not torch.equal(a.boxes, b.boxes)


def write_cifar10(root, per_batch=3, seed=0):
    """A tiny CIFAR-10 in the original Python pickle layout: 5 train batches, a test batch, meta."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        batches[name] = (data, labels)
        with open(folder / name, "wb") as handle:
            pickle.dump({"batch_label": name, "data": data, "labels": labels, "filenames": []}, handle)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch}, handle)
    return batches, names


def test_cifar10_reads_the_pickle_format(tmp_path):
    batches, names = write_cifar10(tmp_path)
    train, test, data_config = build_datasets(data_cfg("data.name=cifar10", f"data.root={tmp_path}"))
    assert (len(train), len(test)) == (15, 3)
    assert data_config.class_names == tuple(names) and data_config.img_size == (32, 32)
    data, labels = batches["test_batch"]
    mean = torch.tensor(data_config.mean)[:, None, None]
    std = torch.tensor(data_config.std)[:, None, None]
    for i in range(3):
        x, y = test[i]
        expected = (torch.from_numpy(data[i].reshape(3, 32, 32)).float() / 255 - mean) / std  # CHW row-major
        assert torch.allclose(x, expected, atol=1e-5) and y == labels[i]


def write_cifar100(root, per_batch=4, seed=0):
    """A tiny CIFAR-100 in the original layout: ``train``, ``test`` and ``meta`` with fine/coarse labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ("train", "test"):
        entry = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "fine_labels": rng.integers(0, 100, per_batch).tolist(),
            "coarse_labels": rng.integers(0, 20, per_batch).tolist(),
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle)
    with open(folder / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": []}, handle)
    return folder


class Payload:
    """Unpickling this runs ``open(marker, "w")``: what a malicious batch file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cifar100_reads_the_pickle_format(tmp_path):
    folder = write_cifar100(tmp_path)
    train, test, data_config = build_datasets(data_cfg("data.name=cifar100", f"data.root={tmp_path}"))
    assert (len(train), len(test)) == (4, 4) and data_config.num_classes == 100
    with open(folder / "train", "rb") as handle:
        entry = pickle.load(handle)
    assert torch.equal(train.images, torch.from_numpy(entry["data"].reshape(4, 3, 32, 32)))
    assert train.labels.tolist() == entry["fine_labels"]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_a_malicious_cifar_batch_runs_no_code(tmp_path, name, protocol):
    if name == "cifar10":
        write_cifar10(tmp_path)
        victim = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    else:
        victim = write_cifar100(tmp_path) / "train"
    marker = tmp_path / "pwned"
    with open(victim, "wb") as handle:
        pickle.dump({"data": Payload(marker), "labels": [0]}, handle, protocol=protocol)
    with pytest.raises(ValueError) as caught:
        build_datasets(data_cfg(f"data.name={name}", f"data.root={tmp_path}"))
    assert not marker.exists(), "unpickling ran the payload"
    message = str(caught.value)
    assert "\n" not in message and str(victim) in message and "refused" in message and "open" in message


def test_cifar_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python.*data.download=true"):
        build_datasets(data_cfg("data.name=cifar100", f"data.root={tmp_path}"))


def test_fake_images_take_the_per_image_transforms():
    cfg = data_cfg(
        "data.name=fake",
        "data.fake_size=8",
        "data.img_size=8",
        "data.augment.crop_padding=2",
        "data.augment.hflip=0.5",
        "data.augment.auto_augment=rand-m9",
        "data.augment.re_prob=0.5",
    )
    train, test, data_config = build_datasets(cfg)
    assert train[0][0].shape == (3, 8, 8) and len(test) == 2


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["data.img_size=24"],
        ["data.name=digits_canvas", "data.canvas_size=40", "data.canvas_copies=1"],
        ["data.name=fake", "data.fake_size=8", "data.fake_classes=3"],
    ],
)
def test_input_shape_is_what_the_built_datasets_report(overrides):
    cfg = data_cfg(*overrides)
    _, _, data_config = build_datasets(cfg)
    chans, classes, side = input_shape(cfg)
    assert (chans, classes, (side, side)) == (data_config.in_chans, data_config.num_classes, data_config.img_size)


def test_held_out_pictures_show_each_class_in_turn_as_stored():
    _, test, _ = build_datasets(data_cfg())
    labels = test.labels.tolist()
    # the first digit of every class in label order, then the second of classes 0 and 1
    expected = [labels.index(c) for c in range(10)] + [labels.index(c, labels.index(c) + 1) for c in (0, 1)]
    pictures = held_out_pictures(test, 12)
    assert [p.mode for p in pictures] == ["L"] * 12 and {p.size for p in pictures} == {(16, 16)}
    for picture, index in zip(pictures, expected, strict=True):
        stored = digits_images("test")[0][index, 0]  # [0, 1] floats, before normalization
        assert np.array_equal(np.asarray(picture), np.rint(stored.numpy() * 255).astype(np.uint8))
    assert len(held_out_pictures(test, 500)) == len(test)  # never more than there are


def test_generated_noise_has_no_held_out_pictures_to_show():
    _, test, _ = build_datasets(data_cfg("data.name=fake", "data.fake_size=8"))
    assert held_out_pictures(test) == []
