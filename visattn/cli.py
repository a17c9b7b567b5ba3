"""The ``visattn`` command: thin front ends over library functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .registry import create_model, list_models


def _cmd_models(args: argparse.Namespace) -> int:
    for name in list_models():
        print(name)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Build a named model and run one forward pass on random input."""
    model = create_model(args.model).eval()
    channels = getattr(getattr(model, "patch_embed", None), "in_chans", 3)
    size = getattr(model, "img_size", (224, 224))
    x = torch.randn(args.batch, channels, *size)
    with torch.inference_mode():
        logits = model(x)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {params / 1e6:.2f} M parameters, input {tuple(x.shape)} -> logits {tuple(logits.shape)}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark suite of a source checkout (``benchmarks/`` next to ``visattn/``)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "__main__.py").is_file():
        print(f"visattn bench needs a source checkout: no benchmarks/ folder in {root}", file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.__main__ import main as bench_main

    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="list the named models")
    models.set_defaults(func=_cmd_models)
    demo = sub.add_parser("demo", help="one forward pass of a named model on random input")
    demo.add_argument("--model", default="vit_digits_patch4_16", help="a name from `visattn models`")
    demo.add_argument("--batch", type=int, default=2)
    demo.set_defaults(func=_cmd_demo)
    bench = sub.add_parser("bench", add_help=False,
                           help="the benchmark suite (options: visattn bench --help)")
    bench.set_defaults(func=_cmd_bench, bench_args=[])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
