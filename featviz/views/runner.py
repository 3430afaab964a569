"""What every view shares around its own computation: the images it reads and their ids."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path


def image_ids(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Image files under ``inputs`` and their ids (paths relative to the folder given; full paths
    when two inputs hold the same names)."""
    from featviz.data.images import find_images

    files: list[Path] = []
    ids: list[str] = []
    for item in inputs:
        root = Path(item)
        for f in find_images(root):
            files.append(f)
            ids.append(str(f.relative_to(root)) if root.is_dir() else f.name)
    if len(set(ids)) < len(ids):  # two inputs hold the same names: their overlays must not collide
        ids = [str(f) for f in files]
    return files, ids


def safe_stem(image_id: str) -> str:
    """A file-name stem for an image id (``cat/cat_0.jpg`` -> ``cat__cat_0``)."""
    stem = re.sub(r"\.[A-Za-z0-9]+$", "", image_id)
    return re.sub(r"[^A-Za-z0-9._-]+", "__", stem.replace("/", "__"))
