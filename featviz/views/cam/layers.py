"""What cam finds out about a model with one probe forward.

Its output kind and the shapes of the target layers. The model facts (classifier or not, class
names) come from its description (``featviz.models.description.describe``); default layers and the
ViT token grid from the feature core (``featviz.models.features.default_cam_layer``,
``featviz.models.features.reshape_transform``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from featviz.errors import ArchitectureError
from featviz.models.description import describe

log = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    """What featviz found out about a model from one probe forward.

    Attributes:
        forward: The module pytorch-grad-cam calls (the model, or a wrapper selecting one output).
        kind: ``logits`` (a classifier), ``embedding`` (an encoder) or ``segmentation``.
        out_shape: Output shape of one sample.
        selected: How a tuple/dict output was reduced to one tensor (None when it was a tensor).
    """

    forward: nn.Module
    kind: str
    out_shape: tuple[int, ...]
    selected: str | None = None

    @property
    def num_classes(self) -> int:
        """The classifier's (or segmenter's) classes: the output's first dimension."""
        return self.out_shape[0]


class OutputSelector(nn.Module):
    """Wraps a model whose forward returns a tuple, list, dict or ModelOutput; returns one tensor."""

    def __init__(self, model: nn.Module, key: int | str):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The selected tensor of the model's output for ``x``."""
        out = self.model(x)
        if isinstance(self.key, int):
            return out[self.key]
        return out[self.key] if isinstance(out, Mapping) else getattr(out, self.key)


def _select_output(out: Any) -> tuple[int | str | None, str | None]:
    if isinstance(out, torch.Tensor):
        return None, None
    if isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            if isinstance(v, torch.Tensor):
                return i, f"element {i} of the {type(out).__name__} output"
    elif isinstance(out, Mapping) or hasattr(out, "logits"):
        keys = list(out.keys()) if isinstance(out, Mapping) else ["logits"]
        tensors = [k for k in keys if isinstance(out[k] if isinstance(out, Mapping) else getattr(out, k), torch.Tensor)]
        for k in ("logits", "out", "x_norm_clstoken", "pooler_output"):
            if k in tensors:
                return k, f"key {k!r} of the {type(out).__name__} output"
        if len(tensors) == 1:
            return tensors[0], f"key {tensors[0]!r} of the {type(out).__name__} output"
        raise ArchitectureError(f"the model returns a {type(out).__name__} with tensors {tensors}; featviz "
                                "cannot tell which one to explain (expected a 'logits' or 'out' key)")
    raise ArchitectureError(f"the model returns {type(out).__name__}; expected a tensor, or a tuple/dict of tensors")


def probe_model(model: nn.Module, x: torch.Tensor) -> ModelInfo:
    """Run one image through ``model`` to learn its output kind; wrap tuple/dict outputs.

    Raises:
        ArchitectureError: the output is neither (N, D) nor (N, C, H, W).
    """
    with torch.no_grad():
        out = model(x[:1])
    key, how = _select_output(out)
    forward = model
    if key is not None:
        forward = OutputSelector(model, key).eval()
        out = out[key] if isinstance(key, int) or isinstance(out, Mapping) else getattr(out, key)
        log.info("the model returns a %s; explaining %s", type(out).__name__, how)
    if out.ndim == 2:
        kind = "logits" if describe(model).has_classifier else "embedding"
    elif out.ndim == 4:
        kind = "segmentation"
    else:
        raise ArchitectureError(f"the model outputs shape {tuple(out.shape)}; featviz cam explains (N, D) "
                                "logits or embeddings and (N, C, H, W) per-pixel logits")
    return ModelInfo(forward, kind, tuple(out.shape[1:]), how)


def layer_shapes(info_model: nn.Module, layers: list[nn.Module], x: torch.Tensor) -> list[tuple[int, ...]]:
    """The output shape of each of ``layers`` for one image of ``x`` (one forward of ``info_model``).

    Raises:
        ArchitectureError: a layer is never run by the forward.
    """
    shapes: dict[int, tuple[int, ...]] = {}

    def record(mod: nn.Module, _inputs, out) -> None:
        shapes.setdefault(id(mod), tuple((out[0] if isinstance(out, (tuple, list)) else out).shape))

    hs = [m.register_forward_hook(record) for m in layers]
    try:
        with torch.no_grad():
            info_model(x[:1])
    finally:
        for h in hs:
            h.remove()
    missing = [i for i, m in enumerate(layers) if id(m) not in shapes]
    if missing:
        raise ArchitectureError(f"layer #{missing[0] + 1} is never run by the model's forward; pick a layer on the "
                                "path from input to output (`featviz layers`)")
    return [shapes[id(m)] for m in layers]
