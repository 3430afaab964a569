"""``--target``: what a map explains, one target object per image, bound to its clean output."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from featviz.errors import (
    DataError,
    UnknownNameError,
    did_you_mean,
)
from featviz.views.cam.layers import ModelInfo

log = logging.getLogger(__name__)


_TARGET_RE = re.compile(r"^(?P<kind>top1|self|pair|class|seg|similarity)(?::(?P<arg>.+))?$")
TARGET_KINDS = ("top1", "class:N", "class:NAME", "seg:CLASS", "similarity:REF_IMAGE", "self", "pair")


@dataclass(frozen=True)
class TargetSpec:
    """A parsed ``--target``: its kind and argument (class index, class name or image path)."""

    kind: str
    arg: str | None = None

    def __str__(self) -> str:
        """The ``--target`` text: ``class:3``, ``self``."""
        return f"{self.kind}:{self.arg}" if self.arg is not None else self.kind


def parse_target(spec: str) -> TargetSpec:
    """Parse ``top1``, ``class:N``, ``class:NAME``, ``seg:CLASS``, ``similarity:REF_IMAGE``, ``self`` or ``pair``.

    A ``class:NAME`` is resolved against the model's class names later (``class_index``).

    Raises:
        UnknownNameError: the text matches none of these.
    """
    m = _TARGET_RE.match(spec.strip())
    ok = m is not None and (m["kind"] in ("top1", "self", "pair")) == (m["arg"] is None)
    if not ok:
        raise UnknownNameError(f"unknown --target {spec!r}{did_you_mean(spec.split(':')[0], TARGET_KINDS)}; "
                               f"expected one of: {', '.join(TARGET_KINDS)}")
    assert m is not None
    return TargetSpec(m["kind"], m["arg"].strip() if m["arg"] else None)


def _name_key(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def class_index(arg: str, class_names: Sequence[str]) -> int:
    """The class a ``class:`` target names: an index, or a name from ``class_names``.

    A name matches a class's whole name or any of its comma-separated synonyms, ignoring case and
    ``_`` vs space (ImageNet's ``tabby, tabby cat``: ``tabby``, ``Tabby_Cat``); the first class
    that has it wins.

    Raises:
        DataError: a name when the model has no class names, or a name no class has (with the
            closest ones).
    """
    if re.fullmatch(r"\d+", arg):
        return int(arg)
    if not class_names:
        raise DataError(f"--target class:{arg}: this model has no class names to look {arg!r} up in; give "
                        "--class-names (a text file, one per line, or 'imagenet') or a class index, class:N")
    key = _name_key(arg)
    synonyms: dict[str, int] = {}
    for i, name in enumerate(class_names):
        for s in (name, *name.split(",")):
            synonyms.setdefault(_name_key(s), i)
    if key in synonyms:
        return synonyms[key]
    raise DataError(f"--target class:{arg}: no class is called {arg!r}{did_you_mean(key, synonyms)}; "
                    f"the model has {len(class_names)} classes (give class:N for an index)")


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
        """The target's value for a model output (one sample's, or a batch of them)."""
        raise NotImplementedError


class ClassTarget(CamTarget):
    """A class logit: ``class:N``, or the arg-max class for ``top1`` (fixed by ``bind``).

    With ``names`` (one per class) the label carries the class name and its softmax probability.
    """

    def __init__(self, category: int | None, num_classes: int, names: Sequence[str] = ()):
        self.category, self.num_classes, self.names = category, num_classes, list(names)

    def bind(self, output: torch.Tensor) -> None:
        """Fix the class (``top1``: the arg-max) and its label; see ``CamTarget.bind``."""
        if self.category is None:
            self.category = int(output.argmax())
        self.label = f"class {self.category}"
        if self.category < len(self.names):
            p = float(output.detach().float().softmax(-1)[self.category])
            self.label += f" {self.names[self.category]} (p={p:.2f})"
        super().bind(output)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        """The class logit."""
        return output[..., self.category]


class SegTarget(CamTarget):
    """``seg:CLASS``: the class's logits summed over the pixels predicted as that class."""

    def __init__(self, category: int, name: str):
        self.category, self.name, self.mask = category, name, None
        self.absent = False  # no pixel predicted as the class: the map explains every pixel

    def bind(self, output: torch.Tensor) -> None:
        """Fix the mask of pixels predicted as the class (every pixel when none is)."""
        mask = (output.argmax(0) == self.category).to(output.dtype)
        self.absent = bool(mask.sum() == 0)
        if self.absent:  # an empty mask would give a zero map; say so and explain the class everywhere
            log.warning("seg:%s: no pixel of this image is predicted as %s; using every pixel instead of "
                        "the predicted mask", self.name, self.name)
            mask = torch.ones_like(mask)
        self.mask = mask
        self.label = (f"seg {self.name}: none predicted; map of all {int(mask.sum())} px" if self.absent
                      else f"seg {self.name} ({int(mask.sum())} px)")
        super().bind(output)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        """The class's logits summed over the mask."""
        mask = self.mask.to(output.device)
        return (output[..., self.category, :, :] * mask).sum(dim=(-2, -1))


class CosineTarget(CamTarget):
    """Cosine similarity of the embedding to a fixed reference (``similarity:`` and ``pair``)."""

    def __init__(self, reference: torch.Tensor, label: str):
        self.reference, self.label = reference.detach(), label

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        """Cosine similarity to the reference."""
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
        """Fix the unit direction of the image's own embedding."""
        self.direction = F.normalize(output.detach().flatten(), dim=0).view_as(output)
        super().bind(output)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        """The embedding's component along the fixed direction."""
        return (output * self.direction.to(output.device)).sum(dim=-1)


def augment_views(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], *, seed: int = 0,
                  method: str | None = None) -> torch.Tensor:
    """A second view of each normalised image, from ``featviz.data.augment`` (the one pipeline).

    The first training view of ``method`` when the model says how it was trained, else
    ``augment.ANALYSIS_VIEW``. Deterministic for a ``seed``; same size, normalised.
    """
    from featviz.data.augment import analysis_view, augment_batch

    return augment_batch(x, mean, std, seed=seed, view=analysis_view(method))


def _trained_with(model: torch.nn.Module) -> str | None:
    """The SSL method a model's weights come from, when its checkpoint says so."""
    from featviz.models.description import describe

    return describe(model).method


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
        names = ctx.class_names if len(ctx.class_names) == info.num_classes else ()
        return [ClassTarget(cat, info.num_classes, names) for _ in range(n)]
    if spec.kind == "seg":
        idx = _seg_category(spec.arg or "", info, ctx.class_names)
        return [SegTarget(idx, spec.arg or str(idx)) for _ in range(n)]
    if spec.kind == "self":
        return [SelfTarget() for _ in range(n)]
    if spec.kind == "similarity":
        assert ctx.reference is not None
        return [CosineTarget(ctx.reference, f"similarity to {Path(spec.arg or '').name}") for _ in range(n)]
    if spec.kind == "pair":
        views = augment_views(x, ctx.mean, ctx.std, seed=ctx.seed, method=_trained_with(info.forward))
        with torch.no_grad():
            z = info.forward(views)
        return [CosineTarget(z[i], "agreement with an augmented view") for i in range(n)]
    raise AssertionError(spec)


def bind_targets(info: ModelInfo, x: torch.Tensor, targets: list[CamTarget]) -> None:
    """Bind targets on a clean forward (for methods whose first forward is not the clean batch)."""
    with torch.no_grad():
        out = info.forward(x)
    for t, o in zip(targets, out, strict=True):
        if not t.bound:
            t.bind(o)


