"""The pictures of ``featviz norms``: one figure per model, its outlier sheet, and the side-by-side comparison.

Matplotlib's object API (headless, no pyplot); the overlays are ``views.sheets``'s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featviz.views.sheets import grid_sheet, heat_overlay, with_caution

OUTLIER = "#00e5ff"
PATCH = "#7a7a7a"
REGISTER = "#1f4fd1"
CLASS = "#1a9641"
RED = "#d7191c"


def _threshold_text(s: Any) -> str:
    t = s.split.threshold
    if t is None:
        return "no bimodal split: no outliers"
    return f"threshold {t:.3g} ({s.split.rule}) · {s.mask.mean():.2%} outliers"


def _overlay(rgb: np.ndarray, norms: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """The log norm over the image (log: the outliers would flatten everything else to black)."""
    return heat_overlay(rgb, np.log(np.maximum(norms, 1e-12)), alpha=0.55, cmap=cmap)


def _draw_outliers(ax: Any, mask: np.ndarray, shape: tuple[int, int]) -> None:
    """Outline each outlier patch on an image of ``shape`` (H, W)."""
    from matplotlib.patches import Rectangle

    h, w = mask.shape
    sy, sx = shape[0] / h, shape[1] / w
    for r, c in zip(*np.nonzero(mask), strict=True):
        ax.add_patch(Rectangle((c * sx - 0.5, r * sy - 0.5), sx, sy, fill=False, edgecolor=OUTLIER, linewidth=1.2))


def _image_cell(ax: Any, rgb: np.ndarray, s: Any, i: int, title: str, cmap: str = "inferno") -> None:
    ax.imshow(_overlay(rgb, s.layer.patch[i], cmap), interpolation="nearest")
    _draw_outliers(ax, s.mask[i], rgb.shape[:2])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7)


def _histogram(ax: Any, s: Any, layout: Any, *, legend: bool = True) -> None:
    """The patch-norm histogram of one layer (log counts), its outliers, the threshold, the prefix tokens."""
    v = s.layer.patch.ravel()
    m = s.mask.ravel()
    prefix = s.layer.prefix
    extra = [] if prefix is None else [prefix.ravel()]
    hi = max([float(v.max())] + [float(e.max()) for e in extra])
    lo = min([float(v.min())] + [float(e.min()) for e in extra])
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 61)
    ax.hist(v[~m], bins=bins, color=PATCH, label="patch tokens")
    if m.any():
        ax.hist(v[m], bins=bins, color=OUTLIER, label="outliers")
    if prefix is not None and layout is not None:
        cls_n, reg_n = layout.class_tokens, layout.register_tokens
        if reg_n:
            ax.hist(
                prefix[:, cls_n : cls_n + reg_n].ravel(),
                bins=bins,
                color=REGISTER,
                alpha=0.8,
                label=f"{reg_n} registers",
            )
        if cls_n:
            ax.hist(prefix[:, :cls_n].ravel(), bins=bins, color=CLASS, alpha=0.8, label="class token")
    if s.split.threshold is not None:
        ax.axvline(s.split.threshold, color=RED, linestyle="--", linewidth=1, label="threshold")
    elif s.split.otsu_threshold is not None:
        ax.axvline(s.split.otsu_threshold, color=RED, linestyle=":", linewidth=1, label="Otsu (no valley)")
    ax.set_yscale("log")
    ax.set_xlabel("token L2 norm", fontsize=8)
    ax.set_ylabel("tokens (all images)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(f"{s.layer.name}: {_threshold_text(s)}", fontsize=8)
    if legend:
        ax.legend(fontsize=6, frameon=False)


def _curves(ax: Any, stats: Sequence[Any], label: str = "", color: str | None = None, relative: bool = False) -> None:
    """Outlier share and the class token's attention on the outliers (and registers), per layer."""
    x = np.arange(len(stats), dtype=float)
    if relative and len(stats) > 1:
        x = x / (len(stats) - 1)
    share = [100 * float(s.mask.mean()) for s in stats]
    ax.plot(x, share, "o-", color=color or OUTLIER, markersize=3, label=f"{label}outlier share of patches".strip())
    att = [s.to_dict()["cls_attention"] for s in stats]
    if any(isinstance(a, dict) for a in att):
        on = [100 * a["on_outliers"] if isinstance(a, dict) else np.nan for a in att]
        ax.plot(
            x, on, "s--", color=color or RED, markersize=3, label=f"{label}class-token attention on outliers".strip()
        )
        regs = [
            100 * a["on_registers"] if isinstance(a, dict) and a["on_registers"] is not None else np.nan for a in att
        ]
        if not np.isnan(regs).all():
            ax.plot(
                x,
                regs,
                "^:",
                color=color or REGISTER,
                markersize=3,
                label=f"{label}class-token attention on registers".strip(),
            )
    if not any(isinstance(a, dict) for a in att):
        note = stats[0].to_dict().get("cls_attention_note", "")
        ax.text(0.02, 0.95, f"class-token attention: n/a ({note})", transform=ax.transAxes, fontsize=7, va="top")
    ax.set_ylabel("%", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("relative depth" if relative else "layer", fontsize=8)
    if not relative and len(stats) <= 16:
        ax.set_xticks(x, [s.layer.name.replace("blocks.", "") for s in stats], fontsize=7)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _per_layer_heatmap(fig: Any, ax: Any, stats: Sequence[Any]) -> None:
    """Every layer's norm histogram as one row (log10 norm axis, log counts), thresholds marked."""
    logs = [np.log10(np.maximum(s.layer.patch.ravel(), 1e-12)) for s in stats]
    lo, hi = min(float(v.min()) for v in logs), max(float(v.max()) for v in logs)
    edges = np.linspace(lo, hi if hi > lo else lo + 1, 81)
    img = np.stack([np.histogram(v, bins=edges)[0] for v in logs]).astype(float)
    im = ax.imshow(
        np.log10(1 + img),
        aspect="auto",
        cmap="magma",
        origin="lower",
        extent=(edges[0], edges[-1], -0.5, len(stats) - 0.5),
        interpolation="nearest",
    )
    for k, s in enumerate(stats):
        if s.split.threshold is not None:
            ax.plot([np.log10(s.split.threshold)] * 2, [k - 0.45, k + 0.45], color=OUTLIER, linewidth=1.5)
    ax.set_yticks(range(len(stats)), [s.layer.name.replace("blocks.", "") for s in stats], fontsize=6)
    ax.set_xlabel("log10 token norm", fontsize=8)
    ax.set_ylabel("layer", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title("patch-norm histogram per layer (cyan: threshold)", fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8).set_label("log10(1 + tokens)", fontsize=7)


def model_figure(
    path: str | os.PathLike,
    summary: dict[str, Any],
    stats: Sequence[Any],
    show: int,
    rgbs: Sequence[np.ndarray],
    ids: Sequence[str],
    images: int = 8,
    *,
    model: Any = None,
    indices: Sequence[int] | None = None,
    cmap: str = "inferno",
) -> Path:
    """One model's figure: the per-layer histograms, the per-layer shares, one layer's histogram and maps.

    ``rgbs`` are the images ``indices`` (default: all); ``model``'s random weights are said in the title.
    """
    from matplotlib.figure import Figure

    layout = stats[0].layout
    n_img = min(images, len(rgbs))
    per_row = min(4, max(1, n_img))
    img_rows = -(-n_img // per_row) if n_img else 0
    fig = Figure(figsize=(12, 3.6 + 2.5 * img_rows), layout="constrained")
    grid = fig.add_gridspec(1 + img_rows, 3 if len(stats) > 1 else 2, height_ratios=[1.35] + [1] * img_rows)
    col = 0
    if len(stats) > 1:
        _per_layer_heatmap(fig, fig.add_subplot(grid[0, 0]), stats)
        ax = fig.add_subplot(grid[0, 1])
        _curves(ax, stats)
        ax.legend(fontsize=6, frameon=False)
        ax.set_title("per layer", fontsize=8)
        col = 2
    _histogram(fig.add_subplot(grid[0, col]), stats[show], layout)
    if n_img:
        sub = grid[1:, :].subgridspec(img_rows, per_row)
        s = stats[show]
        at = list(range(len(rgbs))) if indices is None else list(indices)
        for k, j in enumerate(_spread(len(rgbs), n_img)):
            ax = fig.add_subplot(sub[k // per_row, k % per_row])
            i = at[j]
            _image_cell(ax, rgbs[j], s, i, f"{_short(ids[i])} · {int(s.mask[i].sum())} outliers", cmap)
    fig.suptitle(with_caution(model, _title(summary, stats[show], cmap)), fontsize=9)
    fig.savefig(path, dpi=100)
    return Path(path)


def _title(summary: dict[str, Any], s: Any, cmap: str = "inferno") -> str:
    tok = summary["tokens"]
    regs = "" if tok is None else f" · {tok['register']} register tokens"
    return (
        f"{summary['name']} ({summary['arch']}) · {summary['image_size'][0]}x{summary['image_size'][1]}{regs} · "
        f"maps: {s.layer.name}, log token norm ({cmap}), outliers outlined (cyan)"
    )


def _spread(n: int, k: int) -> list[int]:
    """``k`` image indices spread evenly over ``n`` (the first and the last included)."""
    return [int(i) for i in np.linspace(0, n - 1, k).round()] if k > 1 else list(range(k))


def _short(text: str, n: int = 24) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1) :]


def outlier_sheet(
    path: str | os.PathLike,
    summary: dict[str, Any],
    s: Any,
    rgbs: Sequence[np.ndarray],
    ids: Sequence[str],
    *,
    model: Any = None,
    indices: Sequence[int] | None = None,
    cmap: str = "inferno",
    caption: str = "",
) -> Path:
    """Every shown image (``rgbs``: the images ``indices``, default all): input and norm map, outliers outlined."""
    n = len(rgbs)
    at = list(range(n)) if indices is None else list(indices)
    per_row = 1 if n <= 4 else 2 if n <= 8 else 4
    cells, titles, contours = [], [], []
    for r in range(0, n, per_row):
        row, tit, con = [], [], []
        for j in range(r, min(r + per_row, n)):
            i = at[j]
            row += [rgbs[j], _overlay(rgbs[j], s.layer.patch[i], cmap)]
            tit += [ids[i], f"{int(s.mask[i].sum())} outliers"]
            con += [None, s.mask[i]]
        cells.append(row)
        titles.append(tit)
        contours.append(con)
    title = f"{summary['name']} · {s.layer.name} · log token norm ({cmap}, per image) · {_threshold_text(s)} (green)"
    title = with_caution(model, title + (f" · {caption}" if caption else ""))
    return grid_sheet(path, cells, cell_titles=titles, contours=contours, title=title, cell=1.9)


def comparison_figure(
    path: str | os.PathLike,
    summaries: Sequence[dict[str, Any]],
    read: Sequence[tuple[Sequence[Any], int, Sequence[np.ndarray]]],
    ids: Sequence[str],
    images: int = 3,
    *,
    models: Sequence[Any] | None = None,
    indices: Sequence[int] | None = None,
    cmap: str = "inferno",
) -> Path:
    """The models side by side: the shown layer's histogram, the per-layer curves, some images' maps.

    ``rgbs`` are the images ``indices`` (default: all); a model with random weights says so in its column.
    """
    from matplotlib.figure import Figure

    k = len(summaries)
    n_img = min(images, *(len(r) for _, _, r in read))
    fig = Figure(figsize=(4.2 * k, 6.4 + 2.6 * n_img), layout="constrained")
    grid = fig.add_gridspec(2 + n_img, k, height_ratios=[1.2, 1.1] + [1] * n_img)
    curves = [fig.add_subplot(grid[1, j]) for j in range(k)]
    top = 0.0
    for j, (summary, (stats, show, rgbs)) in enumerate(zip(summaries, read, strict=True)):
        layout = stats[0].layout
        ax = fig.add_subplot(grid[0, j])
        _histogram(ax, stats[show], layout, legend=True)
        regs = 0 if summary["tokens"] is None else summary["tokens"]["register"]
        ax.set_title(
            with_caution(None if models is None else models[j], f"{summary['name']} · {regs} registers")
            + f"\n{stats[show].layer.name}: {_threshold_text(stats[show])}",
            fontsize=8,
        )
        _curves(curves[j], stats, relative=True)
        curves[j].legend(fontsize=6, frameon=False)
        top = max(top, *curves[j].get_ylim())
        at = list(range(len(rgbs))) if indices is None else list(indices)
        for k, p in enumerate(_spread(len(rgbs), n_img)):
            i = at[p]
            _image_cell(
                fig.add_subplot(grid[2 + k, j]),
                rgbs[p],
                stats[show],
                i,
                f"{_short(ids[i])} · {int(stats[show].mask[i].sum())} outliers",
                cmap,
            )
    for ax in curves:  # one scale, so the models compare at a glance
        ax.set_ylim(0, top)
    fig.suptitle(
        "High-norm tokens side by side: histogram at the map layer, shares per layer, where the outliers sit (cyan)",
        fontsize=10,
    )
    fig.savefig(path, dpi=100)
    return Path(path)
