"""visattn.explain.evaluate and ``visattn evaluate-maps``: rows, baselines, intervals, files."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import visattn
from visattn.cli import main
from visattn.explain import evaluate
from visattn.train.config import config_to_dict, load_config
from visattn.weights.checkpoint import save_checkpoint

from .test_metrics import SmallCNN


def test_the_bootstrap_interval_has_the_width_of_the_normal_approximation():
    scores = torch.tensor([1.0, 0.0] * 200)  # p = 0.5, N = 400: half-width 1.96·√(p(1-p)/N) = 0.049
    mean, low, high = evaluate.bootstrap_interval(scores)
    assert mean == 0.5 and low < mean < high
    assert abs((high - low) / 2 - 0.049) < 0.006
    assert evaluate.bootstrap_interval(torch.full((5,), 0.25)) == (0.25, 0.25, 0.25)
    assert evaluate.bootstrap_interval(torch.tensor([0.5, float("nan"), 0.5])) == (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def evaluated():
    torch.manual_seed(0)
    vit = visattn.create_model("vit_digits_patch4_16", img_size=(16, 24), pool="cls", depth=2).eval()
    images = torch.randn(4, 1, 16, 24)
    boxes = torch.tensor([[8, 4, 16, 12]] * 4)  # holds the centre pixel (11.5, 7.5)
    methods = ["cls", "rollout", "grad_rollout", "received"]
    return evaluate.evaluate_maps(vit, images, methods=methods, boxes=boxes, steps=3), methods


def test_every_method_and_baseline_gets_every_metric(evaluated):
    result, methods = evaluated
    assert list(result.scores) == [*methods, "random", "centre", "ink"]
    for row in result.scores.values():
        assert sorted(row) == ["deletion", "insertion", "pointing", "randomization", "randomization_all"]
        assert all(score.shape == (4,) for score in row.values())
    assert torch.equal(result.scores["centre"]["pointing"], torch.ones(4, dtype=torch.float64))
    for name in evaluate.BASELINES:  # the same map whatever the weights: no dependence
        assert torch.equal(result.randomization[name][1], torch.ones(5, 4, dtype=torch.float64))  # 5 steps
    assert result.curves["rollout"]["deletion"].shape == (4, 4)


def test_summary_table_and_figure(evaluated, tmp_path):
    summary = evaluate.summarize(evaluated[0])
    json.dumps(summary)  # JSON-ready
    table = evaluate.format_table(summary).splitlines()
    assert len(table) == 2 + 7 and "deletion AUC" in table[0] and table[-1].startswith("| ink (baseline) |")
    assert evaluate.format_randomization(summary).splitlines()[0].startswith("| map | + head | + norm | + blocks.1")
    evaluate.plot_curves(summary, tmp_path / "curves.png")
    assert Image.open(tmp_path / "curves.png").format == "PNG"


def test_a_method_that_does_not_fit_the_model_fails_before_the_work():
    cnn = SmallCNN()
    visattn.insert_attention(cnn, "layer1", num_heads=2)
    with pytest.raises(ValueError, match="'rollout' does not apply"):
        evaluate.evaluate_maps(
            cnn.eval(), torch.randn(2, 1, 8, 8), methods=["received", "rollout"], metrics=["deletion"]
        )


def test_evaluate_maps_command_on_a_canvas_checkpoint(tmp_path, capsys):
    overrides = ["data.canvas_size=32", "data.canvas_copies=1", "model.pool=cls", "model.img_size=32"]
    overrides += ["model.embed_dim=16", "model.depth=1", "model.num_heads=2"]
    cfg = load_config("configs/digits_canvas_vit.yaml", overrides)
    model_config = {**config_to_dict(cfg)["model"], "num_classes": 10, "in_chans": 1}
    model = visattn.create_model(**model_config)
    save_checkpoint(tmp_path / "best.pt", model, model_config, config=config_to_dict(cfg))
    argv = ["evaluate-maps", "--checkpoint", str(tmp_path), "--methods", "cls,received", "--limit", "5"]
    assert main([*argv, "--steps", "2", "--out", str(tmp_path / "maps")]) == 0
    printed = capsys.readouterr().out
    assert "5 images" in printed and "| random (baseline) |" in printed and "bootstrap" in printed
    summary = json.loads((tmp_path / "maps.json").read_text())
    assert summary["images"] == 5 and list(summary["rows"]) == ["cls", "received", "random", "centre", "ink"]
    assert summary["rows"]["cls"]["pointing"]["low"] <= summary["rows"]["cls"]["pointing"]["mean"]
    assert Image.open(tmp_path / "maps.png").format == "PNG"
