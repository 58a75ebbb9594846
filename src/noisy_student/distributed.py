"""Process groups for data-parallel training, so one training loop runs in one process or in
many: torchrun on one machine or several, or Ray Train's ``TorchTrainer``. The launcher
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; with a world size
of 1 nothing here touches ``torch.distributed``, so a single process trains exactly as it
would without it."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


class DistributedError(ValueError):
    """A launch that cannot work (its message is one line naming what is wrong)."""


@dataclass(frozen=True)
class Group:
    """This process's place in the training job (rank 0 of 1 for a single process)."""

    rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the one process that evaluates and writes files and records."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """This process is a rank of a torchrun job: torchrun sets ``TORCHELASTIC_RUN_ID`` in
    every process it starts, beside ``RANK`` and ``WORLD_SIZE``."""
    return "TORCHELASTIC_RUN_ID" in os.environ


# What torchrun sets in each process it starts; outside a torchrun job they are strays.
LAUNCH_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def launched_world_size() -> int:
    """The world size torchrun asked for (1 when torchrun did not start this process: a
    ``WORLD_SIZE`` left in a shell would make one process wait for ranks that never come)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1


def drop_stray_launch_variables() -> list[str]:
    """Remove from this process's environment the launcher variables that torchrun did not
    set (a shell's or a scheduler's ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``), so a plain
    command runs as the one process it is and starts its own torchrun jobs cleanly; return
    their names, for a warning."""
    if launched_by_torchrun():
        return []
    stray = [name for name in LAUNCH_VARIABLES if name in os.environ]
    for name in stray:
        del os.environ[name]
    return stray


def check_launch(
    world_size: int,
    batch_size: int,
    device_type: str,
    processes_here: int,
    gpus: int,
    sync_batchnorm: bool = False,
) -> None:
    """Refuse, before any work, a launch that would fail or hang later."""
    if world_size <= 1:
        return
    if batch_size % world_size:
        raise DistributedError(
            f"train.batch_size: {batch_size} does not split evenly across {world_size} "
            f"processes (the global batch is divided among them); allowed: a multiple of "
            f"{world_size}"
        )
    if device_type == "cuda" and processes_here > gpus:
        raise DistributedError(
            f"{processes_here} processes on this machine but {gpus} GPU(s): each process "
            f"trains on its own GPU; allowed: 1 to {gpus} processes per machine"
        )
    if sync_batchnorm and device_type != "cuda":
        raise DistributedError(
            "train.sync_batchnorm: true needs CUDA (torch's SyncBatchNorm has no CPU "
            "kernel); allowed on CPU: false, each process normalising its own batch"
        )


def cpu_share(local_world_size: int) -> int:
    """Torch threads for one of ``local_world_size`` processes on this machine: oversubscribed
    torch processes run at a small fraction of their speed."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, local_world_size))


@contextmanager
def process_group(
    device: torch.device, batch_size: int, sync_batchnorm: bool = False
) -> Iterator[Group]:
    """Join the launcher's process group (env:// rendezvous; NCCL on CUDA, gloo on CPU),
    pin this process to its GPU and its share of the cores, and on success wait for every
    rank before leaving, so rank 0's writes are finished when the others exit. Under Ray
    Train the group already exists and is left to Ray."""
    world_size = dist.get_world_size() if dist.is_initialized() else launched_world_size()
    if world_size <= 1:
        yield Group(0, 1, 1, device)
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    here = max(local_world_size, local_rank + 1)
    check_launch(world_size, batch_size, device.type, here, gpus, sync_batchnorm)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.set_num_threads(cpu_share(local_world_size))
    group = Group(dist.get_rank(), world_size, local_world_size, device)
    log.info(
        "rank %d of %d on %s, %d torch threads",
        group.rank,
        world_size,
        device,
        torch.get_num_threads(),
    )
    yield group  # an exception skips the barrier: the launcher stops the other ranks
    dist.barrier()
    if created:
        dist.destroy_process_group()


def active() -> tuple[int, int] | None:
    """(rank, world size) inside a process group, else None. :func:`process_group` forms
    one only for several processes; Ray Train forms one for a single worker too."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def agree(value: int) -> int:
    """Rank 0's ``value`` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def rank_seed(seed: int, rank: int) -> int:
    """A seed of its own for each rank but rank 0, which goes on with the process's own
    stream (augmentation, dropout), fixed by ``seed``."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows of a global batch: every ``world_size``-th row from ``rank``, so each
    rank keeps the batch's labeled:pseudo mix. A batch that does not split evenly (an
    epoch's last) is first padded with its own leading rows, as ``DistributedSampler``
    pads an epoch: every rank then steps with the same number of rows."""
    short = -len(batch) % world_size
    if short:
        batch = torch.cat([batch, batch[torch.arange(short) % len(batch)]])
    return batch[rank::world_size]


def sum_over_ranks(*values: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor summed over every rank (one all-reduce for all of them)."""
    stacked = torch.stack([v.to(torch.float64) for v in values])
    dist.all_reduce(stacked)
    return list(stacked.unbind())


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank. DDP broadcasts them
    before each forward pass, but every rank updates its own copy during it."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def wrap(model: nn.Module, device: torch.device, sync_batchnorm: bool) -> nn.Module:
    """``model`` in DistributedDataParallel (gradients averaged over ranks), its batch norm
    synchronised across ranks when ``sync_batchnorm`` (CUDA only, see
    :func:`check_launch`)."""
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap_batchnorm(model: nn.Module) -> None:
    """Turn the SyncBatchNorm layers of :func:`wrap` back into BatchNorm2d in place, with
    their weights and statistics, so checkpoints and inference see the model they built."""
    for name, child in model.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            plain = nn.BatchNorm2d(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            ).to(next(child.buffers()).device)
            plain.load_state_dict(child.state_dict())
            plain.train(child.training)
            setattr(model, name, plain)
        else:
            unwrap_batchnorm(child)
