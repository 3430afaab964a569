"""What min-max scaling hides (``MapStats``, ``classify``) and the model state every CAM method runs in."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class MapStats:
    """What min-max scaling hides: the raw size of one map before normalisation.

    Attributes:
        raw_max: Largest value of the raw map after ReLU (before scaling); 0 means blank.
        raw_mean: Mean of the raw map after ReLU.
        grad_norm: L2 norm of the target's gradient at the layer(s), for gradient methods.
        status: ``ok``, ``blank`` (all zero), ``noise`` (gradients at float-rounding level),
            ``nan`` (non-finite) or ``unchecked`` (the method gives no raw map).
    """

    raw_max: float | None = None
    raw_mean: float | None = None
    grad_norm: float | None = None
    status: str = "unchecked"

    def to_dict(self) -> dict[str, Any]:
        """The statistics as manifests record them."""
        return {"raw_max": self.raw_max, "raw_mean": self.raw_mean, "grad_norm": self.grad_norm,
                "status": self.status}


NOISE_RATIO = 1e-4
"""A gradient map is noise when the target's relative slope at the output (``CamTarget.slope``) is
below this: its gradients are float rounding, which min-max scaling blows up into a heatmap."""


def classify(st: MapStats, slope: float | None) -> MapStats:
    """Set ``st.status`` from its raw map and the target's slope (``NOISE_RATIO``); return it."""
    if st.raw_max is None:
        return st
    if not math.isfinite(st.raw_max):
        st.status = "nan"
    elif st.raw_max <= 0:
        st.status = "blank"
    elif st.grad_norm is not None and slope is not None and slope < NOISE_RATIO:
        st.status = "noise"
    else:
        st.status = "ok"
    return st


@contextmanager
def model_state(model: nn.Module, *, weights_require_grad: bool = False) -> Iterator[None]:
    """Eval mode and chosen weight ``requires_grad``; restore every flag and ``.grad`` afterwards.

    Layer-gradient methods need no weight gradients (featviz makes the layer's output require
    grad itself, which also covers frozen backbones). FullGrad and ShapleyCAM differentiate
    through the whole network as pytorch-grad-cam does, with weights requiring grad (ShapleyCAM's
    Hessian-vector product fails on a frozen head otherwise).
    """
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _, _ in params:
            p.requires_grad_(weights_require_grad)
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for p, flag, grad in params:
            p.requires_grad_(flag)
            p.grad = grad
        for m, flag in modes:
            m.training = flag
