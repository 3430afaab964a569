"""Class masks: reading one (``read_mask``), their class names, the ignore value and the shared checks.

Torch-free.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from featviz.errors import DataError

IGNORE_INDEX = 255
"""Mask value of unlabelled pixels (VOC's boundary value; CAC's and torch's ``ignore_index``)."""


def check_same_size(mask_wh: tuple[int, int], image_wh: tuple[int, int], *, mask: str = "mask",
                    image: str = "its image") -> None:
    """A mask must have its image's size (``(width, height)`` pairs, as Pillow's ``size``).

    Raises:
        DataError: the sizes differ (both named).
    """
    if tuple(mask_wh) != tuple(image_wh):
        raise DataError(f"{mask} is {mask_wh[0]}x{mask_wh[1]} but {image} is {image_wh[0]}x{image_wh[1]}; "
                        "a mask must have its image's size")


def array_wh(mask: np.ndarray) -> tuple[int, int]:
    """``(width, height)`` of an (H, W) mask array."""
    shape = np.asarray(mask).shape
    return int(shape[1]), int(shape[0])


def check_values(mask: np.ndarray, class_names: Sequence[str], *, name: str = "mask",
                 ignore_index: int = IGNORE_INDEX) -> None:
    """Every labelled value of ``mask`` must name a class of ``class_names`` (when there are names).

    Raises:
        DataError: a value at or above ``len(class_names)`` that is not ``ignore_index``.
    """
    if not class_names:
        return
    m = np.asarray(mask)
    bad = (m != ignore_index) & ((m < 0) | (m >= len(class_names)))
    if bad.any():
        values = np.unique(m[bad])
        shown = ", ".join(str(int(v)) for v in values[:5]) + (" …" if len(values) > 5 else "")
        raise DataError(f"{name} has value(s) {shown}, but classes.txt names {len(class_names)} classes "
                        f"(values 0..{len(class_names) - 1}, {ignore_index} = ignore); fix the mask or classes.txt")


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A single-channel class mask (palette indices or grey levels) as (H, W) int64.

    Raises:
        DataError: unreadable, or a colour (RGB) mask.
    """
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L", "I", "I;16", "1"):
                raise DataError(f"mask {str(path)!r} is {im.mode}; expected a single-channel class-index PNG "
                                "(palette or grey values = class ids, 255 = ignore)")
            return np.asarray(im).astype(np.int64)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is a data problem
        raise DataError(f"mask {str(path)!r} is not a readable image ({e})") from None


def find_class_names(masks_dir: Path) -> list[str]:
    """Class names from a ``classes.txt`` in the mask folder or its parent (VOC-like layout)."""
    for cand in (masks_dir / "classes.txt", masks_dir.parent / "classes.txt"):
        if cand.is_file():
            return [ln.strip() for ln in cand.read_text().splitlines() if ln.strip()]
    return []
