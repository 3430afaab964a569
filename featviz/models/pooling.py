"""Many layers of one model in one forward, each pooled to one vector per image (``LayerTaps``).

The feature core's rules, applied to several layers at once:

- layer names are resolved by ``features.resolve_layer`` (``layer4[-1]``, ``blocks.-1``);
- a ViT layer that outputs tokens with a class token is pooled to its class token
  (``"class token"``); any other output is made a map by ``features.to_map`` (ViT patch tokens to
  the patch grid, channels-last maps permuted) and averaged over space (``"global average"``); a
  2-D output is already pooled (``"as output"``);
- each layer's output is pooled inside its hook and dropped, so one forward never holds more than
  the pooled vectors of all layers (not their maps), and the forward stops once every tapped layer
  has run.

``auto_layers`` chooses a readable set of layers to compare: every residual block of a ResNet,
every block of a ViT, a timm model's ``feature_info`` stages, at most ``max_layers`` (evenly spaced,
the last kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from featviz.errors import ArchitectureError
from featviz.models.features import (
    _channels_last,
    _feature_info_last,
    is_vit,
    resolve_layer,
    to_map,
    token_layout,
)

MAX_LAYERS = 24
POOLINGS = ("class token", "global average", "as output")


class _Done(Exception):
    """Raised by the last hook that was still waiting: the rest of the forward is not needed."""


def _spread(names: list[str], most: int) -> list[str]:
    if len(names) <= most:
        return names
    picks = sorted({round(i * (len(names) - 1) / (most - 1)) for i in range(most)})
    return [names[i] for i in picks]


def auto_layers(model: nn.Module, *, max_layers: int = MAX_LAYERS) -> list[str]:
    """A readable set of layers of ``model`` to compare, input to output.

    Every residual block of a ResNet (``layer1.0`` … ``layer4.1``), every block of a ViT
    (``blocks.0`` … ``blocks.11``; a torchvision ViT's ``encoder.layers.*``), a timm model's
    ``feature_info`` stages; more than ``max_layers``
    are thinned evenly (the first and last kept).

    Raises:
        ArchitectureError: no rule fits; pass the layer names.
    """
    names: list[str] = []
    if all(isinstance(getattr(model, f"layer{i}", None), nn.Sequential) for i in range(1, 5)):
        names = [f"layer{i}.{j}" for i in range(1, 5) for j in range(len(getattr(model, f"layer{i}")))]
    elif is_vit(model):
        names = [f"blocks.{i}" for i in range(len(model.blocks))]
    elif isinstance(getattr(getattr(model, "encoder", None), "layers", None), nn.Sequential):  # torchvision ViT
        names = [f"encoder.layers.{n}" for n, _ in model.encoder.layers.named_children()]
    elif _feature_info_last(model):
        names = [str(f["module"]) for f in model.feature_info if isinstance(f, dict) and f.get("module")]
    if not names:
        raise ArchitectureError(
            f"featviz has no automatic layer set for {type(model).__name__}; pass --layers "
            "L1,L2,… (`featviz layers` lists the names)"
        )
    return _spread(names, max_layers)


def pool(model: nn.Module, module: nn.Module, output: Any, layout: Any, *, what: str) -> tuple[torch.Tensor, str]:
    """One layer's output as (N, D) pooled vectors and the name of the rule used (``POOLINGS``).

    Raises:
        NoSpatialMapError: the output is neither tokens, a map nor pooled vectors.
    """
    t = output[0] if isinstance(output, (tuple, list)) and output else output
    if isinstance(t, torch.Tensor) and t.ndim == 2:
        return t, "as output"
    if (
        isinstance(t, torch.Tensor)
        and t.ndim == 3
        and layout is not None
        and layout.class_tokens >= 1
        and t.shape[1] == layout.prefix + layout.grid[0] * layout.grid[1]
    ):
        return t[:, 0], "class token"
    cl = isinstance(t, torch.Tensor) and t.ndim == 4 and _channels_last(model, module, t, layout)
    return to_map(t, layout, channels_last=cl, what=what).mean(dim=(2, 3)), "global average"


class LayerTaps:
    """Pooled vectors of several layers from one forward. Use as a context manager.

    Args:
        model: Any ``nn.Module``.
        layers: Layer names (``features.resolve_layer`` resolves them).

    Example::

        with LayerTaps(model, ["layer1.0", "layer4.1"]) as taps, torch.inference_mode():
            vecs = taps(x)            # [(N, 16), (N, 128)]
        taps.pooling                  # {"layer1.0": "global average", ...}

    Raises:
        UnknownNameError: no such layer.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        self.model = model
        resolved = [resolve_layer(model, name) for name in layers]
        self.layers = [name for name, _ in resolved]
        self.modules = [mod for _, mod in resolved]
        self.pooling: dict[str, str] = {}
        self._out: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._layout: Any = None

    def __enter__(self) -> LayerTaps:
        """Hook every layer."""
        for i, (name, mod) in enumerate(zip(self.layers, self.modules, strict=True)):

            def hook(m, _inp, out, i=i, name=name):
                if i in self._out:
                    return  # a module run twice (shared): its first output counts
                vec, rule = pool(self.model, m, out, self._layout, what=f"layer {name!r}")
                self._out[i] = vec.float()
                self.pooling[name] = rule
                if len(self._out) == len(self.layers):
                    raise _Done

            self._handles.append(mod.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The (N, D_l) pooled vectors of every layer for the (N, 3, H, W) batch ``x``, in ``layers`` order.

        Raises:
            ArchitectureError: a layer never ran in the model's forward.
            NoSpatialMapError: a layer's output cannot be pooled.
        """
        if not self._handles:
            raise RuntimeError("use LayerTaps as a context manager: `with LayerTaps(m, layers) as taps:`")
        self._layout = token_layout(self.model, (int(x.shape[-2]), int(x.shape[-1])))
        self._out = {}
        try:
            self.model(x)
        except _Done:
            pass
        missing = [n for i, n in enumerate(self.layers) if i not in self._out]
        if missing:
            raise ArchitectureError(
                f"layer(s) {', '.join(missing)} never run in the model's forward; pick layers on "
                "the path from input to output (`featviz layers`)"
            )
        return [self._out[i] for i in range(len(self.layers))]
