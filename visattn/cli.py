"""The ``visattn`` command: thin front ends over library functions."""

from __future__ import annotations

import argparse
import ast
import gc
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from ._utils import sigterm_raises
from .data_spec import DataSpec
from .models.registry import create_model, list_models


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


def _pair(text: str, kind: type = float) -> tuple:
    try:
        first, second = (kind(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers like 12,34, got {text!r}") from None
    return first, second


def _size(text: str) -> tuple[int, int]:
    height, width = _pair(text, int)
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"expected a height and a width of at least 1 pixel, got {text!r}")
    return height, width


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _block_argument(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` → ``(key, value)``: a Python literal (``8``, ``0.5``, ``False``, ``None``) or a word."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY an option name (window_size=8), got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _model_source(args: argparse.Namespace) -> tuple[torch.nn.Module, DataSpec, str]:
    """``--checkpoint`` or ``--model [--pretrained | --pretrained-file]``: (model in eval mode, its
    data spec, a name for it)."""
    from .explain.inputs import default_data_config, pretrained_data_config
    from .weights.checkpoint import load_checkpoint, model_from_checkpoint

    if args.checkpoint:
        if args.img_size:
            raise ValueError("--img-size is for --model; a checkpoint's data_config sets the input size")
        if args.pretrained or args.pretrained_file:
            raise ValueError("--pretrained and --pretrained-file are for --model; a checkpoint holds its own weights")
        state = load_checkpoint(_checkpoint_file(args.checkpoint))
        model = model_from_checkpoint(state, source=args.checkpoint)
        if state.get("data_config") is None:
            spec = default_data_config(model)
            print(f"note: {args.checkpoint} has no data_config; using {spec.to_dict()}", file=sys.stderr)
        else:
            spec = DataSpec.from_dict(state["data_config"], source=args.checkpoint)
        return model, spec, str(args.checkpoint)
    if args.pretrained or args.pretrained_file:
        model = create_model(args.model, pretrained=args.pretrained, pretrained_file=args.pretrained_file).eval()
        source = args.pretrained_file or "pretrained"
        return model, pretrained_data_config(model, args.img_size), f"{args.model} ({source})"
    torch.manual_seed(args.seed)
    model = create_model(args.model).eval()
    return model, default_data_config(model, args.img_size), f"{args.model} (untrained, seed {args.seed})"


def _input_files(args: argparse.Namespace) -> list[str | Path | None]:
    """Every file a command reads: its pictures, checkpoint, weights file and config."""
    images = getattr(args, "image", None) or []
    checkpoint = getattr(args, "checkpoint", None)
    return [
        *([images] if isinstance(images, str) else images),
        _checkpoint_file(checkpoint) if checkpoint else None,
        getattr(args, "pretrained_file", None),
        getattr(args, "config", None),
    ]


def _check_output(args: argparse.Namespace, out: str | Path, kind: str) -> None:
    """``--out`` before anything is loaded: its folder exists, it is none of the inputs, and it
    replaces only a file of the same ``kind`` unless ``--force`` (`visattn._io.check_output`)."""
    from ._io import UnsafeOutputError, check_output

    if not Path(out).resolve().parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {Path(out).parent} does not exist; create it first")
    try:
        check_output(out, kind, _input_files(args), force=args.force, force_hint="--force")
    except UnsafeOutputError as err:
        raise UnsafeOutputError(f"--out {err}") from None


def _cmd_overlay(args: argparse.Namespace) -> int:
    """Draw an attention map of one picture (see visattn.explain.overlay.attention_overlay)."""
    from ._io import image_format, load_image
    from .explain.inputs import Preprocess
    from .explain.maps import METHODS
    from .explain.overlay import OVERLAY_MAX_SIDE, attention_overlay

    spec = METHODS[args.method]
    if spec.needs_query != (args.query is not None):
        raise ValueError(
            "--method query needs a query point, --query X,Y (a pixel of the picture); the other methods take none"
        )
    if args.layer is not None and not spec.reads_layer:
        raise ValueError(
            f"--layer picks the attention module of --method {_methods_that('reads_layer')}; --method {args.method} "
            "combines every layer, so leave --layer out"
        )
    if args.head != "mean" and (args.panels or not spec.per_head):
        raise ValueError(f"--head picks one head's map of --method {_methods_that('per_head')} without --panels")
    _check_output(args, args.out, image_format(args.out))
    model, data_spec, _ = _model_source(args)
    preprocess = Preprocess.from_spec(data_spec)
    # one overlay: the whole picture, at its own resolution; panels: a copy of at most 2048 pixels
    image = load_image(args.image, max_side=max(OVERLAY_MAX_SIDE, *preprocess.img_size) if args.panels else None)
    layer = _layer(args.layer)
    drawn = attention_overlay(
        model,
        image,
        args.method,
        preprocess=preprocess,
        query=args.query,
        original_size=image.info["original_size"],
        layer=layer,
        target=args.target,
        head_fusion=args.head_fusion,
        discard_ratio=args.discard_ratio,
        class_names=data_spec.class_names,
        cmap=args.cmap,
        alpha=args.alpha,
        panels=args.panels,
        head=args.head,
        out=args.out,
        force=args.force,
    )
    print(f"wrote {args.out} ({drawn.width}×{drawn.height})")
    return 0


def _cmd_explore(args: argparse.Namespace) -> int:
    """Write the attention explorer: one self-contained HTML page (see visattn.explain.explore)."""
    from .explain.explore import explore

    _check_output(args, args.out, "HTML")
    model, data_spec, name = _model_source(args)
    page = explore(
        model,
        args.image,
        args.out,
        data_config=data_spec,
        max_mb=args.max_mb,
        title=args.title or name,
        cmap=args.cmap,
        alpha=args.alpha,
        force=args.force,
    )
    print(f"wrote {page.summary()}")
    return 0


def _checkpoint_file(path: str) -> Path:
    """``--checkpoint``: a checkpoint file, or a run folder (its ``best.pt``)."""
    checkpoint = Path(path)
    if checkpoint.is_dir():
        if not (checkpoint / "best.pt").is_file():
            raise FileNotFoundError(f"--checkpoint {path} is a folder without best.pt; pass a run folder or a .pt file")
        return checkpoint / "best.pt"
    return checkpoint


def _cmd_sites(args: argparse.Namespace) -> int:
    """Where attention could go in a CNN and what it would cost there (a Markdown table)."""
    from .models.insert import attention_sites, format_sites

    model = create_model(args.model, in_chans=args.input_size[0]).eval()
    options = dict(args.block_arg or ())
    if args.kv_pool is not None:
        options["kv_pool"] = args.kv_pool
    sites = attention_sites(
        model,
        tuple(args.input_size),
        block=args.block,
        num_heads=args.heads,
        leaves=args.leaves,
        max_depth=args.depth,
        **options,
    )
    print(format_sites(sites))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark suite of a source checkout (``python -m benchmarks`` next to ``visattn/``)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "__main__.py").is_file():
        print(f"visattn bench needs a source checkout: no benchmarks/ folder in {root}", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "benchmarks", *args.bench_args], cwd=root)


def _user_error_types() -> tuple[type[BaseException], ...]:
    """What visattn raises on purpose about the input or the machine (exit status 2). Anything
    else (``RuntimeError``, ``KeyError``, ``IndexError``, ``TypeError``...) is a bug of visattn
    (exit status 1), so the place that meets a peer's error about the input converts it."""
    from .explain.recording import NotRecordedError
    from .train.engine import NonFiniteLossError
    from .train.lock import RunFolderBusy
    from .weights.hf import MissingExtraError

    return (
        ValueError,  # ConfigError, CheckpointError, ImageFileError, UnsafeOutputError, bad arguments
        OSError,  # FileNotFoundError, DiskFullError, PretrainedUnavailableError, read-only folders
        MissingExtraError,  # an optional extra that is not installed (pip install 'visattn[hf]')
        NotRecordedError,  # --layer names no recorded attention module
        RunFolderBusy,  # another process trains in the run folder
        NonFiniteLossError,  # the run diverged; last.pt is the last good state
    )


def _show_traceback(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "traceback", False)) or os.environ.get("VISATTN_TRACEBACK", "") not in ("", "0")


def _one_line(err: BaseException) -> str:
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    text = " ".join(str(message).split())
    return _printable(text) or type(err).__name__


def _printable(text: str) -> str:
    """`text` with every character a terminal would act on written as its backslash escape:
    control characters and line breaks (`\\x1b`, `\\n`), format characters such as
    bidirectional overrides (`\\u202e`). Names read from checkpoints and folders are printed
    through it, so that they cannot forge log lines or send escape sequences."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _interrupted(command: str, err: KeyboardInterrupt) -> str:
    signum = getattr(err, "signum", signal.SIGINT)
    stopped = f"visattn {command}: " + (
        "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    )
    run_dir = getattr(err, "run_dir", None)
    if run_dir is None:
        return stopped
    if getattr(err, "resumable", False):
        return f"{stopped}; continue the run with --resume {run_dir}"
    return f"{stopped} before the first checkpoint; nothing to resume ({run_dir} was not kept)"


def _user_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a sub-command so that every mistake ends in one line on stderr: ``visattn CMD: error:
    ...`` with exit status 2 (1 for an unexpected internal error); Ctrl-C exits with 130, and
    SIGTERM, handled the same way (`sigterm_raises`), with 143.
    ``--traceback`` or ``VISATTN_TRACEBACK=1`` lets the exception through instead."""

    def run(args: argparse.Namespace) -> int:
        try:
            with sigterm_raises():
                return command(args)
        except KeyboardInterrupt as err:
            if _show_traceback(args):
                raise
            print(_interrupted(args.command, err), file=sys.stderr)
            return 128 + getattr(err, "signum", signal.SIGINT)
        except Exception as err:
            if _show_traceback(args):
                raise
            if isinstance(err, _user_error_types()):
                print(f"visattn {args.command}: error: {_one_line(err)}", file=sys.stderr)
                return 2
            print(
                f"visattn {args.command}: internal error: {type(err).__name__}: {_one_line(err)} "
                "(rerun with --traceback and report it)",
                file=sys.stderr,
            )
            return 1

    run.__doc__ = command.__doc__
    return run


def _cmd_train(args: argparse.Namespace) -> int:
    """Train from a config (or resume a run), then show where the model looks; the loop is
    `visattn.train.engine.fit`, the page `_write_run_explorer` (``run.explorer=false``: none)."""
    from .train.config import load_config
    from .train.engine import fit
    from .train.resume import load_run_config

    overrides = [*args.overrides, *args.set]
    if args.resume:
        if args.config:
            raise ValueError("--resume continues a run with its saved config; give overrides, not --config")
        cfg, _ = load_run_config(args.resume, overrides)
    else:
        cfg = load_config(args.config, overrides)
    fit(cfg, resume=args.resume, at_end=_write_run_explorer if cfg.run.explorer else None)
    return 0


#: how many held-out pictures the explorer page at the end of a training run shows
RUN_EXPLORER_PICTURES = 8


def _write_run_explorer(run_dir: Path, model: torch.nn.Module, test_set: Any, data_spec: DataSpec) -> None:
    """``RUN/explorer.html`` (`visattn.explore`): where the trained model looks in a few held-out
    pictures, one of each class in turn; its path is the last line printed. Nothing for data
    that has no pictures to show (``fake``); a model that records no attention (a CNN without
    attention blocks) gets a line saying so instead."""
    from .explain.explore import explore
    from .train.data import held_out_pictures

    pictures = held_out_pictures(test_set, RUN_EXPLORER_PICTURES)
    if not pictures:
        return
    title = f"{run_dir.name}: held-out {data_spec.name} pictures"
    try:
        page = explore(model, pictures, run_dir / "explorer.html", data_config=data_spec, title=title)
    except ValueError as err:  # nothing recorded, or nothing finite: the run itself is complete
        print(f"no explorer page: {_one_line(err)}")
        return
    print(f"where the model looks in {len(pictures)} held-out pictures ({page.bytes / 1e6:.2f} MB): {page.path}")


def _held_out(args: argparse.Namespace) -> tuple[Path, dict, torch.nn.Module, Any, Any, DataSpec]:
    """`--checkpoint` (`--data`, `--data-root`, `--set`) → the checkpoint file, its state, its
    model (eval mode), its resolved config, the held-out split of its data set and that set's data
    spec (see `_held_out_config` for what of the stored config is used)."""
    from .train.data import build_datasets
    from .weights.checkpoint import load_checkpoint, model_from_checkpoint

    path = _checkpoint_file(args.checkpoint)
    state = load_checkpoint(path)
    if not isinstance(state.get("config"), dict):
        raise ValueError(
            f"{path} holds no training config (not written by visattn train); "
            f"evaluate it from Python (visattn.train.engine.evaluate, visattn.explain.metrics)"
        )
    model = model_from_checkpoint(state, source=path)
    cfg = _held_out_config(args, state["config"], path)
    _, test_set, data_spec = build_datasets(cfg.data)
    classes = state["model_config"].get("num_classes")
    if classes is not None and data_spec.num_classes != classes:
        raise ValueError(f"the model has {classes} classes but {cfg.data.name} has {data_spec.num_classes}")
    return path, state, model, cfg, test_set, data_spec


#: data sets read from a folder: `eval` and `evaluate-maps` read only a folder their command line names
FOLDER_DATASETS = ("imagefolder", "cifar10", "cifar100")


def _held_out_config(args: argparse.Namespace, saved: dict, path: Path) -> Any:
    """A checkpoint's training config with the command line's data choices (`--data`,
    `--data-root`, `--set`). The checkpoint is data, so nothing stored in it makes `eval`
    reach the network or read a folder: `data.download` is off (the command line cannot turn it
    on), and an image folder or CIFAR is read from the folder the command line gives
    (`--data-root DIR` or `--set data.root=DIR`), never from the checkpoint's `data.root`."""
    from .train.config import load_config

    overrides = ["data.download=false", *([f"data.name={args.data}"] if args.data else []), *args.set]
    cfg = load_config(base=saved, overrides=overrides)
    if cfg.data.download:
        raise ValueError(
            "this command never downloads data: drop data.download=true and put the files in the folder given with "
            "--data-root DIR (`visattn train ... data.download=true` fetches them)"
        )
    given = args.data_root is not None or any(item.split("=", 1)[0].strip() == "data.root" for item in args.set)
    if args.data_root is not None:
        cfg.data.root = args.data_root
    if cfg.data.name in FOLDER_DATASETS and not given:
        stored = saved.get("data", {}).get("root") if isinstance(saved.get("data"), dict) else None
        raise ValueError(
            f"{path} was trained on {cfg.data.name} data from the folder {stored!r}; a folder a checkpoint names is "
            f"not read: give the folder of the {cfg.data.name} data to evaluate on with --data-root DIR"
        )
    return cfg


def _cmd_eval(args: argparse.Namespace) -> int:
    """Top-1/top-5 and a per-class table of a checkpoint on its dataset's held-out split."""
    from torch.utils.data import DataLoader

    from .train.engine import evaluate
    from .train.imagefolder import collate_readable

    path, _, model, cfg, test_set, data_spec = _held_out(args)
    assert data_spec.num_classes is not None and data_spec.class_names is not None  # build_datasets sets both
    loader = DataLoader(test_set, batch_size=args.batch, collate_fn=collate_readable)
    stats = evaluate(model, loader, num_classes=data_spec.num_classes)
    print(f"{path}: {cfg.data.name} held-out split, {len(test_set)} images")
    print(f"top-1 {stats['acc1']:.2%}  top-5 {stats['acc5']:.2%}  loss {stats['loss']:.4f}")
    print(f"{'class':<16}{'images':>8}{'top-1':>9}")
    for name, correct, count in zip(
        data_spec.class_names, stats["per_class_correct"], stats["per_class_count"], strict=True
    ):
        acc = f"{correct / count:.2%}" if count else "-"
        print(f"{_printable(name):<16}{int(count):>8}{acc:>9}")
    return 0


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _cmd_evaluate_maps(args: argparse.Namespace) -> int:
    """Pointing game, deletion, insertion and randomization test of a checkpoint's maps, with baselines."""
    from torch.utils.data import DataLoader, Subset

    from ._io import atomic_write_json
    from .explain.evaluate import evaluate_maps, format_randomization, format_table, plot_curves, summarize

    methods, metrics = _names(args.methods), _names(args.metrics)
    plotted = bool({"deletion", "insertion"} & set(metrics))
    out = Path(args.out) if args.out else _checkpoint_file(args.checkpoint).parent / "evaluate-maps"
    written = [Path(f"{out}.json")] + ([Path(f"{out}.png")] if plotted else [])
    for file, kind in zip(written, ("JSON", "PNG"), strict=False):
        _check_output(args, file, kind)
    path, _, model, cfg, test_set, _ = _held_out(args)
    count = min(args.limit or len(test_set), len(test_set))
    images, labels = next(iter(DataLoader(Subset(test_set, range(count)), batch_size=count)))
    boxes = getattr(test_set, "boxes", None)
    result = evaluate_maps(
        model,
        images,
        methods=methods,
        metrics=metrics,
        boxes=None if boxes is None else boxes[:count],
        layer=_layer(args.layer),
        steps=args.steps,
        batch_size=args.batch,
        seed=args.seed,
    )
    correct = int((result.predictions == labels).sum())
    summary = {"checkpoint": str(path), "data": cfg.data.name, "images": count, "accuracy": correct / count}
    summary.update(steps=args.steps, deletion_baseline="blur", **summarize(result))
    print(f"{path}: {cfg.data.name} held-out split, {count} images, top-1 {correct / count:.2%}; {summary['interval']}")
    print(format_table(summary))
    if "randomization" in metrics:
        print(format_randomization(summary))
    atomic_write_json(written[0], summary)
    if plotted:
        plot_curves(summary, written[1], title=f"{path} on {cfg.data.name} ({count} images)", force=args.force)
    print("wrote " + ", ".join(map(str, written)))
    return 0


def _layer(text: str | None) -> int | str:
    layer = "-1" if text is None else text
    return int(layer) if layer.lstrip("-").isdigit() else layer


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="a YAML file (e.g. configs/digits_canvas_vit.yaml); default: the built-in default job"
    )
    parser.add_argument("--resume", metavar="RUN", help="continue the run folder RUN from its last.pt")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. train.epochs=20 model.depth=4"
    )


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint | --model NAME [--pretrained | --pretrained-file PATH]``, ``--seed``, ``--img-size``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a visattn checkpoint (RUN/best.pt) or a run folder RUN")
    source.add_argument(
        "--model", help="any name visattn.create_model accepts (`visattn models`, timm/torchvision names, timm:NAME)"
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument(
        "--pretrained", action="store_true", help="--model's published weights (timm's/torchvision's download or cache)"
    )
    weights.add_argument(
        "--pretrained-file",
        metavar="PATH",
        help="--model's weights: a folder from save_pretrained or training, a checkpoint, or a .safetensors/.pth file",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of --model's untrained weights")
    parser.add_argument("--img-size", type=_size, metavar="H,W", help="input size for --model (default: its own)")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _head(text: str) -> int | str:
    if text == "mean":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected 'mean' or a head number, got {text!r}")
    return int(text)


def _add_force_argument(parser: argparse.ArgumentParser, what: str = "an existing --out file of another kind") -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"replace {what} (without it only a file of the same kind is replaced; an input never is)",
    )


def _methods_that(flag: str, among: Sequence[str] | None = None) -> str:
    """The map methods (of ``among``, default all) whose :class:`~visattn.explain.maps.MethodSpec` has
    ``flag`` set, as text: ``"cls, query, received"``."""
    from .explain.maps import METHODS

    return ", ".join(name for name, spec in METHODS.items() if getattr(spec, flag) and name in (among or METHODS))


def _add_overlay_arguments(overlay: argparse.ArgumentParser) -> None:
    from .explain.maps import METHODS

    _add_model_arguments(overlay)
    overlay.add_argument(
        "--image", required=True, help="the picture (any size, RGB or gray); the overlay has its width and height"
    )
    overlay.add_argument(
        "--method",
        required=True,
        choices=list(METHODS),
        help=f"the map; {_methods_that('needs_class_token')} needs a class token, "
        f"{_methods_that('needs_query')} a --query point",
    )
    overlay.add_argument(
        "--query",
        type=_pair,
        metavar="X,Y",
        help=f"pixel (column,row) of the original picture, at full size, for --method {_methods_that('needs_query')}",
    )
    overlay.add_argument(
        "--layer", help=f"attention module path or position for {_methods_that('reads_layer')} (default -1: the last)"
    )
    overlay.add_argument(
        "--head",
        type=_head,
        default="mean",
        help=f"{_methods_that('per_head')}: 'mean' of the heads (default) or a head number",
    )
    overlay.add_argument(
        "--panels",
        action="store_true",
        help="the picture and every head's map side by side with a title (a picture over 2048 px is reduced)",
    )
    overlay.add_argument(
        "--target", type=int, help=f"class for {_methods_that('needs_gradients')} (default: the predicted one)"
    )
    overlay.add_argument("--head-fusion", default="mean", choices=["mean", "max", "min"], help="rollout head fusion")
    overlay.add_argument(
        "--discard-ratio", type=float, default=0.0, help="rollout: drop this fraction of weakest links"
    )
    overlay.add_argument("--cmap", default="inferno", help="matplotlib colormap")
    overlay.add_argument("--alpha", type=float, default=0.5, help="opacity of the map")
    overlay.add_argument("--out", required=True, help="the picture to write (PNG, or the format of its extension)")
    _add_force_argument(overlay)


def _add_explore_arguments(explore: argparse.ArgumentParser) -> None:
    _add_model_arguments(explore)
    explore.add_argument("--image", action="append", required=True, help="a picture (any size); repeat for several")
    explore.add_argument("--out", required=True, help="the HTML file to write (e.g. explorer.html)")
    _add_force_argument(explore)
    explore.add_argument(
        "--max-mb",
        type=_positive_float,
        default=20.0,
        help="size budget of the page in MB (default 20); query cells are subsampled beyond it",
    )
    explore.add_argument("--title", help="the page's title (default: the checkpoint or model)")
    explore.add_argument("--cmap", default="inferno", help="colormap the page opens with")
    explore.add_argument("--alpha", type=float, default=0.6, help="opacity the page opens with")


def _add_data_root_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-root",
        metavar="DIR",
        help="the folder of an imagefolder or CIFAR data set to evaluate on (needed for them: "
        "the data.root a checkpoint stores is never read)",
    )


def _add_evaluate_maps_arguments(parser: argparse.ArgumentParser) -> None:
    from .explain.metrics import METHODS

    parser.add_argument("--checkpoint", required=True, help="a run folder (its best.pt) or a checkpoint")
    parser.add_argument("--data", help="the data set to use instead of the checkpoint's (same classes)")
    _add_data_root_argument(parser)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a data key, e.g. data.root=/data"
    )
    parser.add_argument("--methods", default="rollout,grad_rollout", help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument(
        "--metrics",
        default="pointing,deletion,insertion,randomization",
        help="comma-separated: pointing (needs boxes, e.g. digits_canvas), deletion, insertion, randomization",
    )
    one_layer = _methods_that("reads_layer", among=METHODS)
    parser.add_argument("--layer", help=f"attention module path or position for {one_layer} (default -1)")
    parser.add_argument("--limit", type=_positive_int, help="only the first N held-out images (default all)")
    parser.add_argument("--steps", type=_positive_int, default=32, help="points of the deletion/insertion curves - 1")
    parser.add_argument("--batch", type=_positive_int, default=256, help="pictures per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random map and of the randomization test")
    parser.add_argument(
        "--out", help="PREFIX of PREFIX.json and PREFIX.png (default: evaluate-maps next to the checkpoint)"
    )
    _add_force_argument(parser, "existing files of another kind at PREFIX.json and PREFIX.png")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (``visattn CMD: error: ... (see --help)``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _with_traceback(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--traceback", action="store_true", help="show the full traceback of an error (also VISATTN_TRACEBACK=1)"
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="visattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="list the named models")
    models.set_defaults(func=_cmd_models)
    demo = sub.add_parser("demo", help="one forward pass of a named model on random input")
    demo.add_argument("--model", default="vit_digits_patch4_16", help="a name from `visattn models`")
    demo.add_argument("--batch", type=_positive_int, default=2, help="pictures in the random batch")
    _with_traceback(demo).set_defaults(func=_user_errors(_cmd_demo))
    overlay = sub.add_parser("overlay", help="an attention map of one picture, drawn on it, as a PNG")
    _add_overlay_arguments(overlay)
    _with_traceback(overlay).set_defaults(func=_user_errors(_cmd_overlay))
    explore = sub.add_parser("explore", help="an interactive HTML page of where the model looks in your pictures")
    _add_explore_arguments(explore)
    _with_traceback(explore).set_defaults(func=_user_errors(_cmd_explore))
    sites = sub.add_parser("sites", help="candidate places for attention in a CNN, with their costs")
    sites.add_argument("model", help="e.g. torchvision:resnet50, timm:convnext_atto, resnet18_small")
    sites.add_argument("--input-size", type=int, nargs=3, default=[3, 224, 224], metavar=("C", "H", "W"))
    sites.add_argument("--heads", type=_positive_int, default=1)
    sites.add_argument("--block", default="global", help="the attention family: global (default), window, ...")
    sites.add_argument("--kv-pool", type=_positive_int, default=None, help="global attention: pool keys and values")
    sites.add_argument(
        "--block-arg",
        type=_block_argument,
        action="append",
        metavar="KEY=VALUE",
        help="an option of the block, e.g. window_size=8 (repeatable)",
    )
    sites.add_argument("--depth", type=_positive_int, default=None, help="only paths with at most this many parts")
    sites.add_argument("--leaves", action="store_true", help="also list single layers")
    _with_traceback(sites).set_defaults(func=_user_errors(_cmd_sites))
    bench = sub.add_parser("bench", add_help=False, help="the benchmark suite (options: visattn bench --help)")
    bench.set_defaults(func=_cmd_bench, bench_args=[])
    train = sub.add_parser("train", help="train a model (same as python train.py)")
    _add_train_arguments(train)
    _with_traceback(train).set_defaults(func=_user_errors(_cmd_train))
    evaluate = sub.add_parser("eval", help="top-1/top-5 and per-class accuracy of a checkpoint")
    evaluate.add_argument(
        "--checkpoint", required=True, help="a run folder (its best.pt) or a checkpoint, e.g. runs/default/best.pt"
    )
    evaluate.add_argument("--data", help="evaluate on another dataset name (same classes), e.g. digits")
    _add_data_root_argument(evaluate)
    evaluate.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a data key, e.g. data.root=/data"
    )
    evaluate.add_argument("--batch", type=_positive_int, default=256, help="pictures per forward pass")
    _with_traceback(evaluate).set_defaults(func=_user_errors(_cmd_eval))
    maps = sub.add_parser(
        "evaluate-maps", help="pointing game, deletion, insertion, randomization test of a checkpoint's maps"
    )
    _add_evaluate_maps_arguments(maps)
    _with_traceback(maps).set_defaults(func=_user_errors(_cmd_evaluate_maps))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """The process entry point (the ``visattn`` command, ``train.py``): :func:`main`, then exit.

    The garbage collector is frozen before the exit: interpreter teardown otherwise collects
    every object that torch, torchvision and timm created (1.3-1.5 s on the AMD EPYC, against
    0.25-0.3 s frozen; docs/results.md). In-process callers use :func:`main`, which leaves it alone.
    """
    code = main(argv)
    gc.freeze()
    raise SystemExit(code)


if __name__ == "__main__":
    run()
