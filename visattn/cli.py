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


def _user_errors(command):
    """Report configuration, data and checkpoint mistakes as one line (exit status 1), not a traceback."""
    def run(args: argparse.Namespace) -> int:
        from .engine import NonFiniteLossError

        try:
            return command(args)
        except (ValueError, FileNotFoundError, NonFiniteLossError) as err:
            raise SystemExit(f"visattn {args.command}: error: {err}") from err
    run.__doc__ = command.__doc__
    return run


def _cmd_train(args: argparse.Namespace) -> int:
    """Train from a config (or resume a run); the loop is :func:`visattn.engine.fit`."""
    from .config import load_config
    from .engine import fit, load_run_config

    overrides = [*args.overrides, *args.set]
    if args.resume:
        if args.config:
            raise ValueError("--resume continues a run with its saved config; give overrides, not --config")
        cfg, _ = load_run_config(args.resume, overrides)
    else:
        cfg = load_config(args.config, overrides)
    fit(cfg, resume=args.resume)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """Top-1/top-5 and a per-class table of a checkpoint on its dataset's held-out split."""
    from torch.utils.data import DataLoader

    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .config import load_config
    from .data import build_datasets
    from .engine import evaluate

    state = load_checkpoint(args.checkpoint)
    if "config" not in state:
        raise ValueError(f"{args.checkpoint} holds no training config (not written by visattn train); "
                         "evaluate it from Python with visattn.engine.evaluate")
    overrides = ([f"data.name={args.data}"] if args.data else []) + args.set
    cfg = load_config(base=state["config"], overrides=overrides)
    _, test_set, data_config = build_datasets(cfg.data)
    if data_config["num_classes"] != state["model_config"]["num_classes"]:
        raise ValueError(f"the model has {state['model_config']['num_classes']} classes but {cfg.data.name} has "
                         f"{data_config['num_classes']}")
    model = model_from_checkpoint(state)
    loader = DataLoader(test_set, batch_size=args.batch)
    stats = evaluate(model, loader, num_classes=data_config["num_classes"])
    print(f"{args.checkpoint}: {cfg.data.name} held-out split, {len(test_set)} images")
    print(f"top-1 {stats['acc1']:.2%}  top-5 {stats['acc5']:.2%}  loss {stats['loss']:.4f}")
    print(f"{'class':<16}{'images':>8}{'top-1':>9}")
    for name, correct, count in zip(data_config["class_names"], stats["per_class_correct"], stats["per_class_count"], strict=True):
        acc = f"{correct / count:.2%}" if count else "-"
        print(f"{name:<16}{int(count):>8}{acc:>9}")
    return 0


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a YAML file (e.g. configs/digits_canvas_vit.yaml); default: the built-in default job")
    parser.add_argument("--resume", metavar="RUN", help="continue the run folder RUN from its last.pt")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. train.epochs=20 model.depth=4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="list the named models")
    models.set_defaults(func=_cmd_models)
    demo = sub.add_parser("demo", help="one forward pass of a named model on random input")
    demo.add_argument("--model", default="vit_digits_patch4_16", help="a name from `visattn models`")
    demo.add_argument("--batch", type=int, default=2)
    demo.set_defaults(func=_cmd_demo)
    train = sub.add_parser("train", help="train a model (same as python train.py)")
    _add_train_arguments(train)
    train.set_defaults(func=_user_errors(_cmd_train))
    evaluate = sub.add_parser("eval", help="top-1/top-5 and per-class accuracy of a checkpoint")
    evaluate.add_argument("--checkpoint", required=True, help="a checkpoint written by training, e.g. runs/default/best.pt")
    evaluate.add_argument("--data", help="evaluate on another dataset name (same classes), e.g. digits")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a data key, e.g. data.root=/data")
    evaluate.add_argument("--batch", type=int, default=256)
    evaluate.set_defaults(func=_user_errors(_cmd_eval))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
