"""Detect a checkpoint's layout: of the registered layouts whose ``detect`` matches, the most specific.

Importing this module imports every family module, so ``FORMATS`` holds every layout.
"""

from __future__ import annotations

from collections import Counter

import featviz.models.checkpoints.classifier_layouts  # noqa: F401 - each family module registers its layouts
import featviz.models.checkpoints.featviz_format  # noqa: F401
import featviz.models.checkpoints.foundation_layouts  # noqa: F401
import featviz.models.checkpoints.resnet_layouts  # noqa: F401
import featviz.models.checkpoints.vit_layouts  # noqa: F401
from featviz.errors import CheckpointFormatError, shorten
from featviz.models.checkpoints.layouts import FORMATS, Format, _is_sd
from featviz.models.checkpoints.reader import Checkpoint
from featviz.registry import Registry


def detect_format(ck: Checkpoint, formats: Registry[Format] | None = None) -> Format:
    """The most specific registered layout whose ``detect`` matches ``ck``.

    Every layout's ``detect`` is asked; of those that match, the one with the highest
    ``specificity`` wins (a repository's own layout over timm's or torchvision's generic names,
    featviz's self-described files over both).

    Args:
        ck: The checkpoint, as ``read_checkpoint`` gives it.
        formats: The layouts to choose from (default: ``FORMATS``, every registered layout).

    Raises:
        CheckpointFormatError: none matches, or several equally specific ones do; shows keys and
            suggests ``--format``.
    """
    formats = FORMATS if formats is None else formats
    hits = [f for _, f in formats.items() if f.detect(ck)]
    top = max((f.specificity for f in hits), default=None)
    best = sorted((f for f in hits if f.specificity == top), key=lambda f: f.name)
    if len(best) == 1:
        return best[0]
    summary = _describe_keys(ck)
    if not hits:
        raise CheckpointFormatError(
            f"{ck.path.name}: keys match no known checkpoint layout; {summary}; "
            f"pass --format ({', '.join(formats.names())}) if you know the source")
    raise CheckpointFormatError(
        f"{ck.path.name}: layout is ambiguous, it matches {', '.join(f.name for f in best)}; {summary}; "
        "pass --format to choose")


def _describe_keys(ck: Checkpoint) -> str:
    obj = ck.obj
    if not isinstance(obj, dict):
        return f"top-level object is a {type(obj).__name__}, not a dict"
    if _is_sd(obj):
        prefixes = Counter(k.split(".", 1)[0] + "." for k in obj)
        return f"bare state_dict of {len(obj)} tensors, first names {shorten(list(obj), 3)}; prefixes " + \
            ", ".join(f"{p!r}({n})" for p, n in prefixes.most_common(5))
    parts = [f"top-level keys {shorten(sorted(map(str, obj)), 8)}"]
    for k, v in obj.items():
        if _is_sd(v):
            prefixes = Counter(".".join(n.split(".")[:2]) + "." for n in v)
            parts.append(f"{k!r} holds {len(v)} tensors with prefixes "
                         + ", ".join(f"{p!r}({n})" for p, n in prefixes.most_common(4)))
            break
    return "; ".join(parts)
