"""What matters about a model for probing its features, in one JSON-able dict (``featviz inspect``).

``model_facts`` reads the model's description (``featviz.models.description.describe``: the loader
fills ``library``, ``pooling`` and ``position_embedding`` for what it builds) and the module itself
through the feature core (patch size, prefix tokens by kind at the native size). When a
description leaves a field None (a module handed to the Python API, or a loader that does not
say), it is derived here from the module, by one rule each:

- library: the package that defines the module's class (``timm``, ``torchvision``,
  ``transformers``, ``open_clip``, ``featviz``);
- pooling: timm's ``global_pool`` (``token``: the normed class token, ``avg``: the average of the
  patch tokens, ``map``: attention pooling; a CNN's pool, on the model or its ``head``, and the norm
  after it), torchvision's ``avgpool``;
- position embedding: a ``rope`` module means rotary embeddings, a ``pos_embed`` tensor learned
  positions (interpolated to the input's grid), both ``learned + rope``, neither ``none``;
- normalisation: named from its numbers (ImageNet, SigLIP's 0.5/0.5, CLIP's own).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from featviz.models.description import IMAGENET_MEAN, IMAGENET_STD, describe

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
if TYPE_CHECKING:
    from torch import nn

_NAMED_NORMALIZATIONS = (
    ("ImageNet", IMAGENET_MEAN, IMAGENET_STD),
    ("SigLIP (0.5/0.5)", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ("CLIP (OpenAI's own)", CLIP_MEAN, CLIP_STD),
    ("none (inputs in [0, 1])", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
)
_LIBRARIES = ("timm", "torchvision", "transformers", "open_clip", "featviz")
_TIMM_POOLING = {
    "token": "class token, normed",
    "avg": "average of patch tokens, normed",
    "avgmax": "average and max of patch tokens",
    "max": "max of patch tokens",
    "map": "attention pool (MAP head)",
    "": "none: the tokens themselves",
}


def model_facts(model: nn.Module) -> dict[str, Any]:
    """The facts ``featviz inspect`` shows about ``model`` (see the module docstring for the rules).

    Returns:
        ``family``, ``arch``, ``library``, ``patch_size`` ([H, W] or None), ``tokens`` (the token
        layout at the native size: ``grid``, ``class``, ``register``, ``other``,
        ``excluded_from_maps``; None without patch tokens), ``position_embedding``, ``pooling``,
        ``normalization`` (``name``, ``mean``, ``std``, ``source``), ``native_size`` ([H, W]).
    """
    from featviz.models.features import patch_size, token_layout

    desc = describe(model)
    patch = patch_size(model)
    native = (int(desc.input_size[0]), int(desc.input_size[1]))
    layout = None
    if patch is not None:
        try:
            layout = token_layout(model, native)
        except Exception:  # noqa: BLE001 - a native size the module cannot take: the layout stays unknown
            layout = None
    norm = desc.normalization
    traits = model_traits(model)
    return {
        "family": _family(model, desc, patch),
        "arch": desc.name,
        "library": desc.library or traits["library"],
        "patch_size": None if patch is None else list(patch),
        "tokens": None if layout is None else layout.to_dict(),
        "position_embedding": desc.position_embedding or traits["position_embedding"],
        "pooling": desc.pooling or traits["pooling"],
        "normalization": {"name": normalization_name(norm.mean, norm.std), "mean": list(norm.mean),
                          "std": list(norm.std), "source": norm.source},
        "native_size": list(native),
    }


def _family(model: nn.Module, desc: Any, patch: tuple[int, int] | None) -> str:
    """The description's family (``resnet``, ``vit``), else ``vit``/``cnn`` with the module's class (``vit (Eva)``)."""
    family = desc.arch.family if desc.arch is not None else None
    if family == "transformers":  # hf:DINOv3ViTModel -> vit (DINOv3ViTModel)
        return f"{'vit' if patch is not None else 'cnn'} ({desc.arch.name.removeprefix('hf:')})"
    if family not in (None, "timm"):
        return family
    return f"{'vit' if patch is not None else 'cnn'} ({type(model).__name__})"


def model_traits(model: nn.Module, *, projection: bool = False) -> dict[str, str | None]:
    """Which library builds ``model``, how ``forward`` pools an image, how it encodes positions.

    The one rule, read from the built module: the loaders record it in the description
    (``library``, ``pooling``, ``position_embedding``), and ``model_facts`` falls back to it for
    modules featviz did not build. ``projection``: a CLIP tower's projection (an ``ArchSpec``
    ``projection`` kwarg) is part of the embedding.
    """
    from featviz.models.features import patch_size

    return {"library": library_of(model), "pooling": pooling_of(model, projection=projection),
            "position_embedding": position_embedding_of(model, patch_size(model))}


def library_of(model: nn.Module) -> str | None:
    """The package that defines the module's class (``timm.models.eva`` -> ``timm``); None if unknown."""
    top = type(model).__module__.split(".")[0]
    return top if top in _LIBRARIES else None


def pooling_of(model: nn.Module, *, projection: bool = False) -> str | None:
    """How ``forward`` pools, from the module; None if unknown.

    timm's ``global_pool`` (the class token or the patch average is ``normed`` when a norm follows,
    ``projected (head)`` when a CLIP tower's projection is part of the embedding), a CNN's pool on
    the model or its ``head`` and the norm after it, torchvision's ``avgpool``.
    """
    from torch import nn

    def applied(m: Any) -> bool:
        return m is not None and not isinstance(m, nn.Identity)

    pool = getattr(model, "global_pool", None)
    if isinstance(pool, str):
        name = _TIMM_POOLING.get(pool, pool)
        if pool == "token" and not applied(getattr(model, "norm", None)):
            name = "class token"
        elif pool == "avg" and not (applied(getattr(model, "fc_norm", None)) or applied(getattr(model, "norm", None))):
            name = "average of patch tokens"
        return name + (", projected (head)" if projection else "")
    head = getattr(model, "head", None)
    pool = pool if pool is not None else getattr(head, "global_pool", None)  # timm ConvNeXt: head.global_pool
    pool_type = getattr(pool, "pool_type", None)  # timm CNNs: SelectAdaptivePool2d
    if isinstance(pool_type, str):
        then_norm = applied(getattr(head, "norm", None))  # NormMlpClassifierHead
        name = "global average pool" if pool_type in ("avg", "fast", "fastavg") else f"global {pool_type} pool"
        return name + (", then norm" if then_norm else "")
    if isinstance(getattr(model, "avgpool", None), nn.AdaptiveAvgPool2d):  # torchvision CNNs
        return "global average pool"
    return None


def position_embedding_of(model: nn.Module, patch: tuple[int, int] | None) -> str | None:
    """How a ViT encodes positions, from the module; None for a model without patch tokens."""
    from torch import nn

    if patch is None:
        return None
    rope = getattr(model, "rope", None) is not None or getattr(model, "rope_embed", None) is not None
    learned = isinstance(getattr(model, "pos_embed", None), nn.Parameter)
    if rope and learned:
        return "learned + rope"
    if rope:
        return "rope"
    return "learned (interpolated)" if learned else "none"


def normalization_name(mean: Any, std: Any) -> str:
    """ImageNet, SigLIP's 0.5/0.5, CLIP's own, none, or ``custom`` (compared to 1e-4)."""
    for name, m, s in _NAMED_NORMALIZATIONS:
        if len(mean) != len(m) or len(std) != len(s):
            continue
        if all(abs(float(a) - b) < 1e-4 for a, b in (*zip(mean, m, strict=True), *zip(std, s, strict=True))):
            return name
    return "custom"
