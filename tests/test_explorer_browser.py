"""The explorer page in a real browser: headless Chromium driven by selenium.

The page opens without console errors; pointing at two places of the picture (real mouse moves)
shows their two different query maps, each equal to the recorded weights; the maps read back
from the page (``window.visattnExplorer.currentMap()``) equal those computed in Python within
the quantization (1/255 of each map's range); a click pins a query, the class and register
tokens are queries of their own, a subsampled page marks the kept cell.

Without Chromium, its driver or selenium these tests skip, saying how to install them; with
``VISATTN_REQUIRE_BROWSER=1`` (as ``.ci/run`` sets) that is a failure instead. One browser
session serves the whole module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from visattn import SelfAttention2d, VisionTransformer, record_attention
from visattn.data_spec import DataSpec
from visattn.explain import maps
from visattn.explain.explore import explore
from visattn.explain.inputs import Preprocess

from .helpers import headless_chromium

SPEC = DataSpec(img_size=(16, 24), in_chans=3, mean=(0.5,) * 3, std=(0.25,) * 3)
pytestmark = pytest.mark.slow  # a browser session: seconds to start, before the first test


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module."""
    yield from headless_chromium()


def picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 140, 3), dtype=np.uint8))


class GridCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=1, padding=1)
        self.attn = SelfAttention2d(8, num_heads=2, qk_channels=4)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.attn(self.stem(x)))


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """A ViT page (class token, 2 registers, 4×6 patches) and a subsampled CNN page (16×24 grid),
    with their models and recordings."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pages")
    vit = VisionTransformer(
        img_size=(16, 24), patch_size=4, num_classes=5, embed_dim=16, depth=2, num_heads=2, reg_tokens=2
    ).eval()
    with torch.no_grad():  # sharper attention than at initialization: maps that differ from place to place
        for block in vit.blocks:
            block.attn.qkv.weight.mul_(6.0)
    cnn = GridCNN().eval()
    explore(vit, [picture()], folder / "vit.html", data_config=SPEC, class_names=list("abcde"))
    page = explore(cnn, [picture()], folder / "cnn.html", data_config=SPEC, max_mb=0.12)
    assert page.strides["attn"] > 1  # the CNN page keeps a subsampled grid of query cells
    x = Preprocess.from_spec(SPEC)(picture())[None]
    recordings = {}
    for name, model in (("vit", vit), ("cnn", cnn)):
        with torch.no_grad(), record_attention(model) as rec:
            model(x)
        recordings[name] = rec
    return {"folder": folder, "vit": vit, "x": x, "rec": recordings, "strides": page.strides}


def open_page(browser, path) -> None:
    browser.get(path.as_uri())
    browser.get_log("browser")  # start each page with an empty log


def current(browser) -> dict:
    return browser.execute_script("return window.visattnExplorer.currentMap()")


def assert_map(read: dict, expected: torch.Tensor) -> None:
    """A map read from the page equals ``expected`` ``(h, w)`` within half a step of its range."""
    want = expected.double().numpy()
    got = np.asarray(read["values"]).reshape(read["grid"])
    assert got.shape == want.shape
    step = (want.max() - want.min()) / 255
    assert np.abs(got - want).max() <= step / 2 * (1 + 1e-4) + 1e-7


def test_the_page_opens_without_console_errors(browser, pages):
    for name in ("vit", "cnn"):
        open_page(browser, pages["folder"] / f"{name}.html")
        state = browser.execute_script("return window.visattnExplorer.state()")
        assert state["layer"] == ("blocks.1.attn" if name == "vit" else "attn")
        browser.execute_script("window.visattnExplorer.pointAt(0.4, 0.6, true)")
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert not errors, errors


def test_pointing_at_two_places_shows_their_two_query_maps(browser, pages):
    from selenium.webdriver.common.action_chains import ActionChains

    open_page(browser, pages["folder"] / "vit.html")
    browser.execute_script("window.visattnExplorer.set({layer: 'blocks.0.attn', head: 1})")
    stage = browser.find_element("id", "stage")
    width, height = stage.size["width"], stage.size["height"]
    weights = pages["rec"]["vit"]["blocks.0.attn"].weights[0, 1]  # (3 + 24, 3 + 24)
    seen = []
    for fx, fy in ((0.1, 0.2), (0.8, 0.9)):  # patches (row 0, col 0) and (row 3, col 4)
        ActionChains(browser).move_to_element_with_offset(stage, (fx - 0.5) * width, (fy - 0.5) * height).perform()
        read = current(browser)
        row, col = int(fy * 4), int(fx * 6)
        assert read["method"] == "query" and read["cell"] == [row, col] and read["head"] == "1"
        assert_map(read, weights[3 + row * 6 + col, 3:].reshape(4, 6))
        prefix = dict(read["prefix"])
        assert prefix["register 1"] == pytest.approx(float(weights[3 + row * 6 + col, 2]), abs=1e-5)
        seen.append(np.asarray(read["values"]))
    assert np.abs(seen[0] - seen[1]).max() > 0.2 * np.ptp(seen[0])  # two places, two different maps
    marker = browser.find_element("id", "cell")
    assert marker.is_displayed() and abs(marker.size["width"] - width / 6) <= 2


def test_maps_read_back_equal_python(browser, pages):
    open_page(browser, pages["folder"] / "vit.html")
    rec, vit, x = pages["rec"]["vit"], pages["vit"], pages["x"]
    hook = "return window.visattnExplorer.set(arguments[0])"
    browser.execute_script(hook, {"method": "cls", "layer": "blocks.1.attn", "head": 0})
    assert_map(current(browser), maps.cls_attention(rec, "blocks.1.attn")[0, 0])
    browser.execute_script(hook, {"head": "max"})
    assert_map(current(browser), maps.cls_attention(rec, "blocks.1.attn")[0].double().amax(0))
    browser.execute_script(hook, {"method": "rollout", "head": "mean"})
    assert_map(current(browser), maps.rollout(rec, "mean")[0])
    browser.execute_script(hook, {"method": "received", "layer": "blocks.0.attn", "head": "mean"})
    assert_map(current(browser), maps.received(rec, "blocks.0.attn")[0].double().mean(0))
    browser.execute_script(hook, {"method": "grad_rollout", "target": 1})
    target = int(vit(x)[0].argsort(descending=True)[1])
    assert_map(current(browser), maps.grad_rollout(vit, x, target)[0])
    read = browser.execute_script("return window.visattnExplorer.pinPrefix(2)")  # register 1 as the query
    assert read["query"] == "register 1"
    assert_map(read, rec["blocks.0.attn"].weights[0].double().mean(0)[2, 3:].reshape(4, 6))


def test_a_click_pins_the_query_and_the_subsampled_grid_marks_the_kept_cell(browser, pages):
    from selenium.webdriver.common.action_chains import ActionChains

    open_page(browser, pages["folder"] / "cnn.html")
    stage = browser.find_element("id", "stage")
    width, height = stage.size["width"], stage.size["height"]
    ActionChains(browser).move_to_element_with_offset(stage, 0.47 * width, -0.47 * height).click().perform()
    browser.execute_script("document.getElementById('stage').dispatchEvent(new PointerEvent('pointerleave'))")
    read = current(browser)  # the pointer left; the pinned query stays
    assert read["cell"] == [0, 23] and read["method"] == "query"
    s = pages["strides"]["attn"]
    kept_row, kept_col = read["query"]
    assert kept_row % s == (s - 1) // 2 and kept_col % s == (s - 1) // 2 and abs(kept_col - 23) <= s
    weights = pages["rec"]["cnn"]["attn"].weights[0].double().mean(0)  # mean of heads: (384, 384)
    assert_map(read, weights[kept_row * 24 + kept_col].reshape(16, 24))
    assert browser.find_element("id", "kept").is_displayed()
    assert "one cell in every" in browser.find_element("id", "notes").text
