"""Patch correspondences between two images: mutual nearest neighbours of their patch features.

DINOv2's "patch matching" (Oquab et al. 2023, Fig. 10; dinov2 #63) and DINOv3's dense-matching
notebook (dinov3 #231) match the patches of two images by their features: patch ``a`` of image A
and patch ``b`` of image B are a match when each is the other's nearest neighbour by cosine
similarity (``b = argmax_b' cos(a, b')`` and ``a = argmax_a' cos(a', b)``). featviz ranks the
mutual pairs by their similarity, strongest first, and draws at most N of them as lines between
the patch centres of the two images side by side. ``foreground`` restricts both searches to the
foreground patches (the first-component rule of ``featviz pca``), so that background patches can
neither match nor steal a foreground patch's nearest neighbour.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Matches:
    """Mutual nearest neighbours of two images' patches, strongest first.

    Attributes:
        a: (M, 2) patch (row, column) in the first image.
        b: (M, 2) patch (row, column) in the second image.
        similarity: (M,) their cosine similarity, descending.
        total: How many mutual nearest neighbours there are (``a`` holds at most the ``limit`` strongest).
    """

    a: np.ndarray
    b: np.ndarray
    similarity: np.ndarray
    total: int

    def to_dict(self, ids: tuple[str, str]) -> dict[str, Any]:
        """The JSON record: the images, ``count`` and ``mean_similarity`` of the pairs listed, the pairs."""
        return {
            "images": list(ids),
            "count": len(self.similarity),
            "mean_similarity": float(self.similarity.mean()) if len(self.similarity) else None,
            "mutual_nearest_neighbours": self.total,
            "pairs": [
                {"a": [int(p[0]), int(p[1])], "b": [int(q[0]), int(q[1])], "similarity": float(s)}
                for p, q, s in zip(self.a, self.b, self.similarity, strict=True)
            ],
        }


def mutual_nearest_neighbours(
    fa: np.ndarray,
    fb: np.ndarray,
    *,
    mask_a: np.ndarray | None = None,
    mask_b: np.ndarray | None = None,
    limit: int | None = None,
) -> Matches:
    """Mutual nearest neighbours between the patches of two (h, w, C) unit-norm feature maps.

    Args:
        fa: (h, w, C) l2-normalised features of image A (``dot`` = cosine similarity).
        fb: (h', w', C) the same for image B.
        mask_a: (h, w) bool: only these patches of A take part (None: all).
        mask_b: (h', w') bool, the same for B.
        limit: Keep at most this many pairs, the most similar (None: all).

    Returns:
        The pairs, strongest first (ties: in A's row-major order).
    """
    ha, wa, c = fa.shape
    hb, wb, _ = fb.shape
    ia = np.flatnonzero(np.ones(ha * wa, bool) if mask_a is None else np.asarray(mask_a, bool).reshape(-1))
    ib = np.flatnonzero(np.ones(hb * wb, bool) if mask_b is None else np.asarray(mask_b, bool).reshape(-1))
    empty = Matches(np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64), np.zeros(0, np.float32), 0)
    if not len(ia) or not len(ib):
        return empty
    xa = fa.reshape(-1, c)[ia].astype(np.float32)
    xb = fb.reshape(-1, c)[ib].astype(np.float32)
    s = xa @ xb.T
    ab = s.argmax(axis=1)  # A's nearest in B (first of ties)
    ba = s.argmax(axis=0)  # B's nearest in A
    mutual = np.flatnonzero(ba[ab] == np.arange(len(ia)))
    sim = s[mutual, ab[mutual]]
    order = np.argsort(-sim, kind="stable")
    total = len(order)
    if limit is not None:
        order = order[:limit]
    pa, pb = ia[mutual[order]], ib[ab[mutual[order]]]
    return Matches(
        np.stack([pa // wa, pa % wa], axis=1).astype(np.int64),
        np.stack([pb // wb, pb % wb], axis=1).astype(np.int64),
        sim[order].astype(np.float32),
        total,
    )


def patch_centres(patches: np.ndarray, grid: tuple[int, int], hw: tuple[int, int]) -> np.ndarray:
    """(M, 2) patch (row, column) -> (M, 2) (x, y) centres in pixels of an ``hw`` picture."""
    rows = (patches[:, 0] + 0.5) * hw[0] / grid[0]
    cols = (patches[:, 1] + 0.5) * hw[1] / grid[1]
    return np.stack([cols, rows], axis=1)


def matches_figure(
    path: str | os.PathLike,
    rgb_a: np.ndarray,
    rgb_b: np.ndarray,
    matches: Matches,
    grid: tuple[int, int],
    *,
    titles: tuple[str, str],
    title: str,
    foreground: tuple[np.ndarray, np.ndarray] | None = None,
    cmap: str = "viridis",
    dpi: int = 120,
) -> Path:
    """The two images side by side, a line per match between the patch centres, coloured by similarity.

    With ``foreground``, the background patches of each image are darkened.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from featviz.views.sheets import upsample

    h, w = rgb_a.shape[:2]
    gap = max(8, w // 20)
    pics = []
    for rgb, fg in zip((rgb_a, rgb_b), foreground or (None, None), strict=True):
        if fg is not None:
            keep = upsample(np.asarray(fg, bool), rgb.shape[:2])[..., None]
            rgb = np.where(keep, rgb, 0.35 * rgb)
        pics.append(rgb)
    canvas = np.ones((h, 2 * w + gap, 3))
    canvas[:, :w], canvas[:, w + gap :] = pics
    fig = Figure(figsize=(2 * 3.2 + 0.4, 3.2 * h / w + 0.7), layout="constrained")
    ax = fig.subplots()
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    xa = patch_centres(matches.a, grid, (h, w))
    xb = patch_centres(matches.b, grid, (h, w)) + np.array([w + gap, 0])
    s = matches.similarity
    if len(s):
        lo, hi = float(s.min()), float(s.max())
        colours = colormaps[cmap]((s - lo) / (hi - lo) if hi > lo else np.ones_like(s))
        for k in range(len(s))[::-1]:  # the strongest drawn last, on top
            ax.plot([xa[k, 0], xb[k, 0]], [xa[k, 1], xb[k, 1]], color=colours[k], lw=0.9, alpha=0.9)
        ax.scatter(
            np.r_[xa[:, 0], xb[:, 0]],
            np.r_[xa[:, 1], xb[:, 1]],
            s=7,
            c=np.r_[colours, colours],
            edgecolors="white",
            linewidths=0.3,
            zorder=3,
        )
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        bar = fig.colorbar(
            ScalarMappable(Normalize(lo, hi if hi > lo else lo + 1e-6), cmap),
            ax=ax,
            shrink=0.7,
            pad=0.01,
            fraction=0.03,
        )
        bar.set_label("cosine similarity", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    ax.text(w / 2, -4, titles[0], ha="center", va="bottom", fontsize=8)
    ax.text(w + gap + w / 2, -4, titles[1], ha="center", va="bottom", fontsize=8)
    import textwrap

    fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * 72 / (9 * 0.6))), fontsize=9)
    fig.savefig(path, dpi=dpi)
    return Path(path)
