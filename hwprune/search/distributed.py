"""Scale-out of supernet training: ``torchrun --nproc-per-node N -m hwprune supernet train ...``.

torchrun starts N processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``; :func:`world_from_env` joins them into one process group (gloo on CPU,
nccl on GPU) or, outside torchrun, returns a world of one. What each piece does:

* the model is wrapped in DistributedDataParallel, which averages gradients over the ranks;
  batch norms stay local (SyncBatchNorm does not run on CPU, and a subnet's statistics are
  recalibrated before it is scored anyway);
* :class:`ShardedBatchLoader` shards the training split like ``DistributedSampler``: each
  epoch one permutation, the same on every rank, of which rank ``r`` takes every N-th image
  from position ``r`` (the batch size is per process);
* the ranks agree on the sampled configurations: every rank draws them from the same seeded
  generator (seeded by the step), and rank 0's draw is broadcast; the losses that teach the
  sampling prior are averaged over the ranks first, so the priors stay equal;
* only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

from hwprune.errors import HwpruneError
from hwprune.training.data import BatchLoader, ImageDataset

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class World:
    """This process's place among the training processes (a world of one without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: its own GPU (``cuda:LOCAL_RANK``) when training on CUDA."""
        if device.type == "cuda" and self.distributed:
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``module`` in DistributedDataParallel (buffers left local), or itself in a world of one."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(module, device_ids=ids, forward_sync_buffers=False)  # BN statistics stay per rank

    def no_sync(self, model: torch.nn.Module):
        """Accumulate gradients without averaging them (all but the last backward of a step)."""
        return model.no_sync() if self.distributed else contextlib.nullcontext()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` averaged over the ranks (a copy)."""
        t = t.detach().clone()
        if self.distributed:
            dist.all_reduce(t)
            t /= self.size
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` on every rank."""
        if self.distributed:
            dist.broadcast(t, src=0)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def agree_int(self, value: int, device: torch.device) -> int:
        """The largest ``value`` any rank holds (e.g. the epoch a resumed run continues from)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def world_from_env(device: torch.device, timeout_s: float = 120.0) -> World:
    """Join the process group torchrun described in the environment (one-line error when it
    cannot form), or a world of one outside torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World()
    missing = [k for k in _ENV if not os.environ.get(k)]
    if missing:
        raise HwpruneError(f"WORLD_SIZE is {size} but {', '.join(missing)} is not set",
                           hint="start distributed training with torchrun --nproc-per-node N -m hwprune ...")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and torch.cuda.device_count() <= local:
        raise HwpruneError(f"rank {rank} needs GPU {local} but this host has {torch.cuda.device_count()}",
                           hint="start at most one process per GPU")
    if not dist.is_initialized():
        if rank != 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # the store must already run
            _wait_for_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, timeout_s)
        try:
            dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
        except Exception as e:  # a peer never came, the port is taken, the address is unreachable...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise HwpruneError(f"the distributed world of {size} processes could not form ({backend} at "
                               f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}): {first}",
                               hint="check that every process started and MASTER_ADDR/MASTER_PORT are reachable") from None
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local, backend=backend)


def _wait_for_store(addr: str, port: int, size: int, timeout_s: float) -> None:
    """Wait until the rendezvous store at ``addr:port`` accepts connections (one-line error when
    it never does), so that an unreachable master fails here rather than deep inside c10d."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((addr, port), timeout=min(5.0, timeout_s)).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise HwpruneError(f"the distributed world of {size} processes could not form: nothing answers at "
                                   f"{addr}:{port} ({e.strerror or type(e).__name__})",
                                   hint="check that rank 0 started and MASTER_ADDR/MASTER_PORT are reachable") from None
            time.sleep(0.2)


def is_main_process() -> bool:
    """Whether this process is rank 0 (or not under torchrun at all): the one that prints and writes."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def close(world: World) -> None:
    """Leave the process group this module joined."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


class ShardedBatchLoader(BatchLoader):
    """A :class:`BatchLoader` over this rank's shard of ``dataset`` (see the module docstring).

    With a world of one it iterates over the whole split in a fresh permutation every epoch.
    Augmentation draws from a generator seeded by the seed, the epoch and the rank.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, world: World, **kw):
        super().__init__(dataset, batch_size, **kw)
        self.world = world

    def _shard_size(self) -> int:
        return len(self.dataset) // self.world.size

    def __len__(self) -> int:
        n = self._shard_size()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self, gen: torch.Generator) -> torch.Tensor:
        order = super()._order(gen)  # the same on every rank: they share the seed and the epoch
        gen.manual_seed((self.seed * 1_000_003 + self.epoch) * 131 + self.world.rank)  # augment apart
        return order[self.world.rank::self.world.size][: self._shard_size()]


def encode_configs(configs: Sequence[dict[str, int]], groups: Sequence[str], device) -> torch.Tensor:
    return torch.tensor([[int(c[g]) for g in groups] for c in configs], dtype=torch.long, device=device)


def decode_configs(t: torch.Tensor, groups: Sequence[str]) -> list[dict[str, int]]:
    return [dict(zip(groups, (int(v) for v in row))) for row in t.cpu().tolist()]
