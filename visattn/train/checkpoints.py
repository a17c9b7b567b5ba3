"""The checkpoints of a run folder: ``last.pt`` (the whole training state), ``best.pt`` (weights) and
the best model as a model folder (``config.json`` + ``model.safetensors``, written just before ``best.pt``).

Every epoch writes ``last.pt`` before ``best.pt``: a run stopped between any two writes resumes
from its ``last.pt``, and a ``best.pt`` it did not get to write is written on resume
(`Checkpoints.rewrite_missed_best`). With EMA the EMA weights are the result, so ``best.pt``
holds them; ``last.pt`` holds both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .._io import CheckpointError
from ..weights.checkpoint import load_checkpoint, save_checkpoint
from ..weights.hub import save_pretrained
from .precision import DTYPE_NAMES
from .recipe import Recipe

__all__ = ["Checkpoints", "Progress"]


@dataclass
class Progress:
    """How far a run is: epochs and updates done, the best held-out top-1 and its epoch (0: none yet)."""

    epoch: int = 0
    step: int = 0
    best_acc1: float = -1.0
    best_epoch: int = 0

    def record(self, epoch: int, step: int, acc1: float) -> None:
        """``epoch`` (counted from 1) ended after ``step`` updates with held-out top-1 ``acc1``."""
        self.epoch, self.step = epoch, step
        if acc1 > self.best_acc1:
            self.best_acc1, self.best_epoch = acc1, epoch


@dataclass
class Checkpoints:
    """Writes and reads the checkpoints of the run in ``run_dir``.

    ``extra``: what both checkpoints carry besides the weights (``data_config``, the stored form of
    the run's `visattn.data_spec.DataSpec`, and ``config``).
    """

    run_dir: Path
    model: nn.Module
    recipe: Recipe
    model_config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def last(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.run_dir / "best.pt"

    def write(self, progress: Progress) -> None:
        """``last.pt``, then ``best.pt`` if the epoch just done is the best so far."""
        save_checkpoint(
            self.last,
            self.model,
            self.model_config,
            epoch=progress.epoch,
            step=progress.step,
            best_acc1=progress.best_acc1,
            best_epoch=progress.best_epoch,
            precision=DTYPE_NAMES[self.recipe.amp_dtype],
            **self.recipe.state_dict(),
            **self.extra,
        )
        if progress.best_epoch == progress.epoch:
            self._save_best(progress)

    def _save_best(self, progress: Progress) -> None:
        """The run folder as a model folder (`visattn.load_pretrained(run_dir)`), then ``best.pt``: the
        weights of epoch ``progress.best_epoch`` (EMA weights with EMA), now in the model. In this
        order a ``best.pt`` of the best epoch means the folder holds that model too."""
        weights = self.recipe.ema.module if self.recipe.ema is not None else self.model
        save_pretrained(weights, self.run_dir, data_config=self.extra.get("data_config"))
        save_checkpoint(
            self.best, weights, self.model_config, epoch=progress.best_epoch, acc1=progress.best_acc1, **self.extra
        )

    def restore(self, state: dict[str, Any]) -> Progress:
        """Load ``state`` (read from `last`) into the model and recipe; how far the run was.

        A state that does not fit the model or recipe of the config raises `CheckpointError`.
        """
        try:
            self.model.load_state_dict(state["model"])
            self.recipe.load_state_dict(state)
            # best_epoch is 0 in checkpoints that predate the field
            return Progress(state["epoch"], state["step"], state["best_acc1"], state.get("best_epoch", 0))
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"{self.last} does not fit the model and recipe of its config: {reason}") from err

    def rewrite_missed_best(self, progress: Progress) -> bool:
        """After `restore`: a run stopped between the ``last.pt`` and the ``best.pt`` of its best
        epoch holds a ``best.pt`` of an earlier epoch, or none; write it again. Whether it did."""
        if not (progress.best_epoch and progress.best_epoch == progress.epoch):
            return False
        try:
            written = load_checkpoint(self.best).get("epoch") if self.best.is_file() else None
        except CheckpointError:  # unreadable: written again
            written = None
        if written == progress.best_epoch:
            return False
        self._save_best(progress)
        return True
