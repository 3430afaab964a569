"""featviz's version as installed: the one place every manifest, output marker and ``--version`` read it.

Torch-free and rank 0 (it imports nothing of featviz), so any package may import it; the root package
re-exports it as ``featviz.__version__``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("featviz")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.1.0+src"
