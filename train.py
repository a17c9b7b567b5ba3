"""Train a Vision Transformer (or a CNN with attention) on an image dataset.

    python train.py                                        # the default job: a small ViT on digits
    python train.py --config configs/digits_canvas_vit.yaml train.epochs=20 model.depth=4
    python train.py --resume runs/default                  # continue a run from its last.pt
    torchrun --nproc_per_node 2 train.py ...               # data-parallel over 2 processes

The config is visattn/train/config.py's defaults, then the YAML file, then the key=value overrides.
The loop itself is visattn.train.engine.fit (also `visattn train`); the run folder is runs/<name>/,
and the last line printed is its explorer.html: where the trained model looks in held-out pictures.
"""

import sys

from visattn.cli import run

if __name__ == "__main__":
    run(["train", *sys.argv[1:]])
