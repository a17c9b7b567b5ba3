"""What a model is fed: its input size, channels and normalization, and the classes of its head.

`DataSpec` is the one description of a model's data. Training makes one for its dataset
(`visattn.train.data.build_datasets`), the explain tools make one for a model without one
(`visattn.explain.inputs.default_data_config`) and turn one into preprocessing
(`visattn.explain.inputs.Preprocess.from_spec`). On disk (a checkpoint's ``data_config`` field,
the ``data_config`` object of a model folder's ``config.json``) it is a plain dict,
`DataSpec.to_dict`'s, read back with `DataSpec.from_dict`::

    {"name": "digits", "img_size": [16, 16], "in_chans": 1, "mean": [0.5], "std": [0.5],
     "num_classes": 10, "class_names": ["0", "1", ...]}

One set of rules checks a spec however it is made (`DataSpecError` names the field, its value
and the fix): sizes, channels and classes are positive whole numbers, one mean and one std per
channel, every std positive and finite, one class name per class. `check_data_dict` applies
them to a stored dict that leaves out the input keys, as files written by earlier versions may.

A leaf: imports nothing of visattn but `visattn._utils`.
"""

from __future__ import annotations

import math
import os
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from ._utils import to_pair

__all__ = ["DataSpec", "DataSpecError", "check_data_dict"]

#: the keys a stored dict must have: how an input is prepared
_REQUIRED = ("img_size", "in_chans", "mean", "std")


class DataSpecError(ValueError):
    """A data spec that breaks a rule; ``field`` is the key at fault, ``value`` its value."""

    def __init__(self, message: str, field: str, value: Any) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _sequence(value: Any, valid: Callable[[Any], bool]) -> bool:
    return isinstance(value, list | tuple) and all(map(valid, value))


#: key → (valid, what it must be, how to fix it), in the order a stored dict holds the keys
_RULES: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "name": (lambda v: isinstance(v, str), "a string", "give the dataset's name, e.g. 'digits'"),
    "img_size": (
        lambda v: _whole(v) or (_sequence(v, _whole) and len(v) == 2),
        "a positive whole number or a pair [height, width] of them",
        "give the input size in pixels, e.g. [224, 224]",
    ),
    "in_chans": (_whole, "a positive whole number", "give 1 for gray inputs, 3 for RGB"),
    "mean": (lambda v: _sequence(v, _finite), "a list of numbers", "give one mean per channel, e.g. [0.5, 0.5, 0.5]"),
    "std": (
        lambda v: _sequence(v, lambda s: _finite(s) and s > 0),
        "a list of positive numbers",
        "give one std above 0 per channel, e.g. [0.5, 0.5, 0.5]",
    ),
    "num_classes": (_whole, "a positive whole number", "give the number of classes of the model's head"),
    "class_names": (
        lambda v: _sequence(v, lambda n: isinstance(n, str)),
        "a list of strings",
        "give one name per class, as text",
    ),
}
_SHOWN = reprlib.Repr()  # a value as read from an untrusted file: its first items only
_SHOWN.maxlist = _SHOWN.maxtuple = 6
_SHOWN.maxstring = _SHOWN.maxother = 40


def _check(values: Mapping[str, Any], lead: str, named: Callable[[str], str]) -> None:
    """Raise a `DataSpecError` unless every key of `values` that `_RULES` knows keeps its rule, and
    the keys present agree: one mean and std per channel, one class name per class. A message
    starts with `lead` and calls a key `named(key)`."""
    for key, (valid, wanted, fix) in _RULES.items():
        if key in values and not valid(values[key]):
            shown = _SHOWN.repr(values[key])
            raise DataSpecError(f"{lead}{named(key)} must be {wanted}, got {shown}; {fix}", key, values[key])
    chans = values.get("in_chans")
    for key in ("mean", "std"):
        if chans is not None and key in values and len(values[key]) != chans:
            raise DataSpecError(
                f"{lead}{named(key)} holds {len(values[key])} value(s) but {named('in_chans')} is {chans}; "
                f"give {chans} value(s), one per channel",
                key,
                values[key],
            )
    names, classes = values.get("class_names"), values.get("num_classes")
    if names is not None and classes is not None and len(names) != classes:
        raise DataSpecError(
            f"{lead}{named('class_names')} holds {len(names)} names but {named('num_classes')} has {classes} "
            "classes; give one name per class",
            "class_names",
            names,
        )


def _stored_name(key: str) -> str:
    return f"data_config[{key!r}]"


def check_data_dict(mapping: Any, source: str | os.PathLike | None = None) -> None:
    """Check the stored form of a data spec (a dict of any of `DataSpec`'s keys) with its rules.

    The input keys (`img_size`, `in_chans`, `mean`, `std`) may be absent: files written before
    `DataSpec` could leave them out, and still load. `DataSpec.from_dict` needs them.

    Args:
        mapping: the dict read from a checkpoint or a ``config.json``.
        source: the file it was read from, named first in a refusal.

    Raises:
        DataSpecError: not a dict, an unknown key (listing the known ones), or a broken rule.
    """
    head = f"{source}: " if source is not None else ""
    if not isinstance(mapping, Mapping):
        raise DataSpecError(f"{head}data_config must be a dict, got {type(mapping).__name__}", "data_config", mapping)
    unknown = [key for key in mapping if key not in _RULES]
    if unknown:
        raise DataSpecError(
            f"{head}data_config has the unknown key(s) {', '.join(map(repr, unknown))}; "
            f"the known keys are {', '.join(_RULES)}",
            str(unknown[0]),
            mapping[unknown[0]],
        )
    _check(mapping, f"{head}field " if source is not None else "", _stored_name)


@dataclass(frozen=True)
class DataSpec:
    """How a model's inputs are prepared (resize to `img_size`, `in_chans` channels, normalize
    with `mean` and `std`) and, when known, the dataset's `name` and the head's classes.

    Lists are taken for tuples and an `int` for a square `img_size`; the spec holds tuples and
    floats. Change one with `dataclasses.replace`, which checks the result again.

    Attributes:
        img_size: ``(height, width)`` of the model input, in pixels.
        in_chans: channels of the model input (1 for gray, 3 for RGB).
        mean, std: per channel, the input is ``(x - mean) / std`` of pixels scaled to [0, 1].
        name: the dataset's name (``"digits"``), if known.
        num_classes: the number of classes of the model's head, if known.
        class_names: one name per class, in label order, if known.

    Raises:
        DataSpecError: a field that breaks a rule (see the module's docstring), naming it, its
            value and the fix.
    """

    img_size: tuple[int, int]
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str | None = None
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        given = {f.name: getattr(self, f.name) for f in fields(self)}
        _check({k: v for k, v in given.items() if v is not None or k in _REQUIRED}, "", lambda key: f"DataSpec.{key}")
        # frozen: the normalized values are set the way dataclasses set them
        object.__setattr__(self, "img_size", to_pair(self.img_size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any], source: str | os.PathLike | None = None) -> DataSpec:
        """The spec of a stored dict (`to_dict`'s form: lists, `img_size` an int or a pair).

        Args:
            mapping: ``{"img_size", "in_chans", "mean", "std"}`` and any of ``"name"``,
                ``"num_classes"``, ``"class_names"``.
            source: the file it was read from, named first in a refusal.

        Raises:
            DataSpecError: see `check_data_dict`; or one of the input keys is missing.
        """
        check_data_dict(mapping, source)
        missing = [key for key in _REQUIRED if key not in mapping]
        if missing:
            lead = f"{source}: " if source is not None else ""
            raise DataSpecError(
                f"{lead}data_config lacks {', '.join(missing)}; it needs {', '.join(_REQUIRED)} "
                f"(and may give {', '.join(k for k in _RULES if k not in _REQUIRED)})",
                missing[0],
                None,
            )
        return cls(**mapping)

    def to_dict(self) -> dict[str, Any]:
        """The stored form: JSON values (lists), the keys in the order training always wrote
        them, fields that are `None` left out."""
        plain = {
            "img_size": list(self.img_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "class_names": None if self.class_names is None else list(self.class_names),
        }
        values = {key: plain.get(key, getattr(self, key)) for key in _RULES}
        return {key: value for key, value in values.items() if value is not None}
