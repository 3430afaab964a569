"""featviz: visualize and diagnose the features that self-supervised vision models learn.

The top level imports nothing heavy; submodules load on first access (PEP 562), so
``import featviz`` and ``featviz --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from featviz.version import __version__  # noqa: F401 - featviz.__version__


def sample_data(*parts: str):
    """The bundled sample data folder (or a path inside it), wherever featviz is installed.

    ``featviz.sample_data()`` -> the folder; ``featviz.sample_data("photos")`` -> its photos.
    """
    from featviz.io.samples import sample_data as _find

    return _find(*parts)


def _submodules() -> set[str]:
    """The modules and packages of featviz, found on disk (so a new module needs no list entry)."""
    from pathlib import Path

    here = Path(__file__).parent
    return {p.stem for p in here.glob("[a-z]*.py")} | {p.name for p in here.iterdir()
                                                       if p.is_dir() and (p / "__init__.py").exists()}


def __getattr__(name: str) -> Any:
    if name in _submodules():
        return importlib.import_module(f"featviz.{name}")
    raise AttributeError(f"module 'featviz' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _submodules())
