"""Scatter plots of 2-D maps with matplotlib's object API (headless; no pyplot).

Points are coloured by class with the class names in a legend; point size and opacity shrink
as N grows so that dense maps stay readable; several panels share identical axes so that the
same place means the same thing in every panel. The format follows the file extension.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featviz.errors import DataError
from featviz.style import DEFAULT_STYLE, PlotStyle

FORMATS = (".png", ".pdf", ".svg")
UNKNOWN_COLOR = (0.6, 0.6, 0.6, 1.0)


def check_format(path: str | os.PathLike) -> Path:
    """Refuse output names matplotlib would not write as PNG/PDF/SVG.

    Raises:
        DataError: another extension.
    """
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise DataError(f"plot file must end in {', '.join(FORMATS)}, got {path.name!r}")
    return path


def point_style(n: int, style: PlotStyle = DEFAULT_STYLE) -> tuple[float, float]:
    """(marker size in pt², alpha) for ``n`` points: big and opaque when few, small and light when many.

    ``style.point_size`` and ``style.alpha`` replace either when chosen (``--point-size``, ``--alpha``).
    """
    n = max(int(n), 1)
    size = float(np.clip(400.0 / np.sqrt(n), 0.3, 40.0))
    alpha = float(np.clip(1.3 - 0.17 * np.log10(n), 0.2, 0.95))
    return (size if style.point_size is None else float(style.point_size),
            alpha if style.alpha is None else float(style.alpha))


def class_colors(n_classes: int, palette: str | None = None) -> np.ndarray:
    """(C, 4) RGBA colours: tab10 up to 10 classes, tab20 up to 20, then evenly spaced hues.

    ``palette`` (``--palette``) is a matplotlib colour map instead: a qualitative one (``Set2``)
    gives its colours in order (repeating, with a warning, when it has fewer than the classes), a
    continuous one (``viridis``) evenly spaced colours.
    """
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    if palette is not None:
        cmap = colormaps[palette]
        if isinstance(cmap, ListedColormap) and cmap.N <= 32:  # qualitative: its own colours, in order
            if cmap.N < n_classes:
                import logging

                logging.getLogger(__name__).warning(
                    "--palette %s has %d colours for %d classes: colours repeat", palette, cmap.N, n_classes)
            return cmap(np.arange(n_classes) % cmap.N)
        return cmap(np.linspace(0, 1, n_classes) if n_classes > 1 else np.zeros(1))
    if n_classes <= 10:
        return colormaps["tab10"](np.arange(n_classes))
    if n_classes <= 20:
        return colormaps["tab20"](np.arange(n_classes))
    return colormaps["hsv"](np.linspace(0, 1, n_classes, endpoint=False))


def shared_limits(panels: Sequence[np.ndarray],
                  margin: float = 0.04) -> tuple[tuple[float, float], tuple[float, float]]:
    """Square x and y limits that contain every panel's points (one frame for all panels).

    Square, because t-SNE axes have the same units: a stretched frame would distort distances.
    """
    allp = np.concatenate([np.asarray(p).reshape(-1, 2) for p in panels if len(p)])
    lo, hi = allp.min(0), allp.max(0)
    half = max(float((hi - lo).max()), 1e-9) * (0.5 + margin)
    mid = (lo + hi) / 2
    lo, hi = mid - half, mid + half
    return (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))


def draw_scatter(ax, coords: np.ndarray, labels: np.ndarray, colors: np.ndarray, *, n_for_style: int | None = None,
                 seed: int = 0, style: PlotStyle = DEFAULT_STYLE) -> None:
    """Scatter ``coords`` on ``ax`` coloured by ``labels`` (-1 grey), in a shuffled drawing order.

    The order is shuffled so no class is always painted on top of the others; ``style`` may fix the
    point size and opacity.
    """
    coords = np.asarray(coords)
    labels = np.asarray(labels)
    size, alpha = point_style(n_for_style or len(coords), style)
    order = np.random.default_rng(seed).permutation(len(coords))
    c = np.array([colors[i] if 0 <= i < len(colors) else UNKNOWN_COLOR for i in labels[order]]).reshape(-1, 4)
    ax.scatter(coords[order, 0], coords[order, 1], s=size, c=c, alpha=alpha, linewidths=0,
               rasterized=len(coords) > 5000)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="box")
    for s in ax.spines.values():
        s.set_color("#bbbbbb")


def legend_handles(class_names: Sequence[str], colors: np.ndarray, present: Sequence[int], *, unknown: bool = False):
    """Legend entries (proxy markers) for the classes ``present``."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", markersize=7, markerfacecolor=colors[i], markeredgewidth=0,
                      label=class_names[i] if i < len(class_names) else str(i)) for i in present]
    if unknown:
        handles.append(Line2D([], [], marker="o", linestyle="", markersize=7, markerfacecolor=UNKNOWN_COLOR,
                              markeredgewidth=0, label="unknown"))
    return handles


def scatter_panels(panels: Sequence[tuple[np.ndarray, np.ndarray]], class_names: Sequence[str], out: str | os.PathLike,
                   *, titles: Sequence[str] | None = None, suptitle: str | None = None, force: bool = False,
                   dpi: int = 150, style: PlotStyle = DEFAULT_STYLE) -> Path:
    """Save one or more (coords, labels) panels side by side with identical axes and one legend.

    ``style``: the class palette, point size and opacity (``featviz.style.PlotStyle``; None = by N).

    Raises:
        DataError: an unsupported extension.
        OutputExistsError: ``out`` exists and ``force`` is False.
    """
    from matplotlib.figure import Figure

    from featviz.io.outputs import check_writable

    out = check_format(out)
    check_writable(out, force=force)
    labels_all = np.concatenate([np.asarray(lab) for _, lab in panels])
    n_classes = max(len(class_names), int(labels_all.max(initial=-1)) + 1)
    colors = class_colors(n_classes, style.palette)
    present = sorted(int(i) for i in np.unique(labels_all) if i >= 0)
    k = len(panels)
    fig = Figure(figsize=(4.2 * k + 1.8, 4.6), layout="constrained")
    axes = fig.subplots(1, k, squeeze=False)[0]
    xlim, ylim = shared_limits([c for c, _ in panels])
    n_max = max(len(c) for c, _ in panels)
    for i, (ax, (coords, labels)) in enumerate(zip(axes, panels, strict=True)):
        draw_scatter(ax, coords, labels, colors, n_for_style=n_max, seed=i, style=style)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        if titles:
            ax.set_title(f"{titles[i]}  (n={len(coords):,})", fontsize=10)
    handles = legend_handles(class_names, colors, present, unknown=bool((labels_all < 0).any()))
    return _finish(fig, handles, out, suptitle=suptitle, dpi=dpi)


def _finish(fig, handles: list, out: Path, *, suptitle: str | None, dpi: int) -> Path:
    """Add the class legend (when there are entries) and the title to ``fig``, and save it to ``out`` atomically."""
    from featviz.io.outputs import atomic_path

    if handles:
        ncol = 1 if len(handles) <= 16 else 2 if len(handles) <= 40 else 3
        fig.legend(handles=handles, loc="outside right upper", frameon=False, fontsize=8, ncol=ncol,
                   title="class", title_fontsize=9)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    with atomic_path(out, force=True) as tmp:
        fig.savefig(tmp, dpi=dpi, format=out.suffix.lower().lstrip("."))
    return out


METHOD_TITLES = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PCA"}
"""How a map's title names its method."""


def map_title(params: Any, title: str | None = None) -> str:
    """A map's title: the user's ``title`` followed by the method, or the method and its settings.

    ``params``: the map's ``featviz.maps.projection.TsneParams`` (its method and settings).

    ``t-SNE (perplexity 30)``, ``UMAP (15 neighbours, min_dist 0.1)``, ``PCA (components 1-2)``; a
    ``title`` that does not name the method gets `` · t-SNE`` after it.
    """
    name = METHOD_TITLES[params.method]
    if title:
        return title if name.lower() in title.lower() else f"{title} · {name}"
    detail = {"tsne": f"perplexity {params.perplexity:g}",
              "umap": f"{params.n_neighbors} neighbours, min_dist {params.min_dist:g}",
              "pca": "components 1-2"}[params.method]
    return f"{name} ({detail})"



MAP_GREY = (0.72, 0.72, 0.72, 1.0)
"""The colour of a map's own points under points placed into it."""


def placement_panels(background: tuple[np.ndarray, np.ndarray], panels: Sequence[tuple[np.ndarray, np.ndarray]],
                     class_names: Sequence[str], out: str | os.PathLike, *, map_name: str = "map",
                     titles: Sequence[str] | None = None, suptitle: str | None = None, force: bool = False,
                     dpi: int = 150, style: PlotStyle = DEFAULT_STYLE) -> Path:
    """Points placed into a map: the map as saved, then each input's points over the map in grey.

    ``background``: the map's (coords, labels). The first panel shows it coloured by class, as it was
    published; each further panel draws it small and light grey under one input's placed points
    (``panels``: (coords, labels)), coloured by class with a thin white edge so that they stand out
    where the map is dense. One frame for all panels (``shared_limits``), one legend.

    Raises:
        DataError: an unsupported extension; OutputExistsError: ``out`` exists and ``force`` is False.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from featviz.io.outputs import check_writable

    out = check_format(out)
    check_writable(out, force=force)
    map_xy, map_labels = np.asarray(background[0]).reshape(-1, 2), np.asarray(background[1])
    labels_all = np.concatenate([map_labels, *[np.asarray(lab) for _, lab in panels]])
    n_classes = max(len(class_names), int(labels_all.max(initial=-1)) + 1)
    colors = class_colors(n_classes, style.palette)
    k = len(panels) + 1
    fig = Figure(figsize=(4.2 * k + 1.8, 4.6), layout="constrained")
    axes = fig.subplots(1, k, squeeze=False)[0]
    xlim, ylim = shared_limits([map_xy, *[c for c, _ in panels]])
    draw_scatter(axes[0], map_xy, map_labels, colors, style=style)
    axes[0].set_title(f"{map_name}  (n={len(map_xy):,}, as saved)", fontsize=10)
    grey_size, grey_alpha = point_style(len(map_xy))
    size, alpha = point_style(max(len(c) for c, _ in panels), style)
    for i, (ax, (coords, labels)) in enumerate(zip(axes[1:], panels, strict=True)):
        ax.scatter(map_xy[:, 0], map_xy[:, 1], s=grey_size, color=MAP_GREY, alpha=min(grey_alpha, 0.5),
                   linewidths=0, rasterized=len(map_xy) > 5000)
        coords, labels = np.asarray(coords).reshape(-1, 2), np.asarray(labels)
        order = np.random.default_rng(i).permutation(len(coords))
        c = np.array([colors[j] if 0 <= j < len(colors) else UNKNOWN_COLOR for j in labels[order]]).reshape(-1, 4)
        ax.scatter(coords[order, 0], coords[order, 1], s=max(size, 4.0), c=c, alpha=max(alpha, 0.8),
                   linewidths=0.3, edgecolors="white", rasterized=len(coords) > 5000)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal", adjustable="box")
        for s in ax.spines.values():
            s.set_color("#bbbbbb")
        if titles:
            ax.set_title(f"{titles[i]}  (n={len(coords):,} placed)", fontsize=10)
    for ax in axes:
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
    present = sorted(int(j) for j in np.unique(labels_all) if j >= 0)
    handles = legend_handles(class_names, colors, present, unknown=bool((labels_all < 0).any()))
    handles.append(Line2D([], [], marker="o", linestyle="", markersize=7, markerfacecolor=MAP_GREY,
                          markeredgewidth=0, label="map (under placed points)"))
    return _finish(fig, handles, out, suptitle=suptitle, dpi=dpi)
