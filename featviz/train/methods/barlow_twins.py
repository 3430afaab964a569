"""Barlow Twins and its cross-correlation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featviz.data.augment import METHOD_RECIPES
from featviz.models.heads import scaled
from featviz.train.methods.base import SSLMethod
from featviz.train.methods.ddp import (
    gather,
)
from featviz.train.methods.registry import (
    MethodRegistration,
    _digits,
    register,
)
from featviz.train.optim import Optim


def barlow_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> torch.Tensor:
    """Barlow Twins' loss, as ``main.py`` computes it.

    c = bn(z1).T bn(z2) / N with ``BatchNorm1d(affine=False)`` (biased variance, eps 1e-5);
    sum_i (1 - c_ii)^2 + lambda * sum_{i!=j} c_ij^2.
    """
    z1, z2 = gather(z1.float()), gather(z2.float())
    n = z1.shape[0]
    z1 = F.batch_norm(z1, None, None, training=True, eps=1e-5)
    z2 = F.batch_norm(z2, None, None, training=True, eps=1e-5)
    c = z1.T @ z2 / n
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on + lambd * off


class BarlowTwins(SSLMethod):
    """Barlow Twins (Zbontar et al. 2021).

    It pushes the cross-correlation matrix of the two views' batch-normalised embeddings to the
    identity: sum (1-C_ii)^2 + lambda sum_{i!=j} C_ij^2.

    The projector is ``main.py``'s: (Linear without bias, BN, ReLU) x 2, Linear without bias.
    """

    name = "barlow_twins"

    def __init__(self, backbone: nn.Module, *, lambd: float = 0.0051, proj_dim: int | None = None):
        """Build the projector around ``backbone``; the keywords are hyperparameters."""
        super().__init__(backbone)
        self.lambd = lambd
        d = proj_dim or scaled(8192, self.dim)  # main.py --projector 8192-8192-8192
        self.head("projector", {"type": "mlp", "dims": [self.dim, d, d, d], "bn": True, "last_bias": False})

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The loss of one batch of views."""
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])
        self._keep(z1, z2)
        return barlow_loss(z1, z2, self.lambd)


register(MethodRegistration(
    "barlow_twins", BarlowTwins,
    recipe=METHOD_RECIPES["barlow_twins"],
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
