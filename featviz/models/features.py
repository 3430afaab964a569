"""The feature core: any layer's output as an (N, C, H, W) map, for any input size.

One rule turns a layer output into a spatial map, and ``embed``, ``cam``, ``collapse``,
``tsne --figure`` and ``layers`` all use it:

- a 4-D output is a map already (channels-last outputs, such as timm Swin stages and the
  patch embedding of a dynamic-size ViT, are permuted to channels-first);
- a 3-D output ``(N, T, C)`` is ViT tokens: the leading prefix tokens (class, register,
  distillation: timm's ``num_prefix_tokens``) are dropped and the rest reshaped to the patch
  grid of the input, ``(H / patch, W / patch)``, non-square included;
- anything else has no spatial map, which is a one-line ``FeatvizError``.

timm ViT blocks (``blocks.N``) and the final ``norm`` are read through timm's own
``forward_intermediates``, which stops after the block it needs; every other layer is read with
a forward hook that also stops the forward once it fired.

Example::

    from featviz.models.features import FeatureExtractor, input_size
    hw = input_size(model, "224x320")               # checked against the patch size
    with FeatureExtractor(model, "blocks.11") as fx, torch.inference_mode():
        fmap = fx(x)                                 # (N, 384, 14, 20)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from featviz.errors import ArchitectureError, DataError, FeatvizError, UnknownNameError, did_you_mean
from featviz.models.description import describe
from featviz.models.tokens import (  # noqa: F401  (the feature core's public names)
    TokenLayout,
    class_tokens,
    layout_of,
    patch_size,
    prefix_tokens,
    register_tokens,
)

MIN_IMAGE_SIDE = 8
MAX_IMAGE_SIDE = 8192
"""The largest side ``--image-size`` takes: a bigger input is a typo, and would not fit in memory."""
_INDEX_RE = re.compile(r"\[(-?\d+)\]")
_SIZE_RE = re.compile(r"\s*(\d+)\s*(?:[x×X,]\s*(\d+))?\s*")


class NoSpatialMapError(FeatvizError):
    """A layer's output cannot be arranged as an (N, C, H, W) map."""


# ------------------------------------------------------------------ names
def arch_name(model: nn.Module) -> str:
    """The architecture name for titles: ``describe(model).name``, or a foreign module's class name."""
    desc = describe(model)
    return desc.arch.name if desc.arch is not None else type(model).__name__


# ------------------------------------------------------------------ sizes
def parse_image_size(value: int | str | Sequence[int] | None) -> tuple[int, int] | None:
    """``N``, ``"N"``, ``"HxW"`` (also ``×`` or ``,``) or ``(H, W)`` as ``(H, W)``; None stays None.

    Raises:
        DataError: not a size, zero or negative, or below ``MIN_IMAGE_SIDE`` pixels.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise DataError(f"--image-size {value!r}: expected N or HxW (e.g. 224 or 224x320)")
    if isinstance(value, int):
        hw = (value, value)
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if not m:
            raise DataError(f"--image-size {value!r}: expected N or HxW (e.g. 224 or 224x320)")
        hw = (int(m[1]), int(m[2] or m[1]))
    else:
        try:
            h, w = (int(v) for v in value)
        except (TypeError, ValueError):
            raise DataError(f"--image-size {value!r}: expected N or HxW (e.g. 224 or 224x320)") from None
        hw = (h, w)
    if min(hw) < MIN_IMAGE_SIDE:
        raise DataError(f"--image-size {hw[0]}x{hw[1]}: each side must be at least {MIN_IMAGE_SIDE} px")
    if max(hw) > MAX_IMAGE_SIDE:
        raise DataError(f"--image-size {value!r}: each side must be at most {MAX_IMAGE_SIDE} px")
    return hw


def _fixed_size(model: nn.Module) -> tuple[int, int] | None:
    """The only input size a non-dynamic ViT accepts (None when it accepts any multiple of its patch)."""
    pe = getattr(model, "patch_embed", None)
    if pe is not None:
        if getattr(pe, "strict_img_size", False) and getattr(pe, "img_size", None):
            return int(pe.img_size[0]), int(pe.img_size[1])
        return None
    size = getattr(model, "image_size", None)  # torchvision ViT: fixed
    return (int(size), int(size)) if isinstance(size, int) and patch_size(model) else None


def check_image_size(model: nn.Module, hw: tuple[int, int]) -> tuple[int, int]:
    """``hw`` if ``model`` accepts it.

    ViTs need multiples of their patch size (and non-dynamic ones their one size).

    Raises:
        DataError: one line naming the patch size and the nearest valid sizes.
    """
    patch = patch_size(model)
    if patch is None:
        return hw
    fixed = _fixed_size(model)
    if fixed is not None and fixed != tuple(hw):
        raise DataError(f"image size {hw[0]}x{hw[1]}: this ViT only takes {fixed[0]}x{fixed[1]} inputs (it was "
                        "built without dynamic_img_size); pass --image-size "
                        f"{fixed[0]}x{fixed[1]}, or build it with dynamic_img_size=True")
    (h, w), (ph, pw) = hw, patch
    if h % ph or w % pw:
        lo = (max(ph, h // ph * ph), max(pw, w // pw * pw))
        hi = (math.ceil(h / ph) * ph, math.ceil(w / pw) * pw)
        raise DataError(f"image size {h}x{w} is not a multiple of this ViT's {ph}x{pw} patches; nearest valid "
                        f"sizes: {lo[0]}x{lo[1]} or {hi[0]}x{hi[1]}")
    return hw


def input_size(model: nn.Module, size: int | str | Sequence[int] | None = None) -> tuple[int, int]:
    """The input (H, W) to use: ``size`` parsed and checked, or the model's default.

    Raises:
        DataError: ``size`` is malformed, too small, or not a multiple of a ViT's patch size.
    """
    hw = parse_image_size(size) or tuple(describe(model).input_size)
    return check_image_size(model, (int(hw[0]), int(hw[1])))


# ------------------------------------------------------------------ tokens -> maps
def token_layout(model: nn.Module, input_hw: tuple[int, int]) -> TokenLayout | None:
    """The token layout of ``model`` at ``input_hw`` (None for models without patch tokens).

    Raises:
        DataError: ``input_hw`` is not a size the ViT accepts (see ``check_image_size``).
    """
    patch = patch_size(model)
    if patch is None:
        return None
    hw = check_image_size(model, tuple(input_hw))
    pe = getattr(model, "patch_embed", None)
    if hasattr(pe, "dynamic_feat_size"):
        gh, gw = pe.dynamic_feat_size(hw)
    else:
        gh, gw = hw[0] // patch[0], hw[1] // patch[1]
    return layout_of(model, (int(gh), int(gw)), patch)


def _tokens_to_map(t: torch.Tensor, layout: TokenLayout, what: str) -> torch.Tensor:
    h, w = layout.grid
    n = t.shape[1]
    if n == layout.prefix + h * w:
        t = t[:, layout.prefix:]
    elif n != h * w:
        raise NoSpatialMapError(
            f"{what} outputs {n} tokens, but a {h}x{w} patch grid plus {layout.prefix} prefix tokens makes "
            f"{h * w + layout.prefix}: it has no spatial map; pick a transformer block or its norm1/norm2/mlp")
    return t.reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)


def to_map(output: Any, layout: TokenLayout | None, *, channels_last: bool = False,
           what: str = "the layer") -> torch.Tensor:
    """A layer output as an (N, C, H, W) map: the one rule featviz uses everywhere.

    Args:
        output: The layer output (a tuple/list's first tensor is used).
        layout: The model's token layout at this input size (``token_layout``), None for CNNs.
        channels_last: The 4-D output is (N, H, W, C).
        what: Names the layer in errors.

    Raises:
        NoSpatialMapError: the output is not a map and not ViT patch tokens.
    """
    t = output[0] if isinstance(output, (tuple, list)) and output else output
    if not isinstance(t, torch.Tensor):
        raise NoSpatialMapError(f"{what} outputs {type(t).__name__}, not a tensor: it has no spatial map")
    if t.ndim == 4:
        if layout is not None and not channels_last and tuple(t.shape[2:]) != layout.grid:
            tokens = layout.prefix + layout.grid[0] * layout.grid[1]
            if tokens in (t.shape[2], t.shape[3]):  # (N, heads, T, d) or (N, heads, T, T) inside attention
                raise NoSpatialMapError(
                    f"{what} outputs per-head tokens {tuple(t.shape)}, which have no spatial map; pick a transformer "
                    "block or its norm1/norm2/attn/mlp")
        return t.permute(0, 3, 1, 2) if channels_last else t
    if t.ndim == 3 and layout is not None:
        return _tokens_to_map(t, layout, what)
    raise NoSpatialMapError(f"{what} outputs shape {tuple(t.shape)}, which has no spatial map; pick a convolutional "
                            "stage or a transformer block (`featviz layers` shows which layers have maps)")


def _channels_last(model: nn.Module, module: nn.Module, out: torch.Tensor, layout: TokenLayout | None) -> bool:
    """Whether a 4-D output of ``module`` is (N, H, W, C).

    timm says so per module (``output_fmt``) or per model (Swin); a ViT's map with the patch grid
    in dims 1-2 is channels-last too.
    """
    fmt = getattr(module, "output_fmt", None)
    if fmt is not None:
        return str(getattr(fmt, "value", fmt)) == "NHWC"
    if str(getattr(getattr(model, "output_fmt", None), "value", getattr(model, "output_fmt", None))) == "NHWC":
        return not isinstance(module, nn.Conv2d)
    return layout is not None and tuple(out.shape[1:3]) == layout.grid and out.shape[1] != out.shape[3]


class TokenReshape:
    """A pytorch-grad-cam ``reshape_transform``: ViT tokens (B, T, C) or channels-last maps to (B, C, h, w)."""

    def __init__(self, layout: TokenLayout | None, *, channels_last: bool = False):
        self.layout, self.channels_last = layout, channels_last

    @property
    def grid(self) -> tuple[int, int] | None:
        """The patch grid (None for a channels-last CNN map)."""
        return None if self.layout is None else self.layout.grid

    @property
    def prefix(self) -> int:
        """The prefix tokens dropped before the patches."""
        return 0 if self.layout is None else self.layout.prefix

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """The (B, C, h, w) map of a layer output ``t``."""
        return to_map(t, self.layout, channels_last=self.channels_last and t.ndim == 4)

    def to_dict(self) -> dict[str, Any]:
        """The transform's settings, as cam's manifest records them."""
        return {"grid": None if self.grid is None else list(self.grid), "prefix_tokens": self.prefix,
                "channels_last": self.channels_last}


def _fmt(obj: Any) -> str | None:
    fmt = getattr(obj, "output_fmt", None)
    return None if fmt is None else str(getattr(fmt, "value", fmt))


def reshape_transform(model: nn.Module, input_hw: tuple[int, int],
                      layers: Sequence[nn.Module] = ()) -> TokenReshape | None:
    """The grad-cam ``reshape_transform`` for ``model`` at ``input_hw``; None for channels-first CNNs.

    A segmenter's token layout is its ``backbone``'s. ``layers`` (the CAM's target modules) mark
    their 4-D outputs channels-last when timm says so per module (a dynamic-size ViT's
    ``patch_embed``) or per model (Swin).
    """
    owner = model
    if patch_size(model) is None and isinstance(getattr(model, "backbone", None), nn.Module):
        owner = model.backbone
    layout = token_layout(owner, input_hw)
    fmts = [_fmt(m) for m in layers]
    nhwc = any(f == "NHWC" for f in fmts) or (_fmt(owner) == "NHWC" and not any(f == "NCHW" for f in fmts))
    if layout is None and not nhwc:
        return None
    return TokenReshape(layout, channels_last=nhwc)


# ------------------------------------------------------------------ layer names
def resolve_layer(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """A dotted layer name (``layer4[-1]``, ``blocks.-1.norm1``) as its canonical name and module.

    Raises:
        UnknownNameError: no such module; the message suggests close names.
    """
    path = _INDEX_RE.sub(r".\1", name).strip(".")
    mod: nn.Module = model
    parts: list[str] = []
    for part in path.split(".") if path else []:
        try:
            if re.fullmatch(r"-?\d+", part) and isinstance(mod, (nn.Sequential, nn.ModuleList)):
                i = int(part) + (len(mod) if int(part) < 0 else 0)
                if not 0 <= i < len(mod):
                    raise IndexError(part)
                mod = mod[i]
                parts.append(str(i))
            else:
                mod = mod.get_submodule(part)
                parts.append(part)
        except (AttributeError, IndexError):
            names = [n for n, _ in model.named_modules() if n]
            hint = did_you_mean(name, names)
            if not hint:  # nothing looks like it: name the model's top-level layers instead
                top = [n for n in names if "." not in n]
                hint = f" (its top-level layers: {', '.join(top[:12])}{' …' if len(top) > 12 else ''})"
            raise UnknownNameError(
                f"model has no layer {name!r}{hint}; run `featviz layers` to list the names") from None
    return ".".join(parts), mod


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """Find a submodule by dotted name; ``layer4[-1]`` and ``blocks.-1`` index sequences.

    Raises:
        UnknownNameError: no such module; the message suggests close names.
    """
    return resolve_layer(model, name)[1]


def is_vit(model: nn.Module) -> bool:
    """A timm-style ViT: ``patch_embed``, a sequence of ``blocks`` and ``num_prefix_tokens``."""
    blocks = getattr(model, "blocks", None)
    return hasattr(model, "patch_embed") and isinstance(blocks, (nn.Sequential, nn.ModuleList)) \
        and hasattr(model, "num_prefix_tokens")


def _is_swin(model: nn.Module) -> bool:
    layers = getattr(model, "layers", None)
    return isinstance(layers, (nn.Sequential, nn.ModuleList)) and len(layers) > 0 and hasattr(layers[-1], "blocks") \
        and hasattr(layers[-1].blocks[-1], "norm1")


def _feature_info_last(model: nn.Module) -> str | None:
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[-1], dict) and info[-1].get("module"):
        return str(info[-1]["module"])
    return None


def _no_default(model: nn.Module, what: str) -> ArchitectureError:
    names = [n for n, _ in model.named_modules() if n]
    return ArchitectureError(f"featviz has no default {what} for {type(model).__name__}; pass --layer "
                             f"(e.g. {', '.join(names[-3:])}); `featviz layers` lists the names")


def default_layer(model: nn.Module) -> str:
    """The layer whose map dense features use by default.

    ResNet ``layer4``; a ViT's final ``norm`` (its last block when the norm moved after pooling);
    any other timm model the last entry of its ``feature_info``; a segmenter its backbone's.

    Raises:
        ArchitectureError: no rule fits; pass a layer name.
    """
    if hasattr(model, "layer4"):
        return "layer4"
    if is_vit(model):
        if not isinstance(getattr(model, "norm", None), (nn.Identity, type(None))):
            return "norm"
        return f"blocks.{len(model.blocks) - 1}"
    last = _feature_info_last(model)
    if last:
        return last
    if isinstance(getattr(model, "backbone", None), nn.Module):
        return "backbone." + default_layer(model.backbone)
    raise _no_default(model, "dense layer")


def default_cam_layer(model: nn.Module) -> str:
    """The usual CAM layer.

    ResNet ``layer4``, ViT ``blocks.<last>.norm1``, Swin ``layers.<last>.blocks.<last>.norm1``,
    torchvision ViT ``encoder.layers.<last>.ln_1``, any other timm model the last entry of its
    ``feature_info`` (MobileNetV3, EfficientNet, ConvNeXt, ...), VGG-style ``features``; a segmenter
    its backbone's.

    Raises:
        ArchitectureError: no rule fits; pass --layer.
    """
    if hasattr(model, "layer4"):
        return "layer4"
    if is_vit(model):
        return f"blocks.{len(model.blocks) - 1}.norm1"
    if _is_swin(model):
        return f"layers.{len(model.layers) - 1}.blocks.{len(model.layers[-1].blocks) - 1}.norm1"
    enc = getattr(getattr(model, "encoder", None), "layers", None)
    if isinstance(enc, nn.Sequential) and len(enc) and hasattr(enc[-1], "ln_1"):
        return f"encoder.layers.{len(enc) - 1}.ln_1"
    last = _feature_info_last(model)
    if last:
        return last
    if isinstance(getattr(model, "features", None), nn.Module):
        return "features"
    if isinstance(getattr(model, "backbone", None), nn.Module):
        return "backbone." + default_cam_layer(model.backbone)
    raise _no_default(model, "CAM layer")


# ------------------------------------------------------------------ extracting maps
class _Stop(Exception):
    """Raised by a hook to end the forward once the wanted layer ran."""


class FeatureExtractor:
    """A layer's output as an (N, C, H, W) map. Use as a context manager; ``fx(x)`` runs the model.

    Args:
        model: Any ``nn.Module`` (timm, torchvision, featviz-built).
        layer: A layer name (``layer3``, ``blocks.11``, ``blocks[-1].norm1``, ``norm``); default
            ``default_layer(model)``.
        stop_early: Stop the forward once the layer produced its output (the rest is not needed).

    Raises:
        UnknownNameError: no such layer.
        ArchitectureError: no layer given and no default fits.
    """

    def __init__(self, model: nn.Module, layer: str | None = None, *, stop_early: bool = True):
        self.model = model
        self.layer, self.module = resolve_layer(model, layer if layer is not None else default_layer(model))
        self.stop_early = stop_early
        self._block = self._timm_block()
        self._out: Any = None
        self._handle = None

    def _timm_block(self) -> tuple[int, bool] | None:
        """(block index, apply the final norm) when timm's ``forward_intermediates`` can give the map."""
        m = self.model
        if not (is_vit(m) and hasattr(m, "forward_intermediates")):
            return None
        match = re.fullmatch(r"blocks\.(\d+)", self.layer)
        if match:
            return int(match[1]), False
        if self.layer == "norm" and not isinstance(m.norm, nn.Identity):
            return len(m.blocks) - 1, True
        return None

    def __enter__(self) -> FeatureExtractor:
        """Hook the layer (timm ViT blocks need no hook)."""
        if self._block is None:
            def hook(_m, _i, o):
                if self._out is None:
                    self._out = o
                if self.stop_early:
                    raise _Stop

            self._handle = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        """Remove the hook."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The (N, C, H, W) map of ``x`` (an (N, 3, H, W) batch) at this layer.

        Raises:
            DataError: a ViT cannot take this input size.
            NoSpatialMapError: the layer's output has no spatial map.
        """
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        layout = token_layout(self.model, hw)
        if self._block is not None:
            index, norm = self._block
            maps = self.model.forward_intermediates(x, indices=[index], norm=norm, stop_early=True,
                                                    output_fmt="NCHW", intermediates_only=True)
            return maps[0]
        if self._handle is None:
            raise RuntimeError("use FeatureExtractor as a context manager: `with FeatureExtractor(m, l) as fx:`")
        self._out = None
        try:
            self.model(x)
        except _Stop:
            pass
        return self._map(self._out, layout)

    def run(self, x: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """The model's own output and this layer's (N, C, H, W) map, from one full forward.

        For callers that need both (``collapse --pixels``: pooled features and the dense map of
        the same views). Needs no context manager.

        Raises:
            DataError: a ViT cannot take this input size.
            NoSpatialMapError: the layer's output has no spatial map.
        """
        layout = token_layout(self.model, (int(x.shape[-2]), int(x.shape[-1])))
        seen: list[Any] = []
        handle = self.module.register_forward_hook(lambda _m, _i, o: seen.append(o) if not seen else None)
        try:
            output = self.model(x)
        finally:
            handle.remove()
        return output, self._map(seen[0] if seen else None, layout)

    def _map(self, raw: Any, layout: TokenLayout | None) -> torch.Tensor:
        return _layer_map(self.model, self.module, self.layer, raw, layout)


def _layer_map(model: nn.Module, module: nn.Module, name: str, raw: Any, layout: TokenLayout | None) -> torch.Tensor:
    if raw is None:
        raise NoSpatialMapError(f"layer {name!r} is never run by the model's forward; pick a layer on the "
                                "path from input to output (`featviz layers`)")
    out = raw[0] if isinstance(raw, (tuple, list)) and raw else raw
    cl = isinstance(out, torch.Tensor) and out.ndim == 4 and _channels_last(model, module, out, layout)
    return to_map(out, layout, channels_last=cl, what=f"layer {name!r}")


def feature_map(model: nn.Module, x: torch.Tensor, layer: str | None = None) -> torch.Tensor:
    """The (N, C, H, W) map of ``x`` at ``layer`` (default ``default_layer``), in one call.

    Args:
        model: The model, e.g. from ``featviz.models.loader.load_model``.
        x: A batch (N, 3, H, W) already normalised the way the model was trained, e.g. by
            ``featviz.data.images.eval_transform(size, mean, std)`` with the model's
            ``featviz.data.images.normalization_of(model)``; raw [0, 1] pixels give wrong features.
        layer: A module name (``layer4``, ``blocks.11``, ``blocks.-1``); `featviz layers` lists them.

    Raises:
        UnknownNameError: no such layer; the message suggests close names.
    """
    with FeatureExtractor(model, layer) as fx:
        return fx(x)


# ------------------------------------------------------------------ listing layers
class LayerInfo(NamedTuple):
    """One named module: its output shape for a dummy input, and its map shape (C, H, W) if any."""

    name: str
    type: str
    shape: tuple[int, ...] | None
    params: int
    map: tuple[int, int, int] | None = None


def list_layers(model: nn.Module, *, image_size: int | str | Sequence[int] | None = None) -> list[LayerInfo]:
    """Run one dummy input through ``model`` and record every named module's output and map shape."""
    h, w = input_size(model, image_size)
    layout = token_layout(model, (h, w))
    outs: dict[str, tuple[tuple[int, ...], tuple[int, int, int] | None]] = {}
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def hook(m, _i, o, name=name):
            t = o[0] if isinstance(o, (tuple, list)) and o else o
            if not isinstance(t, torch.Tensor) or name in outs:
                return
            try:
                cl = t.ndim == 4 and _channels_last(model, m, t, layout)
                fmap: tuple[int, int, int] | None = tuple(to_map(t, layout, channels_last=cl).shape[1:])
            except NoSpatialMapError:
                fmap = None
            outs[name] = (tuple(t.shape[1:]), fmap)

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, h, w))
    finally:
        for hd in handles:
            hd.remove()
    return [LayerInfo(n, type(m).__name__, outs.get(n, (None, None))[0], sum(p.numel() for p in m.parameters()),
                      outs.get(n, (None, None))[1]) for n, m in model.named_modules() if n]
