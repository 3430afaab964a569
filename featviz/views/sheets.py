"""Pictures of patch-resolution maps: upsampling, heat and mask overlays, PNGs and contact sheets.

Maps are upsampled with nearest neighbour, so each patch stays a visible square of exactly the
pixels it covers (DINO's ``visualize_attention.py`` does the same). Figures use matplotlib's
object API (headless, no pyplot).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from featviz.models.description import with_caution  # noqa: F401 - the views' titles import it from here

log = logging.getLogger(__name__)

MASK_COLOR = (0.15, 0.85, 0.35)


@dataclass(frozen=True)
class SheetCut:
    """Which images a contact sheet shows: the one rule of every sheet (``--sheet-images``).

    ``indices`` are spread evenly over all ``total`` images (the first and the last among them), so
    a sheet of a class-sorted folder shows every class; all of them when they fit.
    """

    indices: tuple[int, ...]
    total: int

    @property
    def shown(self) -> int:
        """How many images the sheet shows."""
        return len(self.indices)

    @property
    def cut(self) -> bool:
        """Whether the sheet leaves images out."""
        return self.shown < self.total

    def caption(self) -> str:
        """``showing 24 of 40 images`` when the sheet cuts, else ``''`` (for titles)."""
        return f"showing {self.shown} of {self.total} images" if self.cut else ""

    def to_dict(self) -> dict[str, Any]:
        """``{"shown", "of"}``: the summary's ``sheet``."""
        return {"shown": self.shown, "of": self.total}


def sheet_cut(total: int, sheet_images: int) -> SheetCut:
    """The images a sheet of at most ``sheet_images`` shows out of ``total``; a cut is said on stderr.

    Raises:
        ValueError: ``sheet_images`` < 1.
    """
    if sheet_images < 1:
        raise ValueError(f"sheet_images must be ≥ 1, got {sheet_images}")
    if sheet_images >= total:
        return SheetCut(tuple(range(total)), total)
    picked = sorted({int(round(v)) for v in np.linspace(0, total - 1, sheet_images)})
    cut = SheetCut(tuple(picked), total)
    log.warning("contact sheet: %s (--sheet-images %d shows all; every image's own files are written)",
                cut.caption(), total)
    return cut


def upsample(a: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of an (h, w[, c]) array to ``hw`` (torch's ``nearest`` rule)."""
    rows = np.minimum((np.arange(hw[0]) * (a.shape[0] / hw[0])).astype(np.int64), a.shape[0] - 1)
    cols = np.minimum((np.arange(hw[1]) * (a.shape[1] / hw[1])).astype(np.int64), a.shape[1] - 1)
    return a[rows][:, cols]


def normalize01(m: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] (a constant map becomes zeros)."""
    m = np.asarray(m, np.float64)
    lo, hi = float(m.min()), float(m.max())
    return np.zeros_like(m) if hi - lo <= 1e-12 * max(1.0, abs(hi)) else (m - lo) / (hi - lo)


def heat(m: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """A map as an RGB float image in [0, 1] (min-max scaled)."""
    from matplotlib import colormaps

    return colormaps[cmap](normalize01(m))[..., :3]


def heat_overlay(
    rgb: np.ndarray,
    m: np.ndarray,
    *,
    alpha: float = 0.6,
    cmap: str = "inferno",
    scale: Literal["minmax", "clip"] = "minmax",
) -> np.ndarray:
    """Blend a map onto an RGB image in [0, 1]: the one overlay of every view.

    Args:
        rgb: (H, W, 3) float image in [0, 1].
        m: (h, w) map, upsampled to the image (nearest: each patch stays a square).
        alpha: The map's weight in the blend.
        cmap: A matplotlib colormap name.
        scale: ``minmax``: the map is min-max scaled first (attention, PCA); ``clip``: it is in
            [0, 1] already (a CAM map, a ContrastiveCrop heatmap) and only clipped.

    Returns:
        (H, W, 3) float image in [0, 1]; ``to_uint8`` makes it 8-bit.
    """
    from matplotlib import colormaps

    up = upsample(m, rgb.shape[:2])
    values = normalize01(up) if scale == "minmax" else np.clip(up, 0, 1)
    return np.clip((1 - alpha) * rgb + alpha * colormaps[cmap](values)[..., :3], 0, 1)


def mask_overlay(
    rgb: np.ndarray, mask: np.ndarray, *, color: Sequence[float] = MASK_COLOR
) -> np.ndarray:
    """DINO-style mask picture: the masked patches tinted, the rest darkened."""
    up = upsample(mask.astype(bool), rgb.shape[:2])[..., None]
    tinted = 0.55 * rgb + 0.45 * np.asarray(color)
    return np.clip(np.where(up, tinted, 0.35 * rgb), 0, 1)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """A float [0, 1] image as uint8 (rounded)."""
    return np.uint8(np.clip(img, 0, 1) * 255 + 0.5)


def save_png(img: np.ndarray, path: str | os.PathLike, *, min_side: int = 0) -> Path:
    """Write a float [0, 1] (or uint8) RGB image; enlarged (nearest) to at least ``min_side`` px."""
    from PIL import Image

    arr = img if img.dtype == np.uint8 else to_uint8(img)
    im = Image.fromarray(arr)
    k = max(1, -(-min_side // max(1, min(arr.shape[:2])))) if min_side else 1
    if k > 1:
        im = im.resize((arr.shape[1] * k, arr.shape[0] * k), Image.NEAREST)
    im.save(path)
    return Path(path)


def grid_sheet(
    path: str | os.PathLike,
    cells: Sequence[Sequence[np.ndarray]],
    *,
    col_titles: Sequence[str] = (),
    row_labels: Sequence[str] = (),
    title: str = "",
    contours: Sequence[Sequence[np.ndarray | None]] | None = None,
    cell_titles: Sequence[Sequence[str]] | None = None,
    cell: float = 1.6,
    dpi: int = 110,
) -> Path:
    """A contact sheet: ``cells[r][c]`` are RGB images; optional mask contours drawn per cell."""
    from matplotlib.figure import Figure

    rows, cols = len(cells), max(len(r) for r in cells)
    h, w = cells[0][0].shape[:2]
    fig = Figure(figsize=(cell * cols * w / h + 0.9, cell * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c >= len(cells[r]):
                ax.set_visible(False)
                continue
            ax.imshow(cells[r][c], interpolation="nearest")
            if contours is not None and contours[r][c] is not None:
                m = upsample(contours[r][c].astype(float), cells[r][c].shape[:2])
                if 0 < m.mean() < 1:
                    ax.contour(m, levels=[0.5], colors=[MASK_COLOR], linewidths=0.8)
            if cell_titles is not None and c < len(cell_titles[r]) and cell_titles[r][c]:
                ax.set_title(_short(cell_titles[r][c], 28), fontsize=7)
            elif r == 0 and c < len(col_titles):
                ax.set_title(col_titles[c], fontsize=8)
            if c == 0 and r < len(row_labels):
                ax.set_ylabel(
                    _short(row_labels[r]),
                    fontsize=7,
                    rotation=0,
                    ha="right",
                    va="center",
                    labelpad=4,
                )
    if title:  # wrapped to the sheet's width: a one-image sheet is narrower than its title
        import textwrap

        chars = max(30, int(fig.get_figwidth() * 72 / (9 * 0.6)))  # 9 pt characters are about 0.6 em wide
        fig.suptitle(textwrap.fill(title, chars), fontsize=9)
    fig.savefig(path, dpi=dpi)
    return Path(path)


def _short(text: str, n: int = 22) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1) :]
