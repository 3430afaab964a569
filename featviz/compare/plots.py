"""The compare sheet (``compare.png``) and its interactive page (``compare.html``).

The sheet: one heatmap per measure (rows: the first model's layers, bottom to top; columns: the
second model's, or the same model's, left to right), the layer names on the axes, a colour bar on
the same 0-1 scale for every measure, the values written in the cells when there are few; and, when
the images have labels, the per-layer k-NN accuracy curve beside them. The page shows the same
matrices with each cell's layers and value on hover (Bokeh, self-contained).
"""

from __future__ import annotations

import html as _html
import os
from typing import Any

import numpy as np

CMAP = "magma"
ANNOTATE_MAX = 12  # write values in the cells up to this many rows and columns
TITLES = {"cka": "linear CKA", "mknn": "mutual k-NN", "cknna": "CKNNA", "svcca": "SVCCA"}


def _axis_names(result: Any) -> tuple[str, str]:
    m = result.models
    if result.within:
        return (m[0]["name"] if len(m) == 1 else "files",) * 2
    return m[0]["name"], m[1]["name"]


def _title(result: Any) -> str:
    """The sheet's and the page's title, led by the random-weights caution when a model has random weights."""
    from featviz.models.description import with_caution

    m = result.models
    if len(m) == 2 and not result.within:
        what = f"{m[0]['name']} (rows) vs {m[1]['name']} (columns)"
    elif len(m) == 1:
        what = f"{m[0]['name']}: layer × layer"
    else:
        what = f"{len(m)} embeddings files"
    return with_caution(list(m), f"{what} · {result.n_images:,} images")


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def draw_png(result: Any, path: str | os.PathLike, cmap: str | None = None) -> None:
    """Write the compare sheet of a ``CompareResult`` to ``path`` (``cmap``: the heatmaps', default ``CMAP``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mats = result.matrices
    n_r, n_c = len(result.rows), len(result.cols)
    cell = 0.42 if max(n_r, n_c) <= 12 else 0.26
    side = max(2.8, cell * max(n_r, n_c) + 1.2)
    panels = len(mats) + (1 if result.knn else 0)
    ncol = panels if panels <= 3 else 2 if panels == 4 else 3
    nrow = -(-panels // ncol)
    fig, grid = plt.subplots(nrow, ncol, figsize=(ncol * (side + 1.3), nrow * (side + 1.5) + 0.4), squeeze=False)
    axes = [list(grid.ravel())]
    for ax in axes[0][panels:]:
        ax.set_visible(False)
    ylab, xlab = _axis_names(result)
    fs = 8 if max(n_r, n_c) <= 12 else 6
    for ax, (name, mat) in zip(axes[0], mats.items(), strict=False):
        im = ax.imshow(
            mat, cmap=cmap or CMAP, vmin=0.0, vmax=1.0, origin="lower", aspect="auto", interpolation="nearest"
        )
        ax.set_xticks(range(n_c), [_short(c) for c in result.cols], rotation=60, ha="right", fontsize=fs)
        ax.set_yticks(range(n_r), [_short(r) for r in result.rows], fontsize=fs)
        ax.set_xlabel(xlab, fontsize=9)
        ax.set_ylabel(ylab, fontsize=9)
        extra = f" (k={result.protocol['k']})" if name in ("mknn", "cknna") else ""
        ax.set_title(f"{TITLES[name]}{extra}", fontsize=10)
        if max(n_r, n_c) <= ANNOTATE_MAX:
            for i in range(n_r):
                for j in range(n_c):
                    v = mat[i, j]
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5, color=_ink(im, v))
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    if result.knn:
        ax = axes[0][panels - 1]
        for curve in result.knn:
            x = np.arange(len(curve["layers"]))
            ax.plot(x, 100 * np.asarray(curve["top1"]), marker="o", lw=1.8, ms=4, label=curve["model"])
        longest = max(result.knn, key=lambda c: len(c["layers"]))
        ax.set_xticks(
            range(len(longest["layers"])), [_short(n) for n in longest["layers"]], rotation=60, ha="right", fontsize=fs
        )
        ax.set_ylabel("k-NN top-1 accuracy (%)", fontsize=9)
        low = min(min(c["top1"]) for c in result.knn)
        ax.set_ylim(max(0.0, 10 * np.floor(10 * low) - 10), 100)
        ax.grid(alpha=0.3)
        p = result.protocol.get("knn_accuracy") or {}
        ax.set_title(f"k-NN accuracy per layer (k={result.knn[0]['k']}, {p.get('folds', 5)}-fold)", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(_title(result), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ink(im: Any, v: float) -> str:
    """Black text on a light cell of the heatmap ``im``, white on a dark one (by the colour's luminance)."""
    r, g, b, _ = im.cmap(im.norm(v))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def palette256(cmap: str | None = None) -> list[str]:
    """The colour map's 256 entries as ``#rrggbb`` (matplotlib's lookup): the page draws with the PNG's colours."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    return [to_hex(c) for c in colormaps[cmap or CMAP](np.arange(256))]


def write_page(result: Any, path: str | os.PathLike, cmap: str | None = None) -> None:
    """Write ``compare.html``: every matrix as a heatmap whose cells show their layers and value on hover."""
    from bokeh.embed import file_html
    from bokeh.layouts import column, row
    from bokeh.models import BasicTicker, ColorBar, ColumnDataSource, Div, HoverTool, LinearColorMapper
    from bokeh.plotting import figure
    from bokeh.resources import INLINE

    ylab, xlab = _axis_names(result)
    rows, cols = list(result.rows), list(result.cols)
    mapper = LinearColorMapper(palette=palette256(cmap), low=0.0, high=1.0)
    figs = []
    size = max(320, min(640, 28 * max(len(rows), len(cols)) + 160))
    for name, mat in result.matrices.items():
        ii, jj = np.meshgrid(np.arange(len(rows)), np.arange(len(cols)), indexing="ij")
        src = ColumnDataSource(
            {"row": [rows[i] for i in ii.ravel()], "col": [cols[j] for j in jj.ravel()], "value": mat.ravel().tolist()}
        )
        f = figure(
            title=TITLES[name],
            x_range=cols,
            y_range=rows,
            width=size + 60,
            height=size,
            tools="hover,save,reset",
            toolbar_location="above",
            x_axis_label=xlab,
            y_axis_label=ylab,
        )
        f.rect("col", "row", 1, 1, source=src, fill_color={"field": "value", "transform": mapper}, line_color=None)
        f.select_one(HoverTool).tooltips = [(ylab, "@row"), (xlab, "@col"), (name, "@value{0.000}")]
        f.xaxis.major_label_orientation = 1.0
        f.add_layout(ColorBar(color_mapper=mapper, ticker=BasicTicker(desired_num_ticks=6)), "right")
        figs.append(f)
    if result.knn:
        f = figure(
            title="k-NN top-1 accuracy per layer (%)",
            x_range=list(result.knn[0]["layers"]),
            width=size,
            height=size,
            tools="hover,save,reset",
            toolbar_location="above",
            y_range=(0, 100),
        )
        for curve, color in zip(result.knn, ("#1f77b4", "#ff7f0e", "#2ca02c"), strict=False):
            src = ColumnDataSource(
                {
                    "layer": curve["layers"],
                    "top1": [100 * v for v in curve["top1"]],
                    "model": [curve["model"]] * len(curve["layers"]),
                }
            )
            f.line("layer", "top1", source=src, color=color, line_width=2, legend_label=curve["model"])
            f.scatter("layer", "top1", source=src, color=color, size=7)
        f.select_one(HoverTool).tooltips = [("model", "@model"), ("layer", "@layer"), ("top-1 %", "@top1{0.0}")]
        f.xaxis.major_label_orientation = 1.0
        f.legend.location = "bottom_right"
        figs.append(f)
    head = Div(
        text=f"<h2>featviz compare</h2><p>{_html.escape(_title(result))}; "
        f"{_html.escape(result.protocol.get('cka', ''))}</p>"
    )
    page = file_html(
        column(head, *[row(*figs[i : i + 3]) for i in range(0, len(figs), 3)]), INLINE, title="featviz compare"
    )
    from featviz.io.outputs import write_text

    write_text(path, page)
