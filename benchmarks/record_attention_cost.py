"""What recording attention costs on a SelfAttention2d: fused forward, a few query cells, all of them.

    OMP_NUM_THREADS=1 python benchmarks/record_attention_cost.py

Prints the median of 5 forward passes (alternating the three cases) (B=1, C=64, one head, 8-channel q/k) and the bytes of the
weights each recording keeps.
"""

from __future__ import annotations

import statistics
import time

import torch

from visattn import SelfAttention2d, record_attention
from visattn.functional import attention_matrix_bytes

ROUNDS = 5


def forward(block: SelfAttention2d, x: torch.Tensor, record: dict | None) -> float:
    """Seconds of one forward, plain (``record=None``) or inside ``record_attention(**record)``."""
    start = time.perf_counter()
    with torch.no_grad():
        if record is None:
            block(x)
        else:
            with record_attention(block, **record):
                block(x)
    return time.perf_counter() - start


def main() -> None:
    torch.manual_seed(0)
    block = SelfAttention2d(64).eval()
    print("| grid | fused forward | record 3 query cells | record all query cells |")
    print("|---|---|---|---|")
    for side in (64, 128):
        x = torch.randn(1, 64, side, side)
        cells = side * side
        points = [(1, 1), (side // 2, side // 2), (side - 1, 0)]
        cases = {"fused": None, "few": {"queries": points}, "full": {}}
        times = {name: [] for name in cases}
        for _ in range(ROUNDS):  # the contenders alternate, so a busy machine slows all alike
            for name, record in cases.items():
                times[name].append(forward(block, x, record))
        fused, few, full = (statistics.median(times[name]) * 1e3 for name in cases)
        print(
            f"| {side}×{side} | {fused:.0f} ms | {few:.0f} ms, {attention_matrix_bytes(1, 1, 3, cells) / 2**10:.0f} KiB "
            f"| {full:.0f} ms, {attention_matrix_bytes(1, 1, cells, cells) / 2**20:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
