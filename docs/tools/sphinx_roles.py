"""A griffe extension: Sphinx roles in visattn's docstrings become mkdocstrings cross-references.

The docstrings use Google-style sections with Sphinx's inline roles (``:func:`x```,
``:class:`~a.b.C```, ``:meth:``, ``:attr:``, ``:data:``, ``:mod:``, ``:exc:``). Markdown shows
those as literal text, so while griffe loads the package this extension rewrites each role:

- a target inside visattn that the API reference documents becomes a Markdown reference link
  ``[`C`][a.b.C]`` to its canonical path, which mkdocs-autorefs resolves (``mkdocs build --strict``
  fails on one it cannot);
- any other target (torch, timm, a private helper) becomes plain code.

Names are looked up as Sphinx does: in the object's own class, then its module, then anywhere in
the package when the last part of the name is unique. ``~`` shows only the last part;
``:role:`title <target>``` keeps the title. A line that ends in ``::`` (reStructuredText's
literal-block marker) ends in ``:`` instead. Module-level ``#:`` comments above an attribute
become its docstring, as Sphinx reads them.

Registered in ``mkdocs.yml`` under the Python handler's ``extensions``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(func|class|meth|attr|data|mod|exc|obj|const):`(?P<body>[^`]+)`")
EXPLICIT = re.compile(r"^(?P<title>.*?)\s*<(?P<target>[^<>]+)>$")
#: the package whose objects the API reference documents
PACKAGE = "visattn"


def convert(text: str, resolve: Any) -> str:
    """``text`` with every Sphinx role replaced; ``resolve(name) -> canonical path | None``."""

    def replace(match: re.Match) -> str:
        body = match.group("body").strip()
        explicit = EXPLICIT.match(body)
        if explicit:
            title, target = explicit.group("title"), explicit.group("target").strip()
        else:
            target = body.lstrip("~").lstrip(".")
            title = target.rsplit(".", 1)[-1] if body.startswith("~") else target
        path = resolve(target.lstrip("~").lstrip("."))
        return f"[`{title}`][{path}]" if path else f"`{title}`"

    text = ROLE.sub(replace, text)
    return re.sub(r"(?m)(\S)::$", r"\1:", text)


def _documented(obj: griffe.Object) -> bool:
    """Whether the API reference renders ``obj``: a public object of visattn, not inside a function."""
    parts = obj.path.split(".")
    if parts[0] != PACKAGE or any(part.startswith("_") and part != "__init__" for part in parts[1:]):
        return False
    parent = obj.parent
    while parent is not None:
        if parent.is_function:
            return False
        parent = parent.parent
    return bool(obj.docstring) or not obj.is_attribute


def _final(obj: griffe.Object | griffe.Alias | None) -> griffe.Object | None:
    if obj is None:
        return None
    if obj.is_alias:
        try:
            return obj.final_target
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
    return obj


class SphinxRoles(griffe.Extension):
    """Rewrites the roles of every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        objects = list(_walk(pkg))
        by_name: dict[str, list[griffe.Object]] = {}
        for obj in objects:
            by_name.setdefault(obj.name, []).append(obj)
        for obj in objects:
            if obj.is_attribute and not obj.docstring:
                _comment_docstring(obj)
        for obj in objects:
            if obj.docstring is not None and ":" in obj.docstring.value:
                obj.docstring.value = convert(obj.docstring.value, lambda name, o=obj: self._resolve(o, name, by_name))

    def _resolve(self, context: griffe.Object, name: str, by_name: dict[str, list[griffe.Object]]) -> str | None:
        found = None
        scopes = [context, *_parents(context)]
        head, _, rest = name.partition(".")
        for scope in scopes:
            if head in scope.members:
                found = _member(scope, head, rest)
                if found is not None:
                    break
        if found is None and name.startswith(PACKAGE + "."):
            found = _lookup(context.modules_collection, name)
        if found is None:
            last = name.rsplit(".", 1)[-1]
            candidates = [o for o in by_name.get(last, []) if _documented(o) and o.path.endswith(name)]
            if not candidates:
                candidates = [o for o in by_name.get(last, []) if _documented(o)]
            if len(candidates) == 1:
                found = candidates[0]
        found = _final(found)
        return found.path if found is not None and _documented(found) else None


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if member.is_alias:
            continue
        yield from _walk(member)


def _parents(obj: griffe.Object):
    parent = obj.parent
    while parent is not None:
        yield parent
        parent = parent.parent


def _member(scope: griffe.Object, head: str, rest: str) -> griffe.Object | None:
    obj = _final(scope.members[head])
    for part in rest.split(".") if rest else []:
        if obj is None or part not in obj.members:
            return None
        obj = _final(obj.members[part])
    return obj


def _lookup(collection: Any, path: str) -> griffe.Object | None:
    try:
        return _final(collection.get_member(path))
    except (KeyError, ValueError, AttributeError):
        return None


def _comment_docstring(attr: griffe.Object) -> None:
    """``#:`` comment lines right above a module or class attribute become its docstring."""
    filepath = attr.filepath
    lines = attr.lines_collection[filepath] if filepath and filepath in attr.lines_collection else None
    if not lines or not attr.lineno:
        return
    comments = []
    index = attr.lineno - 2
    while index >= 0 and lines[index].strip().startswith("#:"):
        comments.insert(0, lines[index].strip()[2:].strip())
        index -= 1
    if comments:
        attr.docstring = griffe.Docstring(" ".join(comments), lineno=attr.lineno, parent=attr)
