"""MkDocs hooks (registered in ``mkdocs.yml``): generated content and the repository's pictures.

- ``on_files``: the pictures and data under ``assets/`` join the site as ``assets/...``, so a page
  shows ``assets/chelsea.png`` from the one copy the README uses.
- ``on_page_markdown``: ``<!-- render: ... -->`` markers become tables and command-line help,
  made from the JSON data files and the parsers at every build (``docs/tools/render.py``), and the
  test options of pytest-markdown-docs leave the fence lines (```` ```python notest ```` and
  ```` ```python continuation ```` are plain Python fences on the site, as they are on GitHub).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import render  # noqa: E402

ASSET_SUFFIXES = {".png", ".json"}
#: a fence line with pytest-markdown-docs options after the language
FENCE_OPTIONS = re.compile(r"^(?P<fence>[ \t]*(?:`{3,}|~{3,})[ \t]*(?:python3?|py))(?:[ \t]+[\w:.-]+)+[ \t]*$", re.M)


def on_files(files: Files, config, **kwargs) -> Files:
    assets = render.ROOT / "assets"
    for path in sorted(assets.rglob("*")):
        if path.suffix in ASSET_SUFFIXES and path.is_file():
            uri = path.relative_to(render.ROOT).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    return render.expand(FENCE_OPTIONS.sub(r"\g<fence>", markdown))
