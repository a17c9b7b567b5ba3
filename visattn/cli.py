"""The ``visattn`` command: thin front ends over library functions."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="list the named models")
    models.set_defaults(func=_cmd_models)
    demo = sub.add_parser("demo", help="one forward pass of a named model on random input")
    demo.add_argument("--model", default="vit_digits_patch4_16", help="a name from `visattn models`")
    demo.add_argument("--batch", type=int, default=2)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
