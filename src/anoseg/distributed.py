"""Training on several processes (torchrun): one process per GPU (NCCL) or per CPU worker (gloo).

Every rank draws the same global batch and the same synthetic anomalies from the per-step seed, and
keeps its own share of it (a DistributedSampler over the batch). Gradients are averaged by
DistributedDataParallel, batch-norm statistics are taken over the global batch, and losses are
normalised over the global batch, so N processes train the same model as one process with the same
``batch_size`` (the global batch), up to floating-point rounding.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data.distributed import DistributedSampler

from .errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank 0 of 1 when not launched by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """False on the ranks other than 0 of a torchrun launch (they neither print nor write)."""
    return int(os.environ.get("RANK", "0")) == 0


def init_from_env(device: str) -> tuple[DistContext, torch.device | None]:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); returns the context and the
    device for this rank (None: use the usual device choice)."""
    if not launched_by_torchrun():
        return DistContext(), None
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return DistContext(rank, world, local), torch.device(f"cuda:{local}" if use_cuda else "cpu")


def shard(batch_size: int, ctx: DistContext) -> list[int]:
    """Indices of the global batch this rank trains on."""
    if batch_size % ctx.world:
        raise ConfigError(f"batch_size {batch_size} (the global batch) must be divisible by the number of "
                          f"processes ({ctx.world})")
    sampler = DistributedSampler(range(batch_size), num_replicas=ctx.world, rank=ctx.rank, shuffle=False)
    return list(sampler)


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_flag(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True on every rank when it is true on any (e.g. one rank got Ctrl-C)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown_process_group() -> None:
    """Leave the torchrun process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum of the ranks' gradients (every rank's loss depends on it)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch of all ranks.

    torch's SyncBatchNorm needs a GPU; this one runs on any backend (gloo included). Its weights and
    buffers have the same names as BatchNorm2d's, so checkpoints are interchangeable.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        x = x.float()  # as autocast runs BatchNorm2d: statistics of bfloat16 activations in fp32
        c = x.shape[1]
        count = x.new_tensor([x.numel() / c])
        stats = _AllReduceSum.apply(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1.0), m)
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None] if self.affine else y


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm2d in `module` for GlobalBatchNorm2d (same parameters and buffers)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats).to(child.weight.device)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_batchnorm(child)
    return module


def wrap(module: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """DistributedDataParallel around a module when training on several processes."""
    if not ctx.enabled:
        return module
    ids = [device.index] if device.type == "cuda" else None
    # buffers (batch-norm statistics, spectral-norm vectors) evolve identically on every rank: no syncing
    try:
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)
    except TypeError:  # torch before forward_sync_buffers
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


__all__ = ["DistContext", "GlobalBatchNorm2d", "all_reduce_sum", "barrier", "broadcast_flag",
           "convert_batchnorm", "init_from_env", "is_main_process", "shard", "shutdown_process_group", "wrap"]
