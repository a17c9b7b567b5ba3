"""Digits with and without an inserted SelfAttention2d: same initial weights, seed and budget.

The training check of tests/test_insert.py, over several seeds and both learning rates for the
new block (the same as the network's, and a tenth of it):

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/insert_digits.py
"""

from __future__ import annotations

import copy

import torch

from tests.test_insert import TinyResNet, train_digits
from visattn import insert_attention


def main(seeds: int = 3, epochs: int = 4) -> None:
    print("| seed | without attention | with, block lr × 1 | with, block lr × 0.1 | γ (× 0.1) |")
    print("|---|---|---|---|---|")
    for seed in range(seeds):
        torch.manual_seed(seed)
        plain = TinyResNet()
        row = [train_digits(copy.deepcopy(plain), epochs=epochs)[0]]
        for block_lr in (1.0, 0.1):
            model = copy.deepcopy(plain)
            insert_attention(model, "layer2", num_heads=2, pos="sincos")
            row.append(train_digits(model, epochs=epochs, block_lr=block_lr)[0])
        gamma = model.layer2_attn.gamma.item()
        print(f"| {seed} | " + " | ".join(f"{a:.2%}" for a in row) + f" | {gamma:+.3f} |")


if __name__ == "__main__":
    main()
