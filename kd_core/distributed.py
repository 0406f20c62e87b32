"""Data-parallel training of one stage over several processes: torch.distributed DDP.

`fit(..., data_parallel=DataParallel(...))` trains each rank on its rows of every global batch
(the batches a single process would train on, `recipe.batch_size` images in all) and lets
`DistributedDataParallel` average the gradients, each rank's loss scaled by its share of the
batch, so that the update is the single-process one up to float rounding. Models with
BatchNorm normalise by each rank's rows (DDP's default: SyncBatchNorm needs CUDA), so their
metrics differ from a single process's within the noise of a smaller batch.

Who starts the processes and how they meet is the caller's business (`sweeps.data_parallel`
for a sweep's trials); this module needs only an initialised default process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kd_core.distillers.base import Distiller, TrainingPosition

#: How long a rank waits for the others (to join, or in a collective) before it fails. A rank
#: whose process dies closes its sockets, so the others fail at once; this bounds a hung peer.
DEFAULT_TIMEOUT = timedelta(minutes=10)


def backend_for(device: str) -> str:
    """The torch.distributed backend of a device: NCCL on CUDA, gloo on the CPU."""
    return "nccl" if device.startswith("cuda") else "gloo"


def join(rank: int, world_size: int, init_method: str, device: str,
         timeout: timedelta = DEFAULT_TIMEOUT) -> DataParallel:
    """Join the process group of `world_size` ranks that meet at `init_method` (a
    `tcp://host:port` address; rank 0 listens there) and return this rank's `DataParallel`.
    Blocks until every rank has joined; RuntimeError (DistStoreError) after `timeout`."""
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank,
                            world_size=world_size, timeout=timeout)
    return DataParallel(rank, world_size)


def leave() -> None:
    """Leave the process group (closing its connections, so that peers still in a collective
    fail at once); nothing if this process never joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def check_data_parallel(distiller: type[Distiller]) -> None:
    """Raise ValueError, naming the method, when it cannot train data-parallel: per-sample state
    (`needs_sample_index`: each rank would update only its rows of it) or an optimizer of its
    own (`after_step`: DDP averages only the trainer's gradients)."""
    reasons = []
    if distiller.needs_sample_index:
        reasons.append("it keeps per-sample state over the training set (needs_sample_index)")
    if distiller.after_step is not Distiller.after_step:
        reasons.append("it steps an optimizer of its own (after_step)")
    if reasons:
        raise ValueError(f"{distiller.method_label()} cannot train on several workers: {' and '.join(reasons)}")


class _TrainingForward(nn.Module):
    """`distiller.forward_train` as a module's forward, the call DDP hooks its gradient sync to."""

    def __init__(self, distiller: Distiller) -> None:
        super().__init__()
        self.distiller = distiller

    def forward(self, images: torch.Tensor, labels: torch.Tensor,
                position: TrainingPosition) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.distiller.forward_train(images, labels, position)


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel group: rank `rank` of `world_size` (rank 0 is
    the one that evaluates, checkpoints and reports). Needs the default process group joined
    (`join`)."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (N, ...): the `rank`-th of `world_size` contiguous,
        near-equal parts (`torch.tensor_split`; sizes differ by at most one)."""
        return torch.tensor_split(rows, self.world_size)[self.rank]

    def check_batches(self, train_size: int, batch_size: int) -> None:
        """Raise ValueError when some rank would get no rows of a batch (a batch, or the epoch's
        last partial batch, smaller than the number of ranks)."""
        last = train_size % batch_size or batch_size
        if min(batch_size, last) < self.world_size:
            raise ValueError(
                f"{self.world_size} workers cannot share a batch of {min(batch_size, last)} images "
                f"({train_size} training images in batches of {batch_size}): every worker needs a row "
                "of every batch; use fewer workers or another batch size")

    def wrap(self, distiller: Distiller) -> nn.Module:
        """A DDP module whose forward is `distiller.forward_train`. Construction broadcasts rank
        0's parameters and buffers to every rank (a collective: every rank calls it at the same
        point). BatchNorm statistics stay per rank (`forward_sync_buffers=False`: rank 0's are the
        evaluated ones), and parameters a step leaves without a gradient are allowed."""
        device = next(distiller.parameters()).device
        return DistributedDataParallel(
            _TrainingForward(distiller), device_ids=[device] if device.type == "cuda" else None,
            forward_sync_buffers=False, find_unused_parameters=True)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the ranks, in place (every rank gets the sum)."""
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values
