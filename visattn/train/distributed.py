"""The processes of a data-parallel run: which one this is, its shard of the data, what they agree on.

A run started by ``torchrun`` has one process per device; every process calls `visattn.train.engine.fit`.
`init_processes` joins them into a process group (gloo on CPU, NCCL on CUDA) and returns this
process's `Processes`; a plain ``python train.py`` is a run of one process, and every function
here does nothing extra for it. The training loader's order depends only on ``(seed, epoch)``,
so one process and many see the same images in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler, Subset

from .imagefolder import collate_readable
from .tensor_dataset import TensorImageDataset

__all__ = [
    "Processes",
    "dataset_size",
    "end_processes",
    "eval_loader",
    "from_main",
    "init_processes",
    "mean_over_processes",
    "sum_over_processes",
    "train_loader",
    "unwrap",
]


@dataclass
class Processes:
    """This process's place in a (possibly single-process) data-parallel run."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run folder and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_processes(device: str = "auto") -> Processes:
    """Join the ``torchrun`` process group when launched by it (gloo on CPU, NCCL on CUDA).

    ``device``: ``train.device`` (``auto``: CUDA where available, else the CPU).
    """
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


def end_processes(procs: Processes) -> None:
    """Wait for every process of a multi-process run, then leave the process group."""
    if procs.distributed:
        dist.barrier()
        dist.destroy_process_group()


def from_main(values: list[Any], procs: Processes) -> list[Any]:
    """``values`` as the main process has them (picklable objects), in every process."""
    if procs.distributed:
        dist.broadcast_object_list(values, src=0)
    return values


def mean_over_processes(value: Tensor, procs: Processes) -> Tensor:
    """The mean of ``value`` over the processes (a copy; ``value`` itself where there is one)."""
    if procs.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= procs.world_size
    return value


def sum_over_processes(tensors: list[Tensor], procs: Processes) -> None:
    """Replace each tensor, in place, by its sum over the processes."""
    if procs.distributed:
        for tensor in tensors:
            dist.all_reduce(tensor)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a `DistributedDataParallel` wrapper (``model`` itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def dataset_size(dataset: Dataset) -> int:
    """``len(dataset)``: visattn's datasets are map-style, so sized; torch's `Dataset` type leaves
    ``__len__`` to its subclasses."""
    assert isinstance(dataset, Sized)
    return len(dataset)


def train_loader(
    dataset: Dataset, batch_size: int, workers: int, seed: int, procs: Processes
) -> tuple[DataLoader, DistributedSampler]:
    """This process's loader of ``batch_size // world_size`` shuffled training images per step,
    and its sampler (``sampler.set_epoch(epoch)`` before each epoch). ``batch_size`` is the
    global one; the last incomplete batch is dropped."""
    if batch_size % procs.world_size:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by the {procs.world_size} processes")
    if dataset_size(dataset) < batch_size:
        raise ValueError(f"train.batch_size={batch_size} is larger than the {dataset_size(dataset)} training images")
    # One sampler for one or many processes: its order depends only on (seed, epoch).
    sampler: DistributedSampler = DistributedSampler(
        dataset, num_replicas=procs.world_size, rank=procs.rank, shuffle=True, seed=seed
    )
    return _loader(dataset, sampler, batch_size // procs.world_size, True, workers, procs), sampler


def eval_loader(dataset: Dataset, batch_size: int, workers: int, procs: Processes) -> DataLoader:
    """This process's shard of the held-out ``dataset`` (every ``world_size``-th image), in order,
    in batches twice this process's share of the training ``batch_size``."""
    shard = (
        Subset(dataset, range(procs.rank, dataset_size(dataset), procs.world_size)) if procs.distributed else dataset
    )
    assert isinstance(shard, Sized)  # a Subset, or the (sized) dataset itself
    per_process = max(batch_size // procs.world_size, 1) * 2
    return _loader(shard, SequentialSampler(shard), per_process, False, workers, procs)


def _loader(
    dataset: Dataset, sampler: Sampler, batch_size: int, drop_last: bool, workers: int, procs: Processes
) -> DataLoader:
    """A ``DataLoader``; an in-memory `TensorImageDataset` gets whole index batches (its
    ``dataset[indices]`` builds the batch at once, with nothing to collate); other datasets are
    collated by `collate_readable`, which keeps the names of pictures that could not be read."""
    common: dict[str, Any] = dict(
        num_workers=workers, pin_memory=procs.device.type == "cuda", persistent_workers=workers > 0
    )
    shard_of = dataset.dataset if isinstance(dataset, Subset) else dataset
    if isinstance(shard_of, TensorImageDataset):
        return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last), batch_size=None, **common)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, collate_fn=collate_readable, **common
    )
