"""The SSL methods' base class and the momentum-encoder mixin.

``SSLMethod`` is a backbone plus heads whose ``forward(views)`` returns the loss; ``MomentumMixin``
keeps EMA targets of some of its modules.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from featviz.models.architectures import feature_dim
from featviz.models.heads import build_head


def zero_init_residual(backbone: nn.Module) -> None:
    """Zero the last BN of each residual block of ``backbone`` (torchvision's ``zero_init_residual=True``)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    for m in backbone.modules():
        if isinstance(m, Bottleneck) and m.bn3.weight is not None:
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
            nn.init.zeros_(m.bn2.weight)


def multicrop_forward(backbone: nn.Module, head: nn.Module, views: list[torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone over runs of same-size views, one batch each; the head once over every crop.

    DINO ``utils.MultiCropWrapper.forward`` and SwAV ``src/resnet50.py`` ``ResNet.forward``:
    consecutive views of one resolution are concatenated, so BatchNorm normalises the two global
    crops together (2B images) and the local crops together (N x B), and the head's BatchNorm
    sees every crop at once.

    Returns:
        The backbone features and the head's output, both with the views' batches stacked in order.
    """
    runs, start = [], 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape[-1] != views[start].shape[-1]:
            runs.append((start, i))
            start = i
    feats = torch.cat([backbone(torch.cat(views[a:b])) for a, b in runs])
    return feats, head(feats)


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
        """The method around ``backbone``; subclasses add their heads (``head``)."""
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

    def train_bn_splits(self) -> int:
        """The BatchNorm splits a training forward uses in one process (1: BatchNorm unsplit)."""
        return 1

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
    """A frozen EMA copy of some modules.

    ``target = m * target + (1 - m) * online`` on the parameters; the target keeps its own
    BatchNorm statistics (the official code's choice).
    """

    base_momentum: float = 0.99
    # True: the EMA after step i uses m(i + 1), the momentum of the step whose forward it precedes
    # (MoCo v3 updates the keys' encoder at the start of each forward; BYOL and DINO after the step)
    momentum_of_next_step: bool = False

    def make_target(self, *names: str) -> None:
        """Make ``target_<name>``, a frozen copy of each module ``<name>``, which ``update_targets`` follows."""
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
        """BYOL's and MoCo v3's two branches on the two global views.

        Returns the predictions q = predictor(projector(backbone(v))) and the target network's
        projections k of the same views (no gradient); keeps z for the monitor.
        """
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
        """One EMA step of every target with momentum ``m``."""
        for online, target in self._pairs:
            for po, pt in zip(online.parameters(), target.parameters(), strict=True):
                pt.mul_(m).add_(po.detach(), alpha=1 - m)


def _cancel_grads(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None
