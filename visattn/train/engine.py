"""Training and evaluation: the loop behind ``python train.py`` and ``visattn train``.

:func:`fit` reads top to bottom: processes → run folder → data → model → recipe (AdamW without
decay on norms/biases/positions, cosine schedule with warmup, label smoothing, Mixup/CutMix,
gradient clipping, EMA, bf16/fp16 autocast) → resume → epochs (train, evaluate, log,
checkpoint) → final weights. Every piece is a function of its own, importable and tested.

Reproducibility: all random generators are re-seeded at the start of every epoch from
``(train.seed, epoch, rank)`` and the shuffling order depends only on ``(train.seed, epoch)``, so
the epoch number stored in ``last.pt`` fixes the random state, and a run killed at any moment
and resumed ends with the same metrics as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler, Subset

from .._io import (
    CheckpointError,
    DiskFullError,
    atomic_append_text,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    check_output,
    save_safetensors,
)
from .._utils import cpu_has_native_bf16
from ..models.registry import create_model
from ..weights.checkpoint import load_checkpoint, save_checkpoint
from ..weights.stored_config import config_for_weights
from .config import ConfigError, config_to_dict, load_config
from .data import build_datasets
from .imagefolder import UnreadableImages, collate_readable
from .lock import lock_run_folder
from .tensor_dataset import TensorImageDataset

__all__ = [
    "RESUME_OVERRIDES",
    "NonFiniteLossError",
    "TrainingInterrupted",
    "check_resume_config",
    "build_model",
    "choose_precision",
    "enable_grad_checkpointing",
    "evaluate",
    "fit",
    "load_run_config",
    "plot_curves",
    "train_one_epoch",
    "write_safetensors",
]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped and ``last.pt`` is the last good state."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during `fit`: ``run_dir`` is the run's folder, ``resumable`` whether it
    holds a ``last.pt``, ``signum`` the signal (`signal.SIGINT` or `signal.SIGTERM`)."""

    def __init__(self, run_dir: Path, resumable: bool, signum: int = signal.SIGINT) -> None:
        super().__init__(str(run_dir))
        self.run_dir, self.resumable, self.signum = run_dir, resumable, signum


#: the config keys an override may change when a run is resumed (the others shaped the saved
#: state: changing them would continue a different run, or fail half-way)
#: keys a resumed run may change: they change neither the arithmetic nor the state (checkpointing
#: recomputes activations, giving the same gradients)
RESUME_OVERRIDES = ("train.epochs", "run.progress", "run.log_every", "train.grad_checkpointing")


@dataclass
class Processes:
    """This process's place in a (possibly single-process) data-parallel run."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# --- the whole job -------------------------------------------------------------------------


@dataclass
class Recipe:
    """Everything a training step uses besides the model and the data."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: nn.Module
    amp_dtype: torch.dtype | None = None
    mixup: Mixup | None = None
    ema: ModelEmaV3 | None = None
    scaler: torch.amp.GradScaler | None = None
    clip_grad: float | None = None


def fit(cfg: DictConfig, resume: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train the model of ``cfg`` and return the final epoch's metrics.

    ``resume``: a run folder (or a checkpoint in it) to continue from its ``last.pt``; ``cfg``
    must then be the saved config with at most the overrides of :data:`RESUME_OVERRIDES`
    (see :func:`load_run_config`). A new run claims its folder (``runs/NAME``, ``NAME-2`` ...)
    with an exclusive ``mkdir`` before anything is built, so two runs never share one; if it
    fails or is interrupted before its first checkpoint, the folder is removed again.
    While it trains, the folder is locked (`visattn.train.lock`): another process that asks for
    it fails with `RunFolderBusy` naming this one's PID. Every epoch writes ``last.pt`` before
    ``best.pt``, so a run stopped between any two writes resumes.
    Ctrl-C (and SIGTERM, where it raises `visattn._utils.Terminated`, as in the ``visattn``
    command) raises `TrainingInterrupted` naming the folder; a full disk raises `DiskFullError`
    saying whether the last checkpoint was kept.
    Under ``torchrun`` every process calls this; only rank 0 locks the folder and writes.
    """
    procs = init_processes(cfg.train.device)
    out_dir = Path(cfg.run.out_dir).absolute()
    new_folders = [folder for folder in (out_dir, *out_dir.parents) if not folder.exists()]  # deepest first
    run_dir, lock = _agreed_run_dir(cfg, resume, procs)
    log = print if procs.is_main else _silent
    try:
        with lock:
            run, loaders, start = _prepare(cfg, resume, procs, run_dir, log)
            if procs.is_main:  # after the precision timing, which it would disturb
                _preload_plotting()
            metrics = run.epochs(*loaders, *start)
            run.finish(metrics)
    except BaseException as err:
        stopped = _stopped(err, run_dir, procs, resume is None, new_folders)
        if stopped is err:
            raise
        raise stopped from err
    return {k: v for k, v in metrics.items() if "per_class" not in k} | {"run_dir": str(run_dir)}


def _stopped(
    err: BaseException, run_dir: Path, procs: Processes, new_run: bool, new_folders: list[Path]
) -> BaseException:
    """After ``err`` stopped a run: remove a new run's folder if it holds no checkpoint, draw the
    curves of a run whose loss diverged, and return the exception to raise: ``err`` itself, or
    one that says what was kept (`TrainingInterrupted` for Ctrl-C and SIGTERM, `DiskFullError`)."""
    if procs.is_main and new_run:
        _release(run_dir, new_folders)
    if procs.is_main and isinstance(err, NonFiniteLossError) and (run_dir / "metrics.jsonl").is_file():
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    resumable = (run_dir / "last.pt").is_file()
    if isinstance(err, KeyboardInterrupt) and not isinstance(err, TrainingInterrupted):
        return TrainingInterrupted(run_dir, resumable, getattr(err, "signum", signal.SIGINT))
    if isinstance(err, DiskFullError):
        if resumable:
            last = run_dir / "last.pt"
            kept = f"the last complete checkpoint {last} is kept: free space, then continue with --resume {run_dir}"
        else:
            gone = "" if run_dir.exists() else f" ({run_dir} was removed)"
            kept = f"the run stopped before its first checkpoint, so there is nothing to resume{gone}"
        return DiskFullError(err.path, kept)
    return err


def _prepare(
    cfg: DictConfig, resume: str | os.PathLike | None, procs: Processes, run_dir: Path, log: Callable[..., None]
) -> tuple[_Run, tuple[DataLoader, DistributedSampler, DataLoader], tuple[int, int, float]]:
    """Data, model, recipe and (on resume) the restored state; writes ``config.yaml`` last.

    Returns the run, its ``(train loader, sampler, test loader)`` and ``(start epoch, step, best)``.
    """
    state = None
    if resume is not None:  # read and checked before anything is built or written
        state = load_checkpoint(run_dir / "last.pt", map_location=procs.device)
        check_resume_config(state, cfg, run_dir / "last.pt")
    _seed_everything(cfg.train.seed, 0, 0)
    train_set, test_set, data_config = build_datasets(cfg.data)
    train_loader, train_sampler = _train_loader(train_set, cfg, procs)
    test_loader = _eval_loader(test_set, cfg, procs)

    # model: create_model(name, num_classes=..., in_chans=..., **the config's other keys)
    model_config = {
        **config_to_dict(cfg.model),
        "num_classes": data_config["num_classes"],
        "in_chans": data_config["in_chans"],
    }
    # resumed: the stored config is data, checked against last.pt's weights, which replace the starting ones
    built = model_config if state is None else config_for_weights(model_config, state.get("model"), run_dir / "last.pt")
    model = build_model(built).to(procs.device)
    if cfg.train.grad_checkpointing:
        enable_grad_checkpointing(model, model_config["name"])
    amp_dtype, reason = _agreed_precision(cfg.train.amp, model, train_loader, procs, state)
    log(f"precision {DTYPE_NAMES[amp_dtype]}: {reason}")
    log(
        f"model {model_config['name']}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; "
        f"data {data_config['name']}: {len(train_set)} train / {len(test_set)} test images of {data_config['img_size']}"
    )
    recipe = build_recipe(cfg.train, model, len(train_loader), data_config["num_classes"], amp_dtype)
    start = (0, 0, -1.0)
    if state is not None:
        start = _restore(state, model, recipe, run_dir / "last.pt")
        if procs.is_main:
            _truncate_metrics(run_dir / "metrics.jsonl", start[0])
            for leftover in run_dir.glob("*.tmp"):  # an atomic write cut short by a kill
                leftover.unlink(missing_ok=True)
        log(f"resumed {run_dir} after epoch {start[0]} (step {start[1]})")
    if procs.is_main:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    run = _Run(cfg, procs, run_dir, model, recipe, model_config, data_config, log)
    if state is not None:
        run.resume_best(state)
    return run, (train_loader, train_sampler, test_loader), start


def build_recipe(
    t: DictConfig, model: nn.Module, steps_per_epoch: int, num_classes: int, amp_dtype: torch.dtype | None
) -> Recipe:
    """Optimizer (timm names; no decay on norms, biases, positions), schedule per update, loss
    (label smoothing, or soft targets under Mixup/CutMix), EMA and gradient scaler from ``train``."""
    optimizer = create_optimizer_v2(
        model, opt=t.opt, lr=t.lr, weight_decay=t.weight_decay, momentum=t.momentum, **_fast_optimizer_kwargs(t.opt)
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=t.sched,
        num_epochs=t.epochs,
        warmup_epochs=t.warmup_epochs,
        warmup_lr=t.warmup_lr,
        min_lr=t.min_lr,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    mixup = (
        Mixup(
            mixup_alpha=t.mixup,
            cutmix_alpha=t.cutmix,
            prob=t.mixup_prob,
            label_smoothing=t.label_smoothing,
            num_classes=num_classes,
        )
        if t.mixup or t.cutmix
        else None
    )
    return Recipe(
        optimizer=optimizer,
        scheduler=scheduler,
        amp_dtype=amp_dtype,
        mixup=mixup,
        clip_grad=t.clip_grad,
        loss_fn=SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=t.label_smoothing),
        ema=ModelEmaV3(model, decay=t.ema_decay) if t.ema_decay else None,
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
    )


def _restore(state: dict[str, Any], model: nn.Module, recipe: Recipe, path: Path) -> tuple[int, int, float]:
    """Load ``last.pt``'s training state; returns ``(epochs done, updates done, best score)``.

    A state that does not fit the model or recipe of the config raises :class:`CheckpointError`.
    """
    try:
        model.load_state_dict(state["model"])
        recipe.optimizer.load_state_dict(state["optimizer"])
        # timm schedules are functions of the update count: recomputed from the config, so an
        # override such as train.epochs=200 on resume stretches the schedule as asked
        recipe.scheduler.step_update(num_updates=state["step"])
        if recipe.ema is not None:
            recipe.ema.load_state_dict(state["ema"])
        if recipe.scaler is not None:
            recipe.scaler.load_state_dict(state["scaler"])
        return state["epoch"], state["step"], state["best_acc1"]
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} does not fit the model and recipe of its config: {reason}") from err


@dataclass
class _Run:
    """One training run in progress: the epoch loop and the final writes."""

    cfg: DictConfig
    procs: Processes
    run_dir: Path
    model: nn.Module
    recipe: Recipe
    model_config: dict[str, Any]
    data_config: dict[str, Any]
    log: Callable[..., None]
    best_epoch: int = 0  # the epoch whose weights best.pt holds (0: none yet)

    def epochs(
        self,
        train_loader: DataLoader,
        sampler: DistributedSampler,
        test_loader: DataLoader,
        start_epoch: int,
        step: int,
        best: float,
    ) -> dict[str, Any]:
        """Train, evaluate, log and checkpoint every epoch from ``start_epoch``; the last metrics."""
        t, procs, ema = self.cfg.train, self.procs, self.recipe.ema
        train_model = DistributedDataParallel(self.model) if procs.distributed else self.model
        if t.compile:  # the training forward and backward; evaluation and checkpoints use the module itself
            train_model = torch.compile(train_model)
        num_classes = self.data_config["num_classes"]
        metrics: dict[str, Any] = {}
        started = time.perf_counter()
        for epoch in range(start_epoch, t.epochs):
            _seed_everything(t.seed, epoch, procs.rank)
            sampler.set_epoch(epoch)
            train_stats, step = train_one_epoch(
                train_model,
                train_loader,
                self.recipe,
                step,
                procs,
                epoch=epoch,
                cfg=self.cfg,
                checkpoint=self.run_dir / "last.pt",
            )
            test = evaluate(self.model, test_loader, procs, self.recipe.amp_dtype, num_classes)
            metrics = {"epoch": epoch + 1, "step": step, **train_stats, **_prefixed(test, "test_")}
            if ema is not None:
                ema_test = evaluate(ema.module, test_loader, procs, self.recipe.amp_dtype, num_classes)
                metrics.update(_prefixed(ema_test, "ema_test_"))
            metrics["time"] = time.perf_counter() - started
            self.log(_epoch_line(metrics, t.epochs, ema is not None))
            if procs.is_main:
                best = self._save_epoch(metrics, best)
        return metrics

    def _save_epoch(self, metrics: dict[str, Any], best: float) -> float:
        """Append to ``metrics.jsonl``, write ``last.pt``, then ``best.pt`` if the score improved;
        the best score. In this order a run stopped after any of the writes resumes from its
        ``last.pt`` (and a ``best.pt`` it did not write is written on resume: `resume_best`)."""
        row = {k: v for k, v in metrics.items() if "per_class" not in k}
        atomic_append_text(self.run_dir / "metrics.jsonl", json.dumps(row) + "\n")
        score = metrics["ema_test_acc1" if self.recipe.ema is not None else "test_acc1"]
        if score > best:
            best, self.best_epoch = score, metrics["epoch"]
        self._save_last(metrics["epoch"], metrics["step"], best)
        if self.best_epoch == metrics["epoch"]:
            self._save_best(best)
        return best

    def _extra(self) -> dict[str, Any]:
        return dict(data_config=self.data_config, config=config_to_dict(self.cfg))

    def _save_last(self, epoch: int, step: int, best: float) -> None:
        """``last.pt``: the model and the whole training state after ``epoch``."""
        recipe, ema = self.recipe, self.recipe.ema
        save_checkpoint(
            self.run_dir / "last.pt",
            self.model,
            self.model_config,
            epoch=epoch,
            step=step,
            best_acc1=best,
            best_epoch=self.best_epoch,
            ema=ema.state_dict() if ema is not None else None,
            optimizer=recipe.optimizer.state_dict(),
            scheduler=recipe.scheduler.state_dict(),
            scaler=recipe.scaler.state_dict() if recipe.scaler is not None else None,
            precision=DTYPE_NAMES[recipe.amp_dtype],
            **self._extra(),
        )

    def _save_best(self, score: float) -> None:
        """``best.pt``: the weights of epoch `best_epoch` (the EMA weights when EMA is on), now in the model."""
        ema = self.recipe.ema
        weights = ema.module if ema is not None else self.model
        save_checkpoint(
            self.run_dir / "best.pt", weights, self.model_config, epoch=self.best_epoch, acc1=score, **self._extra()
        )

    def resume_best(self, state: dict[str, Any]) -> None:
        """Continue the record of the best epoch from ``state`` (a ``last.pt``, loaded into the
        model). A run stopped between that ``last.pt`` and the ``best.pt`` of the same (best)
        epoch holds a ``best.pt`` of an earlier epoch, or none: it is written again here."""
        self.best_epoch = state.get("best_epoch", 0)  # 0 in checkpoints that predate the field
        if not (self.procs.is_main and self.best_epoch and self.best_epoch == state["epoch"]):
            return
        best = self.run_dir / "best.pt"
        try:
            written = load_checkpoint(best).get("epoch") if best.is_file() else None
        except CheckpointError:  # unreadable: written again
            written = None
        if written != self.best_epoch:
            self._save_best(state["best_acc1"])
            self.log(f"wrote {best} (epoch {self.best_epoch}) from last.pt: the run had stopped before writing it")

    def finish(self, metrics: dict[str, Any]) -> None:
        """Final weights as safetensors + JSON (the EMA weights when EMA is on), the curves, the last line."""
        ema = self.recipe.ema
        if self.procs.is_main:
            write_safetensors(
                self.run_dir, ema.module if ema is not None else self.model, self.model_config, self.data_config
            )
            plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
            if metrics:
                key = "ema_test_acc1" if ema is not None else "test_acc1"
                self.log(
                    f"final test accuracy {metrics[key]:.2%} ({'EMA weights, ' if ema else ''}"
                    f"epoch {metrics['epoch']}); run folder {self.run_dir}"
                )
        if self.procs.distributed:
            dist.barrier()
            dist.destroy_process_group()


# --- pieces ----------------------------------------------------------------------------------


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
    if not callable(getattr(model, "set_grad_checkpointing", None)):
        raise ValueError(
            f"train.grad_checkpointing=true: model {name!r} ({type(model).__name__}) has no set_grad_checkpointing; "
            "visattn's ViTs and HybridViT and timm models have it, torchvision models do not"
        )
    model.set_grad_checkpointing(True)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    recipe: Recipe,
    step: int,
    procs: Processes,
    *,
    epoch: int = 0,
    cfg: DictConfig | None = None,
    checkpoint: Path | None = None,
) -> tuple[dict[str, float], int]:
    """One pass over ``loader``; returns ``({"train_loss", "lr", "images_per_s", "epoch_s", "data_s",
    "train_unreadable"}, step)``.

    ``data_s`` is the part of ``epoch_s`` spent waiting for the loader (batches and augmentation).
    ``train_unreadable`` counts the pictures dropped from their batches because they could not be
    read (named in a line printed after the epoch); more than allowed stops the run
    (:class:`~visattn.train.imagefolder.UnreadableImages`).

    The scheduler is stepped per update. The loss is averaged over processes every step, and a
    NaN/inf loss raises :class:`NonFiniteLossError` naming the step (in every process at once).
    """
    model.train()
    total_loss, images, data_seconds, started = 0.0, 0, 0.0, time.perf_counter()
    progress = _progress(loader, epoch, cfg, procs)
    skips = UnreadableImages.training(epoch + 1, len(loader.dataset) // procs.world_size)
    waited = time.perf_counter()
    batch = -1
    for batch, (x, y) in enumerate(skips.batches(progress, procs.distributed)):
        data_seconds += time.perf_counter() - waited
        x, y = x.to(procs.device, non_blocking=True), y.to(procs.device, non_blocking=True)
        if recipe.mixup is not None:
            x, y = recipe.mixup(x, y)
        with _autocast(procs.device, recipe.amp_dtype):
            loss = recipe.loss_fn(model(x), y)
        reduced = _mean_over_processes(loss.detach().float(), procs)
        if not torch.isfinite(reduced):
            where = f"; the last good state is {checkpoint}" if checkpoint is not None and checkpoint.exists() else ""
            raise NonFiniteLossError(
                f"training loss is {reduced.item()} at step {step + 1} (epoch {epoch + 1}); "
                f"stopping (lower train.lr or set train.clip_grad){where}"
            )
        _update(model, loss, recipe)
        step += 1
        recipe.scheduler.step_update(num_updates=step)
        if recipe.ema is not None:
            recipe.ema.update(_unwrap(model), step=step)
        total_loss += reduced.item()
        images += len(x) * procs.world_size
        if hasattr(progress, "set_postfix"):
            progress.set_postfix(loss=f"{reduced.item():.4f}")
        elif cfg is not None and procs.is_main and cfg.run.log_every and (batch + 1) % cfg.run.log_every == 0:
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


def _update(model: nn.Module, loss: Tensor, recipe: Recipe) -> None:
    """Backward, clip, optimizer step (through the gradient scaler under fp16)."""
    optimizer, scaler = recipe.optimizer, recipe.scaler
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if recipe.clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


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
    that cannot be read stops the evaluation (:meth:`UnreadableImages.held_out`): an accuracy
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
        with _autocast(procs.device, amp_dtype):
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
    count = torch.tensor(float(len(loader.dataset)), dtype=torch.float64, device=procs.device)
    if procs.distributed:
        for tensor in (totals, count, per_class_correct, per_class_count):
            dist.all_reduce(tensor)
    return {
        "loss": (totals[0] / count).item(),
        "acc1": (totals[1] / count).item(),
        "acc5": (totals[2] / count).item(),
        "per_class_correct": per_class_correct.cpu(),
        "per_class_count": per_class_count.cpu(),
    }


def write_safetensors(run_dir: Path, model: nn.Module, model_config: dict, data_config: dict) -> None:
    """``model.safetensors`` (weights, no pickle) and ``model.json`` (``{"model_config", "data_config"}``)."""
    save_safetensors(model, run_dir / "model.safetensors", metadata={"format": "visattn"})
    atomic_write_json(run_dir / "model.json", {"model_config": model_config, "data_config": data_config})


def plot_curves(metrics_path: Path, out_path: Path, force: bool = False) -> None:
    """Loss and accuracy per epoch from ``metrics.jsonl`` into a PNG (matplotlib's ``Figure``:
    no pyplot, no display, no global state). ``out_path`` is never ``metrics_path``, and replaces
    an existing file only if it is a PNG or empty, or with ``force`` (`visattn._io.check_output`)."""
    from matplotlib.figure import Figure

    check_output(out_path, "PNG", [metrics_path], force=force)

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key in ("train_loss", "test_loss", "ema_test_loss"):
        if key in rows[0]:
            ax_loss.plot(epochs, [r[key] for r in rows], label=key)
    for key in ("test_acc1", "ema_test_acc1"):
        if key in rows[0]:
            ax_acc.plot(epochs, [100 * r[key] for r in rows], label=key)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="held-out accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def _preload_plotting() -> None:
    """Import matplotlib in a background thread while the model trains (half a second that would
    otherwise be spent after the last epoch, before ``curves.png`` can be drawn)."""
    threading.Thread(target=importlib.import_module, args=("matplotlib.figure",), daemon=True).start()


def load_run_config(run: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> tuple[DictConfig, Path]:
    """The config a run folder (or the folder holding a checkpoint) was trained with, from its
    ``last.pt``, with ``overrides`` — only keys of :data:`RESUME_OVERRIDES` may change.

    Nothing is written. Raises :class:`CheckpointError` when the folder holds no state to resume
    and :class:`ConfigError` naming an override that may not change.
    """
    run = Path(run)
    run_dir = run.parent if run.is_file() else run
    last = run_dir / "last.pt"
    if not last.is_file():
        if not any((run_dir / name).is_file() for name in ("config.yaml", "best.pt", "metrics.jsonl")):
            raise CheckpointError(f"{run_dir} is not a run folder (no last.pt); pass the folder train.py wrote")
        if (run_dir / "best.pt").is_file():  # last.pt is written first: deleted, or from an older visattn
            raise CheckpointError(
                f"{run_dir} holds no training state to resume: it has a best.pt but no last.pt (the checkpoint "
                f"with the optimizer, schedule and epoch); its best.pt can be evaluated (visattn eval --checkpoint "
                f"{run_dir}) or fine-tuned, not resumed; start a new run to train further"
            )
        raise CheckpointError(
            f"{run_dir} holds no training state to resume: no last.pt, the run stopped before its first "
            "checkpoint was written; delete the folder and start a new run"
        )
    state = load_checkpoint(last)
    cfg = load_config(base=_saved_config(state, last), overrides=overrides)
    check_resume_config(state, cfg, last)
    cfg.run.out_dir, cfg.run.name = str(run_dir.parent), run_dir.name
    return cfg, run_dir


def _saved_config(state: dict[str, Any], path: Path) -> dict[str, Any]:
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path} holds no training config (not written by visattn train); cannot resume it")
    return state["config"]


def check_resume_config(state: dict[str, Any], cfg: DictConfig, path: Path) -> None:
    """Raise :class:`~visattn.train.config.ConfigError` unless ``cfg`` differs from the config
    saved in ``state`` (a ``last.pt``) only in :data:`RESUME_OVERRIDES` and ``run.name``/``out_dir``,
    and ``train.epochs`` is at least the epochs already done."""
    saved = _flat(config_to_dict(load_config(base=_saved_config(state, path))))
    given = _flat(config_to_dict(cfg))
    ignored = {"run.name", "run.out_dir", *RESUME_OVERRIDES}
    changed = [key for key in sorted(saved.keys() | given.keys()) if saved.get(key) != given.get(key)]
    refused = [key for key in changed if key not in ignored]
    if refused:
        was = ", ".join(f"{key}={saved.get(key)!r}" for key in refused)
        raise ConfigError(
            f"{', '.join(refused)} cannot change on resume ({path} was trained with {was}); "
            f"only {', '.join(RESUME_OVERRIDES)} may; start a new run to change the others"
        )
    if cfg.train.epochs < state.get("epoch", 0):
        raise ConfigError(f"train.epochs={cfg.train.epochs} but {path} has already trained {state['epoch']} epochs")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --- helpers ---------------------------------------------------------------------------------


def init_processes(device: str = "auto") -> Processes:
    """Join the ``torchrun`` process group when launched by it (gloo on CPU, NCCL on CUDA)."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available; use train.device=cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes(device=torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def _agreed_run_dir(
    cfg: DictConfig, resume: str | os.PathLike | None, procs: Processes
) -> tuple[Path, contextlib.AbstractContextManager]:
    """Rank 0 claims the folder (runs/NAME or runs/NAME-2 ...) and locks it; the other processes
    agree on it, and fail with rank 0 when it cannot have it. Returns the folder and its lock (a
    do-nothing context on the other ranks)."""
    run_dir, lock, failure = Path(), contextlib.nullcontext(), None
    if procs.is_main:
        try:
            run_dir = _run_dir(cfg, resume)
            lock = lock_run_folder(run_dir)
        except Exception as err:  # raised below, once the other processes know
            failure = err
    if procs.distributed:
        shared = [str(run_dir), None if failure is None else str(failure)]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])
        if shared[1] is not None and failure is None:
            raise RuntimeError(f"rank 0 could not claim the run folder: {shared[1]}")
    if failure is not None:
        raise failure
    return run_dir, lock


def _run_dir(cfg: DictConfig, resume: str | os.PathLike | None) -> Path:
    """The resumed run's folder, or a new one claimed with an exclusive ``mkdir``: a new run never
    shares a folder, even with a run of the same name started at the same moment."""
    if resume is not None:
        path = Path(resume)
        run_dir = path.parent if path.is_file() else path
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run folder {run_dir} does not exist; --resume takes the folder train.py wrote")
        return run_dir
    base = Path(cfg.run.out_dir) / cfg.run.name
    base.parent.mkdir(parents=True, exist_ok=True)
    number = 1
    while True:
        path = base if number == 1 else base.with_name(f"{base.name}-{number}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            number += 1


#: what a new run writes before its first checkpoint: removed with the folder when it stops there
_EARLY_FILES = ("config.yaml", "metrics.jsonl", "curves.png")


def _release(run_dir: Path, new_folders: list[Path]) -> None:
    """Remove a new run's folder if it holds no checkpoint (the run failed or stopped before one),
    and the empty ``new_folders`` (deepest first) that were made for it."""
    if not run_dir.is_dir() or any((run_dir / name).exists() for name in ("last.pt", "best.pt")):
        return
    for name in _EARLY_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for leftover in run_dir.glob("*.tmp"):
        leftover.unlink(missing_ok=True)
    for folder in (run_dir, *new_folders):
        try:
            folder.rmdir()
        except OSError:  # something else is in it: keep it and its parents
            return


def _train_loader(dataset: Dataset, cfg: DictConfig, procs: Processes) -> tuple[DataLoader, DistributedSampler]:
    if cfg.train.batch_size % procs.world_size:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by the {procs.world_size} processes"
        )
    per_process = cfg.train.batch_size // procs.world_size
    if len(dataset) < cfg.train.batch_size:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is larger than the {len(dataset)} training images")
    # One sampler for one or many processes: its order depends only on (seed, epoch).
    sampler = DistributedSampler(
        dataset, num_replicas=procs.world_size, rank=procs.rank, shuffle=True, seed=cfg.train.seed
    )
    return _loader(dataset, sampler, per_process, True, cfg, procs), sampler


def _eval_loader(dataset: Dataset, cfg: DictConfig, procs: Processes) -> DataLoader:
    shard = Subset(dataset, range(procs.rank, len(dataset), procs.world_size)) if procs.distributed else dataset
    batch_size = max(cfg.train.batch_size // procs.world_size, 1) * 2
    return _loader(shard, SequentialSampler(shard), batch_size, False, cfg, procs)


def _loader(
    dataset: Dataset, sampler: Sampler, batch_size: int, drop_last: bool, cfg: DictConfig, procs: Processes
) -> DataLoader:
    """A ``DataLoader``; an in-memory :class:`TensorImageDataset` gets whole index batches (its
    ``dataset[indices]`` builds the batch at once, with nothing to collate); other datasets are
    collated by :func:`collate_readable`, which keeps the names of pictures that could not be read."""
    common = dict(
        num_workers=cfg.data.workers, pin_memory=procs.device.type == "cuda", persistent_workers=cfg.data.workers > 0
    )
    shard_of = dataset.dataset if isinstance(dataset, Subset) else dataset
    if isinstance(shard_of, TensorImageDataset):
        return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last), batch_size=None, **common)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, collate_fn=collate_readable, **common
    )


def _seed_everything(seed: int, epoch: int, rank: int) -> None:
    derived = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)


DTYPE_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
#: bf16 is chosen by ``train.amp=auto`` only when a step is at least this much faster than fp32
BF16_MIN_GAIN = 0.9


def choose_precision(
    amp: str, device: torch.device, step_seconds: Callable[[torch.dtype | None], float]
) -> tuple[torch.dtype | None, str]:
    """The autocast dtype for ``train.amp`` (``None``: fp32) and the reason, for the log.

    ``auto`` picks bf16 on CUDA devices that support it. On a CPU it times a training step of
    each precision with ``step_seconds(dtype)`` and picks bf16 only when it is at least 10 %
    faster; where oneDNN has no native bf16 (an AVX2-only CPU, or ``ONEDNN_MAX_CPU_ISA=AVX2``: bf16 matrix
    products are emulated, 6-10x slower than fp32 as measured on an AVX2 EPYC) it skips the timing.
    """
    if amp in ("none", "bf16", "fp16"):
        if amp == "fp16" and device.type != "cuda":
            raise ValueError("train.amp=fp16 needs CUDA; use train.amp=bf16 or none on CPU")
        return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp], f"train.amp={amp}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "train.amp=auto on a CUDA device with bf16 support"
        return None, "train.amp=auto on a CUDA device without bf16 support"
    if not cpu_has_native_bf16():
        return (
            None,
            "train.amp=auto: oneDNN has no native bf16 here (no AVX512-BF16/AMX), so bf16 would be emulated, slower",
        )
    fp32, bf16 = step_seconds(None), step_seconds(torch.bfloat16)
    timing = f"a training step took {bf16 * 1e3:.1f} ms in bf16 and {fp32 * 1e3:.1f} ms in fp32 on this CPU"
    if bf16 < BF16_MIN_GAIN * fp32:
        return torch.bfloat16, f"train.amp=auto: {timing}"
    return None, f"train.amp=auto: {timing} (bf16 is used only when at least 10% faster)"


def step_timer(model: nn.Module, batch: tuple[Tensor, Tensor], device: torch.device, repeats: int = 5):
    """``seconds(dtype)``: the fastest of ``repeats`` forward+backward passes of a copy of ``model``
    on ``batch`` under autocast to ``dtype`` (after two warm-up passes); ``model`` is untouched."""
    probe = copy.deepcopy(model).train()
    x, y = (t.to(device) for t in batch)

    def seconds(dtype: torch.dtype | None) -> float:
        times = []
        for _ in range(repeats + 2):
            started = time.perf_counter()
            with _autocast(device, dtype):
                loss = nn.functional.cross_entropy(probe(x).float(), y)
            loss.backward()
            probe.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
        return min(times[2:])

    return seconds


def _agreed_precision(
    amp: str, model: nn.Module, loader: DataLoader, procs: Processes, state: dict[str, Any] | None
) -> tuple[torch.dtype | None, str]:
    """:func:`choose_precision` on rank 0, shared with every process of the run. A resumed
    ``auto`` run keeps the precision it started with, so that it continues the same arithmetic."""
    if amp == "auto" and state is not None and state.get("precision") in _DTYPES:
        return _DTYPES[state["precision"]], "train.amp=auto: as chosen when the run started (from last.pt)"
    choice: list[Any] = [None, ""]
    if procs.is_main:
        timer = step_timer(model, next(iter(loader)), procs.device) if amp == "auto" else None
        choice = list(choose_precision(amp, procs.device, timer))
    if procs.distributed:
        dist.broadcast_object_list(choice, src=0)
    return choice[0], choice[1]


def _fast_optimizer_kwargs(opt: str) -> dict[str, Any]:
    """PyTorch's fused Adam/AdamW kernel (one op for all parameters: 3x faster steps than the
    per-tensor loop on the default job, measured); other optimizers keep timm's defaults."""
    return {"fused": True} if opt.lower() in ("adam", "adamw") else {}


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _mean_over_processes(value: Tensor, procs: Processes) -> Tensor:
    if procs.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= procs.world_size
    return value


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _progress(loader: DataLoader, epoch: int, cfg: DictConfig | None, procs: Processes):
    mode = cfg.run.progress if cfg is not None else "lines"
    if not procs.is_main or mode == "lines" or (mode == "auto" and not sys.stderr.isatty()):
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True)


def _prefixed(stats: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {prefix + k: v for k, v in stats.items()}


def _epoch_line(m: dict[str, Any], epochs: int, has_ema: bool) -> str:
    line = (
        f"epoch {m['epoch']:>3}/{epochs} train_loss {m['train_loss']:.4f} test_loss {m['test_loss']:.4f} "
        f"test_acc1 {m['test_acc1']:.2%} test_acc5 {m['test_acc5']:.2%}"
    )
    if has_ema:
        line += f" ema_acc1 {m['ema_test_acc1']:.2%}"
    line += f" lr {m['lr']:.2e} {m['images_per_s']:.0f} img/s {m['time']:.1f}s"
    return line + (f" unreadable {m['train_unreadable']} skipped" if m.get("train_unreadable") else "")


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop lines of epochs after the checkpoint (written before a kill, then redone) and an
    incomplete last line (a kill mid-write); any other unreadable line raises :class:`CheckpointError`."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # cut short by a kill: that epoch is redone
                break
            raise CheckpointError(f"{path} line {number} is not valid JSON ({err}); fix or delete that line") from None
        if row.get("epoch", 0) <= epochs_done:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _silent(*args: Any, **kwargs: Any) -> None:
    pass
