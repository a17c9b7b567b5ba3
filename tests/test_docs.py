"""The manual: README.md as the front door, and the site that ``mkdocs build`` makes from docs/ and
the docstrings.

The README stays short, keeps the Quick start commands, and quotes the same figures as the data
files the docs render. The site builds with ``--strict``, shows no raw Sphinx role (the griffe
extension turns them into cross-references), names the command and machine of every measured
table, documents every sub-command, and opens in a real browser with its navigation and a
rendered signature. (The examples themselves run as tests through pytest-markdown-docs.)

The site is built once for the module into a temporary folder (about ten seconds), or read from
``VISATTN_DOCS_SITE`` when that names a site already built from this tree (as ``.ci/run`` does).
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .helpers import headless_chromium

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|data|mod|exc|obj|const):`")
QUICK_START = 'pip install -e ".[dev]" && python train.py\npython -m pytest -q\n'


def _tool(name: str):
    """A module of docs/tools, loaded by path (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"docs_tools_{name}", REPO / "docs" / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _data(path: str) -> dict:
    return json.loads((REPO / path).read_text())


# --- the README -------------------------------------------------------------------------------------


def test_the_readme_is_short_and_keeps_the_quick_start() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    assert QUICK_START in text
    top = "\n".join(text.splitlines()[:15])
    assert "docs/" in top and "mkdocs build" in top  # where the manual is, near the top


def test_the_readme_links_point_at_existing_files() -> None:
    text = README.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert targets
    missing = [t for t in targets if not t.startswith("http") and not (REPO / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_the_readme_quotes_the_figures_of_the_data_files() -> None:
    text = README.read_text()
    default = _data("docs/data/default_job_xeon.json")["rows"][0]
    assert default["mean"].replace(" %", "") in text and default["wall"].split()[0] in text
    bench = _data("assets/bench/bench-cpu.json")["parts"]
    block = next(r for r in bench["selfattention2d"]["rows"] if r["grid"] == "64x64" and r["contender"] == "visattn")
    assert f"{block['time_vs_timm']:.2f}× timm's time" in text
    assert f"{block['memory_vs_timm']:.2f}× its peak memory" in text
    ratios = [row["ratio"] for row in bench["vit"]["rows"] if "ratio" in row]
    assert f"{min(ratios):.2f}-{max(ratios):.2f}× timm's throughput" in text
    families = {r["contender"]: r for r in _data("assets/bench/bench-families-cpu.json")["parts"]["families"]["rows"]
                if r["grid"] == 128}  # fmt: skip
    window, halo = families["window 7/3"], families["halo 8/3"]
    assert f"window 7/3: {window['time_vs_global']:.3f}× its time ({window['time_vs_peer']:.2f}× timm's" in text
    assert f"neighborhood 7: {families['neighborhood 7']['time_vs_global']:.2f}×" in text
    assert f"halo 8/3: {halo['time_vs_global']:.2f}× ({halo['time_vs_peer']:.2f}× timm's" in text


def test_the_manual_does_not_narrate() -> None:
    pages = [README, *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "docs" / "data").glob("*.json"))]
    for page in pages:
        text = page.read_text().lower()
        assert "session" not in text, page
        assert not re.search(r"\b(re-?measured|re-?timed|previous(ly)?)\b", text), page


# --- Sphinx roles ---------------------------------------------------------------------------------------


def test_sphinx_roles_become_cross_references_or_code() -> None:
    convert = _tool("sphinx_roles").convert
    paths = {"fit": "visattn.train.engine.fit", "visattn.SelfAttention2d": "visattn.layers.attention.SelfAttention2d"}
    text = ":func:`fit` and :class:`~visattn.SelfAttention2d`, :func:`torch.save`, :meth:`the loop <fit>`::"
    assert convert(text, paths.get) == (
        "[`fit`][visattn.train.engine.fit] and [`SelfAttention2d`][visattn.layers.attention.SelfAttention2d], "
        "`torch.save`, [`the loop`][visattn.train.engine.fit]:"
    )


def test_no_docstring_keeps_a_sphinx_role_after_loading() -> None:
    griffe = pytest.importorskip("griffe", reason="the docs tools: pip install -e '.[dev]'")
    extensions = griffe.load_extensions(f"{REPO / 'docs' / 'tools' / 'sphinx_roles.py'}:SphinxRoles")
    package = griffe.load("visattn", search_paths=[str(REPO)], extensions=extensions)
    left = []
    stack = [package]
    while stack:
        obj = stack.pop()
        if obj.docstring is not None and ROLE.search(obj.docstring.value):
            left.append(obj.path)
        stack.extend(member for member in obj.members.values() if not member.is_alias)
    assert not left, f"docstrings that still show a Sphinx role: {left}"


# --- the built site -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("VISATTN_DOCS_SITE")
    if given:
        return Path(given).resolve()
    pytest.importorskip("mkdocs", reason="the docs tools: pip install -e '.[dev]'")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


def on_the_site(test):
    """A test of the built site: ``slow`` unless ``VISATTN_DOCS_SITE`` names a built site (the
    `site` fixture otherwise runs ``mkdocs build`` first, about ten seconds)."""
    return test if os.environ.get("VISATTN_DOCS_SITE") else pytest.mark.slow(test)


@on_the_site
def test_the_site_shows_no_raw_sphinx_role(site: Path) -> None:
    files = [*site.rglob("*.html"), *site.rglob("search_index.json")]
    assert len(files) > 10
    raw = [str(f.relative_to(site)) for f in files if ROLE.search(f.read_text(errors="replace"))]
    assert not raw, f"pages that show a raw Sphinx role: {raw}"


@on_the_site
@pytest.mark.parametrize("page", ["results", "performance"])
def test_every_measured_table_names_its_command_and_machine(site: Path, page: str) -> None:
    html = (site / page / "index.html").read_text()
    body = html[html.index('<article class="md-content__inner') :]
    pieces = re.split(r"<table>", body)
    assert len(pieces) > 3
    for before in pieces[:-1]:
        # what stands between the previous table (or heading) and this one
        context = re.split(r"</table>|<h[1-6][ >]", before)[-1]
        described = "descriptive table: no measured figures" in context
        assert described or ("Command:" in context and "Machine:" in context), context[-400:]


@on_the_site
def test_the_command_line_page_documents_every_sub_command(site: Path) -> None:
    import argparse

    from visattn.cli import build_parser

    html = (site / "cli" / "index.html").read_text()
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in action.choices:
        assert f"usage: visattn {name}" in html, name


@on_the_site
def test_the_api_reference_renders_signatures_and_links(site: Path) -> None:
    html = (site / "api" / "models" / "index.html").read_text()
    assert 'id="visattn.models.registry.create_model"' in html
    assert 'class="doc-signature' in html
    # a role of a docstring became a link to the object's own heading
    assert 'href="#visattn.models.insert.insert_attention"' in html


@on_the_site
def test_every_public_name_has_a_heading_on_the_api_pages(site: Path) -> None:
    """Each name of ``visattn.__all__`` is rendered on an API page: under its defining module's
    path, or (for the two defined in a private module) under ``visattn.NAME``."""
    import visattn

    pages = "".join(page.read_text() for page in (site / "api").rglob("index.html"))
    missing = []
    for name in visattn.__all__:
        obj = getattr(visattn, name)
        if f'id="{obj.__module__}.{obj.__qualname__}"' not in pages and f'id="visattn.{name}"' not in pages:
            missing.append(name)
    assert not missing, f"public names without a heading on the API pages: {missing}"


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module."""
    yield from headless_chromium(1300, 900)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def served(site: Path):
    """The site served over HTTP on the loopback interface (its links are folder URLs)."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_the_site_opens_in_a_browser_with_its_navigation_and_a_signature(served: str, browser) -> None:
    from selenium.webdriver.common.by import By

    browser.get(served)
    nav = browser.find_element(By.CSS_SELECTOR, "nav.md-nav--primary")
    labels = {link.get_attribute("textContent").strip() for link in nav.find_elements(By.CSS_SELECTOR, "a")}
    assert {"Getting started", "Where the model looks", "Results", "Development"} <= labels
    api = next(link for link in nav.find_elements(By.CSS_SELECTOR, "a") if "api/models" in link.get_attribute("href"))
    browser.get(api.get_attribute("href"))
    heading = browser.find_element(By.ID, "visattn.models.registry.create_model")
    assert heading.is_displayed()
    signature = browser.find_element(
        By.XPATH, "//*[@id='visattn.models.registry.create_model']/following::div[contains(@class, 'doc-signature')][1]"
    )
    text = signature.text
    assert text.startswith("create_model(") and "name: str" in text and "pretrained: bool = False" in text
