"""Screenshots of the attention explorer, taken by headless Chromium (the pictures of README.md and docs/).

Without ``--page`` it writes the explorer page for ``assets/chelsea.png`` and the
hand-set (untrained) ``SelfAttention2d`` of ``assets/similarity_attention.py``, pins the query on
the cat's left eye and saves the screenshot::

    python assets/explorer_screenshot.py --out assets/explorer_chelsea.png

With ``--page`` it photographs any explorer page, after pinning ``--point`` (fractions of the
picture's width and height) and applying ``--set`` (``window.visattnExplorer.set``)::

    visattn explore --checkpoint runs/default --image digit.png --out digits.html
    python assets/explorer_screenshot.py --page digits.html --point 0.55,0.3 \\
        --set '{"method": "rollout"}' --out assets/explorer_digits.png

Needs Chromium, chromedriver and selenium (``apt-get install -y chromium chromium-driver``,
``pip install selenium``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def chelsea_page(out: Path) -> str:
    """The hand-set similarity block on the cat; returns the page's summary line."""
    from torch import nn

    sys.path.insert(0, str(ROOT / "assets"))
    from similarity_attention import HEADS, PixelFeatures, similarity_block

    from visattn.explain.explore import explore

    model = nn.Sequential(PixelFeatures(), similarity_block()).eval()
    data_config = {"img_size": [150, 225], "in_chans": 3, "mean": [0.5] * 3, "std": [0.5] * 3}
    title = "hand-set SelfAttention2d, no training (heads: " + ", ".join(HEADS) + ")"
    page = explore(model, [ROOT / "assets" / "chelsea.png"], out, data_config=data_config, title=title, alpha=0.65)
    return page.summary()


def screenshot(page: Path, out: Path, point: tuple[float, float] | None, changes: dict, size: tuple[int, int]) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(flag)
    options.add_argument(f"--window-size={size[0]},{size[1]}")
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(page.resolve().as_uri())
        if changes:
            driver.execute_script("window.visattnExplorer.set(arguments[0])", changes)
        if point is not None:
            driver.execute_script("window.visattnExplorer.pointAt(arguments[0], arguments[1], true)", *point)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page", type=Path, help="an explorer page (default: the cat page, written here)")
    parser.add_argument("--point", help="FX,FY: pin the query at these fractions of the picture")
    parser.add_argument("--set", default="{}", help="JSON for window.visattnExplorer.set, e.g. '{\"head\": 0}'")
    parser.add_argument("--size", default="1240,700", help="browser window W,H in pixels")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args()
    point = tuple(float(v) for v in args.point.split(",")) if args.point else None
    changes = json.loads(args.set)
    with tempfile.TemporaryDirectory() as folder:
        page = args.page
        if page is None:
            page = Path(folder) / "chelsea.html"
            print(chelsea_page(page))
            point = point or (150 / 451, 120 / 300)  # the left eye, as in the cat figures
            changes = changes or {"head": 0}
        width, height = (int(v) for v in args.size.split(","))
        screenshot(page, args.out, point, changes, (width, height))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
