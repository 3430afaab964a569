"""Input sizes for the map commands (``attention``, ``pca``): ``--image-size N | HxW``.

The rule is ``featviz cam``'s: no size means the model's own square size, ``N`` means a resize of
the short side to ``N / 0.875`` and a centre crop of ``N × N`` (the ImageNet evaluation crop),
``HxW`` means a resize to exactly ``H × W`` (any aspect ratio). A ViT needs both sides to be
multiples of its patch size; other sizes are refused, with the nearest valid ones named.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from featviz.errors import DataError

Size = tuple[int, int]


def parse_image_size(size: int | str | Sequence[int] | None, default: int) -> Size:
    """``None`` / ``N`` / ``"N"`` / ``"HxW"`` / ``(H, W)`` as ``(H, W)``.

    Raises:
        DataError: not of those forms, or a side < 1.
    """
    if size is None:
        h = w = int(default)
    elif isinstance(size, int):
        h = w = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:[x×,]\s*(\d+))?\s*", size)
        if not m:
            raise DataError(f"--image-size {size!r}: expected N or HxW (e.g. 224 or 224x320)")
        h, w = int(m[1]), int(m[2] or m[1])
    else:
        h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise DataError(f"--image-size must be positive, got {h}x{w}")
    return h, w


def patch_size(model: Any) -> Size | None:
    """A ViT's patch size ``(ph, pw)``; None for models without a patch embedding."""
    pe = getattr(model, "patch_embed", None)
    p = getattr(pe, "patch_size", None)
    if p is None:
        return None
    return (int(p), int(p)) if isinstance(p, int) else (int(p[0]), int(p[1]))


def check_patch_multiple(model: Any, hw: Size) -> None:
    """Refuse an input size a ViT cannot split into whole patches.

    Raises:
        DataError: a side is not a multiple of the patch size; names the nearest valid sizes.
    """
    p = patch_size(model)
    if p is None or (hw[0] % p[0] == 0 and hw[1] % p[1] == 0):
        return

    def near(v: int, q: int) -> str:
        lo = max(q, v // q * q)
        return f"{lo}" if lo == v else f"{lo} or {lo + q}"

    raise DataError(
        f"--image-size {hw[0]}x{hw[1]} is not a multiple of the ViT's patch size {p[0]}x{p[1]}; "
        f"use a height of {near(hw[0], p[0])} and a width of {near(hw[1], p[1])}"
    )


def eval_transform(hw: Size, mean: Sequence[float], std: Sequence[float]):
    """The torchvision transform for ``hw`` (square: resize + centre crop; else: exact resize)."""
    from featviz import data

    if hw[0] == hw[1]:
        return data.eval_transform(hw[0], mean, std)
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(hw, interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
