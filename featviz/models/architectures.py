"""Backbone architectures: build them by name and infer them from weights.

Their layers and maps: featviz.models.features.

Every backbone featviz builds returns pooled features ``(N, D)`` from ``forward`` (the
classifier is removed) and keeps the module names of its source library (torchvision or
timm), so the layer names users know (``layer4``, ``blocks.11.norm1``) work everywhere.
Weights are always random here; pretrained downloads are never used.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from featviz.errors import ArchitectureError, UnknownNameError, did_you_mean, shorten
from featviz.models.checkpoints.timm_families import infer_timm_family
from featviz.models.description import (
    IMAGENET,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ArchSpec,
    ModelDescription,
    Normalization,
    attach,
    describe,
)
from featviz.models.facts import model_traits

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ArchSpec", "Inferred", "build_backbone", "classifier_name",
           "default_input_size", "default_normalization", "feature_dim", "infer_arch", "model_traits", "parse_arch",
           "resnet_name", "standard_num_heads"]

log = logging.getLogger(__name__)

_RESNET_LAYOUT = {  # depth -> (bottleneck, blocks per stage)
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}
_VIT_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}
_VIT_DEFAULT_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16}
_RESNET_RE = re.compile(
    r"^(?P<wide>wide_)?resnet(?P<depth>\d+)(?:_(?P<wpg>2))?(?:_w(?P<width>\d+))?"
    r"(?P<cifar>-cifar)?(?:-os(?P<os>8|16))?$"
)


# ------------------------------------------------------------------ names -> specs
def parse_arch(name: str, *, num_heads: int | None = None) -> ArchSpec:
    """Turn a user's architecture name into an ``ArchSpec``.

    Grammar: ``resnet{18,34,50,101,152}[_w<width>][-cifar][-os{8,16}]``,
    ``wide_resnet{50,101}_2[...]``, a timm ViT name (``vit_small_patch16_224``), or
    ``timm:<any timm model>``.

    Raises:
        UnknownNameError: the name matches none of these.
    """
    name = name.strip()
    if name.startswith("timm:"):
        return ArchSpec("timm", name)
    m = _RESNET_RE.match(name)
    if m and m["width"] and not 1 <= int(m["width"]) <= 4096:
        raise UnknownNameError(f"architecture {name!r}: the width after _w must be between 1 and 4096")
    if m and int(m["depth"]) in _RESNET_LAYOUT and (not m["wide"]) == (not m["wpg"]):
        depth = int(m["depth"])
        if m["wide"] and not _RESNET_LAYOUT[depth][0]:
            raise UnknownNameError(f"wide ResNets need a Bottleneck depth (50, 101), got {name!r}")
        return ArchSpec("resnet", name)
    if name.startswith(("vit_", "deit_")):
        kwargs = {"num_heads": num_heads} if num_heads else {}
        return ArchSpec("vit", name, kwargs)
    known = [f"resnet{d}" for d in _RESNET_LAYOUT] + ["wide_resnet50_2", "resnet18-cifar",
             "vit_small_patch16_224", "vit_base_patch16_224", "timm:<name>"]
    raise UnknownNameError(f"unknown architecture {name!r}{did_you_mean(name, known)}; "
                           f"expected one of: {', '.join(known)}")


def _resnet_params(name: str) -> dict[str, Any]:
    m = _RESNET_RE.match(name)
    assert m is not None, name
    depth = int(m["depth"])
    return {
        "depth": depth,
        "width": int(m["width"] or 64),
        "width_per_group": 128 if m["wide"] else 64,
        "cifar": bool(m["cifar"]),
        "output_stride": int(m["os"] or 32),
    }


def resnet_name(depth: int, *, width: int = 64, width_per_group: int = 64, cifar: bool = False,
                output_stride: int = 32) -> str:
    """The canonical name for a ResNet variant (inverse of the name grammar)."""
    name = f"wide_resnet{depth}_2" if width_per_group == 128 else f"resnet{depth}"
    if width != 64:
        name += f"_w{width}"
    if cifar:
        name += "-cifar"
    if output_stride != 32:
        name += f"-os{output_stride}"
    return name


# ------------------------------------------------------------------ specs -> modules
def _make_resnet(depth: int, width: int, width_per_group: int, cifar: bool, output_stride: int) -> nn.Module:
    from torchvision.models import resnet as tv

    bottleneck, blocks = _RESNET_LAYOUT[depth]
    block = tv.Bottleneck if bottleneck else tv.BasicBlock
    dilate = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}[output_stride]
    if not bottleneck:  # torchvision's BasicBlock refuses dilation: build plain, dilate after (_dilate)
        dilate, basic_dilate = [False, False, False], dilate
    model = tv.ResNet(block, list(blocks), width_per_group=width_per_group,
                      replace_stride_with_dilation=dilate, zero_init_residual=False)
    if width != 64:  # torchvision hard-codes a base width of 64: rebuild the stages narrower/wider
        model.inplanes, model.dilation = width, 1
        model.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        model.bn1 = nn.BatchNorm2d(width)
        for i, (n, d) in enumerate(zip(blocks, [False, *dilate], strict=True)):
            stage = model._make_layer(block, width * 2**i, n, stride=1 if i == 0 else 2, dilate=d)
            setattr(model, f"layer{i + 1}", stage)
    if not bottleneck:
        rate = 1
        for i, d in enumerate(basic_dilate):
            if d:
                rate *= 2
                _dilate(getattr(model, f"layer{i + 2}"), rate)
    if cifar:  # 3x3 stride-1 stem, no max-pool (solo-learn / CIFAR convention)
        model.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    for m in model.modules():  # same init as torchvision for the rebuilt parts
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def _dilate(layer: nn.Module, rate: int) -> None:
    """Trade a stage's stride for dilation (DeepLab output stride); weights keep their shapes."""
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                m.dilation, m.padding = (rate, rate), (rate, rate)


_MLP_LAYERS = ("mlp", "swiglu")  # ArchSpec kwargs["mlp"]: timm Mlp (default) or SwiGLUPacked (DINOv2 ViT-g)


def _vit_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Turn JSON-able ArchSpec kwargs into timm VisionTransformer arguments."""
    kwargs = dict(kwargs)
    mlp = kwargs.pop("mlp", "mlp")
    if mlp not in _MLP_LAYERS:
        raise ArchitectureError(f"unknown ViT mlp {mlp!r}; expected one of {', '.join(_MLP_LAYERS)}")
    if mlp == "swiglu":
        from timm.layers import SwiGLUPacked

        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    return kwargs


def _make_vit(spec: ArchSpec, num_classes: int) -> nn.Module:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(spec.kwargs)
    m = re.match(r"^vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)", spec.name)
    if "embed_dim" in kwargs or not timm.is_model(spec.name):
        if m is None and "embed_dim" not in kwargs:
            raise ArchitectureError(f"unknown ViT {spec.name!r}; use a timm ViT name such as "
                                    f"vit_small_patch16_224, or timm:<name>")
        if m is not None:
            size, patch, img = m.group(1), int(m.group(2)), int(m.group(3))
            dims = {v: k for k, v in _VIT_SIZES.items()}
            kwargs.setdefault("embed_dim", dims[size])
            kwargs.setdefault("patch_size", patch)
            kwargs.setdefault("img_size", img)
            kwargs.setdefault("depth", 24 if size in ("large",) else 32 if size == "huge" else 12)
            kwargs.setdefault("num_heads", _VIT_DEFAULT_HEADS[size])
        if "num_heads" not in kwargs:
            raise ArchitectureError("a ViT's num_heads cannot be inferred from its weights; pass --num-heads")
        return VisionTransformer(num_classes=num_classes, dynamic_img_size=True, **_vit_kwargs(kwargs))
    return timm.create_model(spec.name, pretrained=False, num_classes=num_classes, dynamic_img_size=True,
                             **_vit_kwargs(kwargs))


def _make_timm(spec: ArchSpec, num_classes: int) -> nn.Module:
    import timm

    tname = spec.name.removeprefix("timm:")
    if not timm.is_model(tname):
        raise UnknownNameError(f"timm has no model {tname!r}{did_you_mean(tname, timm.list_models())}")
    kwargs = dict(spec.kwargs)
    projection = kwargs.pop("projection", None)  # a CLIP tower's projection: timm's head, part of the embedding
    if projection and not num_classes:
        num_classes = int(projection)
    try:  # ViT-like timm models interpolate their position embeddings for any input size
        return timm.create_model(tname, pretrained=False, num_classes=num_classes, dynamic_img_size=True, **kwargs)
    except TypeError as e:
        if "dynamic_img_size" not in str(e):
            raise
        return timm.create_model(tname, pretrained=False, num_classes=num_classes, **kwargs)


def _timm_cfg(spec: ArchSpec) -> dict[str, Any]:
    """The ``pretrained_cfg`` timm has for a timm architecture, without any download ({} when unknown)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(spec.name.removeprefix("timm:"))
    return cfg.to_dict() if cfg is not None else {}


def default_normalization(spec: ArchSpec) -> Normalization:
    """The normalisation featviz uses for weights of ``spec`` when the file does not record one.

    timm architectures (``timm:NAME``) take mean/std from timm's ``pretrained_cfg``. ResNets and
    featviz's ViT family (the backbones of SSL checkpoints: DINO, MoCo v3, MAE, iBOT, I-JEPA, MSN)
    use ImageNet's, as those methods do; timm's own ``vit_*`` configs say 0.5/0.5, which is
    right for timm's supervised ViT weights only.
    """
    if spec.family == "timm":
        cfg = _timm_cfg(spec)
        if cfg.get("mean") and cfg.get("std"):
            return Normalization(tuple(cfg["mean"]), tuple(cfg["std"]),
                                 f"timm pretrained_cfg of {spec.name.removeprefix('timm:')}")
    if spec.family == "vit":
        return Normalization(IMAGENET.mean, IMAGENET.std, "ImageNet mean/std (the SSL ViT convention)")
    return IMAGENET


def default_input_size(spec: ArchSpec, model: nn.Module) -> tuple[int, int]:
    """The input (H, W) a backbone is built for.

    A ViT's ``img_size``, timm's ``pretrained_cfg`` input size, 32 for CIFAR-stem ResNets, else 224.
    """
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img:
        return int(img[0]), int(img[1])
    if spec.family == "timm":
        size = _timm_cfg(spec).get("input_size")
        if size:
            return int(size[1]), int(size[2])
    if "-cifar" in spec.name:
        return 32, 32
    return 224, 224


def classifier_name(model: nn.Module) -> str | None:
    """The module name a classifier of this architecture has (``fc``, ``head``, ``classifier``, ``head.fc``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if isinstance(cfg.get("classifier"), str):
        return cfg["classifier"]
    get = getattr(model, "get_classifier", None)  # timm models built from their class
    if callable(get):
        head = get()
        return next((n for n, m in model.named_modules() if m is head and n), None)
    if hasattr(model, "fc") and hasattr(model, "layer4"):  # torchvision ResNets
        return "fc"
    return None


def _set_resnet_classes(model: nn.Module, num_classes: int) -> None:
    in_features = model.layer4[-1].conv3.out_channels if hasattr(model.layer4[-1], "conv3") else \
        model.layer4[-1].conv2.out_channels
    model.fc = nn.Linear(in_features, num_classes)


def build_backbone(arch: str | ArchSpec, *, num_heads: int | None = None, seed: int | None = None,
                   num_classes: int = 0, description: ModelDescription | None = None) -> nn.Module:
    """Build a model with random weights.

    A backbone whose ``forward`` returns pooled features ``(N, D)``, or with ``num_classes`` a
    classifier whose ``forward`` returns logits.

    timm ViTs are built with ``dynamic_img_size=True``: position embeddings are interpolated, so
    any input size that is a multiple of the patch size works.

    Args:
        arch: An architecture name (see ``parse_arch``) or an ``ArchSpec``.
        num_heads: ViT attention heads, overriding the name's default.
        seed: Seed for the random initialisation (the "random init" baseline).
        num_classes: Give the model a linear classifier of this many classes (0: none).
        description: The description to attach (default: one for random weights).

    Returns:
        The model in eval mode, its ``ModelDescription`` attached (``featviz.models.description.describe``).
    """
    spec = parse_arch(arch, num_heads=num_heads) if isinstance(arch, str) else arch
    if num_heads and spec.family == "vit":
        spec = ArchSpec(spec.family, spec.name, {**spec.kwargs, "num_heads": num_heads})
    gen_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        if spec.family == "resnet":
            model = _make_resnet(**_resnet_params(spec.name))
            if num_classes:
                _set_resnet_classes(model, num_classes)
        elif spec.family == "vit":
            model = _make_vit(spec, num_classes)
        else:
            model = _make_timm(spec, num_classes)
    finally:
        if seed is not None:
            torch.random.set_rng_state(gen_state)
    if description is None:
        head = classifier_name(model) if num_classes else None
        description = ModelDescription(arch=spec, kind="classifier" if num_classes else "backbone", head=head,
                                       num_classes=num_classes or None, normalization=default_normalization(spec),
                                       input_size=default_input_size(spec, model), random_init=True,
                                       **model_traits(model, projection=bool(spec.kwargs.get("projection"))))
    attach(model, description)
    return model.eval()


_STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1536: 24}


def standard_num_heads(embed_dim: int) -> int | None:
    """The usual head count for a ViT width.

    DeiT/timm ViT-T/S/B/L/H 3/6/12/16/16, ViT-g 16 (1408, I-JEPA) or 24 (1536, DINOv2), else
    64-wide heads; None when the width fits none of these.
    """
    if embed_dim in _STANDARD_HEADS:
        return _STANDARD_HEADS[embed_dim]
    return embed_dim // 64 if embed_dim % 64 == 0 else None


# ------------------------------------------------------------------ weights -> specs
@dataclass(frozen=True)
class Inferred:
    """An architecture inferred from a state dict, and what could not be inferred."""

    spec: ArchSpec
    details: dict[str, Any]
    not_inferable: tuple[str, ...] = ()


def mlp_ratio(hidden: int, dim: int) -> float:
    """An ``mlp_ratio`` for which timm's ``int(dim * mlp_ratio)`` gives back ``hidden`` exactly."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim


def _count(sd: dict, prefix: str) -> int:
    idx = {k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)}
    return len([i for i in idx if i.isdigit()])


def infer_arch(state_dict: dict[str, Any]) -> Inferred:
    """Infer the architecture of a backbone state dict from its key names and shapes.

    ResNet: depth from the blocks per stage, width from ``conv1``, CIFAR stem from its kernel,
    wide variants from ``layer1.0.conv1``. ViT: embed dim, patch size, depth, prefix tokens and
    image size from ``pos_embed``. A ViT's ``num_heads`` and a ResNet's dilation change no shape
    and cannot be inferred; they are listed in ``not_inferable``.

    Raises:
        ArchitectureError: the keys match neither family.
    """
    sd = state_dict
    timm_family = infer_timm_family(sd)  # DINOv3 (Eva), ConvNeXt, SigLIP: timm names that say the model
    if timm_family is not None:
        return Inferred(*timm_family)
    if "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        bottleneck = "layer1.0.conv3.weight" in sd
        blocks = tuple(_count(sd, f"layer{i}.") for i in range(1, 5))
        depth = next((d for d, v in _RESNET_LAYOUT.items() if v == (bottleneck, blocks)), None)
        if depth is None:
            raise ArchitectureError(
                f"ResNet-like weights with {'Bottleneck' if bottleneck else 'BasicBlock'} stages of "
                f"{blocks} blocks match no torchvision depth (18/34/50/101/152); pass --arch")
        conv1 = sd["conv1.weight"]
        width, kernel = int(conv1.shape[0]), int(conv1.shape[-1])
        inner = int(sd["layer1.0.conv1.weight"].shape[0])
        wpg = inner * 64 // width if bottleneck else 64
        if wpg not in (64, 128):
            raise ArchitectureError(f"ResNet stage-1 width {inner} fits no known variant (conv1 width {width}); "
                                    "pass --arch")
        name = resnet_name(depth, width=width, width_per_group=wpg, cifar=kernel == 3)
        details = {"family": "ResNet", "depth": depth, "width": width, "stem": f"{kernel}x{kernel}",
                   "block": "Bottleneck" if bottleneck else "BasicBlock", "wide": wpg == 128,
                   "feature_dim": width * 8 * (4 if bottleneck else 1) * (wpg // 64 if bottleneck else 1)}
        return Inferred(ArchSpec("resnet", name), details, ("dilation / output stride",))
    if "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd:
        proj = sd["patch_embed.proj.weight"]
        dim, patch = int(proj.shape[0]), int(proj.shape[-1])
        depth = _count(sd, "blocks.")
        cls = "cls_token" in sd
        reg = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
        tokens = int(sd["pos_embed"].shape[1]) if "pos_embed" in sd else None
        grid = tokens - (int(cls) + reg) if tokens else None
        if "register_tokens" in sd:  # DINOv2 names: registers have no position
            reg, grid = int(sd["register_tokens"].shape[1]), tokens - int(cls) if tokens else None
        no_embed_class = False
        if grid and math.isqrt(grid) ** 2 != grid and math.isqrt(tokens) ** 2 == tokens:
            grid, no_embed_class = tokens, True
        side = math.isqrt(grid) if grid else 14
        avg = "fc_norm.weight" in sd or not cls
        fc1 = "blocks.0.mlp.fc1.weight" if "blocks.0.mlp.fc1.weight" in sd else "blocks.0.mlp.w12.weight"
        if fc1 not in sd:
            raise ArchitectureError(f"ViT-like weights without an MLP fc1 ({shorten(list(sd), 3)}); pass --arch")
        kwargs: dict[str, Any] = {
            "embed_dim": dim, "depth": depth, "patch_size": patch, "img_size": side * patch,
            "mlp_ratio": mlp_ratio(int(sd[fc1].shape[0]), dim),
            "qkv_bias": "blocks.0.attn.qkv.bias" in sd, "class_token": cls, "reg_tokens": reg,
            "no_embed_class": no_embed_class, "global_pool": "avg" if avg else "token",
        }
        if avg and "fc_norm.weight" not in sd and "norm.weight" in sd:
            kwargs["fc_norm"] = False  # norm every token, then average (I-JEPA), not timm's pool-then-norm
        if "blocks.0.ls1.gamma" in sd:
            kwargs["init_values"] = 1.0  # LayerScale (DINOv2, DeiT-3); the values come from the file
        if fc1.endswith("w12.weight"):
            kwargs["mlp"] = "swiglu"  # DINOv2 ViT-g's fused SwiGLU (w12, w3)
        size = _VIT_SIZES.get(dim)
        name = f"vit_{size}_patch{patch}_{side * patch}" if size else f"vit_d{dim}_patch{patch}_{side * patch}"
        details = {"family": "ViT", "embed_dim": dim, "depth": depth, "patch_size": patch,
                   "tokens": tokens, "prefix_tokens": int(cls) + reg, "img_size": side * patch,
                   "feature_dim": dim}
        return Inferred(ArchSpec("vit", name, kwargs), details, ("num_heads",))
    keys = list(sd)[:5]
    raise ArchitectureError(f"cannot infer an architecture from keys like {keys}; pass --arch")


# ------------------------------------------------------------------ facts of built models
def feature_dim(model: nn.Module) -> int:
    """Width of the pooled features ``forward`` returns."""
    if hasattr(model, "num_features"):
        return int(model.num_features)
    with torch.no_grad():
        h, w = describe(model).input_size
        return int(model(torch.zeros(1, 3, h, w)).shape[1])
