"""The public surface: what ``import visattn`` offers and where every module is.

The names of ``visattn.__all__`` are the package's front door: each is the class or function
itself (the object its defining module holds under that name), documented. Everything else is
imported from the module that defines it, so every visattn module is known under the path of its
file only: no module aliases, no module objects under other names; and every ``visattn.…`` name
or ``visattn/….py`` file that the package's text, the manual and the scripts mention exists.
(That the API pages render every public name is checked on the built site in ``test_docs.py``.)
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import visattn

ROOT = Path(__file__).resolve().parents[1]

#: a fresh interpreter imports the package and its command line, then reports every visattn module
#: it holds (name → (the module's own name, its file)) and the module attributes of ``visattn``
LOADED = """
import json, sys, types
import visattn, visattn.cli
modules = {n: [m.__name__, m.__file__] for n, m in sys.modules.items() if n.split(".")[0] == "visattn"}
attributes = {a: v.__name__ for a, v in vars(visattn).items() if isinstance(v, types.ModuleType)}
print(json.dumps({"modules": modules, "attributes": attributes}))
"""


def test_every_public_name_is_the_documented_object_of_its_defining_module():
    assert len(set(visattn.__all__)) == len(visattn.__all__)
    for name in visattn.__all__:
        obj = getattr(visattn, name)
        assert inspect.isclass(obj) or inspect.isfunction(obj), f"visattn.{name} is a {type(obj).__name__}"
        assert obj.__name__ == name, (name, obj.__name__)
        assert getattr(sys.modules[obj.__module__], name) is obj, f"visattn.{name} is not {obj.__module__}.{name}"
        assert (obj.__doc__ or "").strip(), f"visattn.{name} has no docstring"


def test_star_import_gives_exactly_the_public_names():
    namespace: dict = {}
    exec("from visattn import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(visattn.__all__)


@pytest.mark.slow
def test_every_module_is_known_by_the_path_of_its_file_only():
    done = subprocess.run(
        [sys.executable, "-c", LOADED],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    package = ROOT / "visattn"
    assert "visattn.explain.maps" in loaded["modules"] and "visattn.layers.functional" in loaded["modules"]
    for name, (own_name, file) in loaded["modules"].items():
        path = package.joinpath(*name.split(".")[1:])
        assert own_name == name, f"sys.modules[{name!r}] is {own_name}: an alias"
        assert Path(file) in {path.with_suffix(".py"), path / "__init__.py"}, (name, file)
    for attribute, module in loaded["attributes"].items():
        assert module == f"visattn.{attribute}", f"visattn.{attribute} is the module {module}"


#: the text users and the next engineer read: the package (docstrings, messages), the manual, the scripts
TEXT = [
    ROOT / "README.md",
    ROOT / "train.py",
    ROOT / "assets" / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
    *sorted((ROOT / "configs").glob("*.yaml")),
    *sorted((ROOT / "visattn").rglob("*.py")),
    *sorted((ROOT / "visattn").rglob("*.html")),
]
DOTTED = re.compile(r"(?<![\w.])visattn(?:\.[A-Za-z_]\w*)+")
FILE = re.compile(r"(?<![\w/.])visattn(?:/\w+)+\.py\b")


def _resolves(dotted: str) -> bool:
    """Whether ``visattn.a.b.C.d`` is a module or an attribute of one."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:end]))
        except ModuleNotFoundError:
            continue
        for part in parts[end:]:
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


def test_every_visattn_name_and_file_the_text_names_exists():
    """A name like ``visattn.engine.evaluate`` or a path like ``visattn/config.py`` in a docstring,
    an error message or the manual points at code that is there."""
    missing = []
    for path in TEXT:
        text, where = path.read_text(), str(path.relative_to(ROOT))
        missing += [(where, name) for name in sorted(set(DOTTED.findall(text))) if not _resolves(name)]
        missing += [(where, file) for file in sorted(set(FILE.findall(text))) if not (ROOT / file).is_file()]
    assert not missing, missing
