"""Do the attention maps point at the object? The pointing game on ``digits_canvas``.

Each held-out canvas holds one real digit among fragments of other digits; the digit's box is
known. A map *hits* when its maximum, placed on the canvas's pixels, falls inside the box. The
table compares the models' maps with two baselines measured on the same canvases: a uniform
random point (its hit rate is the box's share of the canvas) and "where the ink is" (the maximum
of the blurred input, which the clutter fools).

Usage (after training the two shipped configs with train.py; ``last.pt`` is the final epoch, so
the held-out canvases play no part in choosing the model)::

    python train.py --config configs/digits_canvas_vit.yaml
    python train.py --config configs/digits_canvas_vit.yaml model.pool=cls run.name=digits_canvas_vit_cls
    python train.py --config configs/digits_canvas_resnet_attn.yaml
    python -m benchmarks.pointing_game --vit runs/digits_canvas_vit/last.pt \
        --vit runs/digits_canvas_vit_cls/last.pt --cnn runs/digits_canvas_resnet_attn/last.pt \
        --out assets/pointing_game.json --figure assets/digits_canvas_maps.png
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.transforms.v2.functional import gaussian_blur

from visattn import maps, record_attention
from visattn.explain.overlay import overlay_grid
from visattn.layers.attention import SelfAttention2d
from visattn.train.data import DigitsCanvas
from visattn.weights.checkpoint import load_checkpoint, model_from_checkpoint

MapFn = Callable[[nn.Module, Tensor], Tensor]  # (model, normalized batch) -> (B, H, W) on pixels


def _on_pixels(grid_map: Tensor, size: tuple[int, int], extent=None) -> Tensor:
    return maps.to_image(grid_map.float(), size, extent=extent)


def vit_methods(model: nn.Module) -> dict[str, MapFn]:
    """The ViT's maps: attention rollout, gradient rollout and (with a class token) its attention."""

    def rollout(model: nn.Module, x: Tensor) -> Tensor:
        with record_attention(model) as rec:
            model(x)
        return _on_pixels(maps.rollout(rec), x.shape[-2:])

    def cls(model: nn.Module, x: Tensor) -> Tensor:
        with record_attention(model) as rec:
            model(x)
        return _on_pixels(maps.cls_attention(rec).mean(1), x.shape[-2:])

    def grad_rollout(model: nn.Module, x: Tensor) -> Tensor:
        return _on_pixels(maps.grad_rollout(model, x), x.shape[-2:])

    methods = {"rollout": rollout, "grad_rollout": grad_rollout}
    if getattr(model, "cls_token", None) is not None:
        methods["cls_attention"] = cls
    return methods


def cnn_methods(model: nn.Module) -> dict[str, MapFn]:
    """The CNN's map: how much attention each position of its (last) block receives."""
    path = [name for name, m in model.named_modules() if isinstance(m, SelfAttention2d)][-1]

    def received(model: nn.Module, x: Tensor) -> Tensor:
        with record_attention(model, layers=[path]) as rec:
            model(x)
        return _on_pixels(maps.received(rec, path).mean(1), x.shape[-2:], extent=rec.extent(path))

    return {f"received ({path})": received}


def ink_map(raw: Tensor, sigma: float = 2.0) -> Tensor:
    """Baseline: the input intensity blurred with a Gaussian, ``(B, 1, H, W)`` → ``(B, H, W)``."""
    return gaussian_blur(raw, kernel_size=2 * int(3 * sigma) + 1, sigma=sigma)[:, 0]


def hits(heatmaps: Tensor, boxes: Tensor) -> Tensor:
    """Whether each map's maximum ``(B, H, W)`` lies in its box ``(B, 4)`` = ``(x0, y0, x1, y1)``."""
    width = heatmaps.shape[-1]
    peak = heatmaps.flatten(1).argmax(dim=1)
    y, x = peak // width, peak % width
    return (boxes[:, 0] <= x) & (x < boxes[:, 2]) & (boxes[:, 1] <= y) & (y < boxes[:, 3])


def _batches(dataset: DigitsCanvas, batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    for start in range(0, len(dataset), batch_size):
        index = range(start, min(start + batch_size, len(dataset)))
        x = torch.stack([dataset[i][0] for i in index])
        raw = torch.stack([dataset.raw_image(i) for i in index])
        yield x, raw, dataset.labels[start : index.stop], dataset.boxes[start : index.stop]


def test_canvases(state: dict) -> DigitsCanvas:
    """The held-out canvases a checkpoint's run was evaluated on."""
    data = state["config"]["data"]
    return DigitsCanvas("test", canvas_size=data["canvas_size"], seed=data.get("seed", 0), copies=data["canvas_copies"])


def evaluate(checkpoint: str, kind: str, batch_size: int = 64) -> dict:
    """Pointing accuracy of each map of one trained model, with the accuracy of its predictions."""
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state)
    dataset = test_canvases(state)
    methods = vit_methods(model) if kind == "vit" else cnn_methods(model)
    counts = dict.fromkeys(methods, 0)
    correct = 0
    for x, _raw, labels, boxes in _batches(dataset, batch_size):
        with torch.no_grad():
            correct += int((model(x).argmax(1) == labels).sum())
        for name, method in methods.items():
            counts[name] += int(hits(method(model, x).detach(), boxes).sum())
    n = len(dataset)
    return {
        "checkpoint": checkpoint,
        "model": state["model_config"]["name"],
        "accuracy": correct / n,
        "pointing": {name: c / n for name, c in counts.items()},
        "images": n,
    }


def baselines(dataset: DigitsCanvas) -> dict:
    """Uniform random point (expected hit rate = box area share) and the blurred-ink maximum."""
    boxes = dataset.boxes.float()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    size = dataset.images.shape[-1] * dataset.images.shape[-2]
    ink = sum(int(hits(ink_map(raw), b).sum()) for _, raw, _, b in _batches(dataset, 256))
    return {"uniform random point": float((area / size).mean()), "ink (blurred input maximum)": ink / len(dataset)}


def figure(vit_ckpt: str, cnn_ckpt: str | None, out: str, count: int = 4) -> None:
    """A grid: canvases (with their box) and each method's map, for the first test canvases."""
    from PIL import Image, ImageDraw

    state = load_checkpoint(vit_ckpt)
    vit = model_from_checkpoint(state)
    dataset = test_canvases(state)
    x, raw, _, boxes = next(_batches(dataset, count))
    panels: list[list[Tensor]] = [list(ink_map(raw))]
    titles = ["ink baseline"]
    for name, method in vit_methods(vit).items():
        panels.append(list(method(vit, x).detach()))
        titles.append(f"ViT {name}")
    if cnn_ckpt:
        cnn = model_from_checkpoint(cnn_ckpt)
        for name, method in cnn_methods(cnn).items():
            panels.append(list(method(cnn, x).detach()))
            titles.append(f"CNN {name}")
    rows = []
    for i in range(count):
        canvas = Image.fromarray((raw[i, 0].numpy() * 255).astype("uint8")).convert("RGB")
        image = canvas.resize((256, 256), Image.NEAREST)
        scale = 256 / raw.shape[-1]
        x0, y0, x1, y1 = (float(v) * scale for v in boxes[i])
        ImageDraw.Draw(image).rectangle((x0, y0, x1 - 1, y1 - 1), outline=(0, 255, 255), width=2)
        rows.append(overlay_grid(image, [p[i] for p in panels], titles=titles))
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    top = 0
    for row in rows:
        sheet.paste(row, (0, top))
        top += row.height
    sheet.save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--vit",
        required=True,
        action="append",
        help="last.pt of a digits_canvas ViT run (repeat for several; the figure uses the first)",
    )
    parser.add_argument("--cnn", help="last.pt of the digits_canvas CNN-with-attention run")
    parser.add_argument("--out", default="benchmarks/results/pointing_game.json")
    parser.add_argument("--figure", help="PNG grid of a few canvases and their maps")
    args = parser.parse_args()

    results = {"models": [evaluate(path, "vit") for path in args.vit]}
    if args.cnn:
        results["models"].append(evaluate(args.cnn, "cnn"))
    results["baselines"] = baselines(test_canvases(load_checkpoint(args.vit[0])))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))

    print("| model | test accuracy | map | pointing accuracy |")
    print("|---|---|---|---|")
    for m in results["models"]:
        for name, value in m["pointing"].items():
            print(f"| {m['model']} ({m['checkpoint']}) | {m['accuracy']:.1%} | {name} | {value:.1%} |")
    for name, value in results["baselines"].items():
        print(f"| baseline | – | {name} | {value:.1%} |")
    if args.figure:
        figure(args.vit[0], args.cnn, args.figure)


if __name__ == "__main__":
    main()
