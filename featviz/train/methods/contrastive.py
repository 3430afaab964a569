"""Contrastive methods, with their losses: SimCLR (NT-Xent), MoCo v2 (InfoNCE against a queue), MoCo v3."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from featviz.data.augment import METHOD_RECIPES, VIT_RECIPES
from featviz.models.heads import scaled
from featviz.train.methods.base import MomentumMixin, SSLMethod
from featviz.train.methods.ddp import (
    _distributed,
    batch_shuffle_ddp,
    batch_unshuffle_ddp,
    convert_split_bn,
    gather,
    set_bn_splits,
)
from featviz.train.methods.registry import (
    DataContext,
    MethodRegistration,
    _digits,
    register,
)
from featviz.train.optim import Optim


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss, as ``tf2/objective.py`` ``add_contrastive_loss`` computes it.

    For each of the 2N views, softmax cross-entropy of its positive against the 2N-2 others;
    loss = mean(loss_a + loss_b), i.e. the sum of the two views' mean losses. With DDP the
    candidates come from every rank and every rank computes the loss of the global batch.
    """
    a = gather(F.normalize(z1.float(), dim=1))  # fp32 under bf16 autocast
    b = gather(F.normalize(z2.float(), dim=1))
    n = a.shape[0]
    labels = torch.arange(n, device=a.device)
    mask = torch.eye(n, dtype=torch.bool, device=a.device)
    aa = (a @ a.T / tau).masked_fill(mask, float("-inf"))
    bb = (b @ b.T / tau).masked_fill(mask, float("-inf"))
    loss_a = F.cross_entropy(torch.cat([a @ b.T / tau, aa], 1), labels)
    loss_b = F.cross_entropy(torch.cat([b @ a.T / tau, bb], 1), labels)
    return loss_a + loss_b


def moco_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo's InfoNCE against a queue, as ``builder.py`` ``forward`` computes it.

    Logits [q.k+, q.queue] / T, cross-entropy with label 0 (``q``, ``k`` and the queue rows
    l2-normalised).
    """
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ queue.T
    logits = torch.cat([l_pos, l_neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def moco_ctr(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo v3's ctr(q, k): InfoNCE against the (global) batch of keys, scaled by 2*tau."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    k = gather(k)
    offset = dist.get_rank() * q.shape[0] if _distributed() else 0
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(q @ k.T / tau, labels) * 2 * tau


class SimCLR(SSLMethod):
    """SimCLR (Chen et al. 2020).

    "A nonlinear projection head g(.)" and the NT-Xent loss
    l(i,j) = -log exp(sim(z_i,z_j)/tau) / sum_{k!=i} exp(sim(z_i,z_j)/tau), over 2N views.

    The projector is ``tf2/model.py`` ``ProjectionHead`` (``num_proj_layers`` 3): every layer
    Linear-BN, the hidden ones as wide as the input with ReLU, the last without bias, its BN
    with a scale but no shift.
    """

    name = "simclr"

    def __init__(self, backbone: nn.Module, *, tau: float = 0.5, proj_layers: int = 3, out_dim: int = 128):
        """Build the heads around ``backbone``; the keywords are hyperparameters."""
        super().__init__(backbone)
        self.tau = tau
        self.head("projector", {"type": "mlp", "dims": [self.dim] * proj_layers + [out_dim], "bn": True,
                                "last_bn": True, "last_affine": "scale"})

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The loss of one batch of views."""
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])  # NxC
        self._keep(z1, z2)
        return nt_xent(z1, z2, self.tau)


register(MethodRegistration(
    "simclr", SimCLR,
    recipe=METHOD_RECIPES["simclr"],
    official=Optim("lars", lr=0.3, weight_decay=1e-6, decay_bias_norm=False, warmup_epochs=10,
                   source="simclr tf2/run.py:37-57 (lr 0.3 x batch/256, wd 1e-6, warmup 10, LARS), "
                          "tf2/model.py:29-44 (LARS excludes batch_normalization and bias); CIFAR: "
                          "tf2/README.md:61-66 (lr 1.0, wd 1e-4, temperature 0.5, no blur, jitter 0.5)"),
    optim=Optim("sgd", lr=0.3, weight_decay=1e-4, decay_bias_norm=False, source="featviz"),
    hparams={"tau": 0.5}, zero_init_residual=True,
    source="google-research/simclr tf2/objective.py:35-89, tf2/model.py:119-213, tf2/resnet.py:366 (init_zero)",
    deviations=("SGD + momentum instead of LARS by default (LARS targets batches of 4096; `--optimizer lars` "
                "is the official one)", "tau 0.5: the official CIFAR setting (ImageNet 0.1)"),
    presets={"digits": _digits()},
))


class MoCoV2(MomentumMixin, SSLMethod):
    """MoCo v2 (Chen et al. 2020).

    InfoNCE of a query against its key from a momentum encoder and a queue of past keys; "an MLP
    projection head" and stronger augmentation than MoCo v1.

    Shuffle-BN (MoCo Sec. 3.3): the key encoder sees a shuffled batch, so a query and its
    positive key never share BatchNorm statistics. Under DDP the keys are shuffled across
    processes (``_batch_shuffle_ddp``) and each process keeps its own BatchNorm; in one process
    BatchNorm is split into ``bn_splits`` sub-batches and the key batch shuffled, as the
    official CIFAR demo does (``SplitBatchNorm``, ``_batch_shuffle_single_gpu``).
    """

    name = "moco_v2"
    monitor_normalize = True

    def __init__(self, backbone: nn.Module, *, tau: float = 0.2, queue_size: int = 65536, momentum: float = 0.999,
                 bn_splits: int = 8, dim: int = 128, shuffle_bn: bool = True):
        """Build the heads, the key encoder and the queue around ``backbone``; the keywords are hyperparameters."""
        super().__init__(backbone)
        self.tau, self.base_momentum, self.bn_splits, self.shuffle_bn = tau, momentum, bn_splits, shuffle_bn
        self.head("projector", {"type": "mlp", "dims": [self.dim, self.dim, dim], "bn": False})
        if shuffle_bn and bn_splits > 1:
            convert_split_bn(self.backbone, bn_splits)
        self.make_target("backbone", "projector")
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def set_splits(self, splits: int) -> None:
        """Split the backbones' BatchNorm into ``splits`` sub-batches (1: unsplit)."""
        set_bn_splits(self, splits)

    def train_bn_splits(self) -> int:
        """``bn_splits`` with shuffle-BN (the CIFAR demo's SplitBatchNorm), else 1."""
        return self.bn_splits if self.shuffle_bn else 1

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """The momentum encoder's l2-normalised keys of ``x``, with shuffle-BN (no gradient)."""
        with torch.no_grad():
            if not self.shuffle_bn:
                return F.normalize(self.target_projector(self.target_backbone(x)).float(), dim=1)
            if _distributed():
                self.set_splits(1)  # per-process BatchNorm, shuffled across processes
                xs, undo = batch_shuffle_ddp(x)
                k = F.normalize(self.target_projector(self.target_backbone(xs)).float(), dim=1)
                return batch_unshuffle_ddp(k, undo)
            perm = torch.randperm(x.shape[0], device=x.device)
            k = F.normalize(self.target_projector(self.target_backbone(x[perm])).float(), dim=1)
            return k[torch.argsort(perm)]

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The loss of one batch of views (the keys are queued after the step)."""
        if _distributed():
            self.set_splits(1)
        q = F.normalize(self.projector(self.backbone(views[0])).float(), dim=1)  # NxC
        k = self.keys(views[1])
        self._keep(q, k)
        self._pending = k
        return moco_infonce(q, k, self.queue.clone(), self.tau)

    @torch.no_grad()
    def on_step_end(self, progress: float) -> None:
        """The key encoder's EMA step (m fixed, as MoCo keeps it), then this step's keys into the queue."""
        self.update_targets(self.base_momentum)  # MoCo keeps m fixed
        k = gather(self._pending)
        n, size = k.shape[0], self.queue.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=k.device)) % size
        self.queue[idx] = k[-size:] if n > size else k
        self.queue_ptr.copy_((self.queue_ptr + n) % size)


def _moco_v2_defaults(ctx: DataContext) -> dict[str, Any]:
    """MoCo v2's queue and momentum from the data.

    K = 8 % of the training images (the CIFAR demo's 4096 of 50k, which it found saturated),
    rounded up to whole global batches, at most the official 65536; m = 1 - 1/steps per epoch (a
    key-encoder horizon of one epoch: the demo's 0.99 at 97 steps), at most the official 0.999;
    bn_splits: sub-batches of 32 (ImageNet's per-GPU batch), 2 to 8 (the demo's 8 of 64).
    """
    b = ctx.batch_size
    queue = min(65536, max(1, math.ceil(0.08 * ctx.n_train / b)) * b)
    m = min(0.999, max(0.9, 1 - 1 / ctx.steps_per_epoch))
    per_rank = b // max(1, ctx.world_size)
    splits = min(8, max(2, per_rank // 32))
    while splits > 1 and per_rank % splits:
        splits -= 1
    return {"queue_size": int(queue), "momentum": round(m, 4), "bn_splits": splits}


register(MethodRegistration(
    "moco_v2", MoCoV2,
    recipe=METHOD_RECIPES["moco_v2"],
    official=Optim("sgd", lr=0.03, weight_decay=1e-4, source="moco main_moco.py:78-105 (lr 0.03 for batch 256, "
                   "wd 1e-4, momentum 0.9), README.md:51 (--mlp --moco-t 0.2 --aug-plus --cos)"),
    optim=Optim("sgd", lr=0.03, weight_decay=1e-4, source="moco main_moco.py:78-105"),
    hparams={"tau": 0.2}, defaults=_moco_v2_defaults, sync_bn=False,
    source="facebookresearch/moco moco/builder.py:16-173 (K 65536, m 0.999, _batch_shuffle_ddp), main_moco.py:153-177; "
           "colab-notebook branch colab/moco_cifar10_demo.ipynb (SplitBatchNorm, K 4096, m 0.99)",
    deviations=("queue and momentum scaled to the data (`_moco_v2_defaults`; official 65536 / 0.999 on ImageNet)",
                "in one process: SplitBatchNorm + a shuffled key batch, the official CIFAR demo's substitute "
                "for shuffle-BN"),
    presets={"digits": _digits(lr=0.03)},
))


class MoCoV3(MomentumMixin, SSLMethod):
    """MoCo v3 (Chen, Xie, He 2021).

    Symmetric ctr(q1, k2) + ctr(q2, k1) where the query encoder has a prediction MLP and keys
    come from a momentum encoder; ctr is InfoNCE scaled by 2*tau.

    Heads are ``builder.py`` ``_build_mlp``: Linear without bias, BN + ReLU between layers, a
    final ``BatchNorm1d(affine=False)`` where ``last_bn``. ResNet (``MoCo_ResNet``): a 2-layer
    projector and a 2-layer predictor without final BN, tau 1.0; ViT (``MoCo_ViT``): a 3-layer
    projector and a predictor ending in BN, tau 0.2 (the ``vit`` variant of its registration).
    """

    name = "moco_v3"
    momentum_of_next_step = True  # main_moco.py: adjust_moco_momentum(epoch + i / iters) inside step i's forward

    def __init__(self, backbone: nn.Module, *, tau: float = 1.0, momentum: float = 0.99, proj_layers: int = 2,
                 pred_last_bn: bool = False, mlp_dim: int | None = None, dim: int | None = None,
                 momentum_of_next_step: bool = True):
        """Build the heads and the momentum encoder around ``backbone``; the keywords are hyperparameters.

        ``momentum_of_next_step``: the official index (``adjust_moco_momentum`` of the step whose
        forward the update precedes); False: featviz's earlier one, a step late (the digits preset).
        """
        super().__init__(backbone)
        self.tau, self.base_momentum = tau, momentum
        self.momentum_of_next_step = momentum_of_next_step
        # main_moco.py --moco-mlp-dim 4096, --moco-dim 256 (for 2048-d features)
        hid, out = mlp_dim or scaled(4096, self.dim), dim or scaled(256, self.dim)
        self.head("projector", {"type": "mlp", "dims": [self.dim] + [hid] * (proj_layers - 1) + [out], "bn": True,
                                "last_bn": True, "last_affine": False, "last_bias": False})
        self.head("predictor", {"type": "mlp", "dims": [out, hid, out], "bn": True, "last_bn": pred_last_bn,
                                "last_affine": False, "last_bias": False})
        self.make_target("backbone", "projector")

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The loss of one batch of views."""
        (q1, q2), (k1, k2) = self.predict_targets(views)
        return moco_ctr(q1, k2, self.tau) + moco_ctr(q2, k1, self.tau)


register(MethodRegistration(
    "moco_v3", MoCoV3, recipe=METHOD_RECIPES["moco_v3"],
    official=Optim("lars", lr=0.6, weight_decay=1e-6, decay_bias_norm=False, warmup_epochs=10,
                   source="moco-v3 main_moco.py:65-70,112-118,190,224-227 (LARS lr 0.6 x batch/256, wd 1e-6, "
                          "warmup 10), moco/optimizer.py:10-43 (no decay or adaptation for 1-D parameters)"),
    optim=Optim("sgd", lr=0.6, weight_decay=1e-6, decay_bias_norm=False, source="featviz"),
    hparams={"tau": 1.0, "momentum": 0.99, "proj_layers": 2, "pred_last_bn": False}, zero_init_residual=True,
    variants={"vit": {"hparams": {"tau": 0.2, "proj_layers": 3, "pred_last_bn": True},
                      "recipe": VIT_RECIPES["moco_v3"],
                      "official": Optim("adamw", lr=1.5e-4, weight_decay=0.1, warmup_epochs=40,
                                        source="moco-v3 CONFIG.md ViT-Small (AdamW lr 1.5e-4, wd .1, warmup 40)"),
                      "optim": Optim("adamw", lr=1.5e-4, weight_decay=0.1, source="moco-v3 CONFIG.md"),
                      "zero_init_residual": False}},
    source="facebookresearch/moco-v3 moco/builder.py:36-122 (_build_mlp, MoCo_ResNet, MoCo_ViT), "
           "main_moco.py:99-105 (m 0.99 cosine, T 1.0), 420-434 (schedules), 186 (zero_init_residual)",
    deviations=("SGD + momentum instead of LARS by default (`--optimizer lars` is the official one)",
                "digits preset: the momentum encoder's schedule a step late (`--hparam momentum_of_next_step=true` "
                "is the official index; measured worse on a short digits run, docs/train.md)"),
    presets={"digits": _digits(optimizer="lars", lr=0.6, hparams={"momentum_of_next_step": False})},
))
