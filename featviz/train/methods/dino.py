"""DINO and its self-distillation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featviz.data.augment import METHOD_RECIPES, VIT_RECIPES
from featviz.models.heads import scaled
from featviz.train.methods.base import MomentumMixin, SSLMethod, _cancel_grads, multicrop_forward
from featviz.train.methods.ddp import (
    all_mean,
)
from featviz.train.methods.registry import (
    MethodRegistration,
    _digits,
    register,
)
from featviz.train.optim import Optim


def dino_h(t: torch.Tensor, s: torch.Tensor, center: torch.Tensor, tps: float, tpt: float) -> torch.Tensor:
    """DINO's H(t, s) = -sum softmax((t - C)/tpt) * log softmax(s/tps), averaged over the batch."""
    t = F.softmax((t.detach().float() - center) / tpt, dim=1)
    return -(t * F.log_softmax(s.float() / tps, dim=1)).sum(dim=1).mean()


class DINO(MomentumMixin, SSLMethod):
    """DINO (Caron et al. 2021): self-distillation with no labels.

    The student matches the centred, sharpened teacher: H(t, s) = -softmax((t - C)/tpt) .
    log softmax(s/tps); the teacher is an EMA of the student and C an EMA of the teacher's batch
    mean.

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
                 use_bn_in_head: bool = False, hidden_dim: int | None = None, bottleneck_dim: int | None = None,
                 one_pass_crops: bool = True):
        """Build the heads, the teacher and the centre around ``backbone``; the keywords are hyperparameters.

        ``one_pass_crops``: the official forward (``MultiCropWrapper``: same-size crops in one
        pass, so BatchNorm normalises them together); False: one pass per view, BatchNorm over B
        images (featviz's earlier forward).
        """
        super().__init__(backbone)
        self.one_pass_crops = one_pass_crops
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
        """``DINOLoss.teacher_temp_schedule``: ``linspace(warmup_tpt, tpt, warmup_tpt_epochs)``, then ``tpt``.

        A 1-epoch warm-up is ``linspace(w, t, 1) = [w]``: epoch 0 uses the warm-up value.
        """
        if self.warmup_tpt is None or self.epoch >= self.warmup_tpt_epochs:
            return self.tpt
        if self.warmup_tpt_epochs == 1:
            return self.warmup_tpt
        return self.warmup_tpt + (self.tpt - self.warmup_tpt) * self.epoch / (self.warmup_tpt_epochs - 1)

    def before_step(self, step: int) -> None:
        """No gradient for the head's last layer during the first ``freeze_last_layer`` epochs."""
        if self.epoch < self.freeze_last_layer:  # utils.cancel_gradients_last_layer
            _cancel_grads(self.projector.last_layer)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The loss of one batch of views (the teacher sees the global views only).

        Student and teacher are ``main_dino.py``'s ``MultiCropWrapper`` (``multicrop_forward``):
        the two global crops pass as one batch, the local crops as another, the head once.
        """
        b = views[0].shape[0]
        if self.one_pass_crops:
            feats, out = multicrop_forward(self.backbone, self.projector, views)
            h, s = feats.split(b), out.split(b)
            with torch.no_grad():
                t = multicrop_forward(self.target_backbone, self.target_projector, views[:2])[1].split(b)
        else:
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
        """The teacher's EMA step, then the centre's."""
        super().on_step_end(progress)
        self.center.mul_(self.center_momentum).add_(all_mean(self._teacher_mean), alpha=1 - self.center_momentum)


register(MethodRegistration(
    "dino", DINO,
    recipe=METHOD_RECIPES["dino"],
    official=Optim("sgd", lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4, decay_bias_norm=False,
                   warmup_epochs=10, clip_grad=3.0, min_lr=1e-6,
                   source="dino README.md:207 (ResNet-50: --optimizer sgd --lr 0.03 --weight_decay 1e-4 "
                          "--weight_decay_end 1e-4), main_dino.py:87-101 (clip_grad 3.0, warmup 10, min_lr 1e-6), "
                          "utils.py:632-643 (no decay on biases and norms)"),
    optim=Optim("sgd", lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4, decay_bias_norm=False, clip_grad=3.0,
                min_lr=1e-6, warmup_share=0.1,
                source="dino README.md:207; warm-up 10 of the default 100 epochs, min_lr 1e-6 (main_dino.py:87-104)"),
    hparams={"tps": 0.1, "tpt": 0.04, "momentum": 0.996, "center_momentum": 0.9, "norm_last_layer": True,
             "freeze_last_layer": 1},
    local_crops=0, official_local_crops=8,
    variants={"vit": {"recipe": VIT_RECIPES["dino"],
                      "official": Optim("adamw", lr=5e-4, weight_decay=0.04, weight_decay_end=0.4,
                                        decay_bias_norm=False, warmup_epochs=10, clip_grad=3.0, min_lr=1e-6,
                                        source="dino main_dino.py:82-104 (AdamW lr 5e-4 x batch/256, weight decay "
                                               "0.04 -> 0.4 cosine, clip_grad 3.0, warmup 10)"),
                      "optim": Optim("adamw", lr=5e-4, weight_decay=0.04, weight_decay_end=0.4, decay_bias_norm=False,
                                     clip_grad=3.0, min_lr=1e-6, warmup_share=0.1,
                                     source="dino main_dino.py:82-104")}},
    source="facebookresearch/dino main_dino.py:55-117 (arguments), 183-212 (student, teacher, SyncBN per network), "
           "301-360 (loop: clip, cancel last layer, EMA), 363-416 (DINOLoss); utils.py:132-149, 187-198; "
           "vision_transformer.py:257-291 (DINOHead)",
    deviations=("no local crops by default on CPU (`--local-crops 8` is the official multi-crop; global crops "
                "then follow the multi-crop scale of the variant)",
                "digits preset: LARC lr 1.0, a BatchNorm head with an unnormalised last layer and EMA base 0.99 "
                "(without the BN head the teacher goes uniform; docs/train.md)",
                "digits preset: no lr warm-up, as before issue 26 (`--warmup-epochs 1` is the official tenth of "
                "the epochs; measured worse on digits, docs/train.md)"),
    presets={"digits": _digits(optimizer="larc", lr=1.0, rotate=15.0, shear=10.0, warmup_epochs=0.0,
                               hparams={"momentum": 0.99, "norm_last_layer": False, "use_bn_in_head": True})},
))
