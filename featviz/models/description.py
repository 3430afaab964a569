"""What featviz knows about a model, in one frozen record (torch-free).

Every model featviz builds or loads carries one ``ModelDescription``: its architecture, whether
it is a backbone, a classifier or a segmenter (and the classifier's module name and classes),
the normalisation its source used and where that choice came from, its default input size, the
checkpoint layout it was read from, the SSL method, and the warnings the loader raised. It is
attached once (``attach``) and read everywhere with ``describe``; ``to_dict`` is what manifests
record.

``describe`` also accepts any ``nn.Module`` handed to the Python API without a description
(a timm model, a torchvision model, your own). For those it derives a minimal description from
the module itself, in ``_derive``, the only place where featviz guesses model facts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ModelKind = Literal["backbone", "classifier", "segmenter"]
ATTRIBUTE = "featviz"  # the module attribute that holds the description


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
        """The spec as a JSON-able dict (``family``, ``name``, ``kwargs``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchSpec:
        """The spec ``to_dict`` wrote."""
        return cls(family=d["family"], name=d["name"], kwargs=dict(d.get("kwargs", {})))

    def describe(self) -> str:
        """The name, with its keyword arguments in parentheses when it has any."""
        extra = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.name} ({extra})" if extra else self.name


@dataclass(frozen=True)
class Normalization:
    """The per-channel mean/std inputs are normalised with, and where that choice came from."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def to_dict(self) -> dict[str, Any]:
        """The normalisation as a JSON-able dict (``mean``, ``std``, ``source``)."""
        return {"mean": list(self.mean), "std": list(self.std), "source": self.source}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> Normalization:
        """The normalisation ``to_dict`` wrote; ``source`` when the dict names none."""
        return cls(tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]),
                   str(d.get("source") or source))


IMAGENET = Normalization(IMAGENET_MEAN, IMAGENET_STD, "ImageNet mean/std")
NO_NORMALIZATION = Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "none: inputs in [0, 1]")


@dataclass(frozen=True)
class ModelDescription:
    """Every fact featviz uses about a model.

    Attributes:
        arch: The architecture (None for a foreign module featviz did not build).
        kind: ``backbone`` (forward gives pooled features), ``classifier`` (forward gives logits)
            or ``segmenter`` (forward gives per-pixel logits).
        head: Module name of the classifier (``fc``, ``classifier``, ``head``, ``head.fc``) or of
            a segmenter's decoder head; None for a backbone.
        num_classes: Outputs of the classifier / segmenter; None for a backbone.
        class_names: Names of those classes when the source records them.
        normalization: Input mean/std and where they came from.
        input_size: Default input (H, W).
        method: The SSL / training method that produced the weights, when known.
        source: The checkpoint load report (format, path, container key, prefix, dropped keys,
            tensor counts); None for random weights.
        warnings: What the loader assumed or could not verify, one line each.
        library: The library that builds the module: ``torchvision``, ``timm``, ``transformers``,
            ``open_clip`` or ``featviz`` (None when unknown).
        pooling: How ``forward`` pools an image into one embedding, in words a manifest can state
            (``class token, normed``, ``average of patch tokens``, ``attention pool (MAP head)``,
            ``global average pool``); None when unknown.
        position_embedding: How a ViT knows where its patches are: ``learned (interpolated)``,
            ``rope``, ``learned + rope``, ``sin-cos (fixed)``; None for CNNs.
        random_init: The weights are featviz's seeded random initialisation (``--arch`` without a
            checkpoint; never with a ``source``): every sheet's title says so.
    """

    arch: ArchSpec | None = None
    kind: ModelKind = "backbone"
    head: str | None = None
    num_classes: int | None = None
    class_names: tuple[str, ...] = ()
    normalization: Normalization = IMAGENET
    input_size: tuple[int, int] = (224, 224)
    method: str | None = None
    source: dict[str, Any] | None = None
    warnings: tuple[str, ...] = ()
    library: str | None = None
    pooling: str | None = None
    position_embedding: str | None = None
    random_init: bool = False

    def __post_init__(self) -> None:
        if self.source is not None and self.random_init:  # weights read from a file are not featviz's init
            object.__setattr__(self, "random_init", False)

    @property
    def name(self) -> str:
        """The architecture name (``resnet50``, ``vit_small_patch16_224``, ``timm:convnext_atto``)."""
        return self.arch.name if self.arch is not None else "unknown"

    @property
    def random_weights(self) -> bool:
        """The weights are random: featviz's random initialisation, or a file that says so (its ``source``)."""
        return self.random_init or bool((self.source or {}).get("random_weights"))

    @property
    def has_classifier(self) -> bool:
        """Whether ``forward`` gives class logits (a classifier, not an encoder)."""
        return self.kind == "classifier"

    @property
    def format(self) -> str | None:
        """The checkpoint layout the weights were read from (None for random weights)."""
        return None if self.source is None else self.source.get("format")

    def with_changes(self, **changes: Any) -> ModelDescription:
        """A copy with some fields replaced (descriptions are frozen)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, as manifests record it."""
        return {
            "arch": None if self.arch is None else self.arch.to_dict(),
            "kind": self.kind, "head": self.head, "num_classes": self.num_classes,
            "class_names": list(self.class_names), "normalization": self.normalization.to_dict(),
            "input_size": list(self.input_size), "method": self.method, "source": self.source,
            "warnings": list(self.warnings), "library": self.library, "pooling": self.pooling,
            "position_embedding": self.position_embedding, "random_init": self.random_init,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelDescription:
        """Read back what ``to_dict`` wrote (e.g. from a manifest)."""
        return cls(
            arch=None if d.get("arch") is None else ArchSpec.from_dict(d["arch"]), kind=d.get("kind", "backbone"),
            head=d.get("head"), num_classes=d.get("num_classes"), class_names=tuple(d.get("class_names") or ()),
            normalization=Normalization.from_dict(d["normalization"]) if d.get("normalization") else IMAGENET,
            input_size=tuple(d.get("input_size") or (224, 224)), method=d.get("method"), source=d.get("source"),
            warnings=tuple(d.get("warnings") or ()), library=d.get("library"), pooling=d.get("pooling"),
            position_embedding=d.get("position_embedding"), random_init=bool(d.get("random_init", False)))


RANDOM_WEIGHTS = "RANDOM WEIGHTS (untrained)"
"""What a sheet's title starts with when the model's weights are featviz's random initialisation."""


def weights_caution(model: Any) -> str | None:
    """``RANDOM_WEIGHTS`` for a model with random weights (``ModelDescription.random_weights``), else None.

    ``model`` may also be its description: a ``ModelDescription`` or a dict with a ``random_init`` key
    (``to_dict``, a manifest's record of the model), for a figure drawn from files.
    """
    if isinstance(model, dict):
        source = model.get("source")
        random = bool(model.get("random_init")) or (isinstance(source, dict) and bool(source.get("random_weights")))
    else:
        random = (model if isinstance(model, ModelDescription) else describe(model)).random_weights
    return RANDOM_WEIGHTS if random else None


def with_caution(model: Any, title: str) -> str:
    """``title``, led by ``RANDOM WEIGHTS (untrained) · `` when the model has featviz's random initialisation.

    Every figure's title goes through it, so no picture of an untrained model passes for a trained one.
    ``model``: a model, its description (see ``weights_caution``), None (no caution), or a list of
    them for a figure of several models (``featviz compare``): the caution leads when any has random weights.
    """
    models = model if isinstance(model, list | tuple) else [model]
    caution = next((c for m in models if m is not None and (c := weights_caution(m))), None)
    return f"{caution} · {title}" if caution else title


def attach(model: Any, description: ModelDescription) -> Any:
    """Attach ``description`` to ``model`` (replacing any earlier one) and return the model."""
    setattr(model, ATTRIBUTE, description)
    return model


def describe(model: Any) -> ModelDescription:
    """The description attached to ``model``, or one derived from the module for foreign models."""
    desc = getattr(model, ATTRIBUTE, None)
    if isinstance(desc, ModelDescription):
        return desc
    inner = getattr(model, "module", None)  # DistributedDataParallel / DataParallel
    if inner is not None and isinstance(getattr(inner, ATTRIBUTE, None), ModelDescription):
        return getattr(inner, ATTRIBUTE)
    return _derive(model)


# ------------------------------------------------------------------ foreign modules
def _linear_head(model: Any) -> tuple[str, int] | None:
    """(module name, classes) of the model's final linear classifier, if it has one."""
    from torch import nn

    names: list[str] = []
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if isinstance(cfg.get("classifier"), str):  # timm names its classifier
        names.append(cfg["classifier"])
    names += ["fc", "classifier", "head", "head.fc"]
    for name in names:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(mod, nn.Sequential) and len(mod) and isinstance(mod[-1], nn.Linear):
            mod, name = mod[-1], f"{name}.{len(mod) - 1}"  # torchvision VGG / MobileNet style
        if isinstance(mod, nn.Linear) and mod.out_features > 0:
            return name, int(mod.out_features)
    return None


def _derive(model: Any) -> ModelDescription:
    """A minimal description of a module featviz did not build: the one place with heuristics.

    A final ``nn.Linear`` named like a classifier makes it a classifier; timm's
    ``pretrained_cfg`` gives normalisation and input size; a ViT's ``patch_embed.img_size``
    gives the input size; otherwise ImageNet mean/std and 224 px are assumed (and said so).
    """
    head = _linear_head(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("mean") and cfg.get("std"):
        norm = Normalization(tuple(cfg["mean"]), tuple(cfg["std"]),
                             f"timm pretrained_cfg of {cfg.get('architecture', type(model).__name__)}")
    else:
        norm = Normalization(IMAGENET_MEAN, IMAGENET_STD, "ImageNet mean/std (assumed: the model does not say)")
    size: tuple[int, int] = (224, 224)
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img:
        size = (int(img[0]), int(img[1]))
    elif cfg.get("input_size"):
        size = (int(cfg["input_size"][1]), int(cfg["input_size"][2]))
    arch = ArchSpec("timm", f"timm:{cfg['architecture']}") if cfg.get("architecture") else None
    class_names = tuple(str(c) for c in getattr(model, "class_names", None) or ())
    return ModelDescription(arch=arch, kind="classifier" if head else "backbone", head=head[0] if head else None,
                            num_classes=head[1] if head else None, class_names=class_names, normalization=norm,
                            input_size=size)
