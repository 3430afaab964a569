"""Read SSL checkpoints safely, detect their layout, and pull a verified encoder out of them.

Three steps, each its own function (``shared/reference/style-anchors.md`` §4.7):

1. ``read_checkpoint``: sniff the first bytes (HTML page, truncated zip, TorchScript, plain
   pickle, safetensors), then ``torch.load(..., weights_only=True)`` with a small allow-list.
2. ``detect_format``: every registered layout has a ``detect`` predicate and a specificity; of the
   layouts that match, the most specific wins. No match, or several equally specific ones, are
   errors that show the keys and suggest ``--format``.
3. The layout's ``extract`` unwraps the container, strips the prefix (always with its trailing
   dot), and drops heads and momentum/target encoders by name. Any key it cannot account for is
   an error, never a silent ``strict=False``.

``load_backbone`` then builds the architecture (given, from metadata, or inferred from shapes),
checks every shape, loads, and returns the encoder plus a ``LoadReport``.

The modules: ``reader`` (safe reading), ``layouts`` (the layout registry and the helpers layouts are
written with), ``detection`` (``detect_format``), one module per family of layouts
(``resnet_layouts``, ``vit_layouts``, ``classifier_layouts``), ``featviz_format`` (featviz's own
files), ``backbone`` (``load_backbone``, ``LoadReport``, ``convert_checkpoint``). This package
imports them lazily, on first use of a name, so importing it stays light (no torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "FEATVIZ_META_KEY": "reader",
    "Checkpoint": "reader",
    "allowed_globals": "reader",
    "read_checkpoint": "reader",
    "sniff": "reader",
    "FORMATS": "detection",  # from detection: every family module registered
    "Extracted": "layouts",
    "Format": "layouts",
    "GENERIC": "layouts",
    "REPOSITORY": "layouts",
    "SELF_DESCRIBED": "layouts",
    "register_layout": "layouts",
    "detect_format": "detection",
    "featviz_metadata": "featviz_format",
    "read_featviz": "featviz_format",
    "save_featviz": "featviz_format",
    "LoadReport": "backbone",
    "convert_checkpoint": "backbone",
    "load_backbone": "backbone",
}

__all__ = [
    "FEATVIZ_META_KEY",
    "FORMATS",
    "Checkpoint",
    "Extracted",
    "Format",
    "GENERIC",
    "LoadReport",
    "REPOSITORY",
    "SELF_DESCRIBED",
    "allowed_globals",
    "convert_checkpoint",
    "detect_format",
    "featviz_metadata",
    "load_backbone",
    "read_checkpoint",
    "read_featviz",
    "register_layout",
    "save_featviz",
    "sniff",
]

if TYPE_CHECKING:
    from featviz.models.checkpoints.backbone import LoadReport, convert_checkpoint, load_backbone
    from featviz.models.checkpoints.detection import FORMATS, detect_format
    from featviz.models.checkpoints.featviz_format import featviz_metadata, read_featviz, save_featviz
    from featviz.models.checkpoints.layouts import (
        GENERIC,
        REPOSITORY,
        SELF_DESCRIBED,
        Extracted,
        Format,
        register_layout,
    )
    from featviz.models.checkpoints.reader import (
        FEATVIZ_META_KEY,
        Checkpoint,
        allowed_globals,
        read_checkpoint,
        sniff,
    )


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use (PEP 562) and keep the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
