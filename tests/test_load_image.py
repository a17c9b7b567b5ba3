"""The one picture loader (`visattn._io.load_image`): every kind of picture file becomes the RGB
pixels written into it, oriented by its EXIF tag, the same for training and explaining; what is
not a regular file is refused before it is opened."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visattn._io import BACKGROUND, ImageFileError, load_image, to_rgb, verify_image
from visattn.explain.inputs import Preprocess
from visattn.train.imagefolder import CheckedImageFolder

ROOT = Path(__file__).resolve().parents[1]
WHITE = 255
assert BACKGROUND == (WHITE,) * 3  # the background the expected values below are written for


def gray(values) -> np.ndarray:
    """The RGB pixels of gray levels: each level in all three channels."""
    return np.repeat(np.asarray(values, dtype=np.uint8)[..., None], 3, axis=-1)


def on_white(colour, alpha) -> np.ndarray:
    """`colour` with opacity `alpha` (0-255) over a white background, rounded."""
    colour, a = np.asarray(colour, dtype=np.float64), np.asarray(alpha, dtype=np.float64)[..., None] / 255
    return np.floor(colour * a + WHITE * (1 - a) + 0.5).astype(np.uint8)


def sixteen(tmp):
    values = np.array([[0, 128, 129, 257, 1000, 32767, 65534, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp / "sixteen.png")
    assert Image.open(tmp / "sixteen.png").mode == "I;16"
    return "sixteen.png", gray(np.floor(values / 257 + 0.5))  # scaled to 8 bits, not clipped at 255


def sixteen_big_endian(tmp):
    values = np.array([[0, 257, 30000, 65535]], dtype=">u2")
    Image.fromarray(values).save(tmp / "big_endian.tif")
    assert Image.open(tmp / "big_endian.tif").mode == "I;16B"
    return "big_endian.tif", gray(np.floor(values.astype(np.float64) / 257 + 0.5))


def thirty_two(tmp):
    values = np.array([[0, 257, 65535, 70000, -5]], dtype=np.int32)
    Image.fromarray(values).save(tmp / "wide.tif")
    assert Image.open(tmp / "wide.tif").mode == "I"
    return "wide.tif", gray([[0, 1, 255, 255, 0]])  # 16-bit values scaled; beyond 16 bits clipped


def rgba(tmp):
    pixels = np.array([[[100, 50, 200, 255], [100, 50, 200, 0], [100, 50, 200, 51], [7, 8, 9, 128]]], np.uint8)
    Image.fromarray(pixels).save(tmp / "alpha.png")
    return "alpha.png", on_white(pixels[..., :3], pixels[..., 3])


def gray_alpha(tmp):
    pixels = np.array([[[100, 255], [100, 0], [100, 51]]], np.uint8)
    Image.fromarray(pixels).save(tmp / "gray_alpha.png")
    assert Image.open(tmp / "gray_alpha.png").mode == "LA"
    return "gray_alpha.png", gray(on_white(pixels[..., :1], pixels[..., 1])[..., 0])


def palette(tmp):
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 128, 0, 10, 20, 30])
    for x, index in enumerate([0, 1, 2]):
        image.putpixel((x, 0), index)
    image.save(tmp / "palette.png", transparency=1)  # palette entry 1 is transparent
    assert Image.open(tmp / "palette.png").mode == "P"
    return "palette.png", np.array([[[255, 0, 0], [WHITE] * 3, [10, 20, 30]]], np.uint8)


def cmyk(tmp):
    inks = np.array([[[10, 0, 0, 0], [0, 0, 0, 255], [0, 0, 0, 51], [51, 0, 0, 51]]], np.uint8)
    Image.frombytes("CMYK", (4, 1), inks.tobytes()).save(tmp / "cmyk.tif")
    assert Image.open(tmp / "cmyk.tif").mode == "CMYK"
    c, k = inks[..., :3].astype(np.float64), inks[..., 3:].astype(np.float64)
    return "cmyk.tif", np.floor((255 - c) * (255 - k) / 255 + 0.5).astype(np.uint8)  # no ICC profile


def one_bit(tmp):
    image = Image.new("1", (3, 1))
    image.putpixel((1, 0), 1)
    image.save(tmp / "one_bit.png")
    assert Image.open(tmp / "one_bit.png").mode == "1"
    return "one_bit.png", gray([[0, 255, 0]])


def eight_bit_gray(tmp):
    Image.fromarray(np.array([[0, 17, 200, 255]], np.uint8)).save(tmp / "gray.png")
    return "gray.png", gray([[0, 17, 200, 255]])


KINDS = [sixteen, sixteen_big_endian, thirty_two, rgba, gray_alpha, palette, cmyk, one_bit, eight_bit_gray]


@pytest.mark.parametrize("make", KINDS, ids=[kind.__name__ for kind in KINDS])
def test_every_kind_of_picture_becomes_the_rgb_pixels_written(tmp_path, make):
    name, expected = make(tmp_path)
    loaded = load_image(tmp_path / name)
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(loaded), expected)
    with Image.open(tmp_path / name) as image:  # a picture in memory is converted the same way
        np.testing.assert_array_equal(np.asarray(to_rgb(image)), expected)


def test_exif_orientation_is_applied_in_training_and_explaining(tmp_path):
    """A phone photo stored 40 wide and 20 high, tagged "turn a quarter clockwise" (EXIF 6), is
    20 wide and 40 high everywhere, its stored top-left pixel at the top right."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[0, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(stored).save(tmp_path / folder / "phone.png", exif=exif.tobytes())
    shown = load_image(tmp_path / "a" / "phone.png")
    assert shown.size == (20, 40) and shown.info["original_size"] == (20, 40)
    assert [tuple(p) for p in np.argwhere(np.asarray(shown)[..., 0] == 255)] == [(0, 19)]
    trained, _ = CheckedImageFolder(tmp_path)[0]  # what the training set reads
    np.testing.assert_array_equal(np.asarray(trained), np.asarray(shown))
    prep = Preprocess((40, 20), 3, (0.0,) * 3, (1.0,) * 3)  # what the explainer feeds the model
    assert prep(shown).shape == (3, 40, 20) and prep(shown)[0, 0, 19] == 1.0


def test_clear_errors_for_what_is_not_a_picture(tmp_path):
    with pytest.raises(ImageFileError, match=r"image .*missing.png does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageFileError, match="is a folder"):
        load_image(tmp_path)
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ImageFileError, match=r"notes.png is not an image that PIL can read"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(ImageFileError, match=r"notes.png is not an image that PIL can read"):
        verify_image(tmp_path / "notes.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    with pytest.raises(ImageFileError, match="dangling.png does not exist"):
        load_image(tmp_path / "dangling.png")


def test_a_jpeg_cut_short_passes_the_quick_check_and_fails_to_load(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "cut.jpg")
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 3 // 5])
    verify_image(tmp_path / "cut.jpg")  # headers intact
    with pytest.raises(ImageFileError, match=r"cut.jpg is not an image that PIL can read \(OSError: .*truncated"):
        load_image(tmp_path / "cut.jpg")


REFUSE = """
import sys
from visattn._io import ImageFileError, load_image, verify_image
for path in sys.argv[1:]:
    for read in (load_image, verify_image):
        try:
            read(path)
        except ImageFileError as err:
            print(err)
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_fifo_or_a_device_is_refused_before_it_is_opened(tmp_path):
    """Opening a FIFO blocks until a writer comes and `/dev/zero` never ends: both are refused
    at once (a child process with a timeout, so a hang fails the test instead of hanging it)."""
    os.mkfifo(tmp_path / "pipe.png")
    os.symlink(tmp_path / "pipe.png", tmp_path / "link.png")
    paths = [str(tmp_path / "pipe.png"), str(tmp_path / "link.png"), "/dev/zero"]
    done = subprocess.run(
        [sys.executable, "-c", REFUSE, *paths],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.splitlines()
        == [
            f"image {paths[0]} is a named pipe (FIFO), not a picture file; give a regular file (PNG, JPEG, ...)",
        ]
        * 2
        + [
            f"image {paths[1]} is a named pipe (FIFO), not a picture file; give a regular file (PNG, JPEG, ...)",
        ]
        * 2
        + [
            "image /dev/zero is a character device, not a picture file; give a regular file (PNG, JPEG, ...)",
        ]
        * 2
    )


def test_a_tensor_of_a_loaded_picture_keeps_its_values(tmp_path):
    """The model input made from a 16-bit picture spans the whole range (not clipped white)."""
    name, expected = sixteen(tmp_path)
    x = Preprocess((1, 8), 1, (0.0,), (1.0,))(load_image(tmp_path / name))
    torch.testing.assert_close(x[0, 0], torch.from_numpy(expected[0, :, 0]).float() / 255)


def square_picture(width: int, height: int, square: tuple[int, int, int, int]) -> Image.Image:
    """A dark RGB picture with one bright square at `(left, top, right, bottom)`."""
    pixels = np.full((height, width, 3), 30, dtype=np.uint8)
    left, top, right, bottom = square
    pixels[top:bottom, left:right] = (250, 240, 200)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_load_image_decodes_a_large_picture_reduced(tmp_path, suffix):
    path = tmp_path / f"big.{suffix}"
    square_picture(900, 600, (540, 120, 720, 300)).save(path)
    small = load_image(path, max_side=256)
    assert max(small.size) == 256 and abs(small.width / small.height - 1.5) < 0.02
    assert small.info["original_size"] == (900, 600) == load_image(path).info["original_size"]
    rows, cols = np.nonzero(np.asarray(small.convert("L")) > 127)  # the square, at the same relative place
    scale = small.width / 900
    assert abs(cols.min() - 540 * scale) <= 1.5 and abs(cols.max() + 1 - 720 * scale) <= 1.5
    assert abs(rows.min() - 120 * scale) <= 1.5 and abs(rows.max() + 1 - 300 * scale) <= 1.5
    assert load_image(path, max_side=900).size == (900, 600)  # within the cap: as it is
    with pytest.raises(ValueError, match="max_side"):
        load_image(path, max_side=0)


def test_load_image_reduced_keeps_exif_orientation_and_16_bits(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 800×400, shown turned a quarter: 400×800
    square_picture(800, 400, (480, 80, 640, 200)).save(tmp_path / "turned.jpg", exif=exif)
    turned = load_image(tmp_path / "turned.jpg", max_side=200)
    assert turned.size == (100, 200) and turned.info["original_size"] == (400, 800)
    assert load_image(tmp_path / "turned.jpg").size == (400, 800)
    values = (np.arange(300, dtype=np.uint32)[None].repeat(200, 0) * 65535 // 299).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    deep = load_image(tmp_path / "deep.png", max_side=100)
    assert deep.mode == "RGB" and deep.size == (100, 67) and deep.info["original_size"] == (300, 200)
    assert np.asarray(deep)[:, 0].max() < 8 and np.asarray(deep)[:, -1].min() > 247  # scaled, not clipped
