"""Overlays: pixel-exact placement, preprocessing undone, grids, attention panels on a picture."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from visattn import SelfAttention2d, load_image
from visattn.data_spec import DataSpec
from visattn.explain.inputs import Preprocess
from visattn.explain.maps import to_image
from visattn.explain.overlay import attention_overlay, attention_panels
from visattn.explain.render import normalize_map, overlay, overlay_grid

DIGITS_LIKE = {
    "name": "digits_canvas",
    "img_size": [32, 48],
    "in_chans": 1,
    "mean": [0.2],
    "std": [0.4],
    "num_classes": 10,
    "class_names": [str(i) for i in range(10)],
}


def picture(width: int = 90, height: int = 60, square: tuple[int, int, int, int] = (54, 12, 72, 30)) -> Image.Image:
    """A dark RGB picture with one bright square at ``(left, top, right, bottom)``."""
    pixels = np.full((height, width, 3), 30, dtype=np.uint8)
    left, top, right, bottom = square
    pixels[top:bottom, left:right] = (250, 240, 200)
    return Image.fromarray(pixels)


def test_overlay_colours_each_cell_on_its_own_pixels():
    image = Image.new("RGB", (30, 20), (10, 200, 30))
    heat = torch.tensor([[0.0, 0.5, 1.0], [0.25, 0.75, 0.1]])
    out = overlay(image, heat, cmap="viridis", alpha=1.0, resample="nearest", normalize="none")
    assert out.size == (30, 20) and out.mode == "RGB"
    colours = matplotlib.colormaps["viridis"](heat.numpy())[..., :3]
    want = np.round(colours.repeat(10, axis=0).repeat(10, axis=1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(out), want)
    half = overlay(image, heat, cmap="viridis", alpha=0.5, resample="nearest", normalize="none")
    blended = np.round((0.5 * np.asarray(image) / 255 + 0.5 * colours.repeat(10, 0).repeat(10, 1)) * 255)
    np.testing.assert_array_equal(np.asarray(half), blended.astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(overlay(image, heat, alpha=0.0)), np.asarray(image))


def test_gray_pictures_and_a_box_leave_the_rest_of_the_picture_alone():
    gray = Image.fromarray(np.arange(40 * 25, dtype=np.uint8).reshape(25, 40) % 200, mode="L")
    out = overlay(gray, torch.rand(3, 3), alpha=0.7, box=(10, 5, 30, 20))
    assert out.size == gray.size and out.mode == "RGB"
    original, result = np.asarray(gray.convert("RGB")), np.asarray(out)
    inside = np.zeros((25, 40), dtype=bool)
    inside[5:20, 10:30] = True
    np.testing.assert_array_equal(result[~inside], original[~inside])
    assert (result[inside] != original[inside]).any()
    with pytest.raises(ValueError, match="does not lie inside"):
        overlay(gray, torch.rand(3, 3), box=(10, 5, 50, 20))


def test_preprocessing_is_undone_so_the_map_lies_on_the_right_pixels():
    """A map made on the (resized, gray, normalized) model input, put back on a 90×60 picture of
    another aspect ratio, is hot exactly where the bright square is in the original."""
    square = (45, 15, 75, 30)  # on the edges of the 3.75-pixel cells of the 16×24 map
    image = picture(square=square)
    prep = Preprocess.from_data_config(DIGITS_LIKE)
    x = prep(image)
    assert x.shape == (1, 32, 48)
    heat = torch.nn.functional.avg_pool2d(x[None], 2)[0, 0]  # a 16×24 map of the input's brightness
    out = np.asarray(overlay(image, heat, cmap="gray", alpha=1.0, resample="nearest", box=prep.box(image.size)))
    hot = out[..., 0] > 127
    truth = np.zeros_like(hot)
    truth[square[1] : square[3], square[0] : square[2]] = True
    iou = (hot & truth).sum() / (hot | truth).sum()
    assert iou > 0.95, iou
    assert prep.to_input((63, 21), image.size) == (63 * 48 / 90, 21 * 32 / 60)
    with pytest.raises(ValueError, match=r"outside the 90×60 \(W×H\) picture"):
        prep.to_input((90, 0), image.size)


def test_preprocess_follows_the_data_config_exactly():
    colour = (200, 100, 50)
    image = Image.new("RGB", (37, 23), colour)
    rgb = Preprocess.from_data_config(
        {"img_size": [16, 20], "in_chans": 3, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.5]}
    )
    x = rgb(image)
    assert x.shape == (3, 16, 20) and x.dtype == torch.float32
    want = (torch.tensor(colour) / 255 - torch.tensor([0.5, 0.4, 0.3])) / torch.tensor([0.2, 0.25, 0.5])
    torch.testing.assert_close(x[:, 7, 9], want)
    gray = Preprocess.from_data_config(DIGITS_LIKE)(image)
    luma = round(colour[0] * 299 / 1000 + colour[1] * 587 / 1000 + colour[2] * 114 / 1000)  # PIL's "L"
    torch.testing.assert_close(gray[0, 3, 3], torch.tensor((luma / 255 - 0.2) / 0.4))
    with pytest.raises(ValueError, match="lacks std"):
        Preprocess.from_data_config({"img_size": [8, 8], "in_chans": 1, "mean": [0.5]})
    with pytest.raises(ValueError, match=r"holds 1 value\(s\) but data_config\['in_chans'\] is 3"):
        Preprocess.from_data_config({"img_size": 8, "in_chans": 3, "mean": [0.5], "std": [0.5]})
    with pytest.raises(ValueError, match="unknown key"):
        Preprocess.from_data_config({**DIGITS_LIKE, "interpolation": "bicubic"})
    two = DataSpec(img_size=(8, 8), in_chans=2, mean=(0.5, 0.5), std=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"in_chans 1 \(gray\) or 3 \(RGB\) pictures; the spec has 2"):
        Preprocess.from_spec(two)


def test_normalize_map():
    heat = torch.tensor([[1.0, 3.0], [2.0, 5.0]])
    torch.testing.assert_close(normalize_map(heat), torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    torch.testing.assert_close(normalize_map(heat, "max"), heat / 5)
    torch.testing.assert_close(normalize_map(heat * 0 + 2, "minmax"), torch.zeros(2, 2))
    torch.testing.assert_close(normalize_map(heat, "none"), torch.ones(2, 2))
    with pytest.raises(ValueError, match="normalize must be"):
        normalize_map(heat, "zscore")
    with pytest.raises(ValueError, match="unknown matplotlib colormap 'nope'"):
        overlay(Image.new("RGB", (4, 4)), heat, cmap="nope")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_map_that_is_not_finite_is_refused_not_drawn_as_constant(bad):
    """An all-NaN map was drawn as a constant one (the bottom colour over the whole picture)."""
    image = Image.new("RGB", (30, 20), (10, 200, 30))
    with pytest.raises(ValueError, match=r"the heatmap to draw: 6 of 6 values are NaN or infinite"):
        overlay(image, torch.full((2, 3), bad))
    one = np.arange(6.0).reshape(2, 3)
    one[1, 2] = bad
    with pytest.raises(ValueError, match=r"the heatmap to draw: 1 of 6 values are NaN or infinite"):
        overlay(image, one)  # an array, one bad cell
    with pytest.raises(ValueError, match=r"1 of 6 values are NaN or infinite"):
        overlay_grid(image, [torch.rand(2, 3), torch.as_tensor(one)])


def test_overlay_grid_lays_out_rows_and_columns(tmp_path):
    image = picture()
    one_row = overlay_grid(image, torch.rand(3, 4, 6), titles=["a", "b", "c"], out=tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").size == one_row.size
    two_rows = overlay_grid(
        image, [[torch.rand(4, 6)] * 3, [torch.rand(2, 3)]], titles=[["a", "b", "c"], ["d"]], row_labels=["l0", "l1"]
    )
    assert two_rows.width == one_row.width and two_rows.height > 1.6 * one_row.height
    with pytest.raises(ValueError, match="do not match the panels"):
        overlay_grid(image, torch.rand(3, 4, 6), titles=["a", "b"])


class BrightnessAttention(nn.Module):
    """A hand-set SelfAttention2d whose every query attends to the bright cells: keys carry the
    brightness, queries a constant; a 4× average-pool stem makes the grid."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.AvgPool2d(4)
        self.attn = SelfAttention2d(1, num_heads=1, qk_channels=1, v_channels=1, scale=1.0)
        with torch.no_grad():
            self.attn.query.weight.zero_()
            self.attn.query.bias.fill_(8.0)
            self.attn.key.weight.fill_(1.0)
            self.attn.key.bias.zero_()

    def forward(self, x):
        return self.attn(self.stem(x)).flatten(1)


@pytest.mark.parametrize("method", ["query", "received"])
def test_attention_panels_land_on_the_bright_square(method):
    square = (54, 12, 72, 30)
    image = picture(square=square)
    prep = Preprocess.from_data_config(DIGITS_LIKE)
    panels = attention_panels(
        BrightnessAttention().eval(), image, method, preprocess=prep, query=(5, 50) if method == "query" else None
    )
    assert panels.titles == ["head 0"] and panels.panels[0].shape == (8, 12)
    assert panels.suptitle.startswith(
        "where (5, 50) attends, attn" if method == "query" else "attention received, attn"
    )
    out = np.asarray(overlay(image, panels.panels[0], cmap="gray", alpha=1.0, box=panels.box, extent=panels.extent))
    hot = np.unravel_index(out[..., 0].argmax(), out.shape[:2])
    assert square[1] <= hot[0] < square[3] and square[0] <= hot[1] < square[2]
    with pytest.raises(ValueError, match="Transformer.*query_map"):
        attention_panels(BrightnessAttention().eval(), image, "rollout", preprocess=prep)


def test_readme_similarity_example_heads_are_gaussian_kernels():
    """The hand-set block of assets/similarity_attention.py does what docs/maps.md says."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "assets" / "similarity_attention.py"
    spec = importlib.util.spec_from_file_location("similarity_attention", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    from visattn import record_attention

    features = example.PixelFeatures(stride=2)(torch.rand(2, 3, 12, 16) * 2 - 1)  # (2, 7, 6, 8)
    block = example.similarity_block().eval()
    with record_attention(block) as rec:
        block(features)
    tokens = features.flatten(2).transpose(1, 2).double()  # (2, 48, 7)
    colour, position = tokens[..., :3], tokens[..., 4:6]
    for head, (s_colour, s_position) in enumerate(example.HEADS.values()):
        distance = s_colour * torch.cdist(colour, colour) ** 2 + s_position * torch.cdist(position, position) ** 2
        want = torch.softmax(-distance / 2, dim=-1)
        torch.testing.assert_close(rec[""].weights[:, head].double(), want, atol=1e-5, rtol=1e-4)


def test_overlay_of_a_tall_picture_is_blended_the_same_in_every_strip():
    """``overlay`` blends a strip of rows at a time (no float copy of a whole large picture); the
    result is the whole-picture formula, across strip boundaries and inside a box."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 50, 3), dtype=np.uint8))
    heat = torch.rand(7, 5, generator=torch.Generator().manual_seed(0))
    out = np.asarray(overlay(image, heat, alpha=0.3, resample="nearest", normalize="none", box=(0, 0, 50, 700)))
    colours = matplotlib.colormaps["inferno"](heat.numpy())[..., :3].repeat(100, axis=0).repeat(10, axis=1)
    want = np.round((0.7 * np.asarray(image) / 255 + 0.3 * colours) * 255).astype(np.uint8)
    np.testing.assert_array_equal(out, want)
    boxed = np.asarray(overlay(image, heat, alpha=0.3, box=(5, 100, 45, 650)))
    np.testing.assert_array_equal(boxed[:100], np.asarray(image)[:100])
    np.testing.assert_array_equal(boxed[650:], np.asarray(image)[650:])
    assert (boxed[100:650, 5:45] != np.asarray(image)[100:650, 5:45]).mean() > 0.9


def test_query_points_stay_in_original_pixels_on_a_reduced_picture(tmp_path):
    picture(900, 600, square=(540, 120, 720, 300)).save(tmp_path / "big.png")
    full = load_image(tmp_path / "big.png")
    small = load_image(tmp_path / "big.png", max_side=300)
    assert small.size == (300, 200)
    prep = Preprocess.from_data_config(DIGITS_LIKE)
    attn = SelfAttention2d(1, num_heads=1, qk_channels=1, v_channels=1, scale=1.0)
    with torch.no_grad():  # bright queries look at bright keys, dark ones at dark keys
        for projection in (attn.query, attn.key):
            projection.weight.fill_(2.0)
            projection.bias.fill_(-1.5)
    model = nn.Sequential(nn.AvgPool2d(4), attn).eval()
    query = (600.0, 200.0)  # in the bright square
    whole = attention_panels(model, full, "query", preprocess=prep, query=query)
    reduced = attention_panels(
        model, small, "query", preprocess=prep, query=query, original_size=small.info["original_size"]
    )
    assert whole.marker == query and reduced.marker == pytest.approx((200.0, 200.0 / 3))
    assert reduced.suptitle == whole.suptitle and "(600, 200)" in whole.suptitle  # original pixels in the title
    assert whole.panels[0].max() > 0.3
    torch.testing.assert_close(reduced.panels[0], whole.panels[0], atol=0.01, rtol=0)  # only the resampling differs
    elsewhere = attention_panels(model, full, "query", preprocess=prep, query=(100.0, 500.0))  # a dark point
    assert (elsewhere.panels[0] - whole.panels[0]).abs().max() > 0.3  # the map does depend on the point
    with pytest.raises(ValueError, match="outside the 300×200"):
        attention_panels(model, small, "query", preprocess=prep, query=query)  # without original_size
    with pytest.raises(ValueError, match="outside the 900×600"):
        attention_panels(model, small, "query", preprocess=prep, query=(900.0, 0.0), original_size=(900, 600))


def test_to_image_samples_a_strip_of_rows_as_the_whole_picture_does():
    heat = torch.rand(2, 5, 7, dtype=torch.float64)
    for mode in ("bilinear", "nearest", "bicubic"):
        whole = to_image(heat, (50, 30), extent=(4.5, 7.0), mode=mode)
        strip = to_image(heat, (50, 30), extent=(4.5, 7.0), mode=mode, rows=(10, 27))
        assert strip.shape == (2, 17, 30) and torch.equal(strip, whole[:, 10:27])


def test_attention_overlay_is_one_map_at_the_pictures_size_or_the_panels():
    """By default one overlay (the mean of the heads, or one head) at the picture's resolution;
    ``panels=True`` the figure, with each panel as wide as the picture."""
    image = picture(300, 200, square=(180, 40, 240, 100))
    prep = Preprocess.from_data_config(DIGITS_LIKE)
    attn = SelfAttention2d(1, num_heads=2, qk_channels=2, v_channels=2)
    model = nn.Sequential(nn.AvgPool2d(4), attn).eval()
    p = attention_panels(model, image, "received", preprocess=prep)
    assert p.titles == ["head 0", "head 1", "mean of heads"]
    mean = attention_overlay(model, image, "received", preprocess=prep, alpha=0.7)
    assert mean.size == image.size
    assert mean.tobytes() == overlay(image, p.panels[2], alpha=0.7, box=p.box, extent=p.extent).tobytes()
    one = attention_overlay(model, image, "received", preprocess=prep, head=1)
    assert one.tobytes() == overlay(image, p.panels[1], box=p.box, extent=p.extent).tobytes()
    with pytest.raises(ValueError, match="head number in 0..1"):
        attention_overlay(model, image, "received", preprocess=prep, head=2)
    figure = attention_overlay(model, image, "received", preprocess=prep, panels=True)
    assert figure.width >= 4 * 300 and figure.height >= 200  # picture + 3 maps, titles above
