"""Batched augmentation against torchvision's per-image transforms, and batched in-memory datasets."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from visattn.train.augment import AffineParams, BatchAugment, apply_affine
from visattn.train.config import load_config
from visattn.train.data import build_datasets
from visattn.train.distributed import Processes, eval_loader, train_loader
from visattn.train.tensor_dataset import TensorImageDataset

B, C, H, W = 5, 2, 12, 16  # non-square, several channels


def params(flip=None, crop=None) -> AffineParams:
    f64 = dict(dtype=torch.float64)
    return AffineParams(
        angle=torch.tensor([0.0, 10.0, -25.0, 7.0, 90.0], **f64),
        scale=torch.tensor([1.0, 1.1, 0.9, 1.2, 1.0], **f64),
        translate=torch.tensor([[0, 0], [1.0, -2], [2.5, 0.5], [-1, 1], [0, 3]], **f64),
        flip=torch.tensor([False, True, False, True, True]) if flip is None else flip,
        crop=torch.zeros(B, 2, **f64) if crop is None else crop,
    )


def test_flip_and_affine_equal_torchvision_per_image():
    x = torch.rand(B, C, H, W, dtype=torch.float64)
    p = params()
    out = apply_affine(x, p)
    for i in range(B):
        image = TF.horizontal_flip(x[i]) if p.flip[i] else x[i]
        expected = TF.affine(
            image,
            angle=float(p.angle[i]),
            translate=p.translate[i].tolist(),
            scale=float(p.scale[i]),
            shear=[0.0, 0.0],
            interpolation=InterpolationMode.BILINEAR,
        )
        torch.testing.assert_close(out[i], expected, atol=1e-10, rtol=0)


def test_crop_equals_a_zero_padded_crop():
    x = torch.rand(B, C, H, W, dtype=torch.float64)
    crop = torch.tensor([[0, 0], [1, -2], [0, 3], [-3, 2], [2, 2]], dtype=torch.float64)
    zero = torch.zeros(B, dtype=torch.float64)
    out = apply_affine(
        x, AffineParams(zero, zero + 1, torch.zeros(B, 2, dtype=torch.float64), torch.zeros(B, dtype=torch.bool), crop)
    )
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(B):
        dx, dy = (int(v) for v in crop[i])
        torch.testing.assert_close(out[i], padded[i, :, 4 + dy : 4 + dy + H, 4 + dx : 4 + dx + W], atol=1e-10, rtol=0)


def test_draws_are_per_image_within_bounds_and_seeded():
    augment = BatchAugment(hflip=0.5, degrees=10, translate=0.1, scale=0.2, crop_padding=2)
    p = augment.sample(4096, H, W, torch.Generator().manual_seed(0))
    assert p.angle.abs().max() <= 10 and p.angle.abs().max() > 8
    assert (p.scale - 1).abs().max() <= 0.2
    assert (p.translate[:, 0].abs() <= 0.1 * W).all() and (p.translate[:, 1].abs() <= 0.1 * H).all()
    assert set(p.crop.unique().tolist()) == {-2.0, -1.0, 0.0, 1.0, 2.0}
    assert 0.45 < p.flip.double().mean() < 0.55
    x = torch.rand(3, C, H, W)
    first = augment(x, torch.Generator().manual_seed(1))
    assert torch.equal(first, augment(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(first[0], first[1]) or not torch.equal(x[0], x[1])
    assert BatchAugment()(x) is x and not BatchAugment().active


def test_tensor_dataset_serves_normalized_batches_through_a_dataloader():
    images = torch.randint(0, 256, (10, 3, 4, 5), dtype=torch.uint8)
    labels = torch.arange(10)
    dataset = TensorImageDataset(images, labels, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    loader = DataLoader(dataset, batch_size=4, shuffle=False)
    batches = list(loader)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 4, 5), (4, 3, 4, 5), (2, 3, 4, 5)]
    x = torch.cat([b[0] for b in batches])
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1), torch.tensor([0.5, 0.25, 2.0]).view(3, 1, 1)
    expected = (images.double() / 255 - mean.double()) / std.double()
    torch.testing.assert_close(x.double(), expected, atol=1e-6, rtol=0)
    assert torch.equal(torch.cat([b[1] for b in batches]), labels)
    single_x, single_y = dataset[7]
    assert torch.equal(single_x, x[7]) and single_y == 7


@pytest.mark.parametrize(
    "augment",
    [
        ["data.augment.crop_padding=2", "data.augment.hflip=0.5"],
        ["data.augment.auto_augment=rand-m9-mstd0.5", "data.augment.re_prob=0.5"],
    ],
)
def test_every_augmentation_option_works_on_in_memory_datasets(augment):
    for name in ("digits", "digits_canvas"):
        train, _, _ = build_datasets(load_config(overrides=[f"data.name={name}", *augment]).data)
        x, y = train.batch(list(range(6)))
        size = 16 if name == "digits" else 64
        assert x.shape == (6, 1, size, size) and torch.isfinite(x).all() and y.shape == (6,)
        plain = (train.raw_images(range(6)) - train.mean) / train.std
        assert not torch.allclose(x, plain)  # the augmentation ran


def test_training_loop_loaders_serve_whole_batches_in_sampler_order():
    cfg = load_config(overrides=["train.batch_size=64"])
    train, test, _ = build_datasets(cfg.data)
    loader, sampler = train_loader(train, cfg.train.batch_size, cfg.data.workers, cfg.train.seed, Processes())
    sampler.set_epoch(3)
    order = list(sampler)
    batches = list(loader)
    assert len(batches) == len(loader) == len(train) // 64 and all(x.shape == (64, 1, 16, 16) for x, _ in batches)
    assert torch.equal(torch.cat([y for _, y in batches]), train.labels[order[: 64 * len(batches)]])
    x = torch.cat([b[0] for b in eval_loader(test, cfg.train.batch_size, cfg.data.workers, Processes())])
    torch.testing.assert_close(x, (test.raw_images(range(len(test))) - test.mean) / test.std)
