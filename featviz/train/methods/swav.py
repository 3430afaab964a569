"""SwAV and its Sinkhorn-Knopp assignment."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from featviz.data.augment import METHOD_RECIPES
from featviz.models.heads import scaled
from featviz.train.methods.base import SSLMethod, _cancel_grads, multicrop_forward
from featviz.train.methods.ddp import (
    _distributed,
)
from featviz.train.methods.registry import (
    DataContext,
    MethodRegistration,
    _digits,
    register,
)
from featviz.train.optim import Optim


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """SwAV's ``distributed_sinkhorn``: equipartitioned soft codes Q (B x K) from prototype scores.

    Under DDP ``scores`` is this rank's (B_local x K) share; the sums run over every rank.
    """
    scores = scores.float()
    shift = scores.max()
    if _distributed():
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    q = torch.exp((scores - shift) / eps).T  # K x B; the max shift cancels in the normalisation
    k = q.shape[0]
    b = q.shape[1] * (dist.get_world_size() if _distributed() else 1)
    total = q.sum()
    if _distributed():
        dist.all_reduce(total)
    q /= total
    for _ in range(iters):
        rows = q.sum(dim=1, keepdim=True)
        if _distributed():
            dist.all_reduce(rows)
        q /= rows
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).T


class SwAV(SSLMethod):
    """SwAV (Caron et al. 2020): "swapped prediction" of one view's Sinkhorn code from the other.

    L = -sum_k q2_k log softmax(z1 . c / tau)_k + (1 <-> 2); multi-crop optional.

    ``main_swav.py``: prototypes are re-normalised before every step; from epoch
    ``epoch_queue_starts`` a queue of ``queue_length`` past embeddings joins the Sinkhorn
    assignment (the scores of the queued embeddings use the current prototypes); the prototypes
    get no gradient for the first ``freeze_prototypes_niters`` steps.
    """

    name = "swav"
    monitor_normalize = True

    def __init__(self, backbone: nn.Module, *, tau: float = 0.1, eps: float = 0.05, sinkhorn_iters: int = 3,
                 prototypes: int | None = None, queue_length: int = 0, epoch_queue_starts: int = 15,
                 freeze_prototypes_niters: int = 313, feat_dim: int = 128):
        """Build the heads, the prototypes and the queue around ``backbone``; the keywords are hyperparameters."""
        super().__init__(backbone)
        self.tau, self.eps, self.sinkhorn_iters = tau, eps, sinkhorn_iters
        self.queue_length, self.epoch_queue_starts = queue_length, epoch_queue_starts
        self.freeze_prototypes_niters = freeze_prototypes_niters
        self.head("projector", {"type": "mlp", "dims": [self.dim, scaled(2048, self.dim), feat_dim], "bn": True})
        self.head("prototypes", {"type": "linear", "dims": [feat_dim, prototypes or scaled(3000, self.dim, lo=30)]})
        # the queue (per process, as in main_swav.py): one row block per assigned crop; zeros = not yet filled
        n = queue_length // (dist.get_world_size() if _distributed() else 1)
        self.register_buffer("queue", torch.zeros(2, n, feat_dim))
        self.register_buffer("queue_active", torch.zeros((), dtype=torch.bool))
        self.queue_used = False

    def set_epoch(self, epoch: int) -> None:
        """The epoch, and the queue from ``epoch_queue_starts`` on."""
        super().set_epoch(epoch)
        if self.queue_length > 0 and epoch >= self.epoch_queue_starts:
            self.queue_active.fill_(True)

    def before_step(self, step: int) -> None:
        """No gradient for the prototypes during the first ``freeze_prototypes_niters`` steps."""
        if step < self.freeze_prototypes_niters:  # main_swav.py: cancel gradients for the prototypes
            _cancel_grads(self.prototypes)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The loss of one batch of views (codes from the global crops only)."""
        with torch.no_grad():  # prototypes live on the unit sphere
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        bs = views[0].shape[0]
        # src/resnet50.py forward: same-size crops share one backbone pass, the head runs once
        z = F.normalize(multicrop_forward(self.backbone, self.projector, views)[1], dim=1)
        z, scores = z.split(bs), self.prototypes(z).split(bs)  # B x K each
        self._keep(z[0], z[1])
        self.queue_used = False
        loss = 0.0
        for i in (0, 1):  # codes from the global crops only
            with torch.no_grad():
                out = scores[i].detach()
                if bool(self.queue_active) and self.queue.shape[1]:
                    if self.queue_used or not bool(torch.all(self.queue[i, -1] == 0)):
                        self.queue_used = True
                        out = torch.cat([self.queue[i] @ self.prototypes.weight.T, out])
                    self.queue[i, bs:] = self.queue[i, :-bs].clone()
                    self.queue[i, :bs] = z[i].detach()[-self.queue.shape[1]:]
                q = sinkhorn(out, self.eps, self.sinkhorn_iters)[-bs:]
            sub = [-(q * F.log_softmax(s / self.tau, dim=1)).sum(dim=1).mean()
                   for j, s in enumerate(scores) if j != i]
            loss = loss + sum(sub) / len(sub)
        return loss / 2


def _swav_defaults(ctx: DataContext) -> dict[str, Any]:
    """SwAV's queue and prototype freezing from the data, as the official scripts set them.

    Freeze the prototypes for one epoch (313 steps at batch 4096, 5005 at 256); a queue only
    when the batch is too small for the prototypes (the bs-256 scripts: 256 + 3840 = 1.37 x 3000
    assignments; none at 4096), long enough for 1.37 x K, in whole global batches, at most half
    the training images; started after 15/400 of the epochs (at least 1).
    """
    k, b = scaled(3000, ctx.feature_dim, lo=30), ctx.batch_size
    queue = min(max(0, math.ceil((1.37 * k - b) / b)), ctx.n_train // (2 * b)) * b  # at most half the data
    return {"freeze_prototypes_niters": ctx.steps_per_epoch, "queue_length": int(queue),
            "epoch_queue_starts": max(1, round(ctx.epochs * 15 / 400))}


register(MethodRegistration(
    "swav", SwAV,
    recipe=METHOD_RECIPES["swav"],
    official=Optim("larc", lr=0.6, weight_decay=1e-6, final_lr=0.001,
                   source="swav main_swav.py:170-182 (SGD + LARC trust 0.001 on every parameter, cosine to "
                          "final_lr), scripts/swav_400ep_bs256_pretrain.sh (base_lr 0.6, final_lr 0.0006, wd 1e-6)"),
    optim=Optim("sgd", lr=0.6, weight_decay=1e-6, final_lr=0.001, source="featviz"),
    hparams={"tau": 0.1, "eps": 0.05, "sinkhorn_iters": 3}, defaults=_swav_defaults,
    local_crops=0, official_local_crops=6,
    source="facebookresearch/swav main_swav.py:45-115 (arguments), 207-231 (queue), 259-329 (loss, queue, "
           "freeze_prototypes_niters), 353-376 (distributed_sinkhorn); src/resnet50.py:195-217 (head)",
    deviations=("SGD + momentum instead of LARC by default (`--optimizer larc` is the official one)",
                "no local crops by default on CPU (`--local-crops 6` is the official multi-crop)",
                "queue length and start, and the prototype freeze, scaled to the data (`_swav_defaults`)",
                "digits preset: epsilon 0.03 (0.05 collapses to uniform codes at batch 32; docs/train.md)"),
    presets={"digits": _digits(optimizer="larc", lr=1.0, hparams={"eps": 0.03})},
))
