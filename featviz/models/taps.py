"""Many layers of one model in one forward: the one rule (``tap_layers``) and its two uses.

- ``tap_layers`` runs the model once, up to the last of the named layers, and hands each layer's
  first output to a reducer inside its hook, so a caller that pools drops the map at once; layer
  names are resolved by ``features.resolve_layer`` (``layer4[-1]``, ``blocks.-1``);
- ``layer_tokens``: each layer's map (``features.to_map``, as ``FeatureExtractor`` makes it) and the
  prefix tokens (class, registers) the map leaves out (``views.norms``);
- ``LayerTaps``: each layer pooled to one vector per image (``compare``): a ViT layer that outputs
  tokens with a class token gives its class token (``"class token"``); any other output is made a
  map by ``features.to_map`` and averaged over space (``"global average"``); a 2-D output is already
  pooled (``"as output"``).

``auto_layers`` chooses a readable set of layers to compare: every residual block of a ResNet,
every block of a ViT, a timm model's ``feature_info`` stages, at most ``max_layers`` (evenly spaced,
the last kept).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from featviz.errors import ArchitectureError
from featviz.models.features import (
    NoSpatialMapError,
    _channels_last,
    _feature_info_last,
    _layer_map,
    is_vit,
    resolve_layer,
    to_map,
    token_layout,
)
from featviz.models.tokens import TokenLayout

MAX_LAYERS = 24
POOLINGS = ("class token", "global average", "as output")


class _Done(Exception):
    """Raised by the last hook that was still waiting: the rest of the forward is not needed."""


class LayerTokens(NamedTuple):
    """One layer's map and, for ViT tokens, the prefix tokens the map leaves out."""

    map: torch.Tensor  # (N, C, h, w)
    prefix: torch.Tensor | None  # (N, P, C): class, register, other prefix tokens in order; None for a 4-D map


def tap_layers(
    model: nn.Module,
    x: torch.Tensor,
    layers: Sequence[str],
    reduce: Callable[[str, nn.Module, Any, TokenLayout | None], Any],
) -> dict[str, Any]:
    """Several layers from one forward: each layer's output goes through ``reduce`` inside its hook.

    The one rule for reading many layers at once (``layer_tokens``, ``LayerTaps``):
    names are resolved by ``resolve_layer``; ``reduce(name, module, output, layout)`` sees a layer's
    first output only (a module run twice counts once), so a caller that pools keeps its vectors and
    drops the map at once; the forward stops once every layer has run.

    Returns:
        ``{resolved name: reduce(...)}`` in ``layers`` order.

    Raises:
        UnknownNameError: no such layer.
        DataError: a ViT cannot take this input size.
        NoSpatialMapError: the forward never runs a layer (or ``reduce`` refuses its output).
    """
    layout = token_layout(model, (int(x.shape[-2]), int(x.shape[-1])))
    mods = dict(resolve_layer(model, name) for name in layers)
    seen: dict[str, Any] = {}
    handles = []
    for name, mod in mods.items():
        def hook(m, _i, o, name=name):
            if name in seen:
                return
            seen[name] = reduce(name, m, o, layout)
            if len(seen) == len(mods):
                raise _Done
        handles.append(mod.register_forward_hook(hook))
    try:
        model(x)
    except _Done:
        pass
    finally:
        for hd in handles:
            hd.remove()
    missing = [n for n in mods if n not in seen]
    if missing:
        raise NoSpatialMapError(f"layer(s) {', '.join(map(repr, missing))} never run by the model's forward; "
                                "pick layers on the path from input to output (`featviz layers`)")
    return {name: seen[name] for name in mods}


def layer_tokens(model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> dict[str, LayerTokens]:
    """Several layers' maps from one forward (``tap_layers``), with the prefix tokens of ViT token outputs.

    Each layer's output goes through the same rule as ``FeatureExtractor`` (``to_map``); a 3-D token
    output with ``layout.prefix`` leading tokens also gives those tokens (``TokenLayout`` says which
    is which).

    Raises:
        UnknownNameError: no such layer.
        DataError: a ViT cannot take this input size.
        NoSpatialMapError: a layer's output has no spatial map, or the forward never runs it.
    """

    def tokens(name: str, mod: nn.Module, out: Any, layout: TokenLayout | None) -> LayerTokens:
        fmap = _layer_map(model, mod, name, out, layout)
        raw = out[0] if isinstance(out, (tuple, list)) else out
        prefix = None
        if raw.ndim == 3 and layout is not None and raw.shape[1] == layout.prefix + layout.grid[0] * layout.grid[1]:
            prefix = raw[:, : layout.prefix]
        return LayerTokens(fmap, prefix)

    return tap_layers(model, x, layers, tokens)


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
    """Pooled vectors of several layers from one forward (the feature core's ``tap_layers``).

    Use as a context manager (kept for call sites that tap the same layers batch after batch).

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
        self.layers = [resolve_layer(model, name)[0] for name in layers]
        self.pooling: dict[str, str] = {}

    def __enter__(self) -> LayerTaps:
        """Nothing to set up: each call hooks and unhooks its layers."""
        return self

    def __exit__(self, *exc: Any) -> None:
        """Nothing to tear down."""

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The (N, D_l) pooled vectors of every layer for the (N, 3, H, W) batch ``x``, in ``layers`` order.

        Each output is pooled inside its hook and dropped, so one forward holds only pooled vectors.

        Raises:
            NoSpatialMapError: a layer never ran in the model's forward, or its output cannot be pooled.
        """

        def pooled(name: str, mod: nn.Module, out: Any, layout: Any) -> torch.Tensor:
            vec, rule = pool(self.model, mod, out, layout, what=f"layer {name!r}")
            self.pooling[name] = rule
            return vec.float()

        got = tap_layers(self.model, x, self.layers, pooled)
        return [got[name] for name in self.layers]
