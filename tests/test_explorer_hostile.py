"""The explorer page with hostile strings in every field: shown as text, never run as markup.

Class names come from image-folder names, module paths from `nn.ModuleDict` keys, picture names
from file names, the title from the command line: any of them may hold markup. A page is built
whose every such field carries some (`<img src=x onerror=...>`, `</script>`, `<!--`, `&`,
U+2028), plus prefix-token names put into its data by hand (the explorer itself writes fixed
ones), and is driven in headless Chromium through every picture, prediction, layer, method, head
and colormap, pointing, pinning and the prefix-token buttons. After each step the document must
hold only the elements the page itself makes (one `img`, two `script`) and no handler may have
run (`window.__pwned` stays undefined); the hostile strings must be there as literal text.

The browser starts as in `test_explorer_browser.py` (skipped without Chromium, a failure under
`VISATTN_REQUIRE_BROWSER=1`); the payload test needs no browser.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch import nn

from visattn import SelfAttention2d, VisionTransformer
from visattn.explain import explore as explore_module
from visattn.explain.explore import explore, read_page_data

from .helpers import headless_chromium
from .test_explorer_browser import SPEC, open_page

# event handlers are sloppy-mode scripts: `__pwned=1` sets window.__pwned (a ModuleDict key may hold no dot)
CLASS_NAMES = [
    '<img src=x onerror="__pwned=1">',
    "</script><script>__pwned=2</script>",
    "<!-- a & b -->",
    "<b>bold</b> &amp; <i>italic</i>",
    "line\u2028separator\u2029paragraph",
]
GRID_KEY = "<svg onload=__pwned=3>"
VIT_KEY = "<img src=x onerror=__pwned=4>"
PICTURE_NAMES = ["<img src=x onerror=__pwned=5>\u2028one.png", "<svg onload=__pwned=6> two.png"]
TITLE = "</title><script>__pwned=7</script><img src=x onerror=__pwned=8>\u2028 & co"
PREFIX_NAMES = ["<img src=x onerror=__pwned=9>", "</script><b>register</b>"]
PATHS = [f"grid.{GRID_KEY}", f"towers.{VIT_KEY}.blocks.0.attn"]
OPENING = '<script type="application/json" id="visattn-data">'

#: every element the page makes itself; anything else came from a string read as markup
PAGE_TAGS = {"html", "head", "meta", "link", "title", "style", "body", "header", "h1", "h2", "main", "section",
             "aside", "div", "span", "p", "br", "label", "select", "option", "input", "button", "img", "canvas",
             "script"}  # fmt: skip
PROBE = """
const allowed = new Set(arguments[0]), tags = [...document.querySelectorAll("*")].map((e) => e.tagName.toLowerCase());
return {pwned: typeof window.__pwned, images: document.images.length, scripts: document.scripts.length,
        foreign: tags.filter((t) => !allowed.has(t))};
"""


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (as in `test_explorer_browser.py`)."""
    yield from headless_chromium()


class HostileModel(nn.Module):
    """A grid block and a ViT (class token, one register), each under a `ModuleDict` key that is markup."""

    def __init__(self) -> None:
        super().__init__()
        self.grid = nn.ModuleDict({GRID_KEY: SelfAttention2d(3, num_heads=2, qk_channels=4)})
        vit = VisionTransformer(
            img_size=(16, 24), patch_size=4, num_classes=5, embed_dim=16, depth=1, num_heads=2, reg_tokens=1
        )
        self.towers = nn.ModuleDict({VIT_KEY: vit})

    def forward(self, x):
        return self.towers[VIT_KEY](self.grid[GRID_KEY](x))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    """`page`: what `explore` writes for the hostile model, names and title (0.5 MB: the grid
    block is subsampled, so a note names it); `patched`: the same data with hostile prefix-token names."""
    folder = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(1)
    files = []
    for name in PICTURE_NAMES:
        Image.fromarray(rng.integers(0, 256, (60, 140, 3), dtype=np.uint8)).save(folder / name, format="PNG")
        files.append(folder / name)
    page = explore(
        HostileModel().eval(), files, folder / "page.html", data_config=SPEC, class_names=CLASS_NAMES,
        max_mb=0.5, title=TITLE,
    )  # fmt: skip
    assert page.strides[PATHS[0]] > 1 and GRID_KEY in page.notes[0]
    data = read_page_data(folder / "page.html")
    for image in data["images"]:
        for layer in image["layers"]:
            if layer["prefix"]:
                layer["prefix"] = PREFIX_NAMES[: len(layer["prefix"])]
    (folder / "patched.html").write_text(explore_module._fill_template(data, TITLE), encoding="utf-8")
    return {"page": folder / "page.html", "patched": folder / "patched.html"}


def test_the_payload_cannot_end_its_script_element_and_keeps_every_string(hostile):
    text = hostile["page"].read_text("utf-8")
    start = text.index(OPENING) + len(OPENING)
    payload = text[start : text.lower().index("</script", start)]  # where the HTML parser ends the element
    for raw in ("<", ">", "&", "\u2028", "\u2029"):
        assert raw not in payload, repr(raw)
    data = json.loads(payload)  # the whole data, up to where the browser stops reading
    assert data["title"] == TITLE and [image["name"] for image in data["images"]] == PICTURE_NAMES
    for image in data["images"]:
        assert {p["label"] for p in image["predictions"]} == set(CLASS_NAMES)
        assert [layer["path"] for layer in image["layers"]] == PATHS
    assert PATHS[0] in data["notes"][0]
    assert text.lower().count("<script") == 2 and text.lower().count("</script") == 2
    assert text.count(html.escape(TITLE)) == 2 and TITLE not in text  # in <title> and <h1>, escaped


def select_each(browser, select_id: str, check) -> None:
    """Choose every enabled option of a <select> in turn (the page rebuilds the options each time)."""
    from selenium.webdriver.support.ui import Select

    count = len(Select(browser.find_element("id", select_id)).options)
    for index in range(count):
        option = Select(browser.find_element("id", select_id)).options[index]
        if option.is_enabled():
            Select(browser.find_element("id", select_id)).select_by_index(index)
            check(f"{select_id} option {index}")


def text_of(browser, selector: str) -> str:
    """The text (`textContent`) of the first element `selector` finds."""
    return browser.execute_script("return document.querySelector(arguments[0]).textContent", selector)


def click_every_prediction(browser, check) -> None:
    for k, name in enumerate(sorted_labels(browser)):
        browser.find_elements("css selector", "#preds .pred")[k].click()
        check(f"prediction {k}")
        assert text_of(browser, "#readout").startswith(f"gradient rollout for class {name}")
        shown = browser.find_element("id", "readout").text
        assert shown.startswith("gradient rollout for class " + name.split("\u2028")[0])


def sorted_labels(browser) -> list[str]:
    return browser.execute_script(
        "return [...document.querySelectorAll('#preds .pred span:not(.p)')].map((s) => s.textContent)"
    )


def point_and_pin(browser, check) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    stage = browser.find_element("id", "stage")
    width, height = stage.size["width"], stage.size["height"]
    for fx, fy in ((0.2, 0.3), (0.7, 0.8)):
        ActionChains(browser).move_to_element_with_offset(stage, (fx - 0.5) * width, (fy - 0.5) * height).perform()
        check(f"hover {fx}, {fy}")
    ActionChains(browser).click().perform()
    check("pinned")
    assert "(pinned)" in browser.find_element("id", "readout").text
    for chip in range(len(browser.find_elements("css selector", "#prefix button"))):
        button = browser.find_elements("css selector", "#prefix button")[chip]
        ActionChains(browser).move_to_element(button).click().perform()
        check(f"prefix chip {chip}")
        assert text_of(browser, "#readout").startswith(f"query: {PREFIX_NAMES[chip]}")
        assert f"weight given to {PREFIX_NAMES[0]} " in text_of(browser, "#readout")


@pytest.mark.slow
def test_hostile_strings_stay_text_in_the_browser(browser, hostile):
    open_page(browser, hostile["patched"])

    def check(step: str) -> None:
        found = browser.execute_script(PROBE, sorted(PAGE_TAGS))
        assert found == {"pwned": "undefined", "images": 1, "scripts": 2, "foreign": []}, step

    check("load")
    assert text_of(browser, "#notes").startswith(f"{PATHS[0]}: query rows kept")
    assert text_of(browser, "h1") == TITLE and browser.title == TITLE + " · visattn attention explorer"
    options = "return [...document.getElementById(arguments[0]).options].map((o) => o.text)"
    assert browser.execute_script(options, "image") == PICTURE_NAMES
    assert [text.rsplit(" (", 1)[0] for text in browser.execute_script(options, "layer")] == PATHS
    for number, name in enumerate(PICTURE_NAMES):
        browser.execute_script("window.visattnExplorer.set({image: arguments[0]})", number)
        check(f"picture {number}")
        assert text_of(browser, "#info").startswith(f"{name}: 140×60 px")
        assert sorted(sorted_labels(browser)) == sorted(CLASS_NAMES)
        click_every_prediction(browser, check)
        browser.execute_script("window.visattnExplorer.set({method: 'received'})")
        for path in PATHS:
            browser.execute_script("window.visattnExplorer.set({method: 'received', layer: arguments[0]})", path)
            assert f" · {path} · " in text_of(browser, "#readout")
            select_each(browser, "method", check)
            select_each(browser, "head", check)
        select_each(browser, "layer", check)
        select_each(browser, "cmap", check)
        point_and_pin(browser, check)
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert not errors, errors
