"""Self-supervised methods: one registration per method, each matching its official code.

A method is an ``SSLMethod`` (backbone + heads, ``forward(views) -> loss``) and a frozen
``MethodSpec`` registered next to it in ``METHODS``: the training views (an
``featviz.data.augment.Recipe``), the official optimiser and schedule (``Optim``, with the file and
line it comes from), featviz's default where a CPU-sized run needs another one (each such
deviation is listed in ``deviations`` and in docs/train.md), the data-dependent
hyperparameters (``defaults``: MoCo's queue and momentum, SwAV's queue and prototype freezing,
DINO's last-layer freezing), the presets measured on the built-in ``digits`` set, and whether
BatchNorm is synchronised under DDP. Segmentation methods (``supervised_seg``, ``cac``) are
registered here too, pointing at their task in ``featviz.train.segmentation``; ``_names.MethodName``
lists every registered name (a test keeps them in sync).

Heads are built from JSON-able specs (``build_head``) so a checkpoint can rebuild them; their
tensors are named ``projector.*``, ``predictor.*`` (and ``prototypes.*`` for SwAV), next to
``backbone.<torchvision/timm name>``. Head widths follow each paper for a 2048-d ResNet-50 and
shrink in proportion for narrower backbones (``scaled``).

Momentum encoders follow the official code: an EMA of the online *parameters* only; the
target keeps its own BatchNorm statistics from its own forwards (MoCo ``builder.py``
``_momentum_update_key_encoder``, BYOL ``byol_experiment.py`` ``target_state``, DINO
``main_dino.py`` teacher EMA).

Distributed runs: contrastive and batch-statistics losses (SimCLR, MoCo v3, Barlow Twins, SwAV)
gather embeddings from every rank (``gather``) and every rank computes the same global loss;
per-sample losses (SimSiam, BYOL, DINO) are averaged by DDP. Both equal the single-process loss
on the global batch. MoCo v2 shuffles the key batch across ranks (``batch_shuffle_ddp``) and,
in one process, splits BatchNorm (``SplitBatchNorm2d``) as the official CIFAR demo does.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from featviz.data.augment import Recipe, View
from featviz.models.architectures import feature_dim
from featviz.registry import Registry


# ---------------------------------------------------------------- registration
@dataclass(frozen=True)
class Optim:
    """An optimiser and its schedule, with the lr for ``ref_batch`` images (linear scaling).

    Attributes:
        name: ``sgd`` (momentum 0.9), ``adamw``, ``lars`` (the official LARS of Barlow Twins /
            BYOL / MoCo v3 / DINO: 1-D parameters skip decay and adaptation when
            ``decay_bias_norm`` is False) or ``larc`` (SwAV's apex LARC, via timm's ``Lars``).
        lr: peak learning rate for a batch of ``ref_batch``.
        weight_decay: decay of the weights (cosine to ``weight_decay_end`` when given, DINO).
        decay_bias_norm: False: biases and normalisation parameters get no weight decay.
        bias_lr: lr multiplier of biases and norm parameters (Barlow Twins: 0.0048 / 0.2).
        warmup_epochs: linear warm-up; final_lr: the cosine ends at ``final_lr`` x peak.
        fixed_lr: module-name prefixes whose lr stays at the peak (SimSiam ``--fix-pred-lr``).
        clip_grad: per-parameter gradient-norm clip (DINO ``utils.clip_gradients``).
        source: where the official values are (file and line).
    """

    name: str
    lr: float
    weight_decay: float
    ref_batch: int = 256
    weight_decay_end: float | None = None
    decay_bias_norm: bool = True
    bias_lr: float = 1.0
    momentum: float = 0.9
    warmup_epochs: float = 0.0
    final_lr: float = 0.0
    fixed_lr: tuple[str, ...] = ()
    clip_grad: float | None = None
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True)
class DataContext:
    """What a method's data-dependent defaults depend on."""

    n_train: int
    batch_size: int
    epochs: int
    image_size: int
    feature_dim: int = 2048
    world_size: int = 1
    family: str = "resnet"

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.n_train // self.batch_size)


@dataclass(frozen=True)
class MethodSpec:
    """Everything that defines one method, in one place.

    Attributes:
        name: the registered name (``featviz train --method``).
        model: the ``SSLMethod`` class, or ``"module:Class"`` of a segmentation task.
        kind: ``ssl`` or ``segmentation``.
        recipe: the official training views (None: the task makes its own, e.g. CAC's crops).
        official: the official optimiser and schedule.
        optim: featviz's default (``official`` unless a CPU-sized run needs another; see
            ``deviations``).
        hparams: constructor defaults that differ from the class's (official values).
        defaults: data-dependent hyperparameters (``DataContext`` -> constructor kwargs).
        local_crops: featviz's default number of multi-crop local crops (0: none).
        official_local_crops: the official number.
        sync_bn: convert BatchNorm to SyncBatchNorm under CUDA DDP (MoCo v2: no, it shuffles).
        zero_init_residual: zero-init the last BN of each residual block (torchvision's flag).
        variants: per backbone family (``vit``) overrides of these fields.
        presets: per built-in dataset, the measured defaults (``TrainConfig`` keys), measured on
            ResNets: other backbone families do not take them (``for_family``).
        source: the official repository files.
        deviations: what featviz does differently by default, and why.
    """

    name: str
    model: type | str
    kind: str = "ssl"
    recipe: Recipe | None = None
    official: Optim | None = None
    optim: Optim | None = None
    hparams: Mapping[str, Any] = field(default_factory=dict)
    defaults: Callable[[DataContext], dict[str, Any]] | None = None
    local_crops: int = 0
    official_local_crops: int = 0
    sync_bn: bool = True
    zero_init_residual: bool = False
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: str = ""
    deviations: tuple[str, ...] = ()

    @property
    def multi_crop(self) -> bool:
        return self.recipe is not None and self.recipe.local is not None

    def for_family(self, family: str) -> MethodSpec:
        """This spec for a backbone family (``resnet``, ``vit``, ``timm``).

        The dataset presets were measured on ResNets (an optimiser, lr and head choices for a
        16 px CNN), so another family keeps only the presets its variant states.
        """
        changes = dict(self.variants.get(family, {}))
        if family != "resnet":
            changes.setdefault("presets", {})
        if "hparams" in changes:
            changes["hparams"] = {**self.hparams, **changes["hparams"]}
        return replace(self, **changes) if changes else self

    def model_class(self) -> type:
        if isinstance(self.model, str):
            import importlib

            mod, _, attr = self.model.partition(":")
            return getattr(importlib.import_module(mod), attr)
        return self.model


METHODS: Registry[MethodSpec] = Registry("method")


def register(spec: MethodSpec) -> MethodSpec:
    """Register ``spec`` under its name (duplicates raise ``ValueError``)."""
    return METHODS.register(spec.name)(spec)


def ssl_names() -> list[str]:
    return [n for n, s in METHODS.items() if s.kind == "ssl"]


# ---------------------------------------------------------------- heads
def scaled(paper: int, dim: int, *, lo: int = 32) -> int:
    """A paper's head width for a 2048-d backbone, scaled to a ``dim``-d one (never below ``lo``)."""
    return max(lo, paper * dim // 2048) if dim < 2048 else paper


def build_head(spec: dict[str, Any]) -> nn.Module:
    """Build a head from its JSON spec (the inverse of what methods store in checkpoints).

    ``{"type": "mlp", "dims": [in, hidden..., out], "bn": bool, "last_bn": bool,
    "last_affine": bool | "scale", "last_bias": bool, "act": "relu"|"gelu"}`` is Linear(-BN)-act
    blocks ending in a Linear (no bias where a BN follows; ``last_bias`` False drops it after the
    last one too; ``last_affine`` "scale" keeps BN's scale but no shift, SimCLR's final BN).
    ``{"type": "dino", ...}`` adds DINO's l2-normalised bottleneck and weight-normalised last
    layer (``norm_last_layer``). ``{"type": "linear", "dims": [in, out]}``.
    """
    kind = spec["type"]
    dims = list(spec["dims"])
    if kind == "linear":
        return nn.Linear(dims[0], dims[1], bias=spec.get("bias", False))
    act = nn.GELU if spec.get("act", "relu") == "gelu" else nn.ReLU
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        last = i == len(dims) - 2
        bn = spec.get("last_bn", False) if last else spec.get("bn", True)
        bias = not bn and (spec.get("last_bias", True) if last else True)
        layers.append(nn.Linear(a, b, bias=bias))  # no bias before BN (the SimSiam builder's hack)
        if bn:
            affine = spec.get("last_affine", True) if last else True
            norm = nn.BatchNorm1d(b, affine=bool(affine))
            if affine == "scale":  # SimCLR: BatchNormRelu(center=False): a scale, no shift
                norm.bias.requires_grad_(False)
            layers.append(norm)
        if not last:
            layers.append(act())
    if kind == "mlp":
        return nn.Sequential(*layers)
    if kind == "dino":
        return DINOHead(nn.Sequential(*layers), dims[-1], spec["out"],
                        norm_last_layer=spec.get("norm_last_layer", True))
    raise ValueError(f"unknown head type {kind!r}")


class DINOHead(nn.Module):
    """DINO's head (``vision_transformer.py`` ``DINOHead``): MLP to a bottleneck, l2-normalise,
    weight-normalised linear to K outputs; ``norm_last_layer`` freezes the weight-norm gain at 1."""

    def __init__(self, mlp: nn.Module, bottleneck: int, out: int, *, norm_last_layer: bool = True):
        super().__init__()
        self.mlp = mlp
        for m in self.mlp.modules():  # DINOHead._init_weights: trunc_normal(std .02), zero bias
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    @property
    def gain(self) -> nn.Parameter:
        """The weight-norm gain (``weight_g`` in the official code)."""
        return self.last_layer.parametrizations.weight.original0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def zero_init_residual(backbone: nn.Module) -> None:
    """torchvision's ``zero_init_residual=True``: the last BN of each residual block starts at 0."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    for m in backbone.modules():
        if isinstance(m, Bottleneck) and m.bn3.weight is not None:
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
            nn.init.zeros_(m.bn2.weight)


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
    """MoCo ``builder.py`` ``_batch_shuffle_ddp``: this rank's share of a randomly permuted
    global batch (rank 0 draws the permutation), and the index that undoes it."""
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
    """BatchNorm over ``splits`` interleaved sub-batches: the MoCo CIFAR demo's SplitBatchNorm,
    which simulates per-GPU BatchNorm in one process (sub-batch j holds samples j, j+s, j+2s, ...).

    Same parameters, buffers and state-dict keys as ``BatchNorm2d``; in eval mode, or with
    ``splits`` 1, it is one. The running statistics are the mean over sub-batches, as in the demo.
    """

    def __init__(self, num_features: int, splits: int = 1, **kw: Any):
        super().__init__(num_features, **kw)
        self.splits = splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
    for m in module.modules():
        if isinstance(m, SplitBatchNorm2d):
            m.splits = splits


# ---------------------------------------------------------------- base class
class SSLMethod(nn.Module):
    """Backbone + heads; ``forward(views)`` returns the scalar loss.

    Attributes:
        name: The registered name.
        embeddings: Last step's two monitored outputs (detached), for collapse monitoring.
        head_specs: JSON specs of the exported heads (stored in checkpoints).
        hparams: the constructor arguments this instance was built with (stored in checkpoints).
    """

    name: ClassVar[str] = ""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.dim = feature_dim(backbone)
        self.head_specs: dict[str, dict[str, Any]] = {}
        self.hparams: dict[str, Any] = {}
        self.embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
        self.epoch = 0

    def head(self, name: str, spec: dict[str, Any]) -> nn.Module:
        """Build a head, remember its spec, and register it as ``self.<name>``."""
        self.head_specs[name] = spec
        module = build_head(spec)
        setattr(self, name, module)
        return module

    def exported(self) -> dict[str, nn.Module]:
        """Modules that go into the model checkpoint, by tensor-name prefix."""
        return {"backbone": self.backbone, **{k: getattr(self, k) for k in self.head_specs}}

    def set_epoch(self, epoch: int) -> None:
        """Called by the loop before each epoch (0-based)."""
        self.epoch = epoch

    def before_step(self, step: int) -> None:
        """Hook between ``backward`` and the optimiser step (gradient surgery); ``step`` is 0-based."""

    @torch.no_grad()
    def on_step_end(self, progress: float) -> None:
        """Hook after each optimiser step (momentum encoders); ``progress`` runs 0 -> 1."""

    def _keep(self, z1: torch.Tensor, z2: torch.Tensor) -> None:
        self.embeddings = (z1.detach().float(), z2.detach().float())

    # what ``forward`` hands to ``_keep``: the projector output (None: the backbone's features)
    monitor_head: str | None = "projector"
    monitor_normalize: bool = False

    def monitored_modules(self) -> list[nn.Module]:
        """The modules ``monitored`` runs through (their BatchNorm statistics matter in eval mode)."""
        return [self.backbone] + ([getattr(self, self.monitor_head)] if self.monitor_head else [])

    @torch.no_grad()
    def monitored(self, x: torch.Tensor) -> torch.Tensor:
        """The output the collapse monitor watches, for one batch of views (no loss, no gather)."""
        z = self.backbone(x)
        if self.monitor_head is not None:
            z = getattr(self, self.monitor_head)(z)
        return (F.normalize(z, dim=1) if self.monitor_normalize else z).float()


class MomentumMixin:
    """A frozen EMA copy of some modules: ``target = m * target + (1 - m) * online`` on the
    parameters; the target keeps its own BatchNorm statistics (the official code's choice)."""

    base_momentum: float = 0.99

    def make_target(self, *names: str) -> None:
        self._pairs = []
        for n in names:
            t = copy.deepcopy(getattr(self, n))
            for p in t.parameters():
                p.requires_grad_(False)
            setattr(self, f"target_{n}", t)
            self._pairs.append((getattr(self, n), t))

    def momentum(self, progress: float) -> float:
        """Cosine schedule from ``base_momentum`` to 1 (BYOL Sec. 3.2, MoCo v3, DINO)."""
        return 1 - (1 - self.base_momentum) * (math.cos(math.pi * progress) + 1) / 2

    def predict_targets(self, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """BYOL / MoCo v3: predictions q = predictor(projector(backbone(v))) of the two global views
        and the target network's projections k of the same views (no gradient); keeps z for the monitor."""
        z = [self.projector(self.backbone(v)) for v in views[:2]]
        q = [self.predictor(x) for x in z]
        with torch.no_grad():
            k = [self.target_projector(self.target_backbone(v)) for v in views[:2]]
        self._keep(z[0], z[1])
        return q, k

    def on_step_end(self, progress: float) -> None:
        """EMA update with the cosine momentum schedule (MoCo v2 keeps m fixed; DINO adds its centre)."""
        self.update_targets(self.momentum(progress))

    @torch.no_grad()
    def update_targets(self, m: float) -> None:
        for online, target in self._pairs:
            for po, pt in zip(online.parameters(), target.parameters(), strict=True):
                pt.mul_(m).add_(po.detach(), alpha=1 - m)


# ---------------------------------------------------------------- losses (official formulas)
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR ``tf2/objective.py`` ``add_contrastive_loss``: for each of the 2N views, softmax
    cross-entropy of its positive against the 2N-2 others; loss = mean(loss_a + loss_b), i.e.
    the sum of the two views' mean losses. With DDP the candidates come from every rank and
    every rank computes the loss of the global batch."""
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


def neg_cosine(p: torch.Tensor, z: torch.Tensor, stop_grad: bool = True) -> torch.Tensor:
    """SimSiam's D(p, z) = -cos(p, stopgrad(z)), averaged over the batch."""
    if stop_grad:
        z = z.detach()
    return -(F.normalize(p.float(), dim=1) * F.normalize(z.float(), dim=1)).sum(dim=1).mean()


def moco_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo ``builder.py`` ``forward``: logits [q.k+, q.queue] / T, cross-entropy with label 0
    (``q``, ``k`` and the queue rows l2-normalised)."""
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


def barlow_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> torch.Tensor:
    """Barlow Twins ``main.py``: c = bn(z1).T bn(z2) / N with ``BatchNorm1d(affine=False)``
    (biased variance, eps 1e-5); sum_i (1 - c_ii)^2 + lambda * sum_{i!=j} c_ij^2."""
    z1, z2 = gather(z1.float()), gather(z2.float())
    n = z1.shape[0]
    z1 = F.batch_norm(z1, None, None, training=True, eps=1e-5)
    z2 = F.batch_norm(z2, None, None, training=True, eps=1e-5)
    c = z1.T @ z2 / n
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on + lambd * off


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


def dino_h(t: torch.Tensor, s: torch.Tensor, center: torch.Tensor, tps: float, tpt: float) -> torch.Tensor:
    """DINO's H(t, s) = -sum softmax((t - C)/tpt) * log softmax(s/tps), averaged over the batch."""
    t = F.softmax((t.detach().float() - center) / tpt, dim=1)
    return -(t * F.log_softmax(s.float() / tps, dim=1)).sum(dim=1).mean()


def _cancel_grads(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


# ---------------------------------------------------------------- the methods
def _digits(**changes: Any) -> dict[str, Any]:
    """A digits preset: what was measured to work on scikit-learn's 8x8 digits (1797 images,
    upsampled), see docs/train.md. Digits' identity survives neither a horizontal flip nor a
    small crop; 16 px holds all of an 8x8 image, and batch 32 gives 45 steps an epoch where 64
    gave 22 (ten epochs of 22 steps left most methods below a random-init encoder). The lr is
    absolute, chosen per method by the held-out kNN `featviz train` logs. MoCo v3, BYOL, Barlow
    Twins and SwAV take their official layer-wise optimiser (LARS, SwAV LARC), DINO LARC too (its
    official ResNet recipe is plain SGD), and the ones measured to gain from it a small random
    rotation and shear (handwriting's slant), in place of the crops digits cannot take."""
    base: dict[str, Any] = {"image_size": 16, "batch_size": 32, "epochs": 10, "lr": 0.1, "min_scale": 0.8,
                            "hflip": False}
    return {**base, **changes}


# Colour jitter, grayscale and blur lists of the official code, for 224 px crops.
_SIMCLR_VIEW = View(scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5, interpolation="bicubic")
_MOCO_VIEW = View(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5)
_BYOL_1 = View(scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0, interpolation="bicubic")
_BYOL_2 = _BYOL_1.with_(blur_p=0.1, solarize_p=0.2)


class SimCLR(SSLMethod):
    """SimCLR (Chen et al. 2020): "a nonlinear projection head g(.)" and the NT-Xent loss
    l(i,j) = -log exp(sim(z_i,z_j)/tau) / sum_{k!=i} exp(sim(z_i,z_j)/tau), over 2N views.

    The projector is ``tf2/model.py`` ``ProjectionHead`` (``num_proj_layers`` 3): every layer
    Linear-BN, the hidden ones as wide as the input with ReLU, the last without bias, its BN
    with a scale but no shift.
    """

    name = "simclr"

    def __init__(self, backbone: nn.Module, *, tau: float = 0.5, proj_layers: int = 3, out_dim: int = 128):
        super().__init__(backbone)
        self.tau = tau
        self.head("projector", {"type": "mlp", "dims": [self.dim] * proj_layers + [out_dim], "bn": True,
                                "last_bn": True, "last_affine": "scale"})

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])  # NxC
        self._keep(z1, z2)
        return nt_xent(z1, z2, self.tau)


register(MethodSpec(
    "simclr", SimCLR,
    recipe=Recipe((_SIMCLR_VIEW, _SIMCLR_VIEW), source="simclr tf2/data_util.py:298-390 (crop 0.08-1, "
                  "color_jitter strength 1.0: 0.8/0.8/0.8/0.2 p 0.8, grayscale 0.2, blur p 0.5)"),
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
    """MoCo v2 (Chen et al. 2020): InfoNCE of a query against its key from a momentum encoder
    and a queue of past keys; "an MLP projection head" and stronger augmentation than MoCo v1.

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
        super().__init__(backbone)
        self.tau, self.base_momentum, self.bn_splits, self.shuffle_bn = tau, momentum, bn_splits, shuffle_bn
        self.head("projector", {"type": "mlp", "dims": [self.dim, self.dim, dim], "bn": False})
        if shuffle_bn and bn_splits > 1:
            convert_split_bn(self.backbone, bn_splits)
        self.make_target("backbone", "projector")
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def set_splits(self, splits: int) -> None:
        set_bn_splits(self, splits)

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
        if _distributed():
            self.set_splits(1)
        q = F.normalize(self.projector(self.backbone(views[0])).float(), dim=1)  # NxC
        k = self.keys(views[1])
        self._keep(q, k)
        self._pending = k
        return moco_infonce(q, k, self.queue.clone(), self.tau)

    @torch.no_grad()
    def on_step_end(self, progress: float) -> None:
        self.update_targets(self.base_momentum)  # MoCo keeps m fixed
        k = gather(self._pending)
        n, size = k.shape[0], self.queue.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=k.device)) % size
        self.queue[idx] = k[-size:] if n > size else k
        self.queue_ptr.copy_((self.queue_ptr + n) % size)


def _moco_v2_defaults(ctx: DataContext) -> dict[str, Any]:
    """Queue and momentum from the data: K = 8 % of the training images (the CIFAR demo's
    4096 of 50k, which it found saturated), rounded up to whole global batches, at most the
    official 65536; m = 1 - 1/steps per epoch (a key-encoder horizon of one epoch: the demo's
    0.99 at 97 steps), at most the official 0.999; bn_splits: sub-batches of 32 (ImageNet's
    per-GPU batch), 2 to 8 (the demo's 8 of 64)."""
    b = ctx.batch_size
    queue = min(65536, max(1, math.ceil(0.08 * ctx.n_train / b)) * b)
    m = min(0.999, max(0.9, 1 - 1 / ctx.steps_per_epoch))
    per_rank = b // max(1, ctx.world_size)
    splits = min(8, max(2, per_rank // 32))
    while splits > 1 and per_rank % splits:
        splits -= 1
    return {"queue_size": int(queue), "momentum": round(m, 4), "bn_splits": splits}


register(MethodSpec(
    "moco_v2", MoCoV2,
    recipe=Recipe((_MOCO_VIEW, _MOCO_VIEW), source="moco main_moco.py:326-338 (aug_plus)"),
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
    """MoCo v3 (Chen, Xie, He 2021): symmetric ctr(q1, k2) + ctr(q2, k1) where the query encoder
    has a prediction MLP and keys come from a momentum encoder; ctr is InfoNCE scaled by 2*tau.

    Heads are ``builder.py`` ``_build_mlp``: Linear without bias, BN + ReLU between layers, a
    final ``BatchNorm1d(affine=False)`` where ``last_bn``. ResNet (``MoCo_ResNet``): a 2-layer
    projector and a 2-layer predictor without final BN, tau 1.0; ViT (``MoCo_ViT``): a 3-layer
    projector and a predictor ending in BN, tau 0.2 (the ``vit`` variant of its registration).
    """

    name = "moco_v3"

    def __init__(self, backbone: nn.Module, *, tau: float = 1.0, momentum: float = 0.99, proj_layers: int = 2,
                 pred_last_bn: bool = False, mlp_dim: int | None = None, dim: int | None = None):
        super().__init__(backbone)
        self.tau, self.base_momentum = tau, momentum
        # main_moco.py --moco-mlp-dim 4096, --moco-dim 256 (for 2048-d features)
        hid, out = mlp_dim or scaled(4096, self.dim), dim or scaled(256, self.dim)
        self.head("projector", {"type": "mlp", "dims": [self.dim] + [hid] * (proj_layers - 1) + [out], "bn": True,
                                "last_bn": True, "last_affine": False, "last_bias": False})
        self.head("predictor", {"type": "mlp", "dims": [out, hid, out], "bn": True, "last_bn": pred_last_bn,
                                "last_affine": False, "last_bias": False})
        self.make_target("backbone", "projector")

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        (q1, q2), (k1, k2) = self.predict_targets(views)
        return moco_ctr(q1, k2, self.tau) + moco_ctr(q2, k1, self.tau)


_MOCO_V3_VIEWS = Recipe((_BYOL_1.with_(scale=(0.2, 1.0)), _BYOL_2.with_(scale=(0.2, 1.0))),
                        source="moco-v3 main_moco.py:261-282 (BYOL's views), CONFIG.md:15 (--crop-min=.2 for ResNets)")
register(MethodSpec(
    "moco_v3", MoCoV3, recipe=_MOCO_V3_VIEWS,
    official=Optim("lars", lr=0.6, weight_decay=1e-6, decay_bias_norm=False, warmup_epochs=10,
                   source="moco-v3 main_moco.py:65-70,112-118,190,224-227 (LARS lr 0.6 x batch/256, wd 1e-6, "
                          "warmup 10), moco/optimizer.py:10-43 (no decay or adaptation for 1-D parameters)"),
    optim=Optim("sgd", lr=0.6, weight_decay=1e-6, decay_bias_norm=False, source="featviz"),
    hparams={"tau": 1.0, "momentum": 0.99, "proj_layers": 2, "pred_last_bn": False}, zero_init_residual=True,
    variants={"vit": {"hparams": {"tau": 0.2, "proj_layers": 3, "pred_last_bn": True},
                      "recipe": Recipe((_BYOL_1, _BYOL_2), source="moco-v3 main_moco.py:117 (crop-min 0.08), "
                                       "CONFIG.md ViT commands"),
                      "official": Optim("adamw", lr=1.5e-4, weight_decay=0.1, warmup_epochs=40,
                                        source="moco-v3 CONFIG.md ViT-Small (AdamW lr 1.5e-4, wd .1, warmup 40)"),
                      "optim": Optim("adamw", lr=1.5e-4, weight_decay=0.1, source="moco-v3 CONFIG.md"),
                      "zero_init_residual": False}},
    source="facebookresearch/moco-v3 moco/builder.py:36-122 (_build_mlp, MoCo_ResNet, MoCo_ViT), "
           "main_moco.py:99-105 (m 0.99 cosine, T 1.0), 420-434 (schedules), 186 (zero_init_residual)",
    deviations=("SGD + momentum instead of LARS by default (`--optimizer lars` is the official one)",),
    presets={"digits": _digits(optimizer="lars", lr=0.6)},
))


class BYOL(MomentumMixin, SSLMethod):
    """BYOL (Grill et al. 2020): the online network predicts the target network's projection;
    L = ||q(z) / ||q(z)|| - z' / ||z'|| ||^2 = 2 - 2 cos, symmetrised; the target is an EMA.

    Heads are ``utils/networks.py`` ``MLP``: Linear-BN-ReLU-Linear (the last without bias).
    """

    name = "byol"

    def __init__(self, backbone: nn.Module, *, momentum: float = 0.996, hidden_dim: int | None = None,
                 out_dim: int | None = None):
        super().__init__(backbone)
        self.base_momentum = momentum
        # configs/byol.py projector_hidden_size 4096, projector_output_size 256 (for 2048-d features)
        hid, out = hidden_dim or scaled(4096, self.dim), out_dim or scaled(256, self.dim)
        self.head("projector", {"type": "mlp", "dims": [self.dim, hid, out], "bn": True, "last_bias": False})
        self.head("predictor", {"type": "mlp", "dims": [out, hid, out], "bn": True, "last_bias": False})
        self.make_target("backbone", "projector")

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        (p1, p2), (t1, t2) = self.predict_targets(views)
        return (2 + 2 * neg_cosine(p1, t2)) + (2 + 2 * neg_cosine(p2, t1))


register(MethodSpec(
    "byol", BYOL,
    recipe=Recipe((_BYOL_1, _BYOL_2), source="deepmind-research byol/utils/augmentations.py (view1: blur 1.0, "
                  "solarize 0; view2: blur 0.1, solarize 0.2; jitter 0.4/0.4/0.2/0.1 p 0.8, gray 0.2)"),
    official=Optim("lars", lr=0.2, weight_decay=1.5e-6, decay_bias_norm=False, warmup_epochs=10,
                   source="deepmind-research byol/configs/byol.py:21-23,58-65 (1000 epochs: lr 0.2 x batch/256, "
                          "wd 1.5e-6, EMA 0.996; 100 epochs: 0.45, 1e-6, 0.99), byol_experiment.py:189-195 "
                          "and utils/optimizers.py:29-34 (LARS, exclude_bias_and_norm)"),
    optim=Optim("sgd", lr=0.2, weight_decay=1.5e-6, decay_bias_norm=False, source="featviz"),
    hparams={"momentum": 0.996}, zero_init_residual=True,
    source="google-deepmind/deepmind-research byol/byol_experiment.py:197-250 (loss), 337-343 (target EMA), "
           "utils/schedules.py:20-24 (cosine EMA), utils/helpers.py:109-112 (regression_loss), "
           "utils/networks.py:25-45 (MLP); haiku ResNet BlockV1 (last BN scale_init zeros)",
    deviations=("SGD + momentum instead of LARS by default (`--optimizer lars` is the official one)",
                "digits preset: EMA base 0.99 (0.996 barely moves the target in 440 steps; docs/train.md)"),
    presets={"digits": _digits(optimizer="lars", lr=2.0, rotate=15.0, shear=10.0, hparams={"momentum": 0.99})},
))


class SimSiam(SSLMethod):
    """SimSiam (Chen & He 2021): L = D(p1, stopgrad(z2))/2 + D(p2, stopgrad(z1))/2 with D the
    negative cosine. "Without stop-gradient, the optimizer quickly finds a degenerated solution"
    (Sec. 4.1) -- ``stop_grad=False`` reproduces that ablation."""

    name = "simsiam"

    def __init__(self, backbone: nn.Module, *, stop_grad: bool = True):
        super().__init__(backbone)
        self.stop_grad = stop_grad
        out = scaled(2048, self.dim)
        self.head("projector", {"type": "mlp", "dims": [self.dim, out, out, out], "bn": True,
                                "last_bn": True, "last_affine": False})
        self.head("predictor", {"type": "mlp", "dims": [out, scaled(512, self.dim, lo=16), out], "bn": True})

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])  # NxC
        p1, p2 = self.predictor(z1), self.predictor(z2)  # NxC
        self._keep(z1, z2)
        return neg_cosine(p1, z2, self.stop_grad) / 2 + neg_cosine(p2, z1, self.stop_grad) / 2


register(MethodSpec(
    "simsiam", SimSiam,
    recipe=Recipe((_MOCO_VIEW, _MOCO_VIEW), source="simsiam main_simsiam.py:229-238 (MoCo v2's views)"),
    official=Optim("sgd", lr=0.05, weight_decay=1e-4, fixed_lr=("predictor",),
                   source="simsiam main_simsiam.py:56-61 (lr 0.05 x batch/256, wd 1e-4, momentum 0.9), "
                          "90, 193-197, 359-364 (--fix-pred-lr: the predictor's lr is not decayed)"),
    optim=Optim("sgd", lr=0.05, weight_decay=1e-4, fixed_lr=("predictor",), source="simsiam main_simsiam.py"),
    zero_init_residual=True,
    source="facebookresearch/simsiam simsiam/builder.py:15-61 (3-layer projector, bottleneck predictor, "
           "zero_init_residual), main_simsiam.py:193-197 (fix_pred_lr)",
    # lr 0.1 at batch 64: the recipe measured before the presets (docs/train.md, SimSiam's Figure 2);
    # the official 0.05 x 64/256 = 0.0125 was below random init after 2 of 10 epochs (held-out kNN 0.749)
    presets={"digits": _digits(lr=0.2)},
))


class BarlowTwins(SSLMethod):
    """Barlow Twins (Zbontar et al. 2021): push the cross-correlation matrix of the two views'
    batch-normalised embeddings to the identity: sum (1-C_ii)^2 + lambda sum_{i!=j} C_ij^2.

    The projector is ``main.py``'s: (Linear without bias, BN, ReLU) x 2, Linear without bias.
    """

    name = "barlow_twins"

    def __init__(self, backbone: nn.Module, *, lambd: float = 0.0051, proj_dim: int | None = None):
        super().__init__(backbone)
        self.lambd = lambd
        d = proj_dim or scaled(8192, self.dim)  # main.py --projector 8192-8192-8192
        self.head("projector", {"type": "mlp", "dims": [self.dim, d, d, d], "bn": True, "last_bias": False})

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])
        self._keep(z1, z2)
        return barlow_loss(z1, z2, self.lambd)


register(MethodSpec(
    "barlow_twins", BarlowTwins,
    recipe=Recipe((_BYOL_1.with_(scale=(0.08, 1.0)), _BYOL_2), source="barlowtwins main.py:290-322 (BYOL's views)"),
    official=Optim("lars", lr=0.2, weight_decay=1.5e-6, decay_bias_norm=False, bias_lr=0.0048 / 0.2,
                   warmup_epochs=10, final_lr=0.001,
                   source="barlowtwins main.py:33-38 (lr weights 0.2, biases 0.0048 x batch/256, wd 1.5e-6), "
                          "90-101 (LARS, weight_decay_filter and lars_adaptation_filter on 1-D parameters), "
                          "155-168 (warmup 10 epochs, cosine to 0.001 x)"),
    optim=Optim("sgd", lr=0.2, weight_decay=1.5e-6, decay_bias_norm=False, bias_lr=0.0048 / 0.2, final_lr=0.001,
                source="featviz"),
    hparams={"lambd": 0.0051}, zero_init_residual=True,
    source="facebookresearch/barlowtwins main.py:180-221 (projector, bn, loss), 224-263 (LARS), "
           "191 (zero_init_residual)",
    deviations=("SGD + momentum instead of LARS by default (`--optimizer lars` is the official one)",),
    presets={"digits": _digits(optimizer="lars", lr=0.2, rotate=15.0, shear=10.0)},
))


class SwAV(SSLMethod):
    """SwAV (Caron et al. 2020): "swapped prediction" -- predict the Sinkhorn code of one view
    from the other: L = -sum_k q2_k log softmax(z1 . c / tau)_k + (1 <-> 2); multi-crop optional.

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
        super().set_epoch(epoch)
        if self.queue_length > 0 and epoch >= self.epoch_queue_starts:
            self.queue_active.fill_(True)

    def before_step(self, step: int) -> None:
        if step < self.freeze_prototypes_niters:  # main_swav.py: cancel gradients for the prototypes
            _cancel_grads(self.prototypes)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():  # prototypes live on the unit sphere
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        z = [F.normalize(self.projector(self.backbone(v)), dim=1) for v in views]
        scores = [self.prototypes(x) for x in z]  # B x K each
        self._keep(z[0], z[1])
        bs = scores[0].shape[0]
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
    """The queue and prototype freezing from the data, as the official scripts set them:
    freeze the prototypes for one epoch (313 steps at batch 4096, 5005 at 256); a queue only
    when the batch is too small for the prototypes (the bs-256 scripts: 256 + 3840 = 1.37 x 3000
    assignments; none at 4096), long enough for 1.37 x K, in whole global batches, at most half
    the training images; started after 15/400 of the epochs (at least 1)."""
    k, b = scaled(3000, ctx.feature_dim, lo=30), ctx.batch_size
    queue = min(max(0, math.ceil((1.37 * k - b) / b)), ctx.n_train // (2 * b)) * b  # at most half the data
    return {"freeze_prototypes_niters": ctx.steps_per_epoch, "queue_length": int(queue),
            "epoch_queue_starts": max(1, round(ctx.epochs * 15 / 400))}


register(MethodSpec(
    "swav", SwAV,
    recipe=Recipe((_SIMCLR_VIEW.with_(scale=(0.14, 1.0)),) * 2, _SIMCLR_VIEW.with_(scale=(0.05, 0.14)),
                  source="swav src/multicropdataset.py:36-95 (color distortion s=1, blur p 0.5), "
                         "scripts/swav_400ep_bs256_pretrain.sh (2x224 at 0.14-1, 6x96 at 0.05-0.14)"),
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


class DINO(MomentumMixin, SSLMethod):
    """DINO (Caron et al. 2021): self-distillation with no labels; the student matches the
    centred, sharpened teacher: H(t, s) = -softmax((t - C)/tpt) . log softmax(s/tps); the teacher
    is an EMA of the student and C an EMA of the teacher's batch mean.

    ``main_dino.py``: the head's last layer is weight-normalised with its gain frozen
    (``norm_last_layer``) and gets no gradient during the first ``freeze_last_layer`` epochs
    (``utils.cancel_gradients_last_layer``); gradients are clipped per parameter
    (``clip_grad``, in the registration's ``Optim``); the teacher keeps its own BatchNorm.
    """

    name = "dino"
    monitor_head = None

    def __init__(self, backbone: nn.Module, *, out: int | None = None, tps: float = 0.1, tpt: float = 0.04,
                 warmup_tpt: float | None = None, warmup_tpt_epochs: int = 0, center_momentum: float = 0.9,
                 momentum: float = 0.996, norm_last_layer: bool = True, freeze_last_layer: int = 1,
                 use_bn_in_head: bool = False, hidden_dim: int | None = None, bottleneck_dim: int | None = None):
        super().__init__(backbone)
        self.tps, self.tpt, self.center_momentum, self.base_momentum = tps, tpt, center_momentum, momentum
        self.warmup_tpt, self.warmup_tpt_epochs = warmup_tpt, warmup_tpt_epochs
        self.freeze_last_layer = freeze_last_layer
        k = out or scaled(65536, self.dim, lo=256)
        hid = hidden_dim or scaled(2048, self.dim)  # DINOHead hidden_dim 2048, bottleneck_dim 256
        self.head("projector", {"type": "dino", "dims": [self.dim, hid, hid, bottleneck_dim or scaled(256, self.dim)],
                                "bn": use_bn_in_head, "act": "gelu", "out": k, "norm_last_layer": norm_last_layer})
        self.make_target("backbone", "projector")
        self.register_buffer("center", torch.zeros(1, k))

    def exported(self) -> dict[str, nn.Module]:
        """DINO evaluates the teacher ("the teacher ... performs better", Sec. 5.2)."""
        return {"backbone": self.target_backbone, "projector": self.target_projector}

    def teacher_temp(self) -> float:
        """``DINOLoss.teacher_temp_schedule``: linear warm-up over ``warmup_tpt_epochs``, then ``tpt``."""
        if self.warmup_tpt is None or self.epoch >= self.warmup_tpt_epochs or self.warmup_tpt_epochs <= 1:
            return self.tpt
        return self.warmup_tpt + (self.tpt - self.warmup_tpt) * self.epoch / (self.warmup_tpt_epochs - 1)

    def before_step(self, step: int) -> None:
        if self.epoch < self.freeze_last_layer:  # utils.cancel_gradients_last_layer
            _cancel_grads(self.projector.last_layer)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        h = [self.backbone(v) for v in views]
        s = [self.projector(x) for x in h]
        with torch.no_grad():
            t = [self.target_projector(self.target_backbone(v)) for v in views[:2]]
        tpt = self.teacher_temp()
        loss, terms = 0.0, 0
        for i, ti in enumerate(t):
            for j, sj in enumerate(s):
                if i != j:
                    loss, terms = loss + dino_h(ti, sj, self.center, self.tps, tpt), terms + 1
        self._keep(h[0], h[1])  # backbone features: the K-way outputs are too wide to monitor cheaply
        self._teacher_mean = torch.cat(t).float().mean(dim=0, keepdim=True)
        return loss / terms

    def on_step_end(self, progress: float) -> None:
        super().on_step_end(progress)
        self.center.mul_(self.center_momentum).add_(all_mean(self._teacher_mean), alpha=1 - self.center_momentum)


_DINO_GLOBAL_1 = _BYOL_1.with_(scale=(0.4, 1.0))
_DINO_GLOBAL_2 = _BYOL_2.with_(scale=(0.4, 1.0))
_DINO_LOCAL = _BYOL_1.with_(scale=(0.05, 0.4), blur_p=0.5)
register(MethodSpec(
    "dino", DINO,
    recipe=Recipe((_DINO_GLOBAL_1.with_(scale=(0.14, 1.0)), _DINO_GLOBAL_2.with_(scale=(0.14, 1.0))),
                  _DINO_LOCAL.with_(scale=(0.05, 0.14)),
                  source="dino README.md:207 (ResNet-50: --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14), "
                         "main_dino.py:419-456 (DataAugmentationDINO)"),
    official=Optim("sgd", lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4, decay_bias_norm=False,
                   warmup_epochs=10, clip_grad=3.0,
                   source="dino README.md:207 (ResNet-50: --optimizer sgd --lr 0.03 --weight_decay 1e-4 "
                          "--weight_decay_end 1e-4), main_dino.py:87-101 (clip_grad 3.0, warmup 10, min_lr 1e-6), "
                          "utils.py:632-643 (no decay on biases and norms)"),
    optim=Optim("sgd", lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4, decay_bias_norm=False, clip_grad=3.0,
                source="dino README.md:207"),
    hparams={"tps": 0.1, "tpt": 0.04, "momentum": 0.996, "center_momentum": 0.9, "norm_last_layer": True,
             "freeze_last_layer": 1},
    local_crops=0, official_local_crops=8,
    variants={"vit": {"recipe": Recipe((_DINO_GLOBAL_1, _DINO_GLOBAL_2), _DINO_LOCAL,
                                       source="dino main_dino.py:107-117 (global 0.4-1 with multi-crop, 0.14-1 "
                                              "without; local 0.05-0.4), 419-456",
                                       global_scale_without_local=(0.14, 1.0)),
                      "official": Optim("adamw", lr=5e-4, weight_decay=0.04, weight_decay_end=0.4,
                                        decay_bias_norm=False, warmup_epochs=10, clip_grad=3.0,
                                        source="dino main_dino.py:82-104 (AdamW lr 5e-4 x batch/256, weight decay "
                                               "0.04 -> 0.4 cosine, clip_grad 3.0, warmup 10)"),
                      "optim": Optim("adamw", lr=5e-4, weight_decay=0.04, weight_decay_end=0.4, decay_bias_norm=False,
                                     clip_grad=3.0, source="dino main_dino.py:82-104")}},
    source="facebookresearch/dino main_dino.py:55-117 (arguments), 183-212 (student, teacher, SyncBN per network), "
           "301-360 (loop: clip, cancel last layer, EMA), 363-416 (DINOLoss); utils.py:132-149, 187-198; "
           "vision_transformer.py:257-291 (DINOHead)",
    deviations=("no local crops by default on CPU (`--local-crops 8` is the official multi-crop; global crops "
                "then follow the multi-crop scale of the variant)",
                "digits preset: LARC lr 1.0, a BatchNorm head with an unnormalised last layer and EMA base 0.99 "
                "(without the BN head the teacher goes uniform; docs/train.md)"),
    presets={"digits": _digits(optimizer="larc", lr=1.0, rotate=15.0, shear=10.0,
                               hparams={"momentum": 0.99, "norm_last_layer": False, "use_bn_in_head": True})},
))


# ---------------------------------------------------------------- segmentation methods (featviz.train.segmentation)
register(MethodSpec(
    "supervised_seg", "featviz.train.segmentation:SegTask", kind="segmentation",
    official=Optim("sgd", lr=0.01, weight_decay=1e-4, ref_batch=8,
                   source="Context-Aware-Consistency configs/voc_cac_deeplabv3+_resnet50_1over8_datalist0.json"),
    optim=Optim("sgd", lr=0.01, weight_decay=1e-4, ref_batch=8, source="CAC configs"),
    source="dvlab-research/Context-Aware-Consistency (labelled branch only)",
))
register(MethodSpec(
    "cac", "featviz.train.segmentation:SegTask", kind="segmentation",
    official=Optim("sgd", lr=0.01, weight_decay=1e-4, ref_batch=8,
                   source="Context-Aware-Consistency configs/voc_cac_deeplabv3+_resnet50_1over8_datalist0.json"),
    optim=Optim("sgd", lr=0.01, weight_decay=1e-4, ref_batch=8, source="CAC configs"),
    source="dvlab-research/Context-Aware-Consistency models/model.py, dataloaders/voc.py",
))


def arch_family(backbone: nn.Module) -> str:
    """``resnet``, ``vit`` or ``timm``: which variant of a method's registration applies, read
    from the model description (``featviz.models.description.describe``); a module featviz did not build
    counts as a ViT when it has a ``patch_embed``, else as a ResNet."""
    from featviz.models.description import describe

    arch = describe(backbone).arch
    if arch is not None:
        return arch.family
    return "vit" if hasattr(backbone, "patch_embed") else "resnet"


def analysis_view(method: str | None) -> View:
    """The view analysis draws for a model trained with ``method`` (its recipe's first global
    view), or ``augment.ANALYSIS_VIEW`` when the method is unknown or has no recipe."""
    from featviz.data.augment import ANALYSIS_VIEW

    spec = METHODS._items.get(method) if method else None
    return spec.recipe.globals_[0] if spec is not None and spec.recipe is not None else ANALYSIS_VIEW


def build_method(name: str, backbone: nn.Module, **kwargs: Any) -> SSLMethod:
    """Instantiate a registered SSL method around ``backbone`` with its official defaults.

    ``kwargs`` override the registration's ``hparams`` (e.g. ``queue_size``, ``tau``); an
    unknown name raises ``UnknownNameError`` listing the method's hyperparameters.
    """
    import inspect

    from featviz.errors import UnknownNameError

    spec = METHODS.get(name).for_family(arch_family(backbone))
    zero_init = bool(kwargs.pop("zero_init_residual", spec.zero_init_residual))
    if spec.kind != "ssl":
        raise UnknownNameError(f"{name!r} is a segmentation method; it has no SSLMethod to build")
    cls = spec.model_class()
    sig = inspect.signature(cls.__init__).parameters
    allowed = [p for p in sig if p not in ("self", "backbone")]
    bad = [k for k in kwargs if k not in allowed]
    if bad:
        raise UnknownNameError(f"{name} has no hyperparameter {bad[0]!r}; expected one of: "
                               f"{', '.join([*allowed, 'zero_init_residual'])}")
    for k, v in kwargs.items():  # values from the command line: check their type against the default
        default = spec.hparams.get(k, sig[k].default)
        if default is inspect.Parameter.empty or default is None or v is None:
            continue
        ok = isinstance(v, bool) if isinstance(default, bool) else \
            (isinstance(v, (int, float)) and not isinstance(v, bool)) if isinstance(default, (int, float)) else True
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(v, float) and not v.is_integer():
            ok = False
        if not ok:
            from featviz.errors import DataError

            raise DataError(f"{name} hyperparameter {k}={v!r}: expected {type(default).__name__} (default {default!r})")
        if isinstance(default, int) and not isinstance(default, bool):
            kwargs[k] = int(v)
    hp = {**spec.hparams, **kwargs}
    if zero_init:
        zero_init_residual(backbone)
    method = cls(backbone, **hp)
    method.hparams = {**{k: sig[k].default for k in allowed}, **hp, "zero_init_residual": zero_init}
    return method
