"""TensorBoard projector export: embeddings, labels and a sprite of thumbnails.

Written with ``torch.utils.tensorboard``'s own ``SummaryWriter.add_embedding``, so the folder is
exactly what TensorBoard's projector reads: ``projector_config.pbtxt`` at the top and, under
``00000/<tag>/``, ``tensors.tsv``, ``metadata.tsv`` (header ``label``, ``file`` and, for pixels,
``y``, ``x``) and ``sprite.png``. View it with ``tensorboard --logdir DIR`` (Projector tab).

The sprite holds one thumbnail per row, in a square grid of at most ``SPRITE_MAX`` pixels a
side (TensorBoard accepts up to 8192; 4096 keeps ``add_embedding``'s float64 assembly under
~0.4 GB), so thumbnails shrink as N grows; below ``MIN_SIDE`` pixels the sprite is left out
with a warning. Rows whose image cannot be found get a grey tile (and one warning).

Needs the optional ``tensorboard`` package: ``pip install 'featviz[tensorboard]'``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from featviz.errors import MissingDependencyError
from featviz.io.artifacts import Embeddings

log = logging.getLogger(__name__)

SPRITE_MAX = 4096
MAX_SIDE = 64
MIN_SIDE = 8
TAG = "featviz"


def require_tensorboard():
    """``torch.utils.tensorboard.SummaryWriter``, or one clear line naming the extra to install.

    Raises:
        MissingDependencyError: the ``tensorboard`` package is missing.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises ImportError when tensorboard is absent
        raise MissingDependencyError(
            "TensorBoard output needs the tensorboard package: pip install 'featviz[tensorboard]' "
            "(or pip install tensorboard)"
        ) from None
    return SummaryWriter


def summary_writer(logdir: str | os.PathLike, **kwargs: Any):
    """A ``SummaryWriter`` on ``logdir`` (see ``require_tensorboard``)."""
    return require_tensorboard()(str(logdir), **kwargs)


def sprite_side(n: int) -> int:
    """Thumbnail side in the sprite for ``n`` rows (0: too many rows for a useful sprite)."""
    side = min(MAX_SIDE, SPRITE_MAX // max(1, math.ceil(math.sqrt(n))))
    return side if side >= MIN_SIDE else 0


def sprite_images(emb: Embeddings, side: int, *, npz_path=None, image_root=None) -> np.ndarray:
    """(N, 3, side, side) float32 tiles in [0, 1]: each row's thumbnail centred on white.

    Rows whose image is missing get a grey tile.
    """
    from featviz.data import thumbnails as th

    res = th.ImageResolver(emb.ids, emb.manifest, npz_path, image_root)
    out = np.full((emb.n, side, side, 3), 0.5, np.float32)
    missing: set[str] = set()
    for i in range(emb.n):
        img = res.image(i)
        if img is None:
            missing.add(res.ids[i])
            continue
        if emb.is_pixels:
            t = th.pixel_thumbnail(img, int(emb.yx[i, 0]), int(emb.yx[i, 1]), side)
        else:
            t = th.image_thumbnail(img, side)
        tile = np.ones((side, side, 3), np.float32)
        a = np.asarray(t, np.float32) / 255.0
        y0, x0 = (side - a.shape[0]) // 2, (side - a.shape[1]) // 2
        tile[y0 : y0 + a.shape[0], x0 : x0 + a.shape[1]] = a
        out[i] = tile
    if missing:
        log.warning(
            "TensorBoard sprite: %d images could not be found or read (looked in %s; e.g. %s); "
            "their "
            "tiles are grey",
            len(missing),
            res.describe(),
            sorted(missing)[0],
        )
    return out.transpose(0, 3, 1, 2)


def metadata_rows(emb: Embeddings) -> tuple[list[list[str]], list[str]]:
    """Projector metadata: a header and one row per point (label, file, and y, x for pixels)."""
    names = emb.label_names()
    label = [names[v] if v >= 0 else "unknown" for v in emb.labels]
    clean = [str(i).replace("\t", " ").replace("\n", " ") for i in emb.ids]
    if emb.is_pixels:
        return (
            [
                [lab, f, str(int(y)), str(int(x))]
                for lab, f, (y, x) in zip(label, clean, emb.yx, strict=True)
            ],
            ["label", "file", "y", "x"],
        )
    return [[lab, f] for lab, f in zip(label, clean, strict=True)], ["label", "file"]


def write_projector(
    emb: Embeddings,
    logdir: str | os.PathLike,
    *,
    npz_path=None,
    image_root=None,
    sprite: bool = True,
    tag: str = TAG,
    force: bool = False,
) -> Path:
    """Write ``emb`` for TensorBoard's projector into ``logdir`` (atomically, as a whole folder).

    Args:
        emb: the embeddings (their ``ids``/manifest locate the thumbnails).
        logdir: the folder to create (TensorBoard's ``--logdir``).
        npz_path: where the embeddings file lives (relative image roots are tried from there).
        image_root: the folder the ids are relative to (overrides the manifest).
        sprite: include the thumbnail sprite.
        tag: the embedding's name in the projector.
        force: replace an existing non-empty ``logdir``.

    Raises:
        MissingDependencyError: tensorboard is not installed.
        OutputExistsError: ``logdir`` exists, is not empty, and ``force`` is False.
    """
    import torch

    from featviz.io.outputs import atomic_dir, check_output

    logdir = Path(logdir)
    require_tensorboard()  # fail on a missing extra before any work
    check_output(logdir, force=force, folder=True)  # before any work; a folder featviz did not write is refused
    meta, header = metadata_rows(emb)
    label_img = None
    if sprite:
        side = sprite_side(emb.n)
        if side == 0:
            log.warning(
                "TensorBoard: %d rows are too many for a sprite of %d px tiles "
                "(%d px a side at most); "
                "writing the projector without thumbnails",
                emb.n,
                MIN_SIDE,
                SPRITE_MAX,
            )
        else:
            label_img = torch.from_numpy(
                sprite_images(emb, side, npz_path=npz_path, image_root=image_root)
            )
    with atomic_dir(logdir, force=force, command="embed --tensorboard") as tmp:
        writer = summary_writer(tmp)
        try:
            writer.add_embedding(
                torch.from_numpy(np.ascontiguousarray(emb.features)),
                metadata=meta,
                label_img=label_img,
                tag=tag,
                metadata_header=header,
            )
        finally:
            writer.close()
    return logdir
