"""The SSL methods' registration type and registry, and ``build_method``.

``MethodRegistration`` (with ``DataContext`` for its data-dependent defaults) and ``SSL_METHODS``;
``build_method`` instantiates a registered method around a backbone. Segmentation methods have
their own registry, ``featviz.train.segmentation.registry.SEG_METHODS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from featviz.data.augment import Recipe
from featviz.registry import Registry
from featviz.train.methods.base import SSLMethod, zero_init_residual
from featviz.train.optim import Optim


# ---------------------------------------------------------------- registration
@dataclass(frozen=True)
class DataContext:
    """What a method's data-dependent defaults depend on."""

    n_train: int
    batch_size: int
    epochs: int
    image_size: int
    feature_dim: int = 2048
    world_size: int = 1
    family: str = "resnet"

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch (at least 1)."""
        return max(1, self.n_train // self.batch_size)


@dataclass(frozen=True)
class MethodRegistration:
    """Everything that defines one SSL method, in one place.

    Attributes:
        name: the registered name (``featviz train --method``).
        model: the ``SSLMethod`` class.
        recipe: the official training views.
        official: the official optimiser and schedule.
        optim: featviz's default (``official`` unless a CPU-sized run needs another; see
            ``deviations``).
        hparams: constructor defaults that differ from the class's (official values).
        defaults: data-dependent hyperparameters (``DataContext`` -> constructor kwargs).
        local_crops: featviz's default number of multi-crop local crops (0: none).
        official_local_crops: the official number.
        sync_bn: convert BatchNorm to SyncBatchNorm under CUDA DDP (MoCo v2: no, it shuffles).
        zero_init_residual: zero-init the last BN of each residual block (torchvision's flag).
        variants: per backbone family (``vit``) overrides of these fields.
        presets: per built-in dataset, the measured defaults (``TrainConfig`` keys), measured on
            ResNets: other backbone families do not take them (``for_family``).
        source: the official repository files.
        deviations: what featviz does differently by default, and why.
        default_arch: the backbone when ``--arch`` is not given.
        default_image_size: the training crop when neither ``--image-size`` nor a preset gives one
            (None: the architecture's input size).
    """

    name: str
    model: type
    recipe: Recipe | None = None
    official: Optim | None = None
    optim: Optim | None = None
    hparams: Mapping[str, Any] = field(default_factory=dict)
    defaults: Callable[[DataContext], dict[str, Any]] | None = None
    local_crops: int = 0
    official_local_crops: int = 0
    sync_bn: bool = True
    zero_init_residual: bool = False
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: str = ""
    deviations: tuple[str, ...] = ()
    default_arch: str = "resnet18_w16-cifar"
    default_image_size: int | None = None

    @property
    def multi_crop(self) -> bool:
        """Whether the recipe has local crops (SwAV, DINO multi-crop)."""
        return self.recipe is not None and self.recipe.local is not None

    def for_family(self, family: str) -> MethodRegistration:
        """This spec for a backbone family (``resnet``, ``vit``, ``timm``).

        The dataset presets were measured on ResNets (an optimiser, lr and head choices for a
        16 px CNN), so another family keeps only the presets its variant states.
        """
        changes = dict(self.variants.get(family, {}))
        if family != "resnet":
            changes.setdefault("presets", {})
        if "hparams" in changes:
            changes["hparams"] = {**self.hparams, **changes["hparams"]}
        return replace(self, **changes) if changes else self


SSL_METHODS: Registry[MethodRegistration] = Registry("method")


def register(spec: MethodRegistration) -> MethodRegistration:
    """Register ``spec`` under its name (duplicates raise ``ValueError``)."""
    return SSL_METHODS.register(spec.name)(spec)


# ---------------------------------------------------------------- the digits preset (every method's)
def _digits(**changes: Any) -> dict[str, Any]:
    """A digits preset: what was measured to work on scikit-learn's 8x8 digits.

    The 1797 images are upsampled; see docs/train.md. Digits' identity survives neither a horizontal flip nor a
    small crop; 16 px holds all of an 8x8 image, and batch 32 gives 45 steps an epoch where 64
    gave 22 (ten epochs of 22 steps left most methods below a random-init encoder). The lr is
    absolute, chosen per method by the held-out kNN `featviz train` logs. MoCo v3, BYOL, Barlow
    Twins and SwAV take their official layer-wise optimiser (LARS, SwAV LARC), DINO LARC too (its
    official ResNet recipe is plain SGD), and the ones measured to gain from it a small random
    rotation and shear (handwriting's slant), in place of the crops digits cannot take.
    """
    base: dict[str, Any] = {"image_size": 16, "batch_size": 32, "epochs": 10, "lr": 0.1, "min_scale": 0.8,
                            "hflip": False}
    return {**base, **changes}


def arch_family(backbone: nn.Module) -> str:
    """The backbone family whose variant of a registration applies: ``resnet``, ``vit`` or ``timm``.

    Read from the model description (``featviz.models.description.describe``); a module featviz
    did not build counts as a ViT when it has a ``patch_embed``, else as a ResNet.
    """
    from featviz.models.description import describe

    arch = describe(backbone).arch
    if arch is not None:
        return arch.family
    return "vit" if hasattr(backbone, "patch_embed") else "resnet"


def build_method(name: str, backbone: nn.Module, **kwargs: Any) -> SSLMethod:
    """Instantiate a registered SSL method around ``backbone`` with its official defaults.

    ``kwargs`` override the registration's ``hparams`` (e.g. ``queue_size``, ``tau``); an
    unknown name raises ``UnknownNameError`` listing the method's hyperparameters.
    """
    import inspect

    from featviz.errors import UnknownNameError
    from featviz.train.segmentation.registry import SEG_METHODS

    if name in SEG_METHODS:
        raise UnknownNameError(f"{name!r} is a segmentation method; it has no SSLMethod to build")
    spec = SSL_METHODS.get(name).for_family(arch_family(backbone))
    zero_init = bool(kwargs.pop("zero_init_residual", spec.zero_init_residual))
    cls = spec.model
    sig = inspect.signature(cls.__init__).parameters
    allowed = [p for p in sig if p not in ("self", "backbone")]
    bad = [k for k in kwargs if k not in allowed]
    if bad:
        raise UnknownNameError(f"{name} has no hyperparameter {bad[0]!r}; expected one of: "
                               f"{', '.join([*allowed, 'zero_init_residual'])}")
    for k, v in kwargs.items():  # values from the command line: check their type against the default
        default = spec.hparams.get(k, sig[k].default)
        if default is inspect.Parameter.empty or default is None or v is None:
            continue
        ok = isinstance(v, bool) if isinstance(default, bool) else \
            (isinstance(v, (int, float)) and not isinstance(v, bool)) if isinstance(default, (int, float)) else True
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(v, float) and not v.is_integer():
            ok = False
        if not ok:
            from featviz.errors import DataError

            raise DataError(f"{name} hyperparameter {k}={v!r}: expected {type(default).__name__} (default {default!r})")
        if isinstance(default, int) and not isinstance(default, bool):
            kwargs[k] = int(v)
    hp = {**spec.hparams, **kwargs}
    if zero_init:
        zero_init_residual(backbone)
    method = cls(backbone, **hp)
    method.hparams = {**{k: sig[k].default for k in allowed}, **hp, "zero_init_residual": zero_init}
    return method
