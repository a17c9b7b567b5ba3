"""The cost of the ``digits_canvas`` ViT variants of the tuning that chose its recipe, per training step.

Each variant is ``configs/digits_canvas_vit.yaml``'s model with some keywords changed; one
training step (forward, loss, backward, AdamW) on a random batch of 64 canvases (1 × 64 × 64) is
timed for every variant, alternating them in one process (2 warm-ups, then the median of
``--repeats`` rounds), and printed with its ratio to the old recipe (an 8×8-patch linear stem),
so the ratios hold on a busy machine too. Multiply a ratio by an epoch of the old recipe to get an
epoch of a variant (68 steps, then evaluating 1,080 canvases)::

    python -m benchmarks.canvas_vit --repeats 10
"""

from __future__ import annotations

import argparse
import statistics

import torch

from visattn import create_model
from visattn.train.config import load_config

from .common import measure

#: variant → model keywords over the shipped config's (the tuning that chose the recipe)
VARIANTS = {
    "old recipe: linear 8×8 patch stem": {"stem": "patch"},
    "linear stem, width 128": {"stem": "patch", "embed_dim": 128},
    "linear stem, 4×4 patches (256 tokens), 2 blocks": {"stem": "patch", "patch_size": 4, "depth": 2},
    "conv stem, mean pool (digits_canvas_vit)": {},
    "conv stem, class token (digits_canvas_vit_cls)": {"pool": "cls"},
}


def step(keywords: dict, batch: int = 64):
    """One training step of the shipped model with ``keywords`` changed, as a callable."""
    model_config = {**dict(load_config("configs/digits_canvas_vit.yaml").model), **keywords}
    model = create_model(**model_config, num_classes=10, in_chans=1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, y = torch.randn(batch, 1, 64, 64), torch.randint(0, 10, (batch,))

    def run() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    samples = measure({name: step(kw) for name, kw in VARIANTS.items()}, warmup=2, repeats=args.repeats, device="cpu")
    base = statistics.median(samples[next(iter(VARIANTS))])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 64, median of {args.repeats}")
    print("| variant | ms/step | × old recipe |\n|---|---:|---:|")
    for name, times in samples.items():
        print(f"| {name} | {statistics.median(times) * 1e3:.1f} | {statistics.median(times) / base:.2f} |")


if __name__ == "__main__":
    main()
