"""Projection heads built from JSON-able specs (``build_head``), so a checkpoint can rebuild them.

Heads are what SSL methods put on a backbone (``projector``, ``predictor``, ``prototypes``);
their tensors are named ``<head>.*`` next to ``backbone.*``. Widths follow each paper for a
2048-d ResNet-50 and shrink in proportion for narrower backbones (``scaled``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


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
    """DINO's head (``vision_transformer.py`` ``DINOHead``).

    An MLP to a bottleneck, l2-normalised, then a weight-normalised linear layer to K outputs;
    ``norm_last_layer`` freezes the weight-norm gain at 1.
    """

    def __init__(self, mlp: nn.Module, bottleneck: int, out: int, *, norm_last_layer: bool = True):
        """The head around ``mlp`` (ending in ``bottleneck`` features), with ``out`` outputs."""
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
        """The K outputs of features ``x`` (N, D)."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))
