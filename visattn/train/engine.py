"""Training and evaluation: the loop behind ``python train.py`` and ``visattn train``.

`fit` reads top to bottom: processes → run folder → data → model → precision → recipe → resume →
epochs (train, evaluate, log, checkpoint) → final weights. The jobs around the loop have modules
of their own: `visattn.train.distributed` (processes, loaders, reductions), `run_folder` (claim,
lock, release, metrics file, curves), `resume` (saved config, allowed overrides), `precision`
(the rule behind ``train.amp=auto``), `recipe` (optimizer, schedule, loss, EMA) and
`checkpoints` (``last.pt``, ``best.pt``).

Reproducibility: all random generators are re-seeded at the start of every epoch from
``(train.seed, epoch, rank)`` and the shuffling order depends only on ``(train.seed, epoch)``, so
the epoch number stored in ``last.pt`` fixes the random state, and a run killed at any moment
and resumed ends with the same metrics as one that was never interrupted.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from .._io import atomic_write_text
from ..data_spec import DataSpec
from ..models.registry import create_model
from ..weights.checkpoint import load_checkpoint
from ..weights.hub import load_pretrained
from ..weights.stored_config import config_for_weights
from .budget import check_training_config
from .checkpoints import Checkpoints, Progress
from .config import config_to_dict
from .data import build_datasets
from .distributed import (
    Processes,
    dataset_size,
    end_processes,
    eval_loader,
    init_processes,
    mean_over_processes,
    sum_over_processes,
    train_loader,
    unwrap,
)
from .imagefolder import UnreadableImages
from .precision import DTYPE_NAMES, autocast, run_precision
from .recipe import Recipe, build_recipe
from .resume import check_resume_config
from .run_folder import (
    TrainingInterrupted,
    append_metrics,
    claimed_run_folder,
    clean_for_resume,
    plot_curves,
    preload_plotting,
)

__all__ = [
    "NonFiniteLossError",
    "RunEnd",
    "TrainingInterrupted",
    "build_model",
    "enable_grad_checkpointing",
    "evaluate",
    "fit",
    "train_one_epoch",
]

#: what `fit` calls last, on the main process: ``(run folder, final model, held-out set, data config)``
RunEnd = Callable[[Path, nn.Module, Dataset, DataSpec], None]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped and ``last.pt`` is the last good state."""


def fit(cfg: DictConfig, resume: str | os.PathLike | None = None, at_end: RunEnd | None = None) -> dict[str, Any]:
    """Train the model of ``cfg`` and return the final epoch's metrics (and ``run_dir``).

    ``resume``: a run folder (or a checkpoint in it) to continue from its ``last.pt``; ``cfg``
    must then be the saved config with at most the overrides of `visattn.train.resume.RESUME_OVERRIDES`
    (see `visattn.train.resume.load_run_config`). A new run claims its folder (``runs/NAME``,
    ``NAME-2`` ...) before anything is built and locks it while it trains (`visattn.train.run_folder`).
    Every epoch writes ``last.pt`` before ``best.pt``, so a run stopped between any two writes resumes.
    ``at_end``: called last on the main process with the run folder, the final model (the EMA
    weights with EMA), the held-out set and its data spec (``visattn train`` writes the explorer page).

    Ctrl-C (and SIGTERM, where it raises `visattn._utils.Terminated`, as in the ``visattn``
    command) raises `TrainingInterrupted` naming the folder; a full disk raises `DiskFullError`
    saying whether the last checkpoint was kept; a NaN loss `NonFiniteLossError` (after drawing the curves).
    Under ``torchrun`` every process calls this; only rank 0 locks the folder and writes.
    """
    t = cfg.train
    procs = init_processes(t.device)
    log = print if procs.is_main else _silent
    if resume is None:  # a resumed run is checked against its last.pt first, below
        check_training_config(cfg, procs.device, procs.world_size)  # before the run folder exists
    with claimed_run_folder(cfg.run.out_dir, cfg.run.name, resume, procs, (NonFiniteLossError,)) as run_dir:
        last, state = run_dir / "last.pt", None
        if resume is not None:  # read and checked before anything is built or written
            state = load_checkpoint(last, map_location=procs.device)
            check_resume_config(state, cfg, last)

        # data: the training loader's order depends only on (seed, epoch)
        _seed_everything(t.seed, 0, 0)
        train_set, test_set, data_spec = build_datasets(cfg.data)
        train_batches, sampler = train_loader(train_set, t.batch_size, cfg.data.workers, t.seed, procs)
        test_batches = eval_loader(test_set, t.batch_size, cfg.data.workers, procs)

        # model: create_model(name, num_classes=..., in_chans=..., **the config's other keys)
        assert data_spec.num_classes is not None  # build_datasets gives every field
        num_classes, in_chans = data_spec.num_classes, data_spec.in_chans
        model_config = {**config_to_dict(cfg.model), "num_classes": num_classes, "in_chans": in_chans}
        # resumed: the stored config is data, checked against last.pt's weights, which replace the starting ones
        built = model_config if state is None else config_for_weights(model_config, state.get("model"), last)
        if state is not None:
            check_training_config(cfg, procs.device, procs.world_size)
        model = build_model(built).to(procs.device)
        if t.grad_checkpointing:
            enable_grad_checkpointing(model, model_config["name"])
        amp_dtype, reason = run_precision(t.amp, model, (in_chans, *data_spec.img_size), procs, state)
        log(f"precision {DTYPE_NAMES[amp_dtype]}: {reason}")
        log(_sizes_line(model, model_config["name"], data_spec, dataset_size(train_set), dataset_size(test_set)))

        # optimizer, schedule, loss, EMA; resumed: the state of last.pt
        recipe = build_recipe(t, model, len(train_batches), num_classes, amp_dtype)
        extra = {"data_config": data_spec.to_dict(), "config": config_to_dict(cfg)}  # the checkpoints' form
        checkpoints = Checkpoints(run_dir, model, recipe, model_config, extra)
        progress = Progress() if state is None else checkpoints.restore(state)
        if state is not None:
            if procs.is_main:
                clean_for_resume(run_dir, progress.epoch)
            log(f"resumed {run_dir} after epoch {progress.epoch} (step {progress.step})")
        if procs.is_main:
            atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
            if state is not None and checkpoints.rewrite_missed_best(progress):
                best = f"{checkpoints.best} (epoch {progress.best_epoch})"
                log(f"wrote {best} from last.pt: the run had stopped before writing it")
            preload_plotting()

        # the epochs: train, evaluate, log, checkpoint
        train_model = DistributedDataParallel(model) if procs.distributed else model
        if t.compile:  # the training forward and backward; evaluation and checkpoints use the module itself
            # a compiled module is a module (OptimizedModule); torch's stubs type the result as a callable
            train_model = cast(nn.Module, torch.compile(train_model))
        metrics: dict[str, Any] = {}
        started = time.perf_counter()
        for epoch in range(progress.epoch, t.epochs):
            _seed_everything(t.seed, epoch, procs.rank)
            sampler.set_epoch(epoch)
            train_stats, step = train_one_epoch(
                train_model,
                train_batches,
                recipe,
                progress.step,
                procs,
                epoch=epoch,
                progress_bar=cfg.run.progress,
                log_every=cfg.run.log_every,
                checkpoint=last,
            )
            held_out = _evaluate_with_ema(model, recipe, test_batches, procs, num_classes)
            metrics = {"epoch": epoch + 1, "step": step, **train_stats, **held_out}
            metrics["time"] = time.perf_counter() - started
            log(_epoch_line(metrics, t.epochs))
            progress.record(epoch + 1, step, metrics["ema_test_acc1" if recipe.ema is not None else "test_acc1"])
            if procs.is_main:
                append_metrics(run_dir, metrics)
                checkpoints.write(progress)

        # the result: the curves, the last line, and what at_end adds for the run folder's model
        # (the best epoch's, EMA weights with EMA: written with best.pt, loaded by load_pretrained)
        if procs.is_main:
            plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
            if metrics:
                log(_final_line(metrics, recipe.ema is not None, run_dir))
            if at_end is not None and (run_dir / "config.json").is_file():
                at_end(run_dir, load_pretrained(run_dir).to(procs.device), test_set, data_spec)
        end_processes(procs)
    return {k: v for k, v in metrics.items() if "per_class" not in k} | {"run_dir": str(run_dir)}


def build_model(model_config: dict[str, Any]) -> nn.Module:
    """``create_model(**model_config)`` with a config-level error for unknown keyword arguments."""
    config = dict(model_config)
    name = config.pop("name")
    try:
        return create_model(name, **config)
    except TypeError as err:
        if "unexpected keyword" not in str(err):
            raise
        raise ValueError(
            f"model {name!r} does not take an argument given in the config's model section: {err}"
        ) from None


def enable_grad_checkpointing(model: nn.Module, name: str) -> None:
    """``train.grad_checkpointing=true``: timm's ``set_grad_checkpointing``, which visattn's ViTs
    and timm's models have; any other model is refused by name."""
    set_checkpointing = getattr(model, "set_grad_checkpointing", None)
    if not callable(set_checkpointing):
        raise ValueError(
            f"train.grad_checkpointing=true: model {name!r} ({type(model).__name__}) has no set_grad_checkpointing; "
            "visattn's ViTs and HybridViT and timm models have it, torchvision models do not"
        )
    set_checkpointing(True)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    recipe: Recipe,
    step: int,
    procs: Processes,
    *,
    epoch: int = 0,
    progress_bar: str = "lines",
    log_every: int = 0,
    checkpoint: Path | None = None,
) -> tuple[dict[str, float], int]:
    """One pass over ``loader``; returns ``({"train_loss", "lr", "images_per_s", "epoch_s", "data_s",
    "train_unreadable"}, step)``.

    ``progress_bar``: ``run.progress`` (``bar``, ``lines``, ``auto``: a bar on a terminal); with
    lines, one every ``log_every`` steps (0: none). ``checkpoint``: the ``last.pt`` a NaN names.
    ``data_s`` is the part of ``epoch_s`` spent waiting for the loader (batches and augmentation).
    ``train_unreadable`` counts the pictures dropped from their batches because they could not be
    read (named in a line printed after the epoch); more than allowed stops the run
    (`visattn.train.imagefolder.UnreadableImages`).

    The scheduler is stepped per update. The loss is averaged over processes every step, and a
    NaN/inf loss raises `NonFiniteLossError` naming the step (in every process at once).
    """
    model.train()
    total_loss, images, data_seconds, started = 0.0, 0, 0.0, time.perf_counter()
    batches = _with_bar(loader, epoch, progress_bar, procs.is_main)
    skips = UnreadableImages.training(epoch + 1, dataset_size(loader.dataset) // procs.world_size)
    waited = time.perf_counter()
    batch = -1
    for batch, (x, y) in enumerate(skips.batches(batches, procs.distributed)):
        data_seconds += time.perf_counter() - waited
        x, y = x.to(procs.device, non_blocking=True), y.to(procs.device, non_blocking=True)
        if recipe.mixup is not None:
            x, y = recipe.mixup(x, y)
        with autocast(procs.device, recipe.amp_dtype):
            loss = recipe.loss_fn(model(x), y)
        reduced = mean_over_processes(loss.detach().float(), procs)
        if not torch.isfinite(reduced):
            where = f"; the last good state is {checkpoint}" if checkpoint is not None and checkpoint.exists() else ""
            raise NonFiniteLossError(
                f"training loss is {reduced.item()} at step {step + 1} (epoch {epoch + 1}); "
                f"stopping (lower train.lr or set train.clip_grad){where}"
            )
        recipe.update(model, loss)
        step += 1
        recipe.scheduler.step_update(num_updates=step)
        if recipe.ema is not None:
            recipe.ema.update(unwrap(model), step=step)
        total_loss += reduced.item()
        images += len(x) * procs.world_size
        if hasattr(batches, "set_postfix"):
            batches.set_postfix(loss=f"{reduced.item():.4f}")
        elif procs.is_main and log_every and (batch + 1) % log_every == 0:
            print(f"  epoch {epoch + 1} step {batch + 1}/{len(loader)} loss {reduced.item():.4f}", flush=True)
        waited = time.perf_counter()
    seconds = time.perf_counter() - started
    if skips.unreadable:
        print(f"  {skips.summary()}", flush=True)
    return {
        "train_loss": total_loss / max(1, batch + 1),
        "lr": recipe.optimizer.param_groups[0]["lr"],
        "images_per_s": images / seconds,
        "epoch_s": seconds,
        "data_s": data_seconds,
        "train_unreadable": len(skips.unreadable),
    }, step


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    procs: Processes | None = None,
    amp_dtype: torch.dtype | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Loss, top-1 and top-5 accuracy (fractions), and per-class ``correct``/``count`` tensors.

    In a multi-process run each process evaluates its shard and the sums are reduced. A picture
    that cannot be read stops the evaluation (`UnreadableImages.held_out`): an accuracy
    over part of the held-out set is not reported as if it were over all of it.
    """
    procs = procs or Processes()
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=procs.device)
    top1 = torch.zeros((), dtype=torch.float64, device=procs.device)
    top5 = torch.zeros((), dtype=torch.float64, device=procs.device)
    per_class_correct = torch.zeros(num_classes or 0, dtype=torch.float64, device=procs.device)
    per_class_count = torch.zeros_like(per_class_correct)
    for x, y in UnreadableImages.held_out().batches(loader):
        x, y = x.to(procs.device), y.to(procs.device)
        with autocast(procs.device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit1 = ranked[:, 0] == y
        top1 += hit1.sum()
        top5 += (ranked == y[:, None]).any(dim=1).sum()
        if num_classes:
            per_class_correct.index_add_(0, y, hit1.double())
            per_class_count.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    totals = torch.stack([loss_sum, top1, top5])
    count = torch.tensor(float(dataset_size(loader.dataset)), dtype=torch.float64, device=procs.device)
    sum_over_processes([totals, count, per_class_correct, per_class_count], procs)
    return {
        "loss": (totals[0] / count).item(),
        "acc1": (totals[1] / count).item(),
        "acc5": (totals[2] / count).item(),
        "per_class_correct": per_class_correct.cpu(),
        "per_class_count": per_class_count.cpu(),
    }


def _evaluate_with_ema(
    model: nn.Module, recipe: Recipe, loader: DataLoader, procs: Processes, num_classes: int
) -> dict[str, Any]:
    """`evaluate` of the model (``test_*`` keys) and, with EMA, of the EMA weights (``ema_test_*``)."""
    weights = {"test_": model} | ({"ema_test_": recipe.ema.module} if recipe.ema is not None else {})
    return {
        prefix + key: value
        for prefix, module in weights.items()
        for key, value in evaluate(module, loader, procs, recipe.amp_dtype, num_classes).items()
    }


def _seed_everything(seed: int, epoch: int, rank: int) -> None:
    """Seed Python's, numpy's and torch's generators from ``(seed, epoch, rank)``."""
    derived = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)


def _with_bar(loader: DataLoader, epoch: int, mode: str, is_main: bool) -> Iterable:
    """``loader``, wrapped in a tqdm bar on the main process for ``run.progress`` = ``mode``."""
    if not is_main or mode == "lines" or (mode == "auto" and not sys.stderr.isatty()):
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True)


def _sizes_line(model: nn.Module, name: str, data_spec: DataSpec, train_images: int, test_images: int) -> str:
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    return (
        f"model {name}: {parameters:.2f} M parameters; data {data_spec.name}: "
        f"{train_images} train / {test_images} test images of {list(data_spec.img_size)}"
    )


def _epoch_line(m: dict[str, Any], epochs: int) -> str:
    line = (
        f"epoch {m['epoch']:>3}/{epochs} train_loss {m['train_loss']:.4f} test_loss {m['test_loss']:.4f} "
        f"test_acc1 {m['test_acc1']:.2%} test_acc5 {m['test_acc5']:.2%}"
    )
    if "ema_test_acc1" in m:
        line += f" ema_acc1 {m['ema_test_acc1']:.2%}"
    line += f" lr {m['lr']:.2e} {m['images_per_s']:.0f} img/s {m['time']:.1f}s"
    return line + (f" unreadable {m['train_unreadable']} skipped" if m.get("train_unreadable") else "")


def _final_line(m: dict[str, Any], ema: bool, run_dir: Path) -> str:
    accuracy = m["ema_test_acc1" if ema else "test_acc1"]
    weights = "EMA weights, " if ema else ""
    return f"final test accuracy {accuracy:.2%} ({weights}epoch {m['epoch']}); run folder {run_dir}"


def _silent(*args: Any, **kwargs: Any) -> None:
    pass
