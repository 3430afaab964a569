"""The pictures of a cam run: overlays, and the contact sheet (rows = images, columns = methods)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featviz.cam.methods import MapStats

log = logging.getLogger(__name__)

Progress = Callable[..., Iterable]



@dataclass
class CamRun:
    """Everything one ``run_cam`` computed (the files hold the same)."""

    ids: list[str]
    methods: list[str]
    skipped: dict[str, str]
    maps: dict[str, np.ndarray]
    stats: dict[str, list[MapStats]]
    target_labels: list[str]
    scores: list[float | None]
    metrics: dict[str, dict[str, np.ndarray]]
    layers: list[str]
    target: str
    image_size: tuple[int, int]
    model_kind: str





def overlay(rgb: np.ndarray, cam: np.ndarray, *, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a [0, 1] map onto an RGB image in [0, 1]; returns uint8 (H, W, 3)."""
    import matplotlib

    heat = matplotlib.colormaps[cmap](np.clip(cam, 0, 1))[..., :3]
    return np.uint8(np.clip((1 - alpha) * rgb + alpha * heat, 0, 1) * 255 + 0.5)


def overlay_png(rgb: np.ndarray, cam: np.ndarray, path: Path, *, min_side: int = 224) -> None:
    """Write ``overlay(rgb, cam)`` as a PNG, enlarged to at least ``min_side`` px (32-px inputs)."""
    from PIL import Image

    h, w = cam.shape
    k = max(1, math.ceil(min_side / min(h, w)))
    if k > 1:  # image bicubic, map bilinear: a readable picture of exactly what the model saw
        size = (w * k, h * k)
        rgb = np.asarray(Image.fromarray(np.uint8(rgb * 255 + 0.5)).resize(size, Image.BICUBIC)) / 255.0
        cam = np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
    Image.fromarray(overlay(rgb, cam)).save(path)


def contact_sheet(run: CamRun, images: list[np.ndarray], path: Path, *, title: str = "") -> None:
    """Rows = images (input first), columns = methods; flagged maps get a red label."""
    from matplotlib.figure import Figure

    rows, cols = len(images), len(run.methods) + 1
    aspect = images[0].shape[0] / images[0].shape[1] if images else 1.0  # non-square inputs (224x320): cells follow
    width = 1.7 * min(1.6, max(1.0, 1 / aspect)) ** 0.5
    fig = Figure(figsize=(width * cols, width * aspect * rows + 0.7), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c == 0:
                ax.imshow(images[r])
                ax.set_ylabel(_short(run.ids[r]) + "\n" + run.target_labels[r], fontsize=7, rotation=0,
                              ha="right", va="center", labelpad=4)
                if r == 0:
                    ax.set_title("input", fontsize=9)
                continue
            m = run.methods[c - 1]
            ax.imshow(overlay(images[r], run.maps[m][r]))
            if r == 0:
                ax.set_title(m, fontsize=9)
            st = run.stats[m][r]
            if st.status in ("blank", "noise", "nan"):
                ax.text(0.03, 0.05, st.status, transform=ax.transAxes, fontsize=7, color="white",
                        bbox={"facecolor": "crimson", "edgecolor": "none", "pad": 1.5})
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)


def _short(text: str, n: int = 22) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]
