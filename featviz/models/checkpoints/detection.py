"""Detect a checkpoint's layout: every registered layout's ``detect``; exactly one must match.

Importing this module imports every family module, so ``FORMATS`` holds every layout.
"""

from __future__ import annotations

from collections import Counter

import featviz.models.checkpoints.classifier_layouts  # noqa: F401 - each family module registers its layouts
import featviz.models.checkpoints.featviz_format  # noqa: F401
import featviz.models.checkpoints.resnet_layouts  # noqa: F401
import featviz.models.checkpoints.vit_layouts  # noqa: F401
from featviz.errors import CheckpointFormatError, shorten
from featviz.models.checkpoints.layouts import FORMATS, Format, _is_sd
from featviz.models.checkpoints.reader import Checkpoint


def detect_format(ck: Checkpoint) -> Format:
    """The one registered layout whose ``detect`` matches ``ck``.

    Raises:
        CheckpointFormatError: none or several match; shows keys and suggests ``--format``.
    """
    hits = [f for _, f in FORMATS.items() if f.detect(ck)]
    if len(hits) == 1:
        return hits[0]
    summary = _describe_keys(ck)
    if not hits:
        raise CheckpointFormatError(
            f"{ck.path.name}: keys match no known checkpoint layout; {summary}; "
            f"pass --format ({', '.join(FORMATS.names())}) if you know the source")
    raise CheckpointFormatError(
        f"{ck.path.name}: layout is ambiguous, it matches {', '.join(f.name for f in hits)}; {summary}; "
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
