"""The pictures of a cam run: overlays, and the contact sheet (rows = images, columns = methods)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featviz.views.cam.methods import MapStats
from featviz.views.sheets import heat_overlay, to_uint8

log = logging.getLogger(__name__)




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
    score_values: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # method -> score -> (N,)
    score_forwards: dict[str, list[int]] = field(default_factory=dict)  # method -> images forwarded per image
    score_settings: dict = field(default_factory=dict)  # steps, step pixels, baselines, percentiles





CAM_OVERLAY = {"alpha": 0.5, "cmap": "jet", "scale": "clip"}
"""How cam draws a map on its image (``featviz.views.sheets.heat_overlay``): maps are in [0, 1]
already (pytorch-grad-cam scales them), ``jet``, half and half."""


def overlay_png(rgb: np.ndarray, cam: np.ndarray, path: Path, *, min_side: int = 224) -> None:
    """Write the overlay of ``cam`` on ``rgb`` (``CAM_OVERLAY``) as a PNG.

    Small inputs (32 px) are enlarged to at least ``min_side`` px.
    """
    from PIL import Image

    h, w = cam.shape
    k = max(1, math.ceil(min_side / min(h, w)))
    if k > 1:  # image bicubic, map bilinear: a readable picture of exactly what the model saw
        size = (w * k, h * k)
        rgb = np.asarray(Image.fromarray(np.uint8(rgb * 255 + 0.5)).resize(size, Image.BICUBIC)) / 255.0
        cam = np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
    Image.fromarray(to_uint8(heat_overlay(rgb, cam, **CAM_OVERLAY))).save(path)


SHEET_MIN_SIDE = 160
"""Smallest thumbnail side on the contact sheet, in pixels; a thumbnail is never smaller than the input."""
_DPI = 100


def contact_sheet(run: CamRun, images: list[np.ndarray], path: Path, *, title: str = "",
                  note: str | None = None, min_side: int = SHEET_MIN_SIDE) -> None:
    """Rows = images (input first), columns = methods, with full labels and a colour bar.

    Every thumbnail is shown at the model's input size or larger (small inputs are enlarged to
    ``min_side``), laid out in exact pixels; the row label holds the whole image id and the target
    (class name and probability when known); flagged maps get a red label.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    h, w = images[0].shape[:2] if images else run.image_size
    k = max(1.0, min_side / min(h, w))
    tw, th = round(w * k), round(h * k)  # thumbnail, px
    gap, label_w, top, bottom = 6, 250, 74 + (18 if note else 0), 84
    rows, cols = len(images), len(run.methods) + 1
    names = [k for k in run.score_settings.get("scores", []) if run.score_values]
    panel = (70 + 20 * len(run.methods)) if names else 0
    width = max(label_w + cols * (tw + gap) + gap, 380 * len(names) + label_w if names else 0)
    height = top + rows * (th + gap) + bottom + panel
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)

    def box(x: float, y: float, bw: float, bh: float):  # pixels from the top left -> an axes
        return fig.add_axes((x / width, 1 - (y + bh) / height, bw / width, bh / height))

    for c in range(cols):
        ax = box(label_w + c * (tw + gap), top - 26, tw, 22)
        ax.axis("off")
        ax.text(0.5, 0.2, "input" if c == 0 else run.methods[c - 1], ha="center", fontsize=11, weight="bold")
    for r in range(rows):
        y = top + r * (th + gap)
        ax = box(gap, y, label_w - 2 * gap, th)
        ax.axis("off")
        ax.text(1.0, 0.5, _row_label(run.ids[r], run.target_labels[r]), ha="right", va="center", fontsize=9,
                linespacing=1.3)
        for c in range(cols):
            ax = box(label_w + c * (tw + gap), y, tw, th)
            ax.set_axis_off()
            if c == 0:
                ax.imshow(images[r], aspect="auto", interpolation="bicubic" if k > 1 else "nearest")
                continue
            m = run.methods[c - 1]
            ax.imshow(to_uint8(heat_overlay(images[r], run.maps[m][r], **CAM_OVERLAY)), aspect="auto",
                      interpolation="bilinear" if k > 1 else "nearest")
            st = run.stats[m][r]
            if st.status in ("blank", "noise", "nan"):
                ax.text(0.03, 0.05, st.status, transform=ax.transAxes, fontsize=9, color="white",
                        bbox={"facecolor": "crimson", "edgecolor": "none", "pad": 1.5})
    fig.text(gap / width, 1 - 12 / height, title, fontsize=12, weight="bold", va="top")
    if note:
        fig.text(gap / width, 1 - 34 / height, note, fontsize=10, va="top", color="#8a5300")
    cw = min(cols * (tw + gap), 560)
    cax = box(label_w + (cols * (tw + gap) - cw) / 2, height - bottom - panel + 18, cw, 16)
    if names:
        _ranking_panel(fig, run, names, box, top=height - panel + 10, left=label_w, width=width - label_w - gap,
                       height=panel - 20)
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), "jet"), cax=cax, orientation="horizontal")
    bar.set_label("map value: each map min-max scaled to [0, 1] (pytorch-grad-cam); red = most important",
                  fontsize=9)
    bar.ax.tick_params(labelsize=8)
    fig.savefig(path, dpi=_DPI)


def _ranking_panel(fig, run: CamRun, names: list[str], box, *, top: float, left: float, width: float,
                   height: float) -> None:
    """One horizontal bar chart per score: the methods ranked by their mean over the images, best on top."""
    from featviz.views.cam.scores import HIGHER_IS_BETTER, ranking

    means = {m: {k: float(np.nanmean(v)) for k, v in d.items()} for m, d in run.score_values.items()}
    ax0 = box(6, top, left - 18, height)
    ax0.axis("off")
    ax0.text(1.0, 0.55, f"faithfulness\n(mean over {len(run.ids)} images;\nbest on top)", ha="right", va="center",
             fontsize=10, weight="bold", linespacing=1.3)
    w = width / len(names)
    for c, k in enumerate(names):
        order = ranking(means, k)
        vals = [means[m][k] for m in order]
        ax = box(left + c * w + 110, top + 22, w - 150, height - 34)
        colors = ["#2a9d8f" if i == 0 else "#8d99ae" for i in range(len(order))]
        ax.barh(range(len(order)), vals, color=colors, height=0.7)
        ax.set_yticks(range(len(order)), order, fontsize=9)
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=8)
        lo = min(0.0, *vals)
        hi = max(0.0, *vals)
        span = (hi - lo) or 1.0
        ax.set_xlim(lo - 0.02 * span, hi + 0.28 * span)
        for i, v in enumerate(vals):
            ax.text(v + 0.02 * span if v >= 0 else 0.02 * span, i, f"{v:.3f}", va="center", fontsize=8)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        better = "higher" if HIGHER_IS_BETTER[k] else "lower"
        ax.set_title(f"{k} AUC ({better} = better)" if k != "road" else f"ROAD ({better} = better)",
                     fontsize=10, weight="bold", loc="left")


def _row_label(image_id: str, target: str, width: int = 34) -> str:
    """The whole id and target, wrapped (never cut) to fit the label column."""
    import textwrap

    lines = textwrap.wrap(image_id, width, break_on_hyphens=False) or [image_id]
    return "\n".join([*lines, *textwrap.wrap(target, width)])
