"""The pictures of a cam run: overlays, and the contact sheet (rows = images, columns = methods)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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





CAM_CMAP = "jet"
"""cam's default colour map (pytorch-grad-cam's); ``--cmap`` chooses another."""
CAM_OVERLAY = {"alpha": 0.5, "cmap": CAM_CMAP, "scale": "clip"}
"""How cam draws a map on its image (``featviz.views.sheets.heat_overlay``): maps are in [0, 1]
already (pytorch-grad-cam scales them), ``jet`` unless ``--cmap``, half and half."""


def overlay_png(rgb: np.ndarray, cam: np.ndarray, path: Path, *, min_side: int = 224, cmap: str = CAM_CMAP) -> None:
    """Write the overlay of ``cam`` on ``rgb`` (``CAM_OVERLAY``, in ``cmap``) as a PNG.

    Small inputs (32 px) are enlarged to at least ``min_side`` px.
    """
    from PIL import Image

    h, w = cam.shape
    k = max(1, math.ceil(min_side / min(h, w)))
    if k > 1:  # image bicubic, map bilinear: a readable picture of exactly what the model saw
        size = (w * k, h * k)
        rgb = np.asarray(Image.fromarray(np.uint8(rgb * 255 + 0.5)).resize(size, Image.BICUBIC)) / 255.0
        cam = np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
    Image.fromarray(to_uint8(heat_overlay(rgb, cam, **{**CAM_OVERLAY, "cmap": cmap}))).save(path)


SHEET_MIN_SIDE = 160
"""Smallest thumbnail side on the contact sheet, in pixels; a thumbnail is never smaller than the input."""
_DPI = 100


CAM_COLORBAR_LABEL = "map value: each map min-max scaled to [0, 1] (pytorch-grad-cam); high = most important"


def contact_sheet(run: CamRun, images: list[np.ndarray], path: Path, *, title: str = "",
                  note: str | None = None, min_side: int = SHEET_MIN_SIDE, rows_of: list[int] | None = None,
                  cmap: str = CAM_CMAP) -> Figure:
    """Rows = images (input first), columns = methods, with full labels and a colour bar.

    Every thumbnail is shown at the model's input size or larger (small inputs are enlarged to
    ``min_side``), laid out in exact pixels; the row label holds the whole image id and the target
    (class name and probability when known); flagged maps get a red label. ``images[k]`` is image
    ``rows_of[k]`` of the run (default: the first ones). The colour bar and its caption always fit the
    sheet, however few methods it has (the caption wraps to the bar's width).

    Returns:
        The figure, as saved.
    """
    import textwrap

    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    rows_of = list(range(len(images))) if rows_of is None else list(rows_of)
    h, w = images[0].shape[:2] if images else run.image_size
    k = max(1.0, min_side / min(h, w))
    tw, th = round(w * k), round(h * k)  # thumbnail, px
    gap, label_w = 6, 250
    grid_w = (len(run.methods) + 1) * (tw + gap)
    cw = min(grid_w - 40, 560)  # the colour bar; 20 px each side keep its end ticks' labels inside
    # wrapped to fit, never cut: at 100 dpi a 9 pt character is at most ~7.5 px wide, a 12 pt bold one ~11 px
    caption = textwrap.wrap(CAM_COLORBAR_LABEL, max(24, int(cw / 7.5)), break_on_hyphens=False)
    title_lines = textwrap.wrap(title, max(24, int((label_w + grid_w) / 11))) or [""]
    note_lines = textwrap.wrap(note, max(24, int((label_w + grid_w) / 9))) if note else []
    head = 22 * len(title_lines) + 17 * len(note_lines)  # the title block, px
    top = 52 + head
    bottom = 70 + 16 * len(caption)
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
        ri = rows_of[r]
        ax.text(1.0, 0.5, _row_label(run.ids[ri], run.target_labels[ri]), ha="right", va="center", fontsize=9,
                linespacing=1.3)
        for c in range(cols):
            ax = box(label_w + c * (tw + gap), y, tw, th)
            ax.set_axis_off()
            if c == 0:
                ax.imshow(images[r], aspect="auto", interpolation="bicubic" if k > 1 else "nearest")
                continue
            m = run.methods[c - 1]
            ax.imshow(to_uint8(heat_overlay(images[r], run.maps[m][ri], **{**CAM_OVERLAY, "cmap": cmap})),
                      aspect="auto", interpolation="bilinear" if k > 1 else "nearest")
            st = run.stats[m][ri]
            if st.status in ("blank", "noise", "nan"):
                ax.text(0.03, 0.05, st.status, transform=ax.transAxes, fontsize=9, color="white",
                        bbox={"facecolor": "crimson", "edgecolor": "none", "pad": 1.5})
    fig.text(gap / width, 1 - 12 / height, "\n".join(title_lines), fontsize=12, weight="bold", va="top")
    if note_lines:
        fig.text(gap / width, 1 - (16 + 22 * len(title_lines)) / height, "\n".join(note_lines), fontsize=10,
                 va="top", color="#8a5300")
    cax = box(label_w + (grid_w - cw) / 2, height - bottom - panel + 18, cw, 16)
    if names:
        _ranking_panel(fig, run, names, box, top=height - panel + 10, left=label_w, width=width - label_w - gap,
                       height=panel - 20)
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), cax=cax, orientation="horizontal")
    bar.set_label("\n".join(caption), fontsize=9)
    bar.ax.tick_params(labelsize=8)
    fig.savefig(path, dpi=_DPI)
    return fig


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
