#!/usr/bin/env bash
# The GPU benchmark in one command, from the repository root or anywhere:
#
#   bash benchmarks/gpu.sh              # needs a CUDA GPU; about 15-30 minutes
#   bash benchmarks/gpu.sh --dry-run    # print what it would run (works without a GPU)
#   bash benchmarks/gpu.sh --compile    # also torch.compile both ViTs (any `python -m benchmarks` option)
#
# Runs `python -m benchmarks --suite gpu --device cuda` (flash SDPA for SelfAttention2d at 64² to
# 256² grids in fp32 and bf16, ViT-S/16 and ViT-B/16 inference and training steps in fp32 and bf16
# against timm, the achieved fraction of the GPU's measured matmul peak, the cost of recording),
# writes assets/bench/bench-cuda.json (OUT=folder changes where) and prints its tables; the docs'
# performance page (docs/performance.md) renders that JSON at every `mkdocs build`.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-assets/bench}"
python -m benchmarks --suite gpu --device cuda --out "$out" "$@"
for arg in "$@"; do
    if [[ "$arg" == "--dry-run" ]]; then
        echo "dry run: would then print the tables of $out/bench-cuda.json, which mkdocs build renders on docs/performance.md"
        exit 0
    fi
done
python -m benchmarks.report "$out/bench-cuda.json"
echo "wrote $out/bench-cuda.json; mkdocs build renders it on docs/performance.md"
