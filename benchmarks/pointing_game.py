"""Do the attention maps point at the digit, and are they faithful? ``visattn evaluate-maps`` on
the ``digits_canvas`` models, plus a picture of their maps.

Each held-out canvas holds one real digit among fragments of other digits; the digit's box is
known. For every checkpoint this runs ``visattn evaluate-maps`` (pointing game, deletion,
insertion, randomization test, with the random, centre and ink baselines; see
:mod:`visattn.explain.evaluate`) and writes ``OUT/<run>.json`` and ``OUT/<run>.png``; with
``--figure`` it draws the first canvases with each model's maps.

Usage (after training the shipped configs with train.py; ``last.pt`` is the final epoch, so the
held-out canvases play no part in choosing the model)::

    python -m benchmarks.pointing_game \\
        --run runs/digits_canvas_vit/last.pt:rollout,grad_rollout,received \\
        --run runs/digits_canvas_vit_cls/last.pt:cls,rollout,grad_rollout,received \\
        --run runs/digits_canvas_resnet_attn/last.pt:received \\
        --out assets/evaluate-maps --figure assets/digits_canvas_maps.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from visattn._io import atomic_save_image, check_output, image_format
from visattn.cli import main as visattn_main
from visattn.explain.evaluate import ink_map
from visattn.explain.metrics import attention_map
from visattn.explain.render import overlay_grid
from visattn.train.digits import DigitsCanvas
from visattn.weights.checkpoint import load_checkpoint, model_from_checkpoint


def _run(text: str) -> tuple[str, str]:
    checkpoint, _, methods = text.rpartition(":")
    if not checkpoint or not methods:
        raise argparse.ArgumentTypeError(f"expected CHECKPOINT:METHODS like runs/x/best.pt:rollout,cls, got {text!r}")
    return checkpoint, methods


def figure(runs: list[tuple[str, str]], out: str, count: int = 4) -> None:
    """The first ``count`` held-out canvases (digit box in cyan), the ink baseline and each run's maps."""
    data = load_checkpoint(runs[0][0])["config"]["data"]
    canvases = DigitsCanvas(
        "test", canvas_size=data["canvas_size"], seed=data["split_seed"], copies=data["canvas_copies"]
    )
    x, _ = canvases.batch(range(count))
    panels, titles = [ink_map(x)], ["ink baseline"]
    for checkpoint, methods in runs:
        model = model_from_checkpoint(checkpoint)
        for method in methods.split(","):
            panels.append(attention_map(model, x, method))
            titles.append(f"{Path(checkpoint).parent.name}: {method}")
    rows = []
    for i in range(count):
        image = Image.fromarray((canvases.raw_image(i)[0].numpy() * 255).astype("uint8")).convert("RGB")
        image = image.resize((256, 256), Image.NEAREST)
        x0, y0, x1, y1 = (float(v) * 256 / x.shape[-1] for v in canvases.boxes[i])
        ImageDraw.Draw(image).rectangle((x0, y0, x1 - 1, y1 - 1), outline=(0, 255, 255), width=2)
        rows.append(overlay_grid(image, [p[i].float() for p in panels], titles=titles))
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    for i, row in enumerate(rows):
        sheet.paste(row, (0, sum(r.height for r in rows[:i])))
    atomic_save_image(sheet, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=_run, action="append", required=True, help="CHECKPOINT:METHODS (repeatable)")
    parser.add_argument("--metrics", default="pointing,deletion,insertion,randomization")
    parser.add_argument("--limit", help="only the first N held-out canvases")
    parser.add_argument("--out", default="benchmarks/results/evaluate-maps", help="folder of the JSON and PNG files")
    parser.add_argument("--figure", help="PNG grid of a few canvases and their maps")
    args = parser.parse_args()
    if args.figure:  # before the runs are evaluated: never over a checkpoint or a file of another kind
        check_output(args.figure, image_format(args.figure), [checkpoint for checkpoint, _ in args.run])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for checkpoint, methods in args.run:
        argv = ["evaluate-maps", "--checkpoint", checkpoint, "--methods", methods, "--metrics", args.metrics]
        argv += ["--out", str(Path(args.out) / Path(checkpoint).parent.name)]
        if visattn_main(argv + (["--limit", args.limit] if args.limit else [])) != 0:
            raise SystemExit(2)
    if args.figure:
        figure(args.run, args.figure)


if __name__ == "__main__":
    main()
