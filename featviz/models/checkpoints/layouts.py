"""The layout registry and the helpers a layout adapter is written with.

A layout (``Format``) has a ``detect`` predicate and an ``extract`` adapter, registered in
``FORMATS`` by ``_fmt`` beside its definition in a family module (``resnet_layouts``,
``vit_layouts``, ``classifier_layouts``, ``featviz_format``). ``extract`` unwraps the container,
strips the prefix (always with its trailing dot), and drops heads and momentum/target encoders by
name (``_finish``); any key it cannot account for is an error, never a silent ``strict=False``.
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


@dataclass(frozen=True)
class Format:
    """A checkpoint layout: where it comes from, how to recognise it, how to extract the encoder."""

    name: str
    title: str
    detect: Callable[[Checkpoint], bool]
    extract: Callable[[Checkpoint, dict[str, Any]], Extracted]


FORMATS: Registry[Format] = Registry("checkpoint format")


def _fmt(name: str, title: str):
    def deco(cls):
        FORMATS.register(name)(Format(name, title, cls.detect, cls.extract))
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
    """Strip ``prefix`` (with its dot); drop ``drop`` prefixes (or exact names) outside it and
    ``drop_inside`` prefixes (or exact names) inside it.

    Returns the encoder tensors, counts of dropped keys per prefix, and keys nobody claimed.
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
    """``module.`` is optional (models saved without DDP): the prefix actually used, and the
    wrapper part (``"module."`` or ``""``) to put before the layout's sibling keys."""
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
