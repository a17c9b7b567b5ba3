"""torch.compile: ``train.compile=true`` trains the compiled model, and ``record_attention`` on a
compiled model records exactly what the eager model records (recording switches a module
attribute, not a hook added after compilation, so it is not subject to pytorch#117758: the
compiled graph's guards see the change and recompile).

``backend="aot_eager"`` keeps these tests short: dynamo's tracing and guards are what recording
and the training loop could break, not inductor's code generation.
"""

from __future__ import annotations

import pytest
import torch

from visattn import create_model, record_attention
from visattn.train.config import load_config
from visattn.train.engine import fit

TINY = [
    "model.embed_dim=32",
    "model.depth=1",
    "model.num_heads=2",
    "train.epochs=1",
    "train.amp=none",
    "train.ema_decay=0",
]


@pytest.fixture
def aot_eager(monkeypatch):
    """``torch.compile`` with the aot_eager backend; the modules it was asked to compile."""
    compiled = []
    real = torch.compile

    def compile_(model, **kwargs):
        compiled.append(model)
        return real(model, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", compile_)
    return compiled


@pytest.mark.slow
def test_train_compile_trains_the_compiled_model_like_the_eager_one(tmp_path, aot_eager):
    torch.set_num_threads(1)
    eager = fit(load_config(overrides=[*TINY, f"run.out_dir={tmp_path}", "run.name=eager"]))
    assert aot_eager == []
    compiled = fit(load_config(overrides=[*TINY, f"run.out_dir={tmp_path}", "run.name=c", "train.compile=true"]))
    assert len(aot_eager) == 1 and not isinstance(aot_eager[0], torch._dynamo.eval_frame.OptimizedModule)
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-3)
    assert abs(compiled["test_acc1"] - eager["test_acc1"]) <= 2 / 360  # at most two of the 360 test images


@pytest.mark.slow
def test_record_attention_on_a_compiled_model_records_the_eager_weights():
    model = create_model("vit_digits_patch4_16", num_classes=10, in_chans=1, depth=2).eval()
    x = torch.randn(2, 1, 16, 16)
    # fullgraph: recording traces into the graph (no graph break), so it works there too
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        plain = compiled(x)  # compiled first without recording: the case pytorch#117758 is about
        with record_attention(model) as eager:
            model(x)
        with record_attention(model) as rec:
            out = compiled(x)
        after = compiled(x)  # closed: the modules take the fused path again
    torch.testing.assert_close(out, plain)
    torch.testing.assert_close(after, plain)
    assert list(rec) == list(eager) == ["blocks.0.attn", "blocks.1.attn"]
    for path in eager:
        torch.testing.assert_close(rec[path].weights, eager[path].weights)
    assert rec.image_size == (16, 16)  # the model's forward pre-hook ran in the compiled call
