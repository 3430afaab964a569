"""Backbone architectures: build them by name, infer them from weights, and name their layers.

Every backbone featviz builds returns pooled features ``(N, D)`` from ``forward`` (the
classifier is removed) and keeps the module names of its source library (torchvision or
timm), so the layer names users know (``layer4``, ``blocks.11.norm1``) work everywhere.
Weights are always random here; pretrained downloads are never used.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from featviz.errors import ArchitectureError, UnknownNameError, did_you_mean

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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


@dataclass(frozen=True)
class ArchSpec:
    """A buildable architecture: a family, a canonical name, and constructor arguments.

    ``name`` is what users type (``resnet50``, ``resnet18-cifar``, ``vit_small_patch16_224``,
    ``timm:convnext_atto``); ``kwargs`` holds what the name does not say (ViT ``num_heads``,
    ``img_size``). It round-trips through JSON (``to_dict``/``from_dict``).
    """

    family: str  # "resnet" | "vit" | "timm"
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchSpec:
        return cls(family=d["family"], name=d["name"], kwargs=dict(d.get("kwargs", {})))

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.name} ({extra})" if extra else self.name


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
        for i, (n, d) in enumerate(zip(blocks, [False, *dilate])):
            setattr(model, f"layer{i + 1}", model._make_layer(block, width * 2**i, n, stride=1 if i == 0 else 2, dilate=d))
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


def _make_vit(spec: ArchSpec) -> nn.Module:
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
        return VisionTransformer(num_classes=0, **kwargs)
    return timm.create_model(spec.name, pretrained=False, num_classes=0, **kwargs)


def build_backbone(arch: str | ArchSpec, *, num_heads: int | None = None, seed: int | None = None) -> nn.Module:
    """Build a backbone with random weights whose ``forward`` returns pooled features ``(N, D)``.

    Args:
        arch: An architecture name (see ``parse_arch``) or an ``ArchSpec``.
        num_heads: ViT attention heads, overriding the name's default.
        seed: Seed for the random initialisation (the "random init" baseline).

    Returns:
        The backbone in eval mode, with ``featviz_arch`` (its ``ArchSpec``) attached.
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
        elif spec.family == "vit":
            model = _make_vit(spec)
        else:
            import timm

            tname = spec.name.removeprefix("timm:")
            if not timm.is_model(tname):
                raise UnknownNameError(f"timm has no model {tname!r}{did_you_mean(tname, timm.list_models())}")
            model = timm.create_model(tname, pretrained=False, num_classes=0, **spec.kwargs)
    finally:
        if seed is not None:
            torch.random.set_rng_state(gen_state)
    model.featviz_arch = spec
    return model.eval()


# ------------------------------------------------------------------ weights -> specs
@dataclass(frozen=True)
class Inferred:
    """An architecture inferred from a state dict, and what could not be inferred."""

    spec: ArchSpec
    details: dict[str, Any]
    not_inferable: tuple[str, ...] = ()


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
            raise ArchitectureError(f"ResNet stage-1 width {inner} fits no known variant (conv1 width {width}); pass --arch")
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
        no_embed_class = False
        if grid and math.isqrt(grid) ** 2 != grid and math.isqrt(tokens) ** 2 == tokens:
            grid, no_embed_class = tokens, True
        side = math.isqrt(grid) if grid else 14
        kwargs: dict[str, Any] = {
            "embed_dim": dim, "depth": depth, "patch_size": patch, "img_size": side * patch,
            "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
            "qkv_bias": "blocks.0.attn.qkv.bias" in sd, "class_token": cls, "reg_tokens": reg,
            "no_embed_class": no_embed_class,
            "global_pool": "avg" if "fc_norm.weight" in sd or not cls else "token",
        }
        size = _VIT_SIZES.get(dim)
        name = f"vit_{size}_patch{patch}_{side * patch}" if size else f"vit_d{dim}_patch{patch}_{side * patch}"
        details = {"family": "ViT", "embed_dim": dim, "depth": depth, "patch_size": patch,
                   "tokens": tokens, "prefix_tokens": int(cls) + reg, "img_size": side * patch,
                   "feature_dim": dim}
        return Inferred(ArchSpec("vit", name, kwargs), details, ("num_heads",))
    keys = list(sd)[:5]
    raise ArchitectureError(f"cannot infer an architecture from keys like {keys}; pass --arch")


# ------------------------------------------------------------------ layers
class LayerInfo(NamedTuple):
    """One named module and the shape of its output for a dummy input."""

    name: str
    type: str
    shape: tuple[int, ...] | None
    params: int


def default_image_size(model: nn.Module) -> int:
    """The input size a model expects: the ViT's img_size, 32 for CIFAR stems, else 224."""
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None):
        return int(pe.img_size[0])
    spec = getattr(model, "featviz_arch", None)
    if spec is not None and "-cifar" in spec.name:
        return 32
    return 224


def list_layers(model: nn.Module, *, image_size: int | None = None) -> list[LayerInfo]:
    """Run a dummy input through ``model`` and record every named module's output shape."""
    size = image_size or default_image_size(model)
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def hook(_m, _i, o, name=name):
            t = o[0] if isinstance(o, (tuple, list)) else o
            if isinstance(t, torch.Tensor):
                shapes.setdefault(name, tuple(t.shape[1:]))

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    return [LayerInfo(n, type(m).__name__, shapes.get(n), sum(p.numel() for p in m.parameters()))
            for n, m in model.named_modules() if n]


_INDEX_RE = re.compile(r"\[(-?\d+)\]")


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """Find a submodule by dotted name; ``layer4[-1]`` and ``blocks.-1`` index sequences.

    Raises:
        UnknownNameError: no such module; the message suggests close names.
    """
    path = _INDEX_RE.sub(r".\1", name).strip(".")
    mod: nn.Module = model
    for part in path.split(".") if path else []:
        try:
            if re.fullmatch(r"-?\d+", part) and isinstance(mod, (nn.Sequential, nn.ModuleList)):
                mod = mod[int(part)]
            else:
                mod = mod.get_submodule(part)
        except (AttributeError, IndexError):
            names = [n for n, _ in model.named_modules() if n]
            raise UnknownNameError(
                f"model has no layer {name!r}{did_you_mean(name, names)}; "
                "run `featviz layers` to list the names") from None
    return mod


def resolve_model(*, arch: str | None = None, checkpoint=None, num_heads: int | None = None,
                  seed: int = 0, **load_kwargs: Any) -> tuple[nn.Module, dict[str, Any] | None]:
    """A backbone from a checkpoint (``arch`` optional) or, without one, seeded random weights.

    ``load_kwargs`` go to ``checkpoints.load_backbone`` (format, checkpoint_key, trust,
    keep_classifier).

    Returns:
        (model in eval mode, the checkpoint load report as a dict, or None for random init).

    Raises:
        ArchitectureError: neither ``arch`` nor ``checkpoint`` is given.
    """
    if checkpoint is not None:
        from featviz.checkpoints import load_backbone

        model, report = load_backbone(checkpoint, arch=arch, num_heads=num_heads, **load_kwargs)
        return model.eval(), report.to_dict()
    if not arch:
        raise ArchitectureError("give --checkpoint, or --arch for a randomly initialised model")
    return build_backbone(arch, num_heads=num_heads, seed=seed), None


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled features ``forward`` returns."""
    if hasattr(model, "num_features"):
        return int(model.num_features)
    with torch.no_grad():
        size = default_image_size(model)
        return int(model(torch.zeros(1, 3, size, size)).shape[1])
