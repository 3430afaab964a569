"""Self-supervised objectives: a backbone, its heads, and ``forward(views) -> loss``.

Every method is a small ``SSLMethod`` registered in ``METHODS``. Heads are built from JSON-able
specs (``build_head``) so a checkpoint can rebuild them; their tensors are named ``projector.*``,
``predictor.*`` (and ``prototypes.*`` for SwAV), next to ``backbone.<torchvision/timm name>``.

Head widths follow each paper for a 2048-d ResNet-50 and shrink in proportion for narrower
backbones (``scaled``), so a 128-d CPU ResNet gets a 128-d SimSiam projector instead of 2048.

Distributed runs: contrastive and batch-statistics losses (SimCLR, MoCo v3, Barlow Twins, SwAV)
gather embeddings from every rank (``gather``) and every rank computes the same global loss;
per-sample losses (SimSiam, BYOL, DINO) are averaged by DDP. Both equal the single-process loss
on the global batch.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from featviz.models import feature_dim
from featviz.registry import Registry

METHODS: Registry[type[SSLMethod]] = Registry("SSL method")


# ---------------------------------------------------------------- heads
def scaled(paper: int, dim: int, *, lo: int = 32) -> int:
    """A paper's head width for a 2048-d backbone, scaled to a ``dim``-d one (never below ``lo``)."""
    return max(lo, paper * dim // 2048) if dim < 2048 else paper


def build_head(spec: dict[str, Any]) -> nn.Module:
    """Build a head from its JSON spec (the inverse of what methods store in checkpoints).

    ``{"type": "mlp", "dims": [in, hidden..., out], "bn": bool, "last_bn": bool,
    "last_affine": bool, "act": "relu"|"gelu"}`` is Linear(-BN)-act blocks with a plain last
    Linear (biases off where a BN follows). ``{"type": "dino", ...}`` adds DINO's l2-normalised
    bottleneck and weight-normalised last layer. ``{"type": "linear", "dims": [in, out]}``.
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
        layers.append(nn.Linear(a, b, bias=not bn))  # hack: no bias before BN (SimSiam builder)
        if bn:
            layers.append(nn.BatchNorm1d(b, affine=spec.get("last_affine", True) if last else True))
        if not last:
            layers.append(act())
    if kind == "mlp":
        return nn.Sequential(*layers)
    if kind == "dino":
        return DINOHead(nn.Sequential(*layers), dims[-1], spec["out"])
    raise ValueError(f"unknown head type {kind!r}")


class DINOHead(nn.Module):
    """DINO's head: MLP to a bottleneck, l2-normalise, weight-normalised linear to K outputs."""

    def __init__(self, mlp: nn.Module, bottleneck: int, out: int):
        super().__init__()
        self.mlp = mlp
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1)  # DINO: norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


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


# ---------------------------------------------------------------- base class
class SSLMethod(nn.Module):
    """Backbone + heads; ``forward(views)`` returns the scalar loss.

    Attributes:
        name: The registered name.
        recipe: The augmentation recipe in ``featviz.augment.RECIPES``.
        embeddings: Last step's two projector outputs (detached), for collapse monitoring.
        head_specs: JSON specs of the exported heads (stored in checkpoints).
    """

    name: ClassVar[str] = ""
    recipe: ClassVar[str] = ""
    multi_crop: ClassVar[bool] = False

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.dim = feature_dim(backbone)
        self.head_specs: dict[str, dict[str, Any]] = {}
        self.hparams: dict[str, Any] = {}
        self.embeddings: tuple[torch.Tensor, torch.Tensor] | None = None

    def head(self, name: str, spec: dict[str, Any]) -> nn.Module:
        """Build a head, remember its spec, and register it as ``self.<name>``."""
        self.head_specs[name] = spec
        module = build_head(spec)
        setattr(self, name, module)
        return module

    def exported(self) -> dict[str, nn.Module]:
        """Modules that go into the model checkpoint, by tensor-name prefix."""
        return {"backbone": self.backbone, **{k: getattr(self, k) for k in self.head_specs}}

    @torch.no_grad()
    def on_step_end(self, progress: float) -> None:
        """Hook after each optimiser step (momentum encoders); ``progress`` runs 0 -> 1."""

    def _keep(self, z1: torch.Tensor, z2: torch.Tensor) -> None:
        self.embeddings = (z1.detach().float(), z2.detach().float())

    # what ``forward`` hands to ``_keep``: the projector output (None: the backbone's features)
    monitor_head: str | None = "projector"
    monitor_normalize: bool = False

    @torch.no_grad()
    def monitored(self, x: torch.Tensor) -> torch.Tensor:
        """The output the collapse monitor watches, for one batch of views (no loss, no gather)."""
        z = self.backbone(x)
        if self.monitor_head is not None:
            z = getattr(self, self.monitor_head)(z)
        return (F.normalize(z, dim=1) if self.monitor_normalize else z).float()


class MomentumMixin:
    """A frozen EMA copy of some modules: ``target = m * target + (1 - m) * online``."""

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
        """EMA update with the cosine momentum schedule (MoCo v2 and DINO add to it)."""
        self.update_targets(self.momentum(progress))

    @torch.no_grad()
    def update_targets(self, m: float) -> None:
        for online, target in self._pairs:
            for po, pt in zip(online.parameters(), target.parameters(), strict=True):
                pt.mul_(m).add_(po.detach(), alpha=1 - m)
            for bo, bt in zip(online.buffers(), target.buffers(), strict=True):
                bt.copy_(bo)


# ---------------------------------------------------------------- losses
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent over 2N views: each view's positive is its pair, the 2N-2 others negatives.

    With DDP the candidates come from every rank (the global batch).
    """
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)  # fp32 under bf16 autocast
    z = torch.cat([gather(z1), gather(z2)])  # 2N x d (global)
    n = z.shape[0] // 2
    sim = z @ z.T / tau
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def neg_cosine(p: torch.Tensor, z: torch.Tensor, stop_grad: bool = True) -> torch.Tensor:
    """SimSiam's D(p, z) = -cos(p, stopgrad(z)), averaged over the batch."""
    if stop_grad:
        z = z.detach()
    return -(F.normalize(p.float(), dim=1) * F.normalize(z.float(), dim=1)).sum(dim=1).mean()


def moco_ctr(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo v3's ctr(q, k): InfoNCE against the (global) batch of keys, scaled by 2*tau."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    k = gather(k)
    offset = dist.get_rank() * q.shape[0] if _distributed() else 0
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(q @ k.T / tau, labels) * 2 * tau


def barlow_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> torch.Tensor:
    """Barlow Twins: sum_i (1 - C_ii)^2 + lambda * sum_{i!=j} C_ij^2, C the batch cross-correlation."""
    z1, z2 = gather(z1.float()), gather(z2.float())
    n = z1.shape[0]
    z1 = (z1 - z1.mean(0)) / z1.std(0, unbiased=False).add(1e-5)  # = BatchNorm1d(affine=False)
    z2 = (z2 - z2.mean(0)) / z2.std(0, unbiased=False).add(1e-5)
    c = z1.T @ z2 / n
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on + lambd * off


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp: equipartitioned soft codes Q (B x K) from prototype scores."""
    scores = scores.float()
    q = torch.exp((scores - scores.max()) / eps).T  # K x B; the max shift cancels in the normalisation
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).T


def dino_h(t: torch.Tensor, s: torch.Tensor, center: torch.Tensor, tps: float, tpt: float) -> torch.Tensor:
    """DINO's H(t, s) = -sum softmax((t - C)/tpt) * log softmax(s/tps), averaged over the batch."""
    t = F.softmax((t.detach().float() - center) / tpt, dim=1)
    return -(t * F.log_softmax(s.float() / tps, dim=1)).sum(dim=1).mean()


# ---------------------------------------------------------------- methods
@METHODS.register("simclr")
class SimCLR(SSLMethod):
    """SimCLR (Chen et al. 2020): "a nonlinear projection head g(.)" and the NT-Xent loss
    l(i,j) = -log exp(sim(z_i,z_j)/tau) / sum_{k!=i} exp(sim(z_i,z_k)/tau), over 2N views."""

    name, recipe = "simclr", "simclr"

    def __init__(self, backbone: nn.Module, *, tau: float = 0.5):
        super().__init__(backbone)
        self.tau = tau
        self.head("projector", {"type": "mlp", "dims": [self.dim, scaled(2048, self.dim), 128], "bn": True})

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])  # NxC
        self._keep(z1, z2)
        return nt_xent(z1, z2, self.tau)


@METHODS.register("moco_v2")
class MoCoV2(MomentumMixin, SSLMethod):
    """MoCo v2 (Chen et al. 2020): InfoNCE of a query against its key from a momentum encoder
    and a queue of past keys; "an MLP projection head" and stronger augmentation than MoCo v1."""

    name, recipe = "moco_v2", "moco_v2"
    monitor_normalize = True

    def __init__(self, backbone: nn.Module, *, tau: float = 0.2, queue_size: int = 4096, momentum: float = 0.99):
        super().__init__(backbone)
        self.tau, self.base_momentum = tau, momentum
        self.head("projector", {"type": "mlp", "dims": [self.dim, self.dim, 128], "bn": False})
        self.make_target("backbone", "projector")
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, 128), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        q = F.normalize(self.projector(self.backbone(views[0])).float(), dim=1)  # NxC
        with torch.no_grad():
            k = F.normalize(self.target_projector(self.target_backbone(views[1])).float(), dim=1)
        l_pos = (q * k).sum(dim=1, keepdim=True)  # Nx1
        l_neg = q @ self.queue.clone().T  # NxK
        logits = torch.cat([l_pos, l_neg], dim=1) / self.tau
        self._keep(q, k)
        self._pending = k
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))

    @torch.no_grad()
    def on_step_end(self, progress: float) -> None:
        self.update_targets(self.base_momentum)  # MoCo keeps m fixed
        k = gather(self._pending)
        n, size = k.shape[0], self.queue.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=k.device)) % size
        self.queue[idx] = k[-size:] if n > size else k
        self.queue_ptr.copy_((self.queue_ptr + n) % size)


@METHODS.register("moco_v3")
class MoCoV3(MomentumMixin, SSLMethod):
    """MoCo v3 (Chen, Xie, He 2021): symmetric ctr(q1, k2) + ctr(q2, k1) where the query encoder
    has a prediction MLP and keys come from a momentum encoder; ctr is InfoNCE scaled by 2*tau."""

    name, recipe = "moco_v3", "moco_v3"

    def __init__(self, backbone: nn.Module, *, tau: float = 0.2, momentum: float = 0.99):
        super().__init__(backbone)
        self.tau, self.base_momentum = tau, momentum
        hid, out = scaled(4096, self.dim), scaled(256, self.dim)
        self.head("projector", {"type": "mlp", "dims": [self.dim, hid, hid, out], "bn": True,
                                "last_bn": True, "last_affine": False})
        self.head("predictor", {"type": "mlp", "dims": [out, hid, out], "bn": True,
                                "last_bn": True, "last_affine": False})
        self.make_target("backbone", "projector")

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        (q1, q2), (k1, k2) = self.predict_targets(views)
        return moco_ctr(q1, k2, self.tau) + moco_ctr(q2, k1, self.tau)


@METHODS.register("byol")
class BYOL(MomentumMixin, SSLMethod):
    """BYOL (Grill et al. 2020): the online network predicts the target network's projection;
    L = ||q(z) / ||q(z)|| - z' / ||z'|| ||^2 = 2 - 2 cos, symmetrised; the target is an EMA."""

    name, recipe = "byol", "byol"

    def __init__(self, backbone: nn.Module, *, momentum: float = 0.99):
        super().__init__(backbone)
        self.base_momentum = momentum
        hid, out = scaled(4096, self.dim), scaled(256, self.dim)
        self.head("projector", {"type": "mlp", "dims": [self.dim, hid, out], "bn": True})
        self.head("predictor", {"type": "mlp", "dims": [out, hid, out], "bn": True})
        self.make_target("backbone", "projector")

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        (p1, p2), (t1, t2) = self.predict_targets(views)
        return (2 + 2 * neg_cosine(p1, t2)) + (2 + 2 * neg_cosine(p2, t1))


@METHODS.register("simsiam")
class SimSiam(SSLMethod):
    """SimSiam (Chen & He 2021): L = D(p1, stopgrad(z2))/2 + D(p2, stopgrad(z1))/2 with D the
    negative cosine. "Without stop-gradient, the optimizer quickly finds a degenerated solution"
    (Sec. 4.1) -- ``stop_grad=False`` reproduces that ablation."""

    name, recipe = "simsiam", "simsiam"

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


@METHODS.register("barlow_twins")
class BarlowTwins(SSLMethod):
    """Barlow Twins (Zbontar et al. 2021): push the cross-correlation matrix of the two views'
    batch-normalised embeddings to the identity: sum (1-C_ii)^2 + lambda sum_{i!=j} C_ij^2."""

    name, recipe = "barlow_twins", "barlow_twins"

    def __init__(self, backbone: nn.Module, *, lambd: float = 5e-3):
        super().__init__(backbone)
        self.lambd = lambd
        d = scaled(8192, self.dim)
        self.head("projector", {"type": "mlp", "dims": [self.dim, d, d, d], "bn": True})

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])
        self._keep(z1, z2)
        return barlow_loss(z1, z2, self.lambd)


@METHODS.register("swav")
class SwAV(SSLMethod):
    """SwAV (Caron et al. 2020): "swapped prediction" -- predict the Sinkhorn code of one view
    from the other: L = -sum_k q2_k log softmax(z1 . c / tau)_k + (1 <-> 2); multi-crop optional."""

    name, recipe, multi_crop = "swav", "swav", True
    monitor_normalize = True

    def __init__(self, backbone: nn.Module, *, tau: float = 0.1, eps: float = 0.05, prototypes: int | None = None):
        super().__init__(backbone)
        self.tau, self.eps = tau, eps
        self.head("projector", {"type": "mlp", "dims": [self.dim, scaled(2048, self.dim), 128], "bn": True})
        self.head("prototypes", {"type": "linear", "dims": [128, prototypes or scaled(3000, self.dim, lo=30)]})

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():  # prototypes live on the unit sphere
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        z = [F.normalize(self.projector(self.backbone(v)), dim=1) for v in views]
        scores = [self.prototypes(x) for x in z]  # B x K each
        self._keep(z[0], z[1])
        loss = 0.0
        for i in (0, 1):  # codes from the global crops only
            q = sinkhorn(gather(scores[i].detach()), self.eps)
            if _distributed():
                n = scores[i].shape[0]
                q = q[dist.get_rank() * n:(dist.get_rank() + 1) * n]
            sub = [-(q * F.log_softmax(s / self.tau, dim=1)).sum(dim=1).mean()
                   for j, s in enumerate(scores) if j != i]
            loss = loss + sum(sub) / len(sub)
        return loss / 2


@METHODS.register("dino")
class DINO(MomentumMixin, SSLMethod):
    """DINO (Caron et al. 2021): self-distillation with no labels; the student matches the
    centred, sharpened teacher: H(t, s) = -softmax((t - C)/tpt) . log softmax(s/tps); the teacher
    is an EMA of the student and C an EMA of the teacher's batch mean."""

    name, recipe, multi_crop = "dino", "dino", True
    monitor_head = None

    def __init__(self, backbone: nn.Module, *, out: int | None = None, tps: float = 0.1, tpt: float = 0.04,
                 center_momentum: float = 0.9, momentum: float = 0.996):
        super().__init__(backbone)
        self.tps, self.tpt, self.center_momentum, self.base_momentum = tps, tpt, center_momentum, momentum
        k = out or scaled(65536, self.dim, lo=256)
        self.head("projector", {"type": "dino", "dims": [self.dim, scaled(2048, self.dim), scaled(2048, self.dim),
                                                         scaled(256, self.dim)],
                                "bn": False, "act": "gelu", "out": k})
        self.make_target("backbone", "projector")
        self.register_buffer("center", torch.zeros(1, k))

    def exported(self) -> dict[str, nn.Module]:
        """DINO evaluates the teacher ("the teacher ... performs better", Sec. 5.2)."""
        return {"backbone": self.target_backbone, "projector": self.target_projector}

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        h = [self.backbone(v) for v in views]
        s = [self.projector(x) for x in h]
        with torch.no_grad():
            t = [self.target_projector(self.target_backbone(v)) for v in views[:2]]
        loss, terms = 0.0, 0
        for i, ti in enumerate(t):
            for j, sj in enumerate(s):
                if i != j:
                    loss, terms = loss + dino_h(ti, sj, self.center, self.tps, self.tpt), terms + 1
        self._keep(h[0], h[1])  # backbone features: the K-way outputs are too wide to monitor cheaply
        self._teacher_mean = torch.cat(t).mean(dim=0, keepdim=True)
        return loss / terms

    def on_step_end(self, progress: float) -> None:
        super().on_step_end(progress)
        self.center.mul_(self.center_momentum).add_(all_mean(self._teacher_mean), alpha=1 - self.center_momentum)


def build_method(name: str, backbone: nn.Module, **kwargs: Any) -> SSLMethod:
    """Instantiate a registered method around ``backbone`` (extra kwargs go to its constructor)."""
    cls = METHODS.get(name)
    method = cls(backbone, **kwargs)
    method.hparams = dict(kwargs)
    return method
