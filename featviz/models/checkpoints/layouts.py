"""The layout registry and the helpers a layout adapter is written with.

A layout (``Format``) has a ``detect`` predicate, an ``extract`` adapter and a ``specificity``; it
is registered in ``FORMATS`` by ``register_layout`` beside its definition in a family module
(``resnet_layouts``, ``vit_layouts``, ``classifier_layouts``, ``featviz_format``). When several
layouts detect a file, the most specific wins (``featviz.models.checkpoints.detection``), so a new
layout never has to narrow an older, more generic one's predicate; two equally specific matches
are an ambiguity error. ``extract`` unwraps the container, strips the prefix (always with its
trailing dot), and drops heads and momentum/target encoders by name (``_finish``); any key it
cannot account for is an error, never a silent ``strict=False``.

Adding a layout: write a class with static ``detect(ck) -> bool`` and ``extract(ck, opts) ->
Extracted`` in the family module it belongs to, decorated with ``@register_layout(name, title)``
(``specificity=GENERIC`` for a layout recognised by parameter names alone); add the name to
``featviz.cli.choices.FormatName``, a built case to ``tests/test_checkpoints.py`` and a row to
``docs/checkpoints.md`` (tests check all three against ``FORMATS``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from featviz.errors import CheckpointError, shorten
from featviz.models.checkpoints.reader import Checkpoint
from featviz.models.description import IMAGENET_MEAN, IMAGENET_STD, ArchSpec, Normalization
from featviz.registry import Registry

Converter = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]


@dataclass
class Extracted:
    """What a layout adapter pulls out of a checkpoint.

    Attributes:
        state_dict: The encoder tensors (prefix stripped, heads dropped). Layouts whose files may
            hold a real classifier (``keeps_classifier``) leave it in; ``load_backbone`` splits it off
            by the architecture's classifier name.
        arch / arch_source: An architecture the layout knows (metadata, its own conventions).
        num_heads: A ViT head count the source's convention fixes.
        normalization: The source's input normalisation; None: unknown, the architecture's
            default is used and a warning says so.
        convert: Maps the tensors to the built model's names (timm's checkpoint filter), after
            the model is built on the meta device.
        input_size: The input size the source evaluates at, when it differs from the model's.
        method: The SSL / training method that produced the weights.
    """

    state_dict: dict[str, torch.Tensor]
    container_key: str | None
    prefix: str
    dropped: dict[str, int]
    arch: ArchSpec | None = None
    arch_source: str = "checkpoint metadata"
    num_heads: int | None = None
    normalization: Normalization | None = None
    warnings: list[str] = field(default_factory=list)
    source: str = ""
    keeps_classifier: bool = False
    convert: Converter | None = None
    input_size: tuple[int, int] | None = None
    method: str | None = None


GENERIC = 0
"""Specificity of a layout recognised by parameter names alone (timm, torchvision): a
repository's own layout that also detects the file wins over it."""
REPOSITORY = 10
"""Specificity of a repository's own layout (its container keys, prefixes, heads): the default."""
SELF_DESCRIBED = 20
"""Specificity of a file that says what it is (featviz's own metadata)."""


@dataclass(frozen=True)
class Format:
    """A checkpoint layout: where it comes from, how to recognise it, how to extract the encoder.

    Attributes:
        name: The ``--format`` name.
        title: Where the layout comes from (shown by ``featviz inspect`` and in errors).
        detect: Whether a checkpoint looks like this layout.
        extract: Pulls the encoder out of a checkpoint of this layout (``opts``: ``checkpoint_key``,
            ``keep_classifier``).
        specificity: Of the layouts that detect a file, the one with the highest specificity
            wins; two equal ones are an ambiguity (``GENERIC``, ``REPOSITORY``, ``SELF_DESCRIBED``).
    """

    name: str
    title: str
    detect: Callable[[Checkpoint], bool]
    extract: Callable[[Checkpoint, dict[str, Any]], Extracted]
    specificity: int = REPOSITORY


FORMATS: Registry[Format] = Registry("checkpoint format")


def register_layout(name: str, title: str, *, specificity: int = REPOSITORY) -> Callable[[type], type]:
    """Class decorator registering a layout in ``FORMATS``.

    Args:
        name: The ``--format`` name.
        title: Where the layout comes from.
        specificity: ``REPOSITORY`` (default), ``GENERIC`` or ``SELF_DESCRIBED``; see ``Format``.

    Returns:
        A decorator for a class with static ``detect(ck)`` and ``extract(ck, opts)``; the class
        is returned unchanged.
    """

    def deco(cls: type) -> type:
        FORMATS.register(name)(Format(name, title, cls.detect, cls.extract, specificity))
        return cls

    return deco


def _is_sd(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _inner(ck: Checkpoint, key: str) -> dict[str, torch.Tensor] | None:
    obj = ck.obj
    if isinstance(obj, dict) and key in obj and _is_sd(obj[key]):
        return obj[key]
    return None


def _has(sd: dict | None, *prefixes: str) -> bool:
    return bool(sd) and any(k.startswith(prefixes) for k in sd)


def _imagenet(method: str) -> Normalization:
    return Normalization(IMAGENET_MEAN, IMAGENET_STD, f"ImageNet mean/std, as {method} evaluates")


def _split(sd: dict[str, torch.Tensor], prefix: str, *, drop: tuple[str, ...] = (),
           drop_inside: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, int], list[str]]:
    """Strip ``prefix`` (with its dot) and drop heads.

    Drops ``drop`` prefixes (or exact names) outside the prefix and ``drop_inside`` prefixes (or
    exact names) inside it. Returns the encoder tensors, counts of dropped keys per prefix, and keys nobody claimed.
    """
    out: dict[str, torch.Tensor] = {}
    dropped: Counter[str] = Counter()
    unclaimed: list[str] = []
    for k, v in sd.items():
        if k.startswith(prefix):
            rest = k[len(prefix):]
            head = next((d for d in drop_inside if rest.startswith(d) or rest == d.rstrip(".")), None)
            if head:
                dropped[prefix + head] += 1
            else:
                out[rest] = v
        else:
            d = next((d for d in drop if k.startswith(d) or k == d.rstrip(".")), None)
            if d:
                dropped[d] += 1
            else:
                unclaimed.append(k)
    return out, dict(dropped), unclaimed


def _finish(ck: Checkpoint, sd: dict, key: str | None, prefix: str, opts: dict, *, drop=(),
            drop_inside=(), **kw) -> Extracted:
    body, dropped, unclaimed = _split(sd, prefix, drop=drop, drop_inside=drop_inside)
    if unclaimed:
        raise CheckpointError(
            f"{ck.path.name}: {len(unclaimed)} keys outside the encoder prefix {prefix!r} are not a known head "
            f"of this layout: {shorten(unclaimed)}; pass --format to choose another layout")
    if not body:
        raise CheckpointError(f"{ck.path.name}: no tensors under prefix {prefix!r}")
    return Extracted(body, key, prefix, dropped, **kw)


def _opt_module(sd: dict, prefix: str) -> tuple[str, str]:
    """The prefix actually used, and the wrapper part to put before the layout's sibling keys.

    ``module.`` is optional (models saved without DDP): the wrapper part is ``"module."`` or ``""``.
    """
    m = "module." if _has(sd, f"module.{prefix}") else ""
    return m + prefix, m


def _vit_names(sd: dict | None) -> bool:
    return bool(sd) and "patch_embed.proj.weight" in sd and any(k.startswith("blocks.0.") for k in sd)


def _key_choice(opts: dict, allowed: tuple[str, ...], default: str, layout: str) -> str:
    key = opts.get("checkpoint_key") or default
    if key not in allowed:
        raise CheckpointError(f"--checkpoint-key {key!r} does not exist in a {layout} checkpoint; "
                              f"expected one of {', '.join(allowed)} (default {default})")
    return key


_PROJECTOR = ("fc.", "head.")  # SSL projection heads where a classifier would sit


def _torchvision_names(sd: dict | None) -> bool:
    return bool(sd) and "conv1.weight" in sd and any(k.startswith("layer1.") for k in sd)
