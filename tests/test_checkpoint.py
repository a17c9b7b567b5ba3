"""Checkpoints round-trip, refuse foreign or truncated files, and never unpickle code."""

from __future__ import annotations

import pickle

import pytest
import torch

from visattn import create_model
from visattn.weights.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)


def test_round_trip(tmp_path):
    model = create_model("vit_digits_patch4_16", num_classes=4).eval()
    save_checkpoint(tmp_path / "m.pt", model, {"name": "vit_digits_patch4_16", "num_classes": 4}, epoch=3)
    assert load_checkpoint(tmp_path / "m.pt")["epoch"] == 3
    restored = model_from_checkpoint(tmp_path / "m.pt")
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(restored(x), model(x))
    assert not list(tmp_path.glob(".*tmp")), "temporary file left behind"


class Exploit:
    """Unpickling this creates the file ``marker``: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the hand-made pickle below
def test_refuses_foreign_truncated_and_unsafe_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a visattn checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    model = create_model("vit_digits_patch4_16")
    save_checkpoint(tmp_path / "ok.pt", model, {"name": "vit_digits_patch4_16"})
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "cut.pt")
    marker = tmp_path / "code-ran"
    payload = pickle.dumps({"format": "visattn-checkpoint", "x": Exploit(marker)})
    (tmp_path / "evil.pt").write_bytes(payload)
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists(), "loading the checkpoint ran the pickled code"
    pickle.loads(payload)  # the control: a plain unpickler does run it
    assert marker.exists()
