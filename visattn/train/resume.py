"""Resuming a run: its saved config, and the few keys an override may change.

``last.pt`` holds the config the run was trained with. A resumed run takes that config, with
overrides only of `RESUME_OVERRIDES`: the others shaped the saved state, and changing them
would continue a different run, or fail half-way. `load_run_config` reads and checks it (the
``--resume`` of ``train.py``); `check_resume_config` is the check, which `fit` repeats for a
config it is given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .._io import CheckpointError
from ..weights.checkpoint import load_checkpoint
from .config import ConfigError, config_to_dict, load_config

__all__ = ["RESUME_OVERRIDES", "check_resume_config", "load_run_config"]

#: the config keys an override may change when a run is resumed: they change neither the
#: arithmetic nor the state (checkpointing recomputes activations, giving the same gradients)
RESUME_OVERRIDES = ("train.epochs", "run.progress", "run.log_every", "run.explorer", "train.grad_checkpointing")


def load_run_config(run: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> tuple[DictConfig, Path]:
    """The config a run folder (or the folder holding a checkpoint) was trained with, from its
    ``last.pt``, with ``overrides`` (only keys of `RESUME_OVERRIDES` may change), and the folder.

    Nothing is written. Raises `CheckpointError` when the folder holds no state to resume
    and `ConfigError` naming an override that may not change.
    """
    run = Path(run)
    run_dir = run.parent if run.is_file() else run
    last = run_dir / "last.pt"
    if not last.is_file():
        raise CheckpointError(_no_state(run_dir))
    state = load_checkpoint(last)
    cfg = load_config(base=_saved_config(state, last), overrides=overrides)
    check_resume_config(state, cfg, last)
    cfg.run.out_dir, cfg.run.name = str(run_dir.parent), run_dir.name
    return cfg, run_dir


def _no_state(run_dir: Path) -> str:
    """Why ``run_dir``, which has no ``last.pt``, cannot be resumed."""
    if not any((run_dir / name).is_file() for name in ("config.yaml", "best.pt", "metrics.jsonl")):
        return f"{run_dir} is not a run folder (no last.pt); pass the folder train.py wrote"
    if (run_dir / "best.pt").is_file():  # last.pt is written first: deleted, or from an older visattn
        return (
            f"{run_dir} holds no training state to resume: it has a best.pt but no last.pt (the checkpoint "
            f"with the optimizer, schedule and epoch); its best.pt can be evaluated (visattn eval --checkpoint "
            f"{run_dir}) or fine-tuned, not resumed; start a new run to train further"
        )
    return (
        f"{run_dir} holds no training state to resume: no last.pt, the run stopped before its first "
        "checkpoint was written; delete the folder and start a new run"
    )


def _saved_config(state: dict[str, Any], path: Path) -> dict[str, Any]:
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path} holds no training config (not written by visattn train); cannot resume it")
    return state["config"]


def check_resume_config(state: dict[str, Any], cfg: DictConfig, path: Path) -> None:
    """Raise `ConfigError` unless ``cfg`` differs from the config saved in ``state`` (a
    ``last.pt`` read from ``path``) only in `RESUME_OVERRIDES` and ``run.name``/``out_dir``, and
    ``train.epochs`` is at least the epochs already done."""
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
