"""visattn.explain.metrics against cases with known answers.

The pointing game on hand-made maps and boxes; deletion and insertion on a model whose evidence
is exactly one region (the map marking it must beat its inverse) and against a float64 hand
computation of the curve and its area; the randomization test on a map that ignores the model
(no dependence at all) and on class-token attention (untouched by the head, changed by the
blocks); Spearman's ρ against scipy's.
"""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from torch import nn

import visattn
from visattn.explain import metrics
from visattn.explain.evaluate import ink_map

# --- the pointing game -----------------------------------------------------------------------


def test_pointing_game_reads_the_maximum_as_x_column_y_row():
    maps = torch.zeros(3, 8, 10)
    maps[0, 2, 7] = 1.0  # row 2, column 7
    maps[1, 7, 2] = 1.0  # the transposed place
    maps[2, 5, 5] = 1.0  # on the exclusive right/bottom edge
    boxes = torch.tensor([[6, 1, 9, 4], [6, 1, 9, 4], [2, 2, 5, 5]])  # (x0, y0, x1, y1)
    assert metrics.pointing_game(maps, boxes, (8, 10)).tolist() == [True, False, False]


def test_pointing_game_tolerance_is_the_euclidean_distance_to_the_box():
    maps = torch.zeros(2, 20, 30)
    maps[0, 10, 24] = 1.0  # 3 columns right of the box's last column (21)
    maps[1, 14, 24] = 1.0  # 3 columns right and 4 rows below its last row (10): distance 5
    boxes = torch.tensor([[12, 4, 22, 11]] * 2)
    assert metrics.pointing_game(maps, boxes, (20, 30), tolerance=2.9).tolist() == [False, False]
    assert metrics.pointing_game(maps, boxes, (20, 30), tolerance=3).tolist() == [True, False]
    assert metrics.pointing_game(maps, boxes, (20, 30), tolerance=5).tolist() == [True, True]


def test_pointing_game_places_a_coarse_non_square_grid_on_the_pixels():
    grid = torch.zeros(1, 2, 3)  # 2 rows × 3 columns of cells on a 16 × 24 image: 8 × 8 px cells
    grid[0, 1, 2] = 1.0  # bottom-right cell: pixels x 16..23, y 8..15
    inside, outside = torch.tensor([[16, 8, 24, 16]]), torch.tensor([[0, 0, 16, 8]])
    assert metrics.pointing_game(grid, inside, (16, 24)).item()
    assert not metrics.pointing_game(grid, outside, (16, 24)).item()


@pytest.mark.parametrize(
    ("maps", "boxes", "message"),
    [
        (torch.zeros(2, 8, 8), [[0, 0, 9, 4], [0, 0, 2, 2]], "outside the 8×8 image"),
        (torch.zeros(2, 8, 8), [[-1, 0, 4, 4], [0, 0, 2, 2]], "box 0"),
        (torch.zeros(2, 8, 8), [[0, 0, 2, 2], [3, 3, 3, 5]], "box 1"),  # empty
        (torch.zeros(2, 8, 8), [[0, 0, 2, 2]], "1 boxes for 2 maps"),
        (torch.zeros(2, 8, 8), [[0, 0, 2.5, 2], [0, 0, 2, 2]], "whole pixel"),
        (torch.zeros(2, 8, 8), [[0, 0, 2, 2, 1]] * 2, "(B, 4)"),
        (torch.zeros(2, 1, 8, 8), [[0, 0, 2, 2]] * 2, "(B, h, w)"),
        (torch.full((2, 8, 8), float("nan")), [[0, 0, 2, 2]] * 2, "NaN"),
    ],
)
def test_pointing_game_names_the_problem(maps, boxes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        metrics.pointing_game(maps, boxes, (8, 8))


def test_ink_baseline_peaks_on_the_largest_blob():
    raw = torch.zeros(1, 1, 32, 32)
    raw[0, 0, 4:6, 4:6] = 1.0  # a small bright fragment
    raw[0, 0, 20:28, 18:26] = 0.8  # a large, slightly dimmer blob
    assert metrics.pointing_game(ink_map(raw), [[18, 20, 26, 28]], (32, 32)).item()


# --- deletion and insertion ------------------------------------------------------------------


class OneRegion(nn.Module):
    """Class 1's logit is ``gain × mean(region)``, class 0's is 0: the only evidence is the region."""

    def __init__(self, rows: slice, cols: slice, gain: float = 4.0) -> None:
        super().__init__()
        self.rows, self.cols, self.gain = rows, cols, gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = self.gain * x[:, :, self.rows, self.cols].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(evidence), evidence], dim=1)


def test_the_map_marking_the_evidence_beats_its_inverse():
    model = OneRegion(slice(2, 6), slice(9, 14))
    images = 0.2 * torch.rand(3, 2, 12, 16)  # two channels, non-square, a batch; dim clutter
    images[:, :, 2:6, 9:14] += 0.8  # the bright evidence
    marking = torch.zeros(3, 12, 16)
    marking[:, 2:6, 9:14] = 1.0 + torch.rand(3, 4, 5)
    inverse = 1.0 - marking / 2  # the region ranked last
    for baseline in ("zero", "blur", "mean", torch.zeros(2, 1, 1)):
        kwargs = dict(steps=12, baseline=baseline)
        deleted = metrics.deletion(model, images, marking, **kwargs), metrics.deletion(model, images, inverse, **kwargs)
        inserted = (
            metrics.insertion(model, images, marking, **kwargs),
            metrics.insertion(model, images, inverse, **kwargs),
        )
        assert (deleted[0] < deleted[1]).all() and (inserted[0] > inserted[1]).all(), baseline


def _reference_curve(image, heatmap, weights, baseline, steps, insert):
    """The target-1 probability of a linear two-class model, in float64, pixel by pixel."""
    pixels = sorted(range(heatmap.numel()), key=lambda p: (-heatmap.flatten()[p].item(), p))
    curve = []
    for k in range(steps + 1):
        changed = set(pixels[: k * heatmap.numel() // steps])
        x = [
            (image.flatten()[p] if (p in changed) == insert else baseline.flatten()[p]).item()
            for p in range(heatmap.numel())
        ]
        logit = sum(w * v for w, v in zip(weights.flatten().tolist(), x, strict=True))
        curve.append(1 / (1 + math.exp(-logit)))  # softmax of (0, logit)
    area = sum((a + b) / 2 for a, b in zip(curve[:-1], curve[1:], strict=True)) / steps
    return curve, area


class Linear2(nn.Module):
    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = (x[:, 0] * self.weights).sum(dim=(1, 2))
        return torch.stack([torch.zeros_like(logit), logit], dim=1)


@pytest.mark.parametrize("steps", [6, 4])  # 6 pixels: one per step, and 0, 1, 3, 4, 6 pixels
def test_curves_and_areas_equal_a_float64_hand_computation(steps):
    weights = torch.tensor([[1.5, -0.5, 2.0], [0.25, 1.0, -1.0]])
    image = torch.tensor([[[0.9, 0.2, 0.7], [0.4, 0.8, 0.3]]])
    heatmap = torch.tensor([[0.1, 0.9, 0.5], [0.5, 0.2, 0.0]])  # a tie: row-major order decides
    model = Linear2(weights)
    for insert, fn in ((False, metrics.deletion), (True, metrics.insertion)):
        for baseline in ("zero", "mean"):
            blank = torch.zeros_like(image) if baseline == "zero" else torch.full_like(image, image.mean().item())
            curve, area = _reference_curve(
                image.double(), heatmap.double(), weights.double(), blank.double(), steps, insert
            )
            got_area, got_curve = fn(
                model, image[None], heatmap[None], target=1, steps=steps, baseline=baseline, return_curves=True
            )
            assert torch.allclose(got_curve[0].double(), torch.tensor(curve, dtype=torch.float64), atol=1e-6)
            assert abs(got_area.item() - area) < 1e-6


def test_the_blur_baseline_is_rises_gaussian_in_float64():
    """The last deletion step shows only the baseline: a σ = 5 px Gaussian (11 taps, reflected edges)."""
    image = torch.rand(1, 1, 12, 14, dtype=torch.float64)
    weights = torch.randn(12, 14, dtype=torch.float64) / 10
    taps = torch.tensor([math.exp(-(i**2) / 50) for i in range(-5, 6)], dtype=torch.float64)
    taps /= taps.sum()
    padded = nn.functional.pad(image, (5, 5, 5, 5), mode="reflect")
    blurred = nn.functional.conv2d(nn.functional.conv2d(padded, taps.view(1, 1, 11, 1)), taps.view(1, 1, 1, 11))
    logit = (blurred[0, 0] * weights).sum().item()
    _, curve = metrics.deletion(Linear2(weights), image, torch.rand(1, 12, 14), target=1, steps=3, return_curves=True)
    assert abs(curve[0, -1].item() - 1 / (1 + math.exp(-logit))) < 1e-6  # probabilities are float32


def test_a_batch_scores_as_its_images_one_by_one():
    model = OneRegion(slice(1, 5), slice(2, 9))
    images, maps = torch.rand(4, 1, 10, 12), torch.rand(4, 5, 6)  # a coarse grid, put on the pixels
    together = metrics.insertion(model, images, maps, steps=7, batch_size=5)
    alone = torch.cat([metrics.insertion(model, images[i : i + 1], maps[i : i + 1], steps=7) for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-6)


def test_target_defaults_to_the_predicted_class():
    model = OneRegion(slice(0, 4), slice(0, 4), gain=-4.0)  # bright images: class 0 wins
    images, maps = torch.rand(2, 1, 8, 8) + 0.5, torch.rand(2, 8, 8)
    assert torch.equal(
        metrics.deletion(model, images, maps, steps=4), metrics.deletion(model, images, maps, steps=4, target=0)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(heatmaps=torch.rand(3, 8, 8)), "3 maps but there are 2 images"),
        (dict(steps=0), "steps"),
        (dict(baseline="noise"), "baseline"),
        (dict(baseline=torch.zeros(3, 1, 1)), "broadcast"),
        (dict(target=[0, 1, 1]), "target"),
        (dict(images=torch.rand(2, 8, 8)), "images"),
    ],
)
def test_deletion_names_the_problem(kwargs, message):
    args = dict(images=torch.rand(2, 1, 8, 8), heatmaps=torch.rand(2, 8, 8)) | kwargs
    model = OneRegion(slice(0, 2), slice(0, 2))
    with pytest.raises(ValueError, match=message):
        metrics.deletion(model, args.pop("images"), args.pop("heatmaps"), **args)


# --- maps of every method --------------------------------------------------------------------


def test_every_method_gives_one_map_per_image_on_its_grid():
    vit = visattn.create_model("vit_digits_patch4_16", img_size=(16, 24), pool="cls", depth=2).eval()
    x = torch.randn(3, 1, 16, 24)
    for method in metrics.METHODS:
        assert metrics.attention_map(vit, x, method).shape == (3, 4, 6), method
    mean_pool = visattn.create_model("vit_digits_patch4_16", depth=1).eval()
    with pytest.raises(ValueError, match="class token"):
        metrics.attention_map(mean_pool, torch.randn(1, 1, 16, 16), "cls")


def test_cnn_received_maps_cover_the_image_with_pooled_keys():
    cnn = nn.Sequential()
    cnn.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1)  # 15 × 9 → 8 × 5 grid
    cnn.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    model = Wrapped(cnn)
    visattn.insert_attention(model, "net.stem", num_heads=2, kv_pool=2)
    x = torch.randn(2, 1, 15, 9)
    heatmap = metrics.attention_map(model.eval(), x, "received")
    assert heatmap.shape == (2, 15, 9)  # 4 × 3 pooled keys reach past the image: put on its pixels
    with pytest.raises(ValueError, match="MultiHeadAttention"):
        metrics.attention_map(model, x, "rollout")
    assert metrics.pointing_game(heatmap, [[0, 0, 9, 15]] * 2, (15, 9)).all()


class Wrapped(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --- the randomization test ------------------------------------------------------------------


def test_spearman_equals_scipys_with_ties():
    a = torch.tensor([[3.0, 1.0, 1.0, 2.0, 5.0, 5.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    b = torch.tensor([[1.0, 2.0, 2.0, 2.0, 9.0, 4.0, -1.0], [7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    got = metrics.spearman(a.view(2, 7, 1), b.view(2, 7, 1))
    for row in range(2):
        assert abs(got[row].item() - scipy.stats.spearmanr(a[row], b[row]).statistic) < 1e-12
    assert torch.isnan(metrics.spearman(torch.ones(1, 4), torch.rand(1, 4))).all()


class IgnoresInput(nn.Module):
    """Logits from its weights alone: the output ignores the input."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(torch.ones(len(x), 4)))


def test_a_map_that_ignores_the_model_shows_no_dependence():
    model = IgnoresInput()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(3, 1, 12, 10)
    rng = torch.get_rng_state()
    result = metrics.randomization_test(model, images, lambda m, x, t: ink_map(x))
    assert result.steps == ["head", "body.1", "body.0"]
    assert torch.equal(result.correlation, torch.ones(3, 3, dtype=torch.float64))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
    assert torch.equal(torch.get_rng_state(), rng)


def test_class_token_attention_ignores_the_head_and_follows_the_blocks():
    vit = visattn.create_model("vit_digits_patch4_16", pool="cls", depth=3).eval()
    result = metrics.randomization_test(vit, torch.randn(4, 1, 16, 16), "cls")
    assert result.steps == ["head", "norm", "blocks.2", "blocks.1", "blocks.0", "patch_embed + cls_token, pos_embed"]
    assert result.last_block == 2
    assert torch.equal(result.correlation[:2], torch.ones(2, 4, dtype=torch.float64))  # exactly unchanged
    assert (result.correlation[2:].abs() < 0.9).all()  # a new last block: another map


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer1(self.stem(x)))


def test_the_cascade_follows_the_forward_order_of_an_inserted_block():
    model = SmallCNN()
    visattn.insert_attention(model, "layer1", num_heads=2)  # registered last, runs before the head
    result = metrics.randomization_test(model.eval(), torch.randn(2, 1, 8, 6), "received")
    assert result.steps == ["head.2", "layer1_attn", "layer1.1", "layer1.0", "stem"]
    assert result.last_block == 1
    assert torch.equal(result.correlation[0], torch.ones(2, dtype=torch.float64))  # the head comes after the map
    assert (result.correlation[1] < 0.9).all()  # new queries and keys: another map
