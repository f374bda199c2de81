"""Training on several processes: torchrun's ranks, one per GPU (NCCL) or per CPU share (gloo).

`reskd train` and `reskd sweep` run as one process, or under `torchrun --nproc-per-node N [--nnodes M ...] -m
reskd.cli train ...` as N x M ranks. World.from_env reads what torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); a
single process is a world of one, where everything here is a no-op, so the one-process path is the same code.

How a distributed run trains (docs/training.md, "Several GPUs, several nodes"):
- Every rank draws the same global order and augmentations (the same seeds) and takes its own slice of each global
  batch (training/batches.py): the recipe's batch_size is the global batch, split evenly over the ranks, and the lr
  stays the recipe's, so N ranks train what one process with the same batch trains. With synchronised batch-norm
  (`train.sync_batchnorm`) the statistics are the global batch's too, and the weights after k steps equal the
  one-process run's up to float summation order (tests/test_distributed.py).
- The stage being trained is wrapped in DistributedDataParallel (gradients averaged over the ranks); the frozen
  teacher and earlier stages run on each rank's own slice.
- Rank 0 alone writes: the run directory, checkpoints (partial ones after each epoch), logs, progress bars,
  evaluation and the report. What it reads from the run directory (finished and partial checkpoints on --resume)
  it sends to the other ranks, so other nodes need no shared file system.
- After every epoch the ranks compare a digest of their weights and batch-norm statistics (rank 0's statistics,
  broadcast, are the ones kept): a rank that drifted stops the run.
- Checks that fail on any rank (the recipe differs between ranks, the global batch does not split evenly, a rank
  cannot read the data, the run directory is in use) stop every rank with the same message before anything is
  written (DistributedError). A rank that dies makes the others fail at their next collective: at once where the
  connection drops, at the latest after the process-group timeout (--dist-timeout).
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
# Imported before any process group exists, on purpose: this module's functions take `group=group.WORLD` as a
# default argument, evaluated when it is first imported. DistributedDataParallel imports it; imported after
# init_process_group, its defaults would hold the default group forever, and destroy_process_group could then never
# free it (World.stop).
import torch.distributed.nn.functional  # noqa: F401

DEFAULT_TIMEOUT_S = 600.0


class DistributedError(RuntimeError):
    """The ranks cannot train together; the message says which rank found what."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls) -> World:
        """torchrun's ranks (RANK, WORLD_SIZE, LOCAL_RANK), or a world of one."""
        try:
            size = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as err:
            raise DistributedError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers: {err}") from None
        if size < 1 or not 0 <= rank < size:
            raise DistributedError(f"RANK {rank} is not a rank of a world of WORLD_SIZE {size}")
        return cls(rank, size, local)

    # -- the process group --------------------------------------------------------------------------------------
    def start(self, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
        """Join the process group (NCCL on CUDA, gloo on the CPU) -> this rank's device (cuda:LOCAL_RANK)."""
        if not self.distributed:
            return device
        if device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise DistributedError(f"rank {self.rank}: LOCAL_RANK {self.local_rank} but torch sees "
                                       f"{torch.cuda.device_count()} CUDA devices; start at most that many ranks "
                                       "per node (--nproc-per-node)")
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s), rank=self.rank,
                                    world_size=self.size,
                                    device_id=device if device.type == "cuda" else None)
        return device

    def stop(self, together: bool = True) -> None:
        """Leave the process group and free it: its threads are joined here, while the interpreter runs. Call it
        once the DistributedDataParallel wrappers are out of reach (they hold the group).

        A group left alive until the interpreter exits aborts the process now and then ("terminate called without an
        active exception"): a gloo worker thread that still holds the last reference to a finished collective's
        tensors drops it during finalization, must take the GIL for that, and cannot (a core dump of
        tests/test_distributed.py's two-rank run showed exactly that, about one run in fifty). So after
        destroy_process_group the garbage collector runs: the last references, in reference cycles, go, and the
        group's destructor joins its threads (torch releases the GIL for it).

        together: the ranks finished their work normally, so they first wait for one another (a barrier). After a
        failure no rank waits; a peer that fails at the barrier itself changes nothing for this rank's result."""
        if self.distributed and dist.is_initialized():
            if together:
                try:
                    dist.barrier()
                except RuntimeError:
                    pass
            dist.destroy_process_group()
            gc.collect()

    # -- agreeing -----------------------------------------------------------------------------------------------
    def agree(self, problem: str | None) -> None:
        """Every rank says what is wrong on its side (None: nothing); if any rank found something, every rank
        raises DistributedError with all of it, so the whole job stops with the same message."""
        if not self.distributed:
            if problem:
                raise DistributedError(problem)
            return
        problems: list[str | None] = [None] * self.size
        dist.all_gather_object(problems, problem)
        found = [f"rank {r}: {p}" for r, p in enumerate(problems) if p]
        if found:
            raise DistributedError("; ".join(found))

    def same(self, value: str, what: str) -> None:
        """Every rank holds the same `value` (e.g. a digest of the recipe); otherwise every rank stops."""
        if not self.distributed:
            return
        values: list[str | None] = [None] * self.size
        dist.all_gather_object(values, value)
        if len(set(values)) > 1:
            differ = [r for r, v in enumerate(values) if v != values[0]]
            raise DistributedError(f"{what} differs between ranks: rank 0's is not the one of rank(s) "
                                   f"{', '.join(map(str, differ))}; start every rank with the same arguments")

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (pickled; tensors come back on this rank's device under NCCL)."""
        if not self.distributed:
            return value
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # -- training -----------------------------------------------------------------------------------------------
    def shard(self, global_batch: int) -> slice:
        """This rank's rows of a global batch."""
        local = global_batch // self.size
        return slice(self.rank * local, (self.rank + 1) * local)

    def check_batch(self, batch_size: int, what: str) -> str | None:
        """Why `batch_size` (global) cannot be split over the ranks, or None."""
        if batch_size % self.size:
            return (f"{what} batch_size {batch_size} does not split evenly over {self.size} ranks; make it a "
                    f"multiple of the world size (it is the global batch)")
        return None

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """`model` under DistributedDataParallel (gradients averaged over the ranks), or itself alone."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def sum(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """The values summed over the ranks (one all-reduce)."""
        if not self.distributed:
            return list(values)
        flat = torch.stack([v.double().reshape(()) for v in values])
        dist.all_reduce(flat)
        return list(flat.unbind())

    def settle(self, model: torch.nn.Module, what: str) -> None:
        """After an epoch: rank 0's buffers (batch-norm statistics) on every rank, then every rank's weights and
        buffers compared by digest; a difference stops the run on every rank."""
        if not self.distributed:
            return
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digests: list[str | None] = [None] * self.size
        dist.all_gather_object(digests, digest.hexdigest())
        if len(set(digests)) > 1:
            differ = [r for r, d in enumerate(digests) if d != digests[0]]
            raise DistributedError(f"{what}: the weights of rank(s) {', '.join(map(str, differ))} differ from rank "
                                   "0's; the ranks no longer train one model")


SINGLE = World()


class SyncBatchNorm2d(torch.nn.BatchNorm2d):
    """Batch-norm whose training statistics are the global batch's, over every rank, on any device (torch's
    SyncBatchNorm runs on GPUs only; torch's is used there). Each forward all-reduces the per-channel sum, then the
    sum of squared deviations from the global mean (two passes, as one process computes them); the all-reduces
    are differentiable, so the gradients are the global batch's too. Outside training, or in a world of one, it is
    plain batch-norm, and its state is batch-norm's (checkpoints do not change)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = (0, 2, 3)
        count = torch.tensor(float(x.numel() // x.shape[1]), dtype=torch.float64)
        dist.all_reduce(count)
        n = float(count)
        xf = x.float()
        mean = all_reduce(xf.sum(dims)) / n
        centred = xf - mean[None, :, None, None]
        var = all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * (n / max(n - 1, 1.0)), alpha=factor)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


class _AllReduceSum(torch.autograd.Function):
    """A sum over the ranks that gradients flow through: each rank's input gets the sum of every rank's gradient
    of the result (every rank's loss depends on every rank's input through it)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` with every BatchNorm2d synchronised over the ranks (in place: the parameters and statistics are the
    same tensors): torch's SyncBatchNorm on CUDA, SyncBatchNorm2d elsewhere."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def convert(module: torch.nn.Module) -> torch.nn.Module:
        for name, child in module.named_children():
            if type(child) is torch.nn.BatchNorm2d:
                synced = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                         child.track_running_stats)
                if child.affine:
                    synced.weight, synced.bias = child.weight, child.bias
                if child.track_running_stats:
                    synced.running_mean, synced.running_var = child.running_mean, child.running_var
                    synced.num_batches_tracked = child.num_batches_tracked
                synced.train(child.training)
                setattr(module, name, synced)
            else:
                convert(child)
        return module

    return convert(model)
