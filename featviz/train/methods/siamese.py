"""Siamese methods without negatives, with their loss: BYOL and SimSiam (negative cosine)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featviz.data.augment import METHOD_RECIPES
from featviz.models.heads import scaled
from featviz.train.methods.base import MomentumMixin, SSLMethod
from featviz.train.methods.registry import (
    MethodRegistration,
    _digits,
    register,
)
from featviz.train.optim import Optim


def neg_cosine(p: torch.Tensor, z: torch.Tensor, stop_grad: bool = True) -> torch.Tensor:
    """SimSiam's D(p, z) = -cos(p, stopgrad(z)), averaged over the batch."""
    if stop_grad:
        z = z.detach()
    return -(F.normalize(p.float(), dim=1) * F.normalize(z.float(), dim=1)).sum(dim=1).mean()


class BYOL(MomentumMixin, SSLMethod):
    """BYOL (Grill et al. 2020): the online network predicts the target network's projection.

    L = ||q(z) / ||q(z)|| - z' / ||z'|| ||^2 = 2 - 2 cos, symmetrised; the target is an EMA.

    Heads are ``utils/networks.py`` ``MLP``: Linear-BN-ReLU-Linear (the last without bias).
    """

    name = "byol"

    def __init__(self, backbone: nn.Module, *, momentum: float = 0.996, hidden_dim: int | None = None,
                 out_dim: int | None = None):
        """Build the heads and the target network around ``backbone``; the keywords are hyperparameters."""
        super().__init__(backbone)
        self.base_momentum = momentum
        # configs/byol.py projector_hidden_size 4096, projector_output_size 256 (for 2048-d features)
        hid, out = hidden_dim or scaled(4096, self.dim), out_dim or scaled(256, self.dim)
        self.head("projector", {"type": "mlp", "dims": [self.dim, hid, out], "bn": True, "last_bias": False})
        self.head("predictor", {"type": "mlp", "dims": [out, hid, out], "bn": True, "last_bias": False})
        self.make_target("backbone", "projector")

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The loss of one batch of views."""
        (p1, p2), (t1, t2) = self.predict_targets(views)
        return (2 + 2 * neg_cosine(p1, t2)) + (2 + 2 * neg_cosine(p2, t1))


register(MethodRegistration(
    "byol", BYOL,
    recipe=METHOD_RECIPES["byol"],
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
    """SimSiam (Chen & He 2021): L = D(p1, stopgrad(z2))/2 + D(p2, stopgrad(z1))/2, D the negative cosine.

    "Without stop-gradient, the optimizer quickly finds a degenerated solution" (Sec. 4.1) --
    ``stop_grad=False`` reproduces that ablation.
    """

    name = "simsiam"

    def __init__(self, backbone: nn.Module, *, stop_grad: bool = True):
        """Build the heads around ``backbone``; the keywords are hyperparameters."""
        super().__init__(backbone)
        self.stop_grad = stop_grad
        out = scaled(2048, self.dim)
        self.head("projector", {"type": "mlp", "dims": [self.dim, out, out, out], "bn": True,
                                "last_bn": True, "last_affine": False})
        self.head("predictor", {"type": "mlp", "dims": [out, scaled(512, self.dim, lo=16), out], "bn": True})

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The loss of one batch of views."""
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])  # NxC
        p1, p2 = self.predictor(z1), self.predictor(z2)  # NxC
        self._keep(z1, z2)
        return neg_cosine(p1, z2, self.stop_grad) / 2 + neg_cosine(p2, z1, self.stop_grad) / 2


register(MethodRegistration(
    "simsiam", SimSiam,
    recipe=METHOD_RECIPES["simsiam"],
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
