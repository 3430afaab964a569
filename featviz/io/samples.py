"""Where featviz's bundled sample data is (torch-free).

The ``sample_data/`` folder of a source checkout, or the copy a ``pip install`` puts inside the
package.
"""

from __future__ import annotations

import os
from pathlib import Path

from featviz.errors import DataError

_PACKAGE = Path(__file__).resolve().parents[1]  # featviz/
_CANDIDATES = (_PACKAGE / "_sample_data", _PACKAGE.parent / "sample_data")  # installed, then a checkout


def sample_data(*parts: str) -> Path:
    """The bundled sample data folder, or a file/folder inside it (``sample_data("photos", "cat")``).

    Raises:
        DataError: the sample data is not installed, ``parts`` lead outside it (``..``, an absolute
            path, a link out), or name nothing inside it.
    """
    root = next((c for c in _CANDIDATES if (c / "photos").is_dir()), None)
    if root is None:
        raise DataError("featviz's sample data is not installed (looked in "
                        f"{', '.join(str(c) for c in _CANDIDATES)}); reinstall featviz (pip install featviz)")
    path = root.joinpath(*parts)
    real_root = os.path.realpath(root)
    if parts and os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise DataError(f"{'/'.join(parts)!r} is not inside the sample data; give a path inside it, "
                        "e.g. photos or checkpoints/moco_v2_tiny.pth.tar")
    if parts and not path.exists():
        names = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        raise DataError(f"the sample data has no {'/'.join(parts)!r}"
                        + (f"; {path.parent.name or 'it'} holds: {', '.join(names)}" if names else ""))
    return path
