"""`DataSpec`: one set of rules however a spec is made, and the stored dict form that every
checkpoint and model folder holds (old files included)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from visattn.data_spec import DataSpec, DataSpecError, check_data_dict

DIGITS = DataSpec(
    img_size=(16, 16),
    in_chans=1,
    mean=(0.5,),
    std=(0.25,),
    name="digits",
    num_classes=3,
    class_names=("0", "1", "2"),
)
#: what training wrote into checkpoints and config.json before DataSpec (the same keys, in this order)
STORED = {
    "name": "digits",
    "img_size": [16, 16],
    "in_chans": 1,
    "mean": [0.5],
    "std": [0.25],
    "num_classes": 3,
    "class_names": ["0", "1", "2"],
}

#: (id, changed fields, the field the error names, words of the message)
BROKEN = [
    ("size zero", {"img_size": (16, 0)}, "img_size", "pair [height, width]"),
    ("size text", {"img_size": "16"}, "img_size", "e.g. [224, 224]"),
    ("size of three", {"img_size": (16, 16, 16)}, "img_size", "positive whole number"),
    ("channels zero", {"in_chans": 0}, "in_chans", "give 1 for gray inputs, 3 for RGB"),
    ("channels bool", {"in_chans": True}, "in_chans", "positive whole number"),
    ("mean nan", {"mean": (float("nan"),)}, "mean", "a list of numbers, got (nan,)"),
    ("mean per channel", {"mean": (0.5, 0.5)}, "mean", "holds 2 value(s) but DataSpec.in_chans is 1"),
    ("std per channel", {"in_chans": 3, "mean": (0.5,) * 3}, "std", "give 3 value(s), one per channel"),
    ("std zero", {"std": (0.0,)}, "std", "a list of positive numbers, got (0.0,)"),
    ("std infinite", {"std": (float("inf"),)}, "std", "give one std above 0 per channel"),
    ("name", {"name": 7}, "name", "DataSpec.name must be a string, got 7"),
    ("classes zero", {"num_classes": 0, "class_names": None}, "num_classes", "positive whole number, got 0"),
    ("class names numbers", {"class_names": (0, 1, 2)}, "class_names", "a list of strings"),
    ("class names count", {"class_names": ("a", "b")}, "class_names", "holds 2 names but DataSpec.num_classes has 3"),
    ("size missing", {"img_size": None}, "img_size", "got None"),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "field", "words"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_each_rule_is_enforced_naming_the_field_value_and_fix(changes, field, words):
    with pytest.raises(DataSpecError) as refused:
        dataclasses.replace(DIGITS, **changes)
    assert isinstance(refused.value, ValueError)
    assert refused.value.field == field and f"DataSpec.{field}" in str(refused.value)
    assert words in str(refused.value) and "; give" in str(refused.value)


def test_lists_and_a_square_size_are_taken_and_held_as_tuples():
    spec = DataSpec(img_size=32, in_chans=3, mean=[0, 0.5, 1], std=[1, 1, 1], class_names=["a"])
    assert spec.img_size == (32, 32) and spec.mean == (0.0, 0.5, 1.0) and spec.std == (1.0, 1.0, 1.0)
    assert spec.class_names == ("a",) and spec.num_classes is None
    assert hash(spec) == hash(dataclasses.replace(spec))


def test_a_spec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DIGITS.in_chans = 3


def test_the_dict_form_is_what_training_stored_and_round_trips():
    assert DIGITS.to_dict() == STORED
    assert list(DIGITS.to_dict()) == list(STORED)  # the same keys in the same order: the same config.json
    assert json.dumps(DIGITS.to_dict()) == json.dumps(STORED)
    assert DataSpec.from_dict(DIGITS.to_dict()) == DIGITS
    bare = DataSpec(img_size=(8, 12), in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert bare.to_dict() == {"img_size": [8, 12], "in_chans": 3, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert DataSpec.from_dict(bare.to_dict()) == bare


def test_a_dict_stored_by_an_old_file_loads():
    """Training's dict as it comes out of a checkpoint or config.json; a square size as one number."""
    assert DataSpec.from_dict(json.loads(json.dumps(STORED))) == DIGITS
    square = DataSpec.from_dict({**STORED, "img_size": 16, "mean": [1], "std": [2]})
    assert square.img_size == (16, 16) and square.mean == (1.0,) and square.std == (2.0,)


def test_an_unknown_key_is_refused_listing_the_known_ones():
    typo = {**STORED, "img_sise": [16, 16]}
    with pytest.raises(DataSpecError, match=r"config.json: data_config has the unknown key\(s\) 'img_sise'") as refused:
        DataSpec.from_dict(typo, source="run/config.json")
    assert "the known keys are name, img_size, in_chans, mean, std, num_classes, class_names" in str(refused.value)
    assert refused.value.field == "img_sise"


def test_a_stored_dict_is_refused_naming_the_file_and_the_key():
    with pytest.raises(DataSpecError, match=r"^best.pt: field data_config\['std'\] must be a list of positive"):
        DataSpec.from_dict({**STORED, "std": [0]}, source="best.pt")
    with pytest.raises(DataSpecError, match=r"^data_config\['class_names'\] holds 1 names but data_config\['num_"):
        DataSpec.from_dict({**STORED, "class_names": ["a"]})
    with pytest.raises(DataSpecError, match=r"^best.pt: data_config lacks mean, std; it needs img_size, in_chans"):
        DataSpec.from_dict({"img_size": [16, 16], "in_chans": 1}, source="best.pt")
    with pytest.raises(DataSpecError, match="data_config must be a dict, got list"):
        DataSpec.from_dict([1, 2], source="best.pt")


def test_a_stored_dict_without_the_input_keys_is_checked_key_by_key():
    """What an earlier save_pretrained could write: any of the keys."""
    check_data_dict({"class_names": ["a", "b"]}, "old/config.json")
    check_data_dict({"mean": [0.5], "std": [0.5]}, "old/config.json")
    with pytest.raises(DataSpecError, match=r"old/config.json: field data_config\['class_names'\] must be a list"):
        check_data_dict({"class_names": [1, 2]}, "old/config.json")
    with pytest.raises(DataSpecError, match=r"data_config\['mean'\] holds 2 value\(s\) but data_config\['in_chans'\]"):
        check_data_dict({"in_chans": 1, "mean": [0.5, 0.5]})
