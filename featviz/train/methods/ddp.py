"""Distributed helpers of the SSL methods.

A differentiable all-gather, MoCo's batch shuffle, and the MoCo CIFAR demo's SplitBatchNorm
(per-GPU BatchNorm simulated in one process).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------- distributed helpers
class _GatherSameLoss(torch.autograd.Function):
    """all_gather whose backward assumes every rank computes the same loss from the result.

    Then the gradient for this rank's slice is the same on every rank, and the sum over ranks
    that an all_gather backward needs is ``world_size`` times the local slice.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.rank, ctx.world, ctx.n = dist.get_rank(), dist.get_world_size(), x.shape[0]
        out = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n] * ctx.world


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank (in rank order), differentiably; ``x`` when alone."""
    if not _distributed():
        return x
    if not x.requires_grad:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)
    return _GatherSameLoss.apply(x)


@torch.no_grad()
def all_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (identity when alone)."""
    if _distributed():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


@torch.no_grad()
def batch_shuffle_ddp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's ``builder.py`` ``_batch_shuffle_ddp``: shuffle a batch across ranks.

    Returns this rank's share of a randomly permuted global batch (rank 0 draws the
    permutation), and the index that undoes it.
    """
    x_all = gather(x)
    n_ranks = x_all.shape[0] // x.shape[0]
    idx_shuffle = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(idx_shuffle, src=0)
    idx_unshuffle = torch.argsort(idx_shuffle)
    return x_all[idx_shuffle.view(n_ranks, -1)[dist.get_rank()]], idx_unshuffle


@torch.no_grad()
def batch_unshuffle_ddp(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """MoCo ``_batch_unshuffle_ddp``: undo ``batch_shuffle_ddp`` on the keys."""
    x_all = gather(x)
    n_ranks = x_all.shape[0] // x.shape[0]
    return x_all[idx_unshuffle.view(n_ranks, -1)[dist.get_rank()]]


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over ``splits`` interleaved sub-batches: the MoCo CIFAR demo's SplitBatchNorm.

    It simulates per-GPU BatchNorm in one process (sub-batch j holds samples j, j+s, j+2s, ...).

    Same parameters, buffers and state-dict keys as ``BatchNorm2d``; in eval mode, or with
    ``splits`` 1, it is one. The running statistics are the mean over sub-batches, as in the demo.
    """

    def __init__(self, num_features: int, splits: int = 1, **kw: Any):
        """A ``BatchNorm2d(num_features, **kw)`` split ``splits`` ways in training."""
        super().__init__(num_features, **kw)
        self.splits = splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (N, C, H, W), each sub-batch by its own statistics in training."""
        s = self.splits
        if not self.training or s <= 1 or not self.track_running_stats:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % s:
            raise ValueError(f"SplitBatchNorm2d: batch {n} does not split into {s} equal parts")
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        weight = self.weight.repeat(s) if self.affine else None
        bias = self.bias.repeat(s) if self.affine else None
        out = F.batch_norm(x.reshape(n // s, s * c, h, w), mean, var, weight, bias, True, factor, self.eps)
        self.running_mean.copy_(mean.view(s, c).mean(0))
        self.running_var.copy_(var.view(s, c).mean(0))
        return out.reshape(n, c, h, w)


def convert_split_bn(module: nn.Module, splits: int) -> nn.Module:
    """Replace every ``BatchNorm2d`` in ``module`` by a ``SplitBatchNorm2d`` with the same state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = SplitBatchNorm2d(child.num_features, splits, eps=child.eps, momentum=child.momentum,
                                   affine=child.affine, track_running_stats=child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(next(iter(child.state_dict().values())).device)
            setattr(module, name, new)
        else:
            convert_split_bn(child, splits)
    return module


def set_bn_splits(module: nn.Module, splits: int) -> None:
    """Set the splits of every ``SplitBatchNorm2d`` in ``module`` (1: unsplit)."""
    for m in module.modules():
        if isinstance(m, SplitBatchNorm2d):
            m.splits = splits
