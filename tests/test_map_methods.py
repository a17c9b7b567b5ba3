"""One table of map methods (`visattn.explain.maps.METHODS`) and one dispatcher (`compute`), which the
overlay, the metrics, the explorer and the command line read; panels chosen by what they are."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from visattn import SelfAttention2d, VisionTransformer, record_attention
from visattn.cli import main
from visattn.explain import maps, metrics
from visattn.explain.maps import (
    cls_attention,
    compute,
    compute_map,
    grad_rollout,
    query_map,
    received,
    rollout,
)
from visattn.explain.overlay import METHODS as OVERLAY_METHODS
from visattn.explain.overlay import AttentionPanels, Panel

VIT = dict(img_size=(8, 12), patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3)


def test_compute_runs_the_named_map_from_a_model_or_a_recording():
    model = VisionTransformer(**VIT).eval()
    x = torch.randn(2, 3, 8, 12)
    with torch.no_grad(), record_attention(model) as rec:
        model(x)
    cases = {  # method: (options, what the map function of that name gives)
        "cls": (dict(layer=0), cls_attention(rec, 0)),
        "rollout": (dict(head_fusion="max", discard_ratio=0.25), rollout(rec, "max", 0.25)),
        "query": (dict(layer="blocks.1.attn", query=(11.0, 0.0)), query_map(rec, "blocks.1.attn", (11.0, 0.0))),
        "received": (dict(layer=1), received(rec, 1)),
    }
    assert set(cases) | {"grad_rollout"} == set(maps.METHODS)
    for method, (options, want) in cases.items():
        spec = maps.METHODS[method]
        per_head = dict(per_head=True) if spec.per_head else {}
        torch.testing.assert_close(compute(rec, method, **options, **per_head), want, msg=method)
        fused = want.mean(dim=1) if spec.per_head else want
        torch.testing.assert_close(compute(rec, method, **options), fused, msg=method)
        torch.testing.assert_close(compute(model, method, x, **options), fused, msg=method)  # records itself
    want = grad_rollout(model, x, [0, 2])
    torch.testing.assert_close(compute(model, "grad_rollout", x, target=[0, 2]), want)
    with pytest.raises(ValueError, match="gradients through the model: pass the model and x"):
        compute(rec, "grad_rollout")


def test_compute_map_says_where_the_map_lies_and_what_it_reads():
    block = SelfAttention2d(4, num_heads=2, kv_pool=2)  # a 5 × 3 grid: 3 × 2 pooled keys span 2.5 × 1.5
    with torch.no_grad(), record_attention(block) as rec:
        block(torch.randn(1, 4, 5, 3))
    heat = compute_map(rec, "received", layer="")
    assert heat.values.shape == (1, 3, 2) and heat.extent == (2.5, 1.5) == rec.extent("") and heat.path == ""
    model = VisionTransformer(**VIT).eval()
    with torch.no_grad(), record_attention(model) as rec:
        model(torch.randn(1, 3, 8, 12))
    assert compute_map(rec, "cls", layer=0).path == "blocks.0.attn" and compute_map(rec, "cls").extent is None
    assert compute_map(rec, "rollout").path is None


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("gradcam", {}, "unknown map method 'gradcam'; choose one of cls, rollout, grad_rollout, query, received"),
        ("query", {}, "needs a query point"),
        ("cls", dict(query=(1.0, 1.0)), "takes no query point"),
        ("rollout", dict(per_head=True), "head_fusion fuses its heads"),
    ],
)
def test_compute_refuses_what_a_method_does_not_take(method, options, message):
    model = VisionTransformer(**VIT).eval()
    with pytest.raises(ValueError, match=message):
        compute(model, method, torch.randn(1, 3, 8, 12), **options)
    with pytest.raises(ValueError, match="needs its input images x"):
        compute(model, "rollout")


def test_every_front_end_reads_the_one_table(capsys):
    names = list(maps.METHODS)
    assert list(OVERLAY_METHODS) == names
    assert list(metrics.METHODS) == [n for n in names if not maps.METHODS[n].needs_query]
    with pytest.raises(SystemExit):  # argparse's choices are the table's names
        main(["overlay", "--model", "vit_digits_patch4_16", "--method", "gradcam", "--image", "x", "--out", "y"])
    offered = re.search(r"choose from ([^)]*)\)", capsys.readouterr().err).group(1)
    assert [name.strip("'") for name in offered.split(", ")] == names


def test_panels_are_chosen_by_what_they_are_not_by_their_titles():
    heads = [torch.full((2, 2), float(h)) for h in range(2)]
    mean = torch.full((2, 2), 0.5)
    entries = [
        Panel(mean, "head average", "mean"),
        Panel(heads[1], "head 0?", "head", 1),
        Panel(heads[0], "x", "head", 0),
    ]
    panels = AttentionPanels(entries, "a picture", (0.0, 0.0, 2.0, 2.0))
    assert panels.choose("mean") is mean and panels.choose(0) is heads[0] and panels.choose(1) is heads[1]
    with pytest.raises(ValueError, match="head number in 0..1"):
        panels.choose(2)
    one = AttentionPanels([Panel(mean, "head 3 (a class named so)", "map")], "rollout", (0.0, 0.0, 2.0, 2.0))
    assert one.choose("mean") is mean
    with pytest.raises(ValueError, match="gives one map"):
        one.choose(0)


def test_deletion_and_insertion_are_one_measurement():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    images, heatmaps = torch.rand(2, 1, 4, 4), torch.rand(2, 4, 4)
    options = dict(target=1, steps=4, baseline="zero", return_curves=True)
    for mode, metric in (("deletion", metrics.deletion), ("insertion", metrics.insertion)):
        area, curves = metrics.causal_metric(model, images, heatmaps, mode=mode, **options)
        same_area, same_curves = metric(model, images, heatmaps, **options)
        assert torch.equal(area, same_area) and torch.equal(curves, same_curves)
    deleted = metrics.causal_metric(model, images, heatmaps, mode="deletion", **options)[1]
    inserted = metrics.causal_metric(model, images, heatmaps, mode="insertion", **options)[1]
    torch.testing.assert_close(deleted[:, [0, -1]], inserted[:, [-1, 0]])  # the image and the blank, swapped
    assert not torch.allclose(deleted, inserted.flip(1))  # between them, each its own measurement
    with pytest.raises(ValueError, match="mode must be 'deletion' or 'insertion'"):
        metrics.causal_metric(model, images, heatmaps, mode="both")
