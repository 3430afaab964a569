"""Class activation maps for classifiers, segmenters and SSL encoders, on any named layer.

featviz drives pytorch-grad-cam (grad-cam 1.5.7): every heatmap comes from one of its method
classes, so the numbers are the numbers pytorch-grad-cam computes. Around it featviz adds what
the library leaves to the user (``shared/reference/features-and-apis.md`` §2.1, §5, §6):

* layers by dotted name (``layer4``, ``layer4[-1]``, ``blocks.11.norm1``) with suggestions, and
  a default per architecture;
* an automatic ``reshape_transform`` for ViTs (prefix tokens and a possibly non-square grid);
* targets as code: ``top1``, ``class:N``, ``seg:CLASS`` and, for encoders without a classifier,
  ``similarity:REF_IMAGE``, ``self`` and ``pair``;
* guard rails: one target per image, errors never swallowed, gradients enabled temporarily on
  frozen or no-grad backbones (state restored), tuple/dict outputs wrapped, hooks always
  released, and blank or noise maps (which min-max scaling hides) flagged with their raw size;
* less work for gradient methods: the trunk below the target layer runs without autograd and
  no weight gradients are computed, so a backward pass only reaches down to the layer.

The heavy libraries (torch, pytorch_grad_cam, matplotlib) are imported by this module or inside
its functions; the CLI imports this module only inside ``featviz cam``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from featviz.errors import ArchitectureError, DataError, FeatvizError, UnknownNameError, did_you_mean

log = logging.getLogger(__name__)

Progress = Callable[..., Iterable]

# ------------------------------------------------------------------ methods


@dataclass(frozen=True)
class MethodSpec:
    """One pytorch-grad-cam method: its class and what it needs from the model.

    Attributes:
        cls: Class name in ``pytorch_grad_cam``.
        gradients: Needs gradients of the target with respect to the layer.
        input_gradient: Also needs the input's gradient (so the whole network is back-propagated).
        note: One line for ``--help`` and docs.
    """

    cls: str
    gradients: bool
    note: str
    input_gradient: bool = False


CAM_METHODS: dict[str, MethodSpec] = {
    "gradcam": MethodSpec("GradCAM", True, "channel weights = mean gradient"),
    "hirescam": MethodSpec("HiResCAM", True, "element-wise gradient × activation, summed"),
    "gradcam_elementwise": MethodSpec("GradCAMElementWise", True, "ReLU(gradient × activation), summed"),
    "gradcam++": MethodSpec("GradCAMPlusPlus", True, "second-order weights (Chattopadhyay et al.)"),
    "xgradcam": MethodSpec("XGradCAM", True, "activation-normalised gradient weights"),
    "ablationcam": MethodSpec("AblationCAM", False, "drop in the target when each channel is zeroed"),
    "scorecam": MethodSpec("ScoreCAM", False, "target score of the image masked by each channel"),
    "eigencam": MethodSpec("EigenCAM", False, "first principal component of the activations"),
    "eigengradcam": MethodSpec("EigenGradCAM", True, "first principal component of gradient × activation"),
    "layercam": MethodSpec("LayerCAM", True, "ReLU(gradient) × activation"),
    "fullgrad": MethodSpec("FullGrad", True, "input and bias gradients of all conv/BN layers",
                           input_gradient=True),
    "kpca_cam": MethodSpec("KPCA_CAM", False, "kernel-PCA component of the activations"),
    "fem": MethodSpec("FEM", False, "feature explanation method (k-sigma channel masks)"),
    "shapleycam": MethodSpec("ShapleyCAM", True, "gradient and Hessian-vector product weights",
                             input_gradient=True),
    "finercam": MethodSpec("FinerCAM", True, "target logit minus the most similar classes' logits"),
    "seg_eigen_cam": MethodSpec("SegEigenCAM", True, "|gradient| × activation, principal component"),
    "refinecam": MethodSpec("RefineCAM", True, "product of GradCAM++ maps over the layers"),
    "sess": MethodSpec("SESS", True, "GradCAM over scaled sliding windows, fused"),
    "random_cam": MethodSpec("RandomCAM", True, "random channel weights (a sanity baseline)"),
}
"""snake_case name -> pytorch-grad-cam method; the classes are imported inside ``make_cam``."""

NOT_CAM_METHODS: dict[str, str] = {
    "deep_feature_factorization": "DeepFeatureFactorization factorises activations into concepts; it "
                                  "explains no target, so it gives no per-target heatmap",
    "guided_backprop": "GuidedBackpropReLUModel gives pixel gradients of the input, not a class "
                       "activation map of a layer",
}
"""pytorch-grad-cam exports that are not per-target CAM methods, and why."""

# the methods whose backward only needs the layer's output gradient: featviz cuts the graph there
_CUT_GRAPH = {n for n, s in CAM_METHODS.items() if s.gradients and not s.input_gradient}
_NO_AUG_SMOOTH = {"finercam", "refinecam", "sess"}  # their __call__ has no aug_smooth


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """Turn ``"gradcam,scorecam"``, ``["gradcam", "eigencam"]`` or ``"all"`` into method names.

    Raises:
        UnknownNameError: an unknown name (with suggestions) or a pytorch-grad-cam export that is
            not a CAM method (with the reason).
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in items:
        for raw in str(item).split(","):
            name = raw.strip().lower().replace("-", "_")
            name = {"gradcam_plusplus": "gradcam++", "gradcampp": "gradcam++", "grad_cam": "gradcam",
                    "kpcacam": "kpca_cam", "score_cam": "scorecam", "eigen_cam": "eigencam"}.get(name, name)
            if not name:
                continue
            if name == "all":
                names += [n for n in CAM_METHODS if n not in names]
                continue
            if name in NOT_CAM_METHODS:
                raise UnknownNameError(f"--method {name!r} does not apply: {NOT_CAM_METHODS[name]}")
            if name not in CAM_METHODS:
                raise UnknownNameError(
                    f"unknown CAM method {name!r}{did_you_mean(name, CAM_METHODS)}; expected one of: "
                    f"{', '.join(CAM_METHODS)} or all")
            if name not in names:
                names.append(name)
    if not names:
        raise UnknownNameError(f"no CAM method given; expected one of: {', '.join(CAM_METHODS)} or all")
    return names


def make_cam(name: str, model: nn.Module, layers: list[nn.Module], reshape_transform=None, *,
             batch_size: int = 32, token_layer: bool = False, output_kind: str = "logits",
             options: dict[str, Any] | None = None):
    """Construct the pytorch-grad-cam object for ``name`` (this registers its hooks).

    ``options`` are extra constructor arguments (e.g. ``{"num_scales": 4}`` for SESS, ``{"k": 3}``
    for FEM). Call ``release_cam`` on the result when done; featviz never relies on ``with``
    because pytorch-grad-cam's ``__exit__`` swallows ``IndexError``.
    """
    import pytorch_grad_cam as pgc

    spec = CAM_METHODS[name]
    cls = getattr(pgc, spec.cls)
    kw = dict(options or {})
    if name == "ablationcam":
        kw.setdefault("ablation_layer", pgc.AblationLayerVit() if token_layer else pgc.AblationLayer())  # fresh
        kw.setdefault("batch_size", batch_size)
    elif name == "sess":
        kw.setdefault("batch_size", batch_size)
        kw.setdefault("use_softmax_scores", output_kind == "logits")  # softmax over embedding dims means nothing
    if name == "fullgrad":
        layers = []  # FullGrad picks every conv/BN bias layer itself
    cam = cls(model, layers, reshape_transform, **kw)
    if name == "scorecam":
        cam.batch_size = batch_size  # masked images per forward (pytorch-grad-cam's default is 16)
    return cam


def _base_cams(cam) -> list:
    """The BaseCAM objects inside a (meta-)method: FinerCAM/SESS wrap one, RefineCAM one per layer."""
    if hasattr(cam, "base_cam_per_layer"):
        return list(cam.base_cam_per_layer)
    if hasattr(cam, "base_cam"):
        return [cam.base_cam]
    return [cam]


def release_cam(cam) -> None:
    """Remove every hook a CAM object registered and drop its tensors (memory must not grow)."""
    for base in _base_cams(cam):
        ag = base.activations_and_grads
        for h in ag.handles:
            h.remove()
        ag.handles.clear()
        # plain reassignment: ActivationsAndGradients.clear() detaches in place, which fails on views
        ag.activations, ag.gradients = [], []
        base.outputs = None


# ------------------------------------------------------------------ targets
_TARGET_RE = re.compile(r"^(?P<kind>top1|self|pair|class|seg|similarity)(?::(?P<arg>.+))?$")
TARGET_KINDS = ("top1", "class:N", "seg:CLASS", "similarity:REF_IMAGE", "self", "pair")


@dataclass(frozen=True)
class TargetSpec:
    """A parsed ``--target``: its kind and argument (class index, class name or image path)."""

    kind: str
    arg: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg is not None else self.kind


def parse_target(spec: str) -> TargetSpec:
    """Parse ``top1``, ``class:N``, ``seg:CLASS``, ``similarity:REF_IMAGE``, ``self`` or ``pair``.

    Raises:
        UnknownNameError: the text matches none of these.
    """
    m = _TARGET_RE.match(spec.strip())
    ok = m is not None and (m["kind"] in ("top1", "self", "pair")) == (m["arg"] is None)
    if not ok:
        raise UnknownNameError(f"unknown --target {spec!r}{did_you_mean(spec.split(':')[0], TARGET_KINDS)}; "
                               f"expected one of: {', '.join(TARGET_KINDS)}")
    assert m is not None
    if m["kind"] == "class" and not re.fullmatch(r"\d+", m["arg"]):
        raise UnknownNameError(f"--target {spec!r}: expected class:N with a class index N ≥ 0")
    return TargetSpec(m["kind"], m["arg"])


class CamTarget:
    """A pytorch-grad-cam target for one image: called on that image's model output.

    ``bind`` fixes what depends on the clean image (the arg-max class, the embedding direction,
    the predicted mask) from its output, so that perturbed or masked copies of the image
    (ScoreCAM, ROAD) are scored against the same objective. Calls accept one sample's output or
    a batch of them (SESS scores patch batches).
    """

    label = "target"
    bound = False
    score: float | None = None
    slope: float | None = None

    def bind(self, output: torch.Tensor) -> None:
        """Fix the image-dependent parts from the clean output (detached, one sample).

        Also records the target's value and its relative slope at the output,
        ``‖∂t/∂o‖·‖o‖ / |t|``: about 1 for a logit or a dot product, about 1e-7 (float rounding)
        for a target that is stationary at the image, such as cosine similarity to itself.
        """
        self.bound = True
        with torch.inference_mode(False), torch.enable_grad():
            o = output.detach().float().clone().requires_grad_(True)
            value = self(o)
            (grad,) = torch.autograd.grad(value.sum(), o, allow_unused=True)
        self.score = float(value.detach())
        slope = 0.0 if grad is None else float(grad.norm() * o.detach().norm())
        self.slope = slope / max(abs(self.score), 1e-12)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ClassTarget(CamTarget):
    """A class logit: ``class:N``, or the arg-max class for ``top1`` (fixed by ``bind``)."""

    def __init__(self, category: int | None, num_classes: int):
        self.category, self.num_classes = category, num_classes

    def bind(self, output: torch.Tensor) -> None:
        if self.category is None:
            self.category = int(output.argmax())
        self.label = f"class {self.category}"
        super().bind(output)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output[..., self.category]


class SegTarget(CamTarget):
    """``seg:CLASS``: the class's logits summed over the pixels predicted as that class."""

    def __init__(self, category: int, name: str):
        self.category, self.name, self.mask = category, name, None

    def bind(self, output: torch.Tensor) -> None:
        mask = (output.argmax(0) == self.category).to(output.dtype)
        if mask.sum() == 0:  # an empty mask would give a zero map; say so and explain the class everywhere
            log.warning("seg:%s: no pixel of this image is predicted as %s; using every pixel instead of "
                        "the predicted mask", self.name, self.name)
            mask = torch.ones_like(mask)
        self.mask = mask
        self.label = f"seg {self.name} ({int(mask.sum())} px)"
        super().bind(output)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        mask = self.mask.to(output.device)
        return (output[..., self.category, :, :] * mask).sum(dim=(-2, -1))


class CosineTarget(CamTarget):
    """Cosine similarity of the embedding to a fixed reference (``similarity:`` and ``pair``)."""

    def __init__(self, reference: torch.Tensor, label: str):
        self.reference, self.label = reference.detach(), label

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(output, self.reference.to(output.device), dim=-1)


class SelfTarget(CamTarget):
    """``self``: the dot product with the image's own detached, unit-norm embedding direction.

    Its gradient is the direction itself, so the map shows what builds the embedding. Plain
    cosine-to-self has zero gradient at the image (it is maximal there), so min-max scaling turns
    float rounding noise into a heatmap.
    """

    label = "self"

    def __init__(self):
        self.direction: torch.Tensor | None = None

    def bind(self, output: torch.Tensor) -> None:
        self.direction = F.normalize(output.detach().flatten(), dim=0).view_as(output)
        super().bind(output)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return (output * self.direction.to(output.device)).sum(dim=-1)


def augment_views(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], *, seed: int = 0) -> torch.Tensor:
    """A second SimCLR-style view of each normalised image: random resized crop, flip, colour jitter.

    Deterministic for a ``seed``; works in the model's input space and returns normalised tensors
    of the same size.
    """
    g = torch.Generator().manual_seed(seed)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    img = (x * s + m).clamp(0, 1)
    H, W = img.shape[-2:]
    views = []
    for im in img:
        area = float(torch.empty(1).uniform_(0.35, 1.0, generator=g))
        ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)))
        h = max(1, min(H, round(math.sqrt(area * H * W / ratio))))
        w = max(1, min(W, round(math.sqrt(area * H * W * ratio))))
        top = int(torch.randint(0, H - h + 1, (1,), generator=g))
        left = int(torch.randint(0, W - w + 1, (1,), generator=g))
        v = F.interpolate(im[None, :, top:top + h, left:left + w], size=(H, W), mode="bilinear",
                          align_corners=False)[0]
        if float(torch.rand(1, generator=g)) < 0.5:
            v = v.flip(-1)
        b, c = (float(t) for t in torch.empty(2).uniform_(0.6, 1.4, generator=g))
        v = ((v * b - (v * b).mean()) * c + (v * b).mean()).clamp(0, 1)
        views.append(v)
    return (torch.stack(views) - m) / s


# ------------------------------------------------------------------ models


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

    A thin alias of ``featviz.loader.load_model(head=True)``, removed with the cam restructure.

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
    if hasattr(model, "class_token") and isinstance(getattr(model, "class_token"), torch.Tensor):
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


# ------------------------------------------------------------------ running one method


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
        return {"raw_max": self.raw_max, "raw_mean": self.raw_mean, "grad_norm": self.grad_norm,
                "status": self.status}


NOISE_RATIO = 1e-4
"""A gradient map is noise when the target's relative slope at the output (``CamTarget.slope``) is
below this: its gradients are float rounding, which min-max scaling blows up into a heatmap."""


def _classify(st: MapStats, slope: float | None) -> MapStats:
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


class _Recorder:
    """Wraps ``get_cam_image`` of a CAM object to record each image's raw map and gradient size."""

    def __init__(self, n: int):
        self.stats = [MapStats() for _ in range(n)]

    def wrap(self, base) -> None:
        orig = base.get_cam_image

        def get_cam_image(input_tensor, target_layer, targets, activations, grads, eigen_smooth=False):
            cam = orig(input_tensor, target_layer, targets, activations, grads, eigen_smooth)
            raw = np.maximum(np.asarray(cam, dtype=np.float64), 0)
            if raw.shape[0] != len(self.stats):  # SESS explains patches, not images
                return cam
            for i, st in enumerate(self.stats):
                mx = float(raw[i].max()) if np.isfinite(raw[i]).all() else float("nan")
                st.raw_max = mx if st.raw_max is None else max(st.raw_max, mx)
                st.raw_mean = float(raw[i].mean()) if st.raw_mean is None else max(st.raw_mean, float(raw[i].mean()))
                if grads is not None and base.uses_gradients:
                    g = float(np.linalg.norm(np.asarray(_numpy(grads[i]), dtype=np.float64)))
                    st.grad_norm = g if st.grad_norm is None else max(st.grad_norm, g)
            return cam

        base.get_cam_image = get_cam_image


def _numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


@contextmanager
def _model_state(model: nn.Module, *, weights_require_grad: bool = False) -> Iterator[None]:
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


def _cut_graph_hook(zero: torch.Tensor):
    """Forward hook: make the layer's output the start of the autograd graph.

    The trunk below the layer runs without recording (no parameter and no input requires grad),
    so the backward pass stops at the layer. ``x.detach() + zero`` (zero a 0-d leaf) has the same
    values, is a non-leaf (in-place ops downstream stay legal) and receives the same gradient
    pytorch-grad-cam would record. Grad mode is switched on for the rest of the forward, so a
    backbone that runs under ``torch.no_grad()`` still gives gradients.
    """

    def hook(_module, _inputs, output):
        torch.set_grad_enabled(True)
        if isinstance(output, torch.Tensor) and output.is_floating_point() and not output.requires_grad:
            return output.detach() + zero.to(device=output.device, dtype=output.dtype)
        return None

    return hook


@contextmanager
def _quiet_inner_loops() -> Iterator[None]:
    """Silence the per-image tqdm bars of ScoreCAM/AblationCAM (featviz shows one progress bar)."""
    import types

    from pytorch_grad_cam import ablation_cam, score_cam

    quiet = types.SimpleNamespace(tqdm=lambda iterable, *a, **k: iterable)
    saved = [(mod, mod.tqdm) for mod in (score_cam, ablation_cam)]
    try:
        for mod, _ in saved:
            mod.tqdm = quiet
        yield
    finally:
        for mod, orig in saved:
            mod.tqdm = orig


def _grad_on_hook(_module, _inputs, _output) -> None:
    torch.set_grad_enabled(True)  # a backbone under torch.no_grad() still records after the layer


class GradientError(FeatvizError):
    """A gradient method was asked for where no gradient flows from the output to the layer."""


def explain(info: ModelInfo, x: torch.Tensor, method: str, layers: list[nn.Module],
            targets: list[CamTarget], *, reshape_transform=None, aug_smooth: bool = False,
            eigen_smooth: bool = False, batch_size: int = 32, token_layer: bool = False,
            method_kwargs: dict[str, Any] | None = None,
            options: dict[str, Any] | None = None) -> tuple[np.ndarray, list[MapStats]]:
    """Compute one method's maps for a batch, with featviz's guard rails.

    Args:
        info: The probed model (``probe_model``).
        x: Normalised images (B, 3, H, W) on the model's device.
        method: A ``CAM_METHODS`` name.
        layers: Target layer modules (several are averaged, as pytorch-grad-cam does).
        targets: One target per image (never broadcast silently).
        reshape_transform: For token layers (``reshape_transform_for``).
        aug_smooth: pytorch-grad-cam's test-time augmentation smoothing (6 passes).
        eigen_smooth: First principal component of the weighted activations.
        batch_size: Inner batch of ScoreCAM/AblationCAM/SESS forwards.
        token_layer: The layers output tokens (picks AblationCAM's ViT ablation layer).
        method_kwargs: Extra call arguments (FinerCAM's ``target_idx``).
        options: Extra constructor arguments for the method (see ``make_cam``).

    Returns:
        maps (B, H, W) float32 in [0, 1] exactly as pytorch-grad-cam returns them, and per-image
        ``MapStats``.

    Raises:
        ValueError: the number of targets is not the number of images.
        GradientError: a gradient method where no gradient reaches the layer.
    """
    if len(targets) != x.shape[0]:
        raise ValueError(f"one target per image is required: got {len(targets)} targets for {x.shape[0]} images")
    spec = CAM_METHODS[method]
    model = info.forward
    if (aug_smooth or method == "sess") and not all(t.bound for t in targets):
        bind_targets(info, x, targets)  # their first forward is not the clean batch
    recorder = _Recorder(x.shape[0])
    with ExitStack() as stack:
        stack.enter_context(_model_state(model, weights_require_grad=spec.input_gradient))
        stack.enter_context(_quiet_inner_loops())
        handles = []
        stack.callback(lambda: [h.remove() for h in handles])
        if method in _CUT_GRAPH:
            zero = torch.zeros((), device=x.device, requires_grad=True)
            # prepend: the cut must happen before pytorch-grad-cam's own hooks see the output
            handles += [m.register_forward_hook(_cut_graph_hook(zero), prepend=True) for m in layers]
        elif spec.gradients:  # FullGrad/ShapleyCAM differentiate the input: grad mode must stay on
            handles += [m.register_forward_hook(_grad_on_hook, prepend=True) for m in layers]

        state = {"first": True}

        def on_output(_module, _inputs, output):
            if not state["first"]:
                return
            state["first"] = False
            for t, o in zip(targets, output):
                if not t.bound:
                    t.bind(o.detach())
            if spec.gradients and not output.requires_grad:
                raise GradientError(
                    f"{method} needs gradients from the model output back to layer(s) "
                    f"{_layer_names(info, layers)}, but none flow: the model detaches or runs under "
                    "torch.no_grad() after that layer. Use a gradient-free method (eigencam, scorecam, "
                    "ablationcam, kpca_cam, fem) or a later layer")

        handles.append(model.register_forward_hook(on_output))
        cam = make_cam(method, model, layers, reshape_transform, batch_size=batch_size,
                       token_layer=token_layer, output_kind=info.kind, options=options)
        stack.callback(release_cam, cam)
        if method == "ablationcam":
            stack.callback(_restore_ablated, model, cam, layers)
        for base in _base_cams(cam):
            recorder.wrap(base)
        kwargs = dict(method_kwargs or {})
        if aug_smooth:
            kwargs["aug_smooth"] = True
        maps = cam(x, None if method == "finercam" else targets, eigen_smooth=eigen_smooth, **kwargs)
        if spec.gradients and method not in ("fullgrad", "sess"):
            for base in _base_cams(cam):
                if len(base.activations_and_grads.gradients) < len(base.target_layers):
                    raise GradientError(
                        f"{method}: no gradient reached layer(s) {_layer_names(info, layers)}; the model output "
                        "does not depend on them. Pick a layer on the path to the output")
    stats = [_classify(st, t.slope) for st, t in zip(recorder.stats, targets)]
    return np.asarray(maps, dtype=np.float32), stats


def _restore_ablated(model: nn.Module, cam, layers: list[nn.Module]) -> None:
    """Put the target layer back if AblationCAM failed while its ablation layer was installed."""
    from pytorch_grad_cam.utils.find_layers import replace_layer_recursive

    for layer in layers:
        replace_layer_recursive(model, cam.ablation_layer, layer)


def _layer_names(info: ModelInfo, layers: list[nn.Module]) -> str:
    names = {id(m): n for n, m in info.forward.named_modules()}
    return ", ".join(repr(names.get(id(m), type(m).__name__)) for m in layers)


# ------------------------------------------------------------------ targets for a batch


@dataclass
class TargetContext:
    """What building targets needs besides the images: the model, reference embedding, views."""

    spec: TargetSpec
    info: ModelInfo
    mean: Sequence[float]
    std: Sequence[float]
    reference: torch.Tensor | None = None
    class_names: list[str] = field(default_factory=list)
    seed: int = 0


def check_target(spec: TargetSpec, info: ModelInfo, class_names: Sequence[str] = ()) -> None:
    """Refuse a target that cannot work on this model's output, before any CAM runs.

    Raises:
        DataError: e.g. ``seg:`` on a classifier, ``top1`` on an encoder, a class out of range.
    """
    shape = "×".join(map(str, info.out_shape))
    if spec.kind == "seg":
        if info.kind != "segmentation":
            raise DataError(f"--target {spec} needs a segmenter whose output is per-pixel logits (N, C, H, W); "
                            f"this model is a{'' if info.kind == 'embedding' else ' classifier'} "
                            f"{'encoder' if info.kind == 'embedding' else ''} with output (N, {shape}). "
                            "Use top1/class:N for classifiers or self/similarity:IMG/pair for encoders")
        _seg_category(spec.arg or "", info, class_names)
        return
    if info.kind == "segmentation":
        raise DataError(f"--target {spec} needs an (N, D) output; this segmenter outputs (N, {shape}). "
                        "Use seg:CLASS")
    if spec.kind in ("top1", "class") and info.kind != "logits":
        raise DataError(f"--target {spec} needs a classifier, but this model outputs {shape}-d features "
                        "(no classifier head); use self, pair or similarity:REF_IMAGE")
    if spec.kind == "class" and int(spec.arg or 0) >= info.num_classes:
        raise DataError(f"--target {spec}: class index {spec.arg} is out of range; the model has "
                        f"{info.num_classes} classes (0..{info.num_classes - 1})")


def _seg_category(arg: str, info: ModelInfo, class_names: Sequence[str]) -> int:
    n = info.num_classes
    if re.fullmatch(r"\d+", arg):
        idx = int(arg)
    elif arg in class_names:
        idx = list(class_names).index(arg)
    else:
        raise DataError(f"--target seg:{arg}: unknown class{did_you_mean(arg, class_names)}; expected a class "
                        f"index 0..{n - 1}" + (f" or one of: {', '.join(class_names)}" if class_names else ""))
    if idx >= n:
        raise DataError(f"--target seg:{arg}: class index {idx} is out of range; the segmenter has {n} classes "
                        f"(0..{n - 1})")
    return idx


def default_target(info: ModelInfo) -> TargetSpec:
    """``top1`` for a classifier, ``self`` for an encoder (logged); segmenters need seg:CLASS."""
    if info.kind == "segmentation":
        raise DataError("a segmenter needs --target seg:CLASS (a class index or name)")
    spec = TargetSpec("top1") if info.kind == "logits" else TargetSpec("self")
    log.info("--target not given: using %s (the model %s)", spec,
             "has a classifier" if info.kind == "logits" else "has no classifier; explaining its embedding")
    return spec


def make_targets(ctx: TargetContext, x: torch.Tensor) -> list[CamTarget]:
    """One fresh target per image of the batch ``x`` (targets bind to their image's output)."""
    spec, info = ctx.spec, ctx.info
    n = x.shape[0]
    if spec.kind in ("top1", "class"):
        cat = None if spec.kind == "top1" else int(spec.arg or 0)
        return [ClassTarget(cat, info.num_classes) for _ in range(n)]
    if spec.kind == "seg":
        idx = _seg_category(spec.arg or "", info, ctx.class_names)
        return [SegTarget(idx, spec.arg or str(idx)) for _ in range(n)]
    if spec.kind == "self":
        return [SelfTarget() for _ in range(n)]
    if spec.kind == "similarity":
        assert ctx.reference is not None
        return [CosineTarget(ctx.reference, f"similarity to {Path(spec.arg or '').name}") for _ in range(n)]
    if spec.kind == "pair":
        views = augment_views(x, ctx.mean, ctx.std, seed=ctx.seed)
        with torch.no_grad():
            z = info.forward(views)
        return [CosineTarget(z[i], "agreement with an augmented view") for i in range(n)]
    raise AssertionError(spec)


def bind_targets(info: ModelInfo, x: torch.Tensor, targets: list[CamTarget]) -> None:
    """Bind targets on a clean forward (for methods whose first forward is not the clean batch)."""
    with torch.no_grad():
        out = info.forward(x)
    for t, o in zip(targets, out):
        if not t.bound:
            t.bind(o)


# ------------------------------------------------------------------ applicability


def not_applicable(method: str, info: ModelInfo, *, token_layer: bool, aug_smooth: bool = False,
                   input_hw: tuple[int, int] | None = None) -> str | None:
    """Why ``method`` cannot run on this model/layer/target/input size (None when it can)."""
    if method == "finercam" and (info.kind != "logits" or info.num_classes < 2):
        return "finercam compares a class with its most similar classes, so it needs a classifier with ≥ 2 classes"
    if method == "sess" and info.kind == "segmentation":
        return "sess scores image patches with one score per patch, so it needs an (N, D) output, not a segmenter"
    if method == "sess" and input_hw is not None and input_hw[0] != input_hw[1]:
        return (f"sess slides square windows of the shorter side over the image, so it needs square inputs; "
                f"this run uses {input_hw[0]}×{input_hw[1]}")
    if method == "shapleycam" and token_layer:
        return ("shapleycam does not apply to token layers: pytorch-grad-cam 1.5.7 skips the reshape_transform on "
                "its activations (detach=False path); pick a convolutional layer")
    if method in _NO_AUG_SMOOTH and aug_smooth:
        return f"{method} has no --aug-smooth in pytorch-grad-cam 1.5.7"
    if method == "fullgrad" and not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) and m.bias is not None
                                        for m in info.forward.modules()):
        return "fullgrad needs Conv2d/BatchNorm2d layers with biases, and this model has none"
    return None


# ------------------------------------------------------------------ metrics

METRIC_DEFINITIONS = {
    "road_morf": "ROAD, most relevant first: mean target change after imputing the top p% pixels, "
                 "p ∈ {20, 40, 60, 80} (lower = more faithful)",
    "road_lerf": "ROAD, least relevant first: mean target change after imputing the bottom p% pixels "
                 "(higher = more faithful)",
    "road_combined": "(road_lerf − road_morf) / 2 (higher = more faithful)",
    "confidence_drop": "max(0, target(x) − target(x · map)): pytorch-grad-cam DropInConfidence (lower = better)",
    "confidence_increase": "1 if target(x · map) > target(x) else 0: IncreaseInConfidence (higher = better)",
}
ROAD_PERCENTILES = (20, 40, 60, 80)


def faithfulness(info: ModelInfo, x: torch.Tensor, maps: np.ndarray, targets: list[CamTarget]) -> dict[str, np.ndarray]:
    """Per-image ROAD and confidence-change scores (pytorch-grad-cam metrics) for bound targets.

    Works for any target, embedding targets included: each target keeps what it bound on the
    clean image (class, direction, reference), so perturbed images are scored against it. The
    definitions are pytorch-grad-cam's (``ROAD*RelevantFirstAverage``, ``DropInConfidence``,
    ``IncreaseInConfidence``); the clean image is scored once instead of once per metric.
    """
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst

    model = info.forward
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    n = len(targets)

    def after(metric) -> np.ndarray:
        return np.asarray(metric(x, maps, targets, model, return_diff=False), np.float64).reshape(n, -1)[:, 0]

    try:
        with torch.no_grad():
            out = model(x)
            base = np.array([float(t(o)) for t, o in zip(targets, out)])
            morf = np.mean([after(ROADMostRelevantFirst(p)) - base for p in ROAD_PERCENTILES], axis=0)
            lerf = np.mean([after(ROADLeastRelevantFirst(p)) - base for p in ROAD_PERCENTILES], axis=0)
            change = after(CamMultImageConfidenceChange()) - base
    finally:
        for m, flag in was:
            m.training = flag
    return {"road_morf": morf, "road_lerf": lerf, "road_combined": (lerf - morf) / 2,
            "confidence_drop": np.maximum(-change, 0), "confidence_increase": (change > 0).astype(np.float64)}


# ------------------------------------------------------------------ the whole run


@dataclass
class CamRun:
    """Everything one ``run_cam`` computed (the files hold the same)."""

    ids: list[str]
    methods: list[str]
    skipped: dict[str, str]
    maps: dict[str, np.ndarray]
    stats: dict[str, list[MapStats]]
    target_labels: list[str]
    scores: list[float | None]
    metrics: dict[str, dict[str, np.ndarray]]
    layers: list[str]
    target: str
    image_size: tuple[int, int]
    model_kind: str


def image_ids(inputs: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Image files under ``inputs`` and readable ids (paths relative to the folder given).

    Raises:
        DataError: an input is missing, or a folder holds no image.
    """
    from featviz.data import find_images

    files: list[Path] = []
    ids: list[str] = []
    for item in inputs:
        root = Path(item)
        for f in find_images(root):
            files.append(f)
            ids.append(str(f.relative_to(root)) if root.is_dir() else f.name)
    return files, ids


def _parse_size(size: int | str | Sequence[int] | None, model: nn.Module) -> tuple[int, int]:
    from featviz.models import default_image_size

    if size is None:
        s = default_image_size(model)
        return s, s
    if isinstance(size, int):
        return size, size
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:[x×,]\s*(\d+))?\s*", size)
        if not m:
            raise DataError(f"--image-size {size!r}: expected N or HxW (e.g. 224 or 224x320)")
        return int(m[1]), int(m[2] or m[1])
    h, w = size
    return int(h), int(w)


def _transform(hw: tuple[int, int], mean, std):
    from featviz.data import eval_transform

    if hw[0] == hw[1]:
        return eval_transform(hw[0], mean, std)
    from torchvision import transforms as T

    return T.Compose([T.Resize(hw, interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(), T.Normalize(mean, std)])


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


def run_cam(inputs: Sequence[str | Path], out_dir: str | Path, *, model: nn.Module,
            methods: str | Sequence[str] = "gradcam", layers: Sequence[str] | None = None,
            target: str | None = None, image_size: int | str | Sequence[int] | None = None,
            batch_size: int = 16, aug_smooth: bool = False, eigen_smooth: bool = False,
            metrics: bool = False, device: str = "auto", seed: int = 0, force: bool = False,
            class_names: Sequence[str] = (), load_report: dict[str, Any] | None = None,
            arguments: dict[str, Any] | None = None, progress: Progress | None = None,
            sheet_rows: int = 24) -> dict[str, Any]:
    """Explain every image under ``inputs`` with every method; write the results to ``out_dir``.

    Writes (atomically, as one folder): ``overlays/<image>.<method>.png``, ``maps.npz`` (per method
    a float32 array (N, H, W) of the normalised maps, plus ``ids`` and ``<method>.raw_max``),
    ``contact_sheet.png`` (rows = images, columns = methods) and ``manifest.json``.

    Args:
        inputs: Image files and/or folders (searched recursively).
        out_dir: Output folder; must not exist unless ``force``.
        model: The model to explain (``load_model``).
        methods: Method names, comma-separated names, or ``all``.
        layers: Layer names (default per architecture); several layers are averaged.
        target: A ``--target`` string (default: ``top1`` with a classifier, else ``self``).
        image_size: N or (H, W) / ``"HxW"`` (default: the model's size).
        batch_size: Images per batch (and, on CUDA, the ScoreCAM/AblationCAM inner batch, at least 32;
            16 on CPU, as in pytorch-grad-cam).
        aug_smooth: Test-time augmentation smoothing.
        eigen_smooth: First-principal-component smoothing.
        metrics: Add ROAD and confidence-change scores per map.
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: Seed for ``pair`` views and ROAD's imputation noise.
        force: Replace an existing ``out_dir``.
        class_names: Names for ``seg:NAME`` targets.
        load_report: The checkpoint load report, copied into the manifest.
        arguments: The command's arguments, for the manifest.
        progress: Wraps the batch loop (a progress bar).
        sheet_rows: Images shown on the contact sheet (all maps are still saved).

    Returns:
        The summary that ``--json`` prints.
    """
    from featviz.data import ImageDataset, collate, load_image, normalization_of
    from featviz.distributed import resolve_device
    from featviz.models import get_layer
    from featviz.outputs import atomic_dir, check_writable, manifest, write_json

    out_dir = Path(out_dir)
    check_writable(out_dir, force=force)
    names = parse_methods(methods)
    spec_t = parse_target(target) if target else None
    files, ids = image_ids(inputs)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    hw = _parse_size(image_size, model)
    mean, std = normalization_of(model)
    transform = _transform(hw, mean, std)
    layer_names = list(layers) if layers else default_layers(model)
    layer_mods = [get_layer(model, n) for n in layer_names]

    dataset = ImageDataset(files, None, transform, strict=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    first = dataset[0][0][None].to(dev)
    info = probe_model(model, first)
    shapes = _layer_shapes(info.forward, layer_mods, first)
    token = any(len(s) == 3 for s in shapes)
    reshape = reshape_transform_for(model, shapes, hw)
    spec_t = spec_t or default_target(info)
    class_names = list(class_names) or list(getattr(model, "class_names", []) or [])  # a segmenter knows its own
    check_target(spec_t, info, class_names)
    reference = None
    if spec_t.kind == "similarity":
        ref = transform(load_image(spec_t.arg or ""))[None].to(dev)
        with torch.no_grad():
            reference = info.forward(ref)[0]
    ctx = TargetContext(spec_t, info, mean, std, reference, list(class_names), seed)

    skipped = {m: why for m in names if (why := not_applicable(m, info, token_layer=token, aug_smooth=aug_smooth,
                                                              input_hw=hw))}
    requested = [part.strip().lower() for item in ([methods] if isinstance(methods, str) else methods)
                 for part in str(item).split(",")]
    explicit = "all" not in requested
    if skipped and explicit:
        m, why = next(iter(skipped.items()))
        raise DataError(f"--method {m} does not apply to this model: {why}")
    for m, why in skipped.items():
        log.warning("skipping %s: %s", m, why)
    run_methods = [m for m in names if m not in skipped]
    if not run_methods:
        raise DataError("none of the requested methods applies to this model: " + "; ".join(skipped.values()))

    # masked copies per forward for ScoreCAM/AblationCAM/SESS: larger batches pay on a GPU, but on a
    # CPU pytorch-grad-cam's own 16 is faster (ResNet-50 ScoreCAM at 112 px: 16 → 27-29 s, 64 → 33-36 s)
    inner = max(32, batch_size) if dev.type == "cuda" else 16
    maps: dict[str, list[np.ndarray]] = {m: [] for m in run_methods}
    stats: dict[str, list[MapStats]] = {m: [] for m in run_methods}
    mets: dict[str, dict[str, list[np.ndarray]]] = {m: {} for m in run_methods}
    labels: list[str] = []
    scores: list[float | None] = []
    sheet_imgs: list[np.ndarray] = []
    n_batches = math.ceil(len(dataset) / batch_size)
    batches: Iterable = loader if progress is None else progress(loader, total=n_batches)
    mean_t = torch.tensor(mean).view(3, 1, 1)
    std_t = torch.tensor(std).view(3, 1, 1)
    with atomic_dir(out_dir, force=force) as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # ROAD's imputation noise; the caller's RNG state is left alone
        (tmp / "overlays").mkdir()
        for x, _, idx, _ in batches:
            x = x.to(dev)
            rgb = ((x.cpu() * std_t + mean_t).clamp(0, 1).permute(0, 2, 3, 1).numpy())
            targets = make_targets(ctx, x)
            for m in run_methods:
                kw = {"target_idx": int(spec_t.arg)} if m == "finercam" and spec_t.kind == "class" else None
                batch_maps, batch_stats = explain(info, x, m, layer_mods, targets, reshape_transform=reshape,
                                                  aug_smooth=aug_smooth, eigen_smooth=eigen_smooth,
                                                  batch_size=inner, token_layer=token, method_kwargs=kw)
                maps[m].append(batch_maps)
                stats[m] += batch_stats
                if metrics:
                    for k, v in faithfulness(info, x, batch_maps, targets).items():
                        mets[m].setdefault(k, []).append(v)
                for j, i in enumerate(idx.tolist()):
                    overlay_png(rgb[j], batch_maps[j], tmp / "overlays" / f"{_safe(ids[i])}.{m}.png")
            labels += [t.label for t in targets]
            scores += [t.score for t in targets]
            sheet_imgs += list(rgb[: max(0, sheet_rows - len(sheet_imgs))])
        all_maps = {m: np.concatenate(v) for m, v in maps.items()}
        metric_arrays = {m: {k: np.concatenate(v) for k, v in d.items()} for m, d in mets.items()}
        arrays: dict[str, np.ndarray] = {"ids": np.array(ids)}
        for m in run_methods:
            arrays[m] = all_maps[m]
            arrays[f"{m}.raw_max"] = np.array([np.nan if s.raw_max is None else s.raw_max for s in stats[m]])
        np.savez_compressed(tmp / "maps.npz", **arrays)
        run = CamRun(ids, run_methods, skipped, all_maps, stats, labels, scores, metric_arrays, layer_names,
                     str(spec_t), hw, info.kind)
        warnings = _warn_degenerate(run)
        contact_sheet(run, sheet_imgs, tmp / "contact_sheet.png", title=_sheet_title(model, run))
        summary = _summary(run, out_dir, warnings)
        write_json(tmp / "manifest.json", manifest(
            "cam", arguments or {}, model={"arch": _arch_name(model), "kind": info.kind, "output_shape": info.out_shape,
                                          "output_selected": info.selected, "load_report": load_report},
            layers=layer_names, layer_shapes=[list(s[1:]) for s in shapes],
            reshape_transform=None if reshape is None else {"grid": reshape.grid, "prefix_tokens": reshape.prefix},
            target=str(spec_t), methods=run_methods, skipped_methods=skipped, image_size=list(hw),
            device=str(dev), normalization={"mean": list(mean), "std": list(std)},
            metric_definitions=METRIC_DEFINITIONS if metrics else None,
            noise_rule=f"gradient maps are 'noise' when the target's relative slope ‖∂t/∂o‖·‖o‖/|t| < {NOISE_RATIO}, "
                       "'blank' when the raw map is all ≤ 0",
            images=[{"id": ids[i], "path": str(files[i]), "target": labels[i], "score": scores[i],
                     "maps": {m: {**stats[m][i].to_dict(),
                                  **{k: float(v[i]) for k, v in metric_arrays.get(m, {}).items()}}
                              for m in run_methods}} for i in range(len(ids))],
            warnings=warnings))
    return summary


def _safe(image_id: str) -> str:
    stem = re.sub(r"\.[A-Za-z0-9]+$", "", image_id)
    return re.sub(r"[^A-Za-z0-9._-]+", "__", stem.replace("/", "__"))


def _arch_name(model: nn.Module) -> str:
    spec = getattr(model, "featviz_arch", None)
    return spec.name if spec is not None else type(model).__name__


def _sheet_title(model: nn.Module, run: CamRun) -> str:
    return f"{_arch_name(model)} · layer {', '.join(run.layers)} · target {run.target}"


def _warn_degenerate(run: CamRun) -> list[str]:
    lines = []
    for m in run.methods:
        bad = [(run.ids[i], s) for i, s in enumerate(run.stats[m]) if s.status in ("blank", "noise", "nan")]
        if not bad:
            continue
        kinds = sorted({s.status for _, s in bad})
        worst = max((s.raw_max or 0.0) for _, s in bad if s.raw_max is not None and math.isfinite(s.raw_max)) \
            if any(s.raw_max is not None and math.isfinite(s.raw_max) for _, s in bad) else float("nan")
        why = {"blank": "all ≤ 0 before ReLU: the target decreases with every feature at this layer",
               "noise": "the target is flat at the image, so the gradients are float rounding that min-max "
                        "scaling blows up into a convincing heatmap",
               "nan": "the raw map is not finite"}
        line = (f"{m}: {len(bad)} of {len(run.ids)} maps are {'/'.join(kinds)} (raw max ≤ {worst:.3g}, e.g. "
                f"{bad[0][0]}): {'; '.join(why[k] for k in kinds)}. Try another target, layer or method")
        log.warning(line)
        lines.append(line)
    return lines


def _summary(run: CamRun, out_dir: Path, warnings: list[str]) -> dict[str, Any]:
    status = {m: {k: sum(s.status == k for s in run.stats[m]) for k in ("ok", "blank", "noise", "nan", "unchecked")}
              for m in run.methods}
    return {
        "out": str(out_dir), "images": len(run.ids), "methods": run.methods, "skipped_methods": run.skipped,
        "layers": run.layers, "target": run.target, "model_kind": run.model_kind, "image_size": list(run.image_size),
        "files": {"contact_sheet": str(out_dir / "contact_sheet.png"), "maps": str(out_dir / "maps.npz"),
                  "manifest": str(out_dir / "manifest.json"), "overlays": len(run.ids) * len(run.methods)},
        "map_status": status,
        "metrics": {m: {k: float(np.nanmean(v)) for k, v in d.items()} for m, d in run.metrics.items() if d} or None,
        "warnings": warnings,
    }


# ------------------------------------------------------------------ pictures


def overlay(rgb: np.ndarray, cam: np.ndarray, *, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a [0, 1] map onto an RGB image in [0, 1]; returns uint8 (H, W, 3)."""
    import matplotlib

    heat = matplotlib.colormaps[cmap](np.clip(cam, 0, 1))[..., :3]
    return np.uint8(np.clip((1 - alpha) * rgb + alpha * heat, 0, 1) * 255 + 0.5)


def overlay_png(rgb: np.ndarray, cam: np.ndarray, path: Path, *, min_side: int = 224) -> None:
    """Write ``overlay(rgb, cam)`` as a PNG, enlarged to at least ``min_side`` px (32-px inputs)."""
    from PIL import Image

    h, w = cam.shape
    k = max(1, math.ceil(min_side / min(h, w)))
    if k > 1:  # image bicubic, map bilinear: a readable picture of exactly what the model saw
        size = (w * k, h * k)
        rgb = np.asarray(Image.fromarray(np.uint8(rgb * 255 + 0.5)).resize(size, Image.BICUBIC)) / 255.0
        cam = np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
    Image.fromarray(overlay(rgb, cam)).save(path)


def contact_sheet(run: CamRun, images: list[np.ndarray], path: Path, *, title: str = "") -> None:
    """Rows = images (input first), columns = methods; flagged maps get a red label."""
    from matplotlib.figure import Figure

    rows, cols = len(images), len(run.methods) + 1
    cell = 1.7
    fig = Figure(figsize=(cell * cols, cell * rows + 0.7), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c == 0:
                ax.imshow(images[r])
                ax.set_ylabel(_short(run.ids[r]) + "\n" + run.target_labels[r], fontsize=7, rotation=0,
                              ha="right", va="center", labelpad=4)
                if r == 0:
                    ax.set_title("input", fontsize=9)
                continue
            m = run.methods[c - 1]
            ax.imshow(overlay(images[r], run.maps[m][r]))
            if r == 0:
                ax.set_title(m, fontsize=9)
            st = run.stats[m][r]
            if st.status in ("blank", "noise", "nan"):
                ax.text(0.03, 0.05, st.status, transform=ax.transAxes, fontsize=7, color="white",
                        bbox={"facecolor": "crimson", "edgecolor": "none", "pad": 1.5})
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)


def _short(text: str, n: int = 22) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]
