"""What cam needs to know about a model: its output kind (one probe forward), its default
layer, and the ViT token grid a layer's output is reshaped to."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featviz.errors import (
    ArchitectureError,
    UnknownNameError,
)

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
        return self.out_shape[0]


class OutputSelector(nn.Module):
    """Wraps a model whose forward returns a tuple, list, dict or ModelOutput; returns one tensor."""

    def __init__(self, model: nn.Module, key: int | str):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(self.key, int):
            return out[self.key]
        return out[self.key] if isinstance(out, Mapping) else getattr(out, self.key)


def has_classifier(model: nn.Module) -> bool:
    """Whether ``model`` ends in a classifier (its forward gives logits, not features)."""
    flag = getattr(model, "featviz_has_classifier", None)
    if flag is not None:
        return bool(flag)
    if getattr(model, "featviz_num_classes", None):  # load_backbone(keep_classifier=True) attached one
        return True
    for attr in ("fc", "head", "classifier"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module) and not isinstance(head, nn.Identity) and any(
                isinstance(m, nn.Linear) for m in head.modules()):
            return True
    return False


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
        kind = "logits" if has_classifier(model) else "embedding"
    elif out.ndim == 4:
        kind = "segmentation"
    else:
        raise ArchitectureError(f"the model outputs shape {tuple(out.shape)}; featviz cam explains (N, D) "
                                "logits or embeddings and (N, C, H, W) per-pixel logits")
    return ModelInfo(forward, kind, tuple(out.shape[1:]), how)


def load_model(*, checkpoint: str | Path | None = None, arch: str | None = None, seed: int = 0,
               **load_kwargs: Any) -> tuple[nn.Module, dict[str, Any] | None]:
    """The model to explain: a checkpoint with its classifier (or whole segmenter) kept, or random weights.

    A thin alias of ``featviz.loader.load_model(head=True)``.

    Returns:
        (model, its description as a dict for the manifest, or None for random weights).
    """
    from featviz.loader import load_model as _load

    model, desc = _load(checkpoint, arch=arch, seed=seed, head=checkpoint is not None, **load_kwargs)
    return model, None if checkpoint is None else desc.to_dict()


# ------------------------------------------------------------------ layers and token grids
_DEFAULT_LAYERS = (  # (attribute path that must exist, layer name), first match wins
    ("layer4", "layer4"),  # torchvision ResNets
    ("layers.-1.blocks.-1.norm1", "layers[-1].blocks[-1].norm1"),  # Swin
    ("blocks.-1.norm1", "blocks[-1].norm1"),  # timm ViT / DeiT
    ("encoder.layers.-1.ln_1", "encoder.layers[-1].ln_1"),  # torchvision ViT
    ("stages.-1", "stages[-1]"),  # timm ConvNeXt and friends
    ("conv_head", "bn2"),  # timm EfficientNet / MobileNet: the head's conv + BN + activation
    ("features", "features"),  # VGG / MobileNet / DenseNet style
)


def default_layers(model: nn.Module) -> list[str]:
    """The usual CAM layer for the architecture: ResNet ``layer4``, ViT ``blocks[-1].norm1``, …

    A segmenter with a ``backbone`` attribute gets its backbone's default layer.

    Raises:
        ArchitectureError: no rule fits; the user must pass --layer.
    """
    from featviz.models import get_layer

    for prefix, root in (("backbone.", getattr(model, "backbone", None)), ("", model)):
        if not isinstance(root, nn.Module):
            continue
        for path, name in _DEFAULT_LAYERS:
            try:
                get_layer(root, path)
            except UnknownNameError:
                continue
            return [prefix + name]
    raise ArchitectureError(f"featviz has no default CAM layer for {type(model).__name__}; pass --layer "
                            "(`featviz layers` lists the names)")


class TokenGrid:
    """A ``reshape_transform`` turning ViT tokens (B, N, D) into maps (B, D, h, w).

    The grid is the input size over the patch size (non-square inputs included); the prefix
    tokens (class, register, distillation) are the leading ``N - h*w`` tokens and must match the
    count the model declares. 4-D tensors pass unchanged; channels-last 4-D outputs (Swin) are
    permuted when ``channels_last``.
    """

    def __init__(self, grid: tuple[int, int], prefix: int | None, *, channels_last: bool = False):
        self.grid, self.prefix, self.channels_last = grid, prefix, channels_last

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 4:
            return t.permute(0, 3, 1, 2) if self.channels_last else t
        if t.ndim != 3:
            raise ArchitectureError(f"cannot turn a layer output of shape {tuple(t.shape)} into a 2-D map")
        h, w = self.grid
        extra = t.shape[1] - h * w
        if extra < 0 or (self.prefix is not None and extra != self.prefix):
            raise ArchitectureError(
                f"the layer outputs {t.shape[1]} tokens but a {h}×{w} patch grid plus {self.prefix} prefix "
                f"tokens makes {h * w + (self.prefix or 0)}; pick a layer inside the transformer blocks")
        return t[:, extra:, :].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)


def prefix_tokens(model: nn.Module) -> int | None:
    """Class + register + distillation tokens, as the model declares them (None if it does not)."""
    if hasattr(model, "num_prefix_tokens"):  # timm (cls + reg + dist)
        return int(model.num_prefix_tokens)
    if hasattr(model, "class_token") and isinstance(model.class_token, torch.Tensor):
        return 1  # torchvision VisionTransformer
    count = 0
    for attr in ("cls_token", "dist_token"):
        count += int(isinstance(getattr(model, attr, None), torch.Tensor))
    reg = getattr(model, "reg_token", None) if hasattr(model, "reg_token") else getattr(model, "register_tokens", None)
    if isinstance(reg, torch.Tensor):
        count += int(reg.shape[1] if reg.ndim == 3 else reg.shape[0])
    return count if count else None


def reshape_transform_for(model: nn.Module, layer_shapes: list[tuple[int, ...]],
                          input_hw: tuple[int, int]) -> TokenGrid | None:
    """The ``reshape_transform`` the layers need, found from the model (None for conv maps)."""
    if all(len(s) == 4 and "Swin" not in type(model).__name__ for s in layer_shapes):
        return None
    pe = getattr(model, "patch_embed", None)
    patch = getattr(pe, "patch_size", None) or getattr(model, "patch_size", None)
    if patch is None:
        conv = getattr(getattr(model, "conv_proj", None), "kernel_size", None)  # torchvision ViT
        patch = conv
    if patch is None:
        raise ArchitectureError(f"layer outputs {layer_shapes[0]} look like tokens, but featviz cannot find the "
                                "model's patch size; pick a convolutional layer")
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    grid = (input_hw[0] // ph, input_hw[1] // pw)
    if "Swin" in type(model).__name__:
        grid = (grid[0] // 2 ** (len(getattr(model, "layers", [])) - 1), grid[1] // 2 ** (len(getattr(model, "layers", [])) - 1))
        return TokenGrid(grid, 0, channels_last=True)
    return TokenGrid(grid, prefix_tokens(model))




def _layer_shapes(info_model: nn.Module, layers: list[nn.Module], x: torch.Tensor) -> list[tuple[int, ...]]:
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


