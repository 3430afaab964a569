"""Foreground masks for ``featviz pca --recipe dinov3 --mask-dir``: found by name, read as DINOv3's notebook does.

Each image's mask goes through the image's own transform and is averaged over each patch (the
notebook's ``patch_quant_filter``), giving the foreground score that ``views.pca.dinov3_pca``
median-filters and cuts at 0.5.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from featviz.errors import DataError

_MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def find_mask(mask_dir: Path, image_id: str) -> Path | None:
    """The mask of ``image_id`` in ``mask_dir``: same relative path or same file name, any image extension."""
    rel = Path(image_id)
    for stem in (rel.with_suffix(""), Path(rel.stem)):
        for ext in _MASK_EXTENSIONS:
            for cand in (mask_dir / (str(stem) + ext), mask_dir / (str(stem) + ext.upper())):
                if cand.is_file():
                    return cand
    return None


def mask_scores(
    mask_dir: str | os.PathLike,
    files: Sequence[Path],
    ids: Sequence[str],
    *,
    hw: tuple[int, int],
    grid: tuple[int, int],
) -> np.ndarray:
    """(N, h, w) foreground scores: each image's mask, transformed as its image, averaged over each patch.

    A mask has its image's size; its last band is read (the alpha of an RGBA cut-out, as the
    notebook's ``split()[-1]``; the grey level of an L mask), as a share of 255, or as 0/1 when
    its values are 0 and 1 (class-index masks). It goes through the images' own transform
    (``data.images.eval_transform``: the same resize and crop), and is averaged over each patch
    of the ``grid`` (the notebook's ``patch_quant_filter``).

    Raises:
        DataError: no such folder, a missing mask, a mask of another size.
    """
    import torch
    from PIL import Image

    from featviz.data.images import eval_transform
    from featviz.data.masks import array_wh, check_same_size

    root = Path(mask_dir)
    if not root.is_dir():
        raise DataError(f"--mask-dir {root}: not a folder; give the folder of foreground masks named like the images")
    transform = eval_transform(hw, (0.0,), (1.0,))
    scores = []
    for f, i in zip(files, ids, strict=True):
        path = find_mask(root, i)
        if path is None:
            raise DataError(
                f"no mask for {i} in {root} (looked for {Path(i).with_suffix('.png')} and {Path(i).stem}.<ext>); "
                "every image needs a mask of its size (white = foreground)"
            )
        with Image.open(path) as im:
            band = im.split()[-1] if im.mode in ("RGBA", "LA", "L") else im.convert("L")
            arr = np.asarray(band, np.float32)
        with Image.open(f) as image:
            check_same_size(array_wh(arr), image.size, mask=f"mask {path.name}", image=f"image {i}")
        arr = arr / 255.0 if arr.max() > 1 else arr
        m = transform(Image.fromarray(arr))[:1].clamp(0, 1)[None]  # (1, 1, H, W)
        scores.append(torch.nn.functional.adaptive_avg_pool2d(m, grid)[0, 0].numpy())
    return np.stack(scores).astype(np.float32)
