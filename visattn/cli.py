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


def _cmd_sites(args: argparse.Namespace) -> int:
    """Where attention could go in a CNN and what it would cost there (a Markdown table)."""
    from .insert import attention_sites, format_sites

    model = create_model(args.model, in_chans=args.input_size[0]).eval()
    sites = attention_sites(
        model, tuple(args.input_size), num_heads=args.heads, kv_pool=args.kv_pool,
        leaves=args.leaves, max_depth=args.depth,
    )
    print(format_sites(sites))
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
    sites = sub.add_parser("sites", help="candidate places for attention in a CNN, with their costs")
    sites.add_argument("model", help="e.g. torchvision:resnet50, timm:convnext_atto, resnet18_small")
    sites.add_argument("--input-size", type=int, nargs=3, default=[3, 224, 224], metavar=("C", "H", "W"))
    sites.add_argument("--heads", type=int, default=1)
    sites.add_argument("--kv-pool", type=int, default=1)
    sites.add_argument("--depth", type=int, default=None, help="only paths with at most this many parts")
    sites.add_argument("--leaves", action="store_true", help="also list single layers")
    sites.set_defaults(func=_cmd_sites)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
