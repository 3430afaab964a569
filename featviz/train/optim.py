"""Optimisers and schedules of ``featviz train``.

A method's recipe (``Optim``), parameter groups, SGD / AdamW / LARS / LARC, the warm-up +
cosine learning rate and DINO's weight-decay cosine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from featviz.errors import UnknownNameError

OPTIMIZERS = ("sgd", "adamw", "lars", "larc")


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
        min_lr: DINO's ``utils.cosine_scheduler``: the warm-up is ``linspace(0, peak, W)`` and the
            cosine ends at this absolute lr (``--min_lr`` 1e-6), not at ``final_lr`` x peak.
        warmup_share: the default warm-up as a share of the run's epochs (DINO: 10 of 100).
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
    min_lr: float | None = None
    warmup_share: float = 0.0
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The recipe as JSON-able values (``config.json``'s ``optim``)."""
        from dataclasses import asdict

        return asdict(self)


def _lr_at(step: int, total: int, warmup: int, peak: float, final: float = 0.0) -> float:
    """Linear warm-up to ``peak``, then a half cosine to ``final`` x peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    q = 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return peak * (q + final * (1 - q))


def _dino_lr_at(step: int, total: int, warmup: int, peak: float, min_lr: float) -> float:
    """DINO ``utils.cosine_scheduler(peak, min_lr, ...)`` at ``step``: linspace warm-up from 0, cosine to ``min_lr``."""
    if step < warmup:
        return peak * step / (warmup - 1) if warmup > 1 else 0.0
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def _wd_at(step: int, total: int, start: float, end: float | None) -> float:
    """DINO ``utils.cosine_scheduler`` for the weight decay: ``start`` -> ``end`` over the run."""
    if end is None or end == start:
        return start
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * step / max(1, total)))


def schedule_step(opt: torch.optim.Optimizer, step: int, total: int, warmup: int, peak: float, final: float,
                  wd: float, wd_end: float | None, min_lr: float | None = None) -> float:
    """Set every group's lr and weight decay for ``step``; returns the scheduled lr.

    Groups with ``fix_lr`` keep the peak lr (SimSiam ``--fix-pred-lr``); ``lr_scale`` multiplies
    (Barlow Twins' bias lr); groups with weight decay follow ``_wd_at`` (DINO's cosine). With
    ``min_lr`` the lr is DINO's ``cosine_scheduler`` (``_dino_lr_at``), else ``_lr_at``.
    """
    lr = _lr_at(step, total, warmup, peak, final) if min_lr is None else _dino_lr_at(step, total, warmup, peak, min_lr)
    w = _wd_at(step, total, wd, wd_end)
    for g in opt.param_groups:
        g["lr"] = (peak if g.get("fix_lr") else lr) * g.get("lr_scale", 1.0)
        if g.get("base_weight_decay"):
            g["weight_decay"] = w
    return lr


@dataclass(frozen=True)
class Schedule:
    """A run's per-step learning rate and weight decay (what the loop applies before each step).

    Attributes:
        total, warmup: the run's steps and warm-up steps (``int(warmup_epochs x steps per epoch)``).
        peak, final, min_lr: the peak lr, ``Optim.final_lr`` and ``Optim.min_lr`` (DINO).
        wd, wd_end: the weight decay and its cosine's end (None: constant).
    """

    total: int
    warmup: int
    peak: float
    final: float
    wd: float
    wd_end: float | None
    min_lr: float | None = None

    @classmethod
    def of(cls, cfg: Any, optim: Optim, steps_per_epoch: int) -> Schedule:
        """The schedule of a resolved ``TrainConfig`` ``cfg`` with the method's ``optim``."""
        return cls(steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch), cfg.lr, optim.final_lr,
                   cfg.weight_decay, cfg.weight_decay_end, optim.min_lr)

    def apply(self, opt: torch.optim.Optimizer, step: int) -> float:
        """Set ``opt``'s groups for ``step`` (``schedule_step``); returns the scheduled lr."""
        return schedule_step(opt, step, self.total, self.warmup, self.peak, self.final, self.wd, self.wd_end,
                             self.min_lr)


class LARS(torch.optim.Optimizer):
    """LARS as the official SSL repositories write it.

    Barlow Twins ``main.py``, BYOL ``utils/optimizers.py``, MoCo v3 ``moco/optimizer.py``, DINO
    ``utils.py``: the weight decay is added to the gradient, the result scaled by
    eta * ||w|| / ||g + wd w||, then SGD momentum (mu = m mu + update; w -= lr mu). Groups with
    ``lars_exclude`` (biases, norms) skip the scaling. timm's ``Lars`` is APEX's LARC
    (||g|| + wd ||w|| in the denominator), which SwAV uses (``larc``), so it is not used here.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001):
        """LARS over ``params`` (parameters or groups) with SGD momentum and trust coefficient ``eta``."""
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad.add(p, alpha=g["weight_decay"]) if g["weight_decay"] else p.grad
                if not g["lars_exclude"]:
                    w_norm, u_norm = torch.norm(p), torch.norm(dp)
                    q = torch.where((w_norm > 0) & (u_norm > 0), g["eta"] * w_norm / u_norm, torch.ones_like(w_norm))
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(g["momentum"]).add_(dp)
                p.add_(state["mu"], alpha=-g["lr"])


def param_groups(model: nn.Module, optim, *, weight_decay: float) -> list[dict[str, Any]]:
    """The optimiser's parameter groups.

    Weights, and biases / norm parameters (1-D: no decay unless ``optim.decay_bias_norm``; lr x
    ``optim.bias_lr``), each split by ``optim.fixed_lr`` module prefixes (their lr is not decayed).
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_1d = p.ndim <= 1 or name.endswith(".bias")
        fixed = any(name == f or name.startswith(f"{f}.") for f in optim.fixed_lr)
        groups.setdefault((is_1d, fixed), []).append(p)
    out = []
    for (is_1d, fixed), params in sorted(groups.items()):
        decay = weight_decay if (optim.decay_bias_norm or not is_1d) else 0.0
        out.append({"params": params, "weight_decay": decay, "base_weight_decay": decay,
                    "lr_scale": optim.bias_lr if is_1d else 1.0, "fix_lr": fixed,
                    "lars_exclude": is_1d and not optim.decay_bias_norm, "name": f"{'1d' if is_1d else 'weights'}"
                    f"{'+fixed_lr' if fixed else ''}"})
    return out


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float, momentum: float = 0.9):
    """The optimiser ``name`` (``OPTIMIZERS``) over ``groups`` (``param_groups``).

    Raises:
        UnknownNameError: an optimiser featviz does not have.
    """
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    if name == "larc":
        from timm.optim import Lars

        return Lars(groups, lr=lr, momentum=momentum, trust_coeff=0.001, trust_clip=False, always_adapt=True)
    raise UnknownNameError(f"unknown optimizer {name!r}; expected one of: {', '.join(OPTIMIZERS)}")
