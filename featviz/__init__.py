"""featviz: visualize and diagnose the features that self-supervised vision models learn.

The top level imports nothing heavy; submodules load on first access (PEP 562), so
``import featviz`` and ``featviz --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("featviz")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.1.0+src"

_SUBMODULES = {
    "artifacts", "augment", "cam", "checkpoints", "collapse", "crops", "data", "demo", "description",
    "distributed", "embed", "errors", "features", "figure", "loader", "methods", "models", "outputs", "plotting",
    "registry", "segmentation", "train", "tsne", "views", "watch",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"featviz.{name}")
    raise AttributeError(f"module 'featviz' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
