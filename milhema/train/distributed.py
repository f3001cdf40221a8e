"""Training on several processes: ``torchrun`` + DistributedDataParallel (NCCL on GPUs, gloo on CPU).

``torchrun --nproc_per_node N -m milhema cv ...`` starts N copies of the same command. Each
process (rank) trains on its share of every epoch's batches, DDP averages the gradients, and
evaluation is split across the ranks and gathered, so every rank takes the same early-stopping
decision. Only rank 0 writes the run folder and talks to W&B. Without ``torchrun`` (no
``WORLD_SIZE`` in the environment) everything here is a no-op for a single process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from milhema.errors import MilhemaError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes outputs and tracks the run."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def current() -> Ranks:
    """This process's ranks (a single process when no process group is running)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def init_from_env(device: torch.device) -> Ranks:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Backend: NCCL when training on CUDA, gloo otherwise. Each rank uses GPU ``LOCAL_RANK``.

    Raises:
        MilhemaError: ``WORLD_SIZE`` is set but the group cannot be formed.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or not dist.is_available():
        return Ranks()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        try:
            dist.init_process_group(backend=backend)
        except (RuntimeError, ValueError) as exc:
            raise MilhemaError(f"distributed training: cannot join the {backend} process group of {world} "
                               f"processes ({exc}); start milhema with torchrun") from exc
    return current()


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """One GPU per process on a machine: ``cuda`` becomes ``cuda:<LOCAL_RANK>``."""
    if device.type == "cuda" and ranks.active:
        return torch.device("cuda", ranks.local_rank)
    return device


def shard(items: Sequence[T], ranks: Ranks) -> list[T]:
    """This rank's share of ``items``: every ``world``-th item from ``rank``.

    Every rank gets the same number of items (the list wraps around), because DDP needs every
    rank to take the same number of optimiser steps.
    """
    items = list(items)
    if not ranks.active or not items:
        return items
    per_rank = -(-len(items) // ranks.world)
    padded = items + items[: per_rank * ranks.world - len(items)]
    return padded[ranks.rank::ranks.world]


def shard_eval(items: Sequence[T], ranks: Ranks) -> list[T]:
    """This rank's share of evaluation work: every ``world``-th item, no repeats (no DDP steps)."""
    return list(items)[ranks.rank::ranks.world]


def gather(obj: Any, ranks: Ranks) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (picklable objects: our own results only)."""
    if not ranks.active:
        return [obj]
    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: T, ranks: Ranks) -> T:
    """Rank 0's ``obj`` on every rank (decisions that must agree, e.g. which folds to skip)."""
    if not ranks.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: torch.nn.Module, ranks: Ranks, device: torch.device) -> torch.nn.Module:
    """The module to call in training steps: DDP around ``model`` when several ranks run.

    Parameters a step does not use (e.g. the class branches a batch without labels skips) are
    allowed, so every model family works unchanged.
    """
    if not ranks.active:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def launched_rank() -> int:
    """The rank torchrun gave this process (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0") or 0)


@contextmanager
def job() -> Iterator[None]:
    """Around one command: leave the process group at the end, whether it succeeded or not."""
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
