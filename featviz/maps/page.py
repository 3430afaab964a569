"""The interactive page itself: scatter panels in one self-contained HTML file.

Bokeh, JavaScript inlined; no server/network. ``featviz.maps.interactive`` builds the panels of a map
or of the CAC figure's views and their thumbnails; ``write_html`` draws any panels.

What the page does:

- pan, wheel zoom, box select, reset (Bokeh's own tools); panels of one map share their axes,
  so panning one pans all;
- a legend whose entries hide/show a class in every panel (click);
- hover shows the point's thumbnail (the image, or for pixel embeddings a crop around the
  pixel with the pixel marked), its class, its file and, for pixels, its (y, x);
- panels whose rows correspond (the same image ids, or the same pixels of the CAC figure's
  views) are linked: selecting points in one selects the same rows in the others.

Why Bokeh rather than Plotly: Bokeh writes a standalone file with its JavaScript inlined
(``bokeh.resources.INLINE``, about 1.3 MB) and its hover template is plain HTML, so an
``<img>`` per point needs no callbacks; linked selection, legend toggling and shared ranges are
built in; and it was already a dependency of umap-learn's plotting. Plotly's ``<img>`` hover needs
custom JavaScript event handling and its inlined bundle is ~3.5 MB.
"""

from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featviz.errors import DataError

UNKNOWN = "#999999"
_BLANK = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"

# d3's category10/20 are matplotlib's tab10/tab20: the same colours as the PNG
TAB10 = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]
TAB20 = [
    "#1f77b4",
    "#aec7e8",
    "#ff7f0e",
    "#ffbb78",
    "#2ca02c",
    "#98df8a",
    "#d62728",
    "#ff9896",
    "#9467bd",
    "#c5b0d5",
    "#8c564b",
    "#c49c94",
    "#e377c2",
    "#f7b6d2",
    "#7f7f7f",
    "#c7c7c7",
    "#bcbd22",
    "#dbdb8d",
    "#17becf",
    "#9edae5",
]


def class_colors(n: int, palette: str | None = None) -> list[str]:
    """Hex colours for ``n`` classes, as ``featviz.maps.plotting.class_colors`` picks them (``--palette``)."""
    if palette is not None:
        from matplotlib.colors import to_hex

        from featviz.maps.plotting import class_colors as rgba

        return [to_hex(c) for c in rgba(n, palette)]
    if n <= 10:
        return TAB10[:n]
    if n <= 20:
        return TAB20[:n]
    return [
        "#{:02x}{:02x}{:02x}".format(*(int(255 * c) for c in colorsys.hsv_to_rgb(i / n, 1.0, 1.0)))
        for i in range(n)
    ]


@dataclass
class Panel:
    """One scatter panel of the page.

    Attributes:
        title: shown above the panel.
        coords: (N, 2) map coordinates.
        labels: (N,) class index, -1 = unknown.
        files: (N,) what the hover names as the point's file.
        yx: (N, 2) pixel (y, x) for pixel embeddings, else None.
        keys: (N,) int correspondence keys: rows with equal keys in linked panels are "the same
            row" (selecting one selects the others); None = not linked.
        thumbs: (N,) index into the page's thumbnail list, -1 = none.
    """

    title: str
    coords: np.ndarray
    labels: np.ndarray
    files: Sequence[str] | None = None
    yx: np.ndarray | None = None
    keys: np.ndarray | None = None
    thumbs: np.ndarray | None = None
    extra: dict[str, Sequence] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Coerce the arrays; every per-point field must have one entry per point."""
        self.coords = np.asarray(self.coords, np.float64).reshape(-1, 2)
        n = len(self.coords)
        self.labels = np.asarray(self.labels, np.int64).reshape(n)
        self.files = [""] * n if self.files is None else [str(f) for f in self.files]
        self.thumbs = (
            np.full(n, -1, np.int64) if self.thumbs is None else np.asarray(self.thumbs, np.int64)
        )
        if len(self.files) != n or len(self.thumbs) != n:
            raise DataError(
                f"panel {self.title!r}: files/thumbs must have one entry per point ({n})"
            )


def point_size(n: int) -> float:
    """Marker diameter in screen pixels for a panel of ``n`` points."""
    return float(np.clip(25.0 / max(n, 1) ** 0.25, 2.5, 9.0))


def _limits(
    panels: Sequence[Panel], margin: float = 0.04
) -> tuple[tuple[float, float], tuple[float, float]]:
    allp = np.concatenate([p.coords for p in panels if len(p.coords)] or [np.zeros((1, 2))])
    lo, hi = allp.min(0), allp.max(0)
    half = max(float((hi - lo).max()), 1e-9) * (0.5 + margin)
    mid = (lo + hi) / 2
    return (float(mid[0] - half), float(mid[0] + half)), (
        float(mid[1] - half),
        float(mid[1] + half),
    )


_LINK_JS = """
if (window.__featviz_linking) { return; }
window.__featviz_linking = true;
try {
  const keys = me.data.key;
  const want = new Set(me.selected.indices.map(i => keys[i]));
  for (const o of others) {
    const ok = o.data.key, idx = [];
    for (let i = 0; i < ok.length; i++) { if (want.has(ok[i])) { idx.push(i); } }
    o.selected.indices = idx;
  }
} finally { window.__featviz_linking = false; }
"""

_THUMB_JS = """
if (format === 'note') { return value >= 0 ? '' : (total ? 'no thumbnail (' + why + ')' : ''); }
return value >= 0 ? thumbs.data.uri[value] : blank;
"""

# the page's own helper (used by the tests through the DevTools protocol, handy in a console):
# featviz.locate(panel, row) -> page (x, y) of that point; featviz.panels() -> panel names
_PAGE_JS = """
<script>
window.featviz = {
  _view(name) {
    const walk = (v) => { if (!v) return null; if (v.model && v.model.name === name) return v;
      for (const c of (v.child_views || [])) { const r = walk(c); if (r) return r; } return null; };
    for (const root of Bokeh.index) { const r = walk(root); if (r) return r; }
    return null;
  },
  panels() { return %s; },
  locate(panel, row) {
    const v = this._view('featviz-panel-' + panel);
    const src = v.model.renderers[0].data_source;
    const x = src.data.x[row], y = src.data.y[row];
    const r = v.canvas_view.el.getBoundingClientRect();
    return [r.left + v.frame.x_scale.compute(x), r.top + v.frame.y_scale.compute(y)];
  },
  ready() { return typeof Bokeh !== 'undefined' && [...Bokeh.index].length > 0 &&
    this._view('featviz-panel-0') !== null; },
};
</script>
"""


def write_html(
    out: str | os.PathLike,
    rows: Sequence[Sequence[Panel]],
    class_names: Sequence[str],
    thumbnails: Sequence[str] = (),
    *,
    title: str | None = None,
    notes: Sequence[str] = (),
    link: bool = True,
    force: bool = False,
    palette: str | None = None,
) -> Path:
    """Write one standalone interactive page of scatter panels.

    Args:
        out: the ``.html`` file.
        rows: panels, row by row; the panels of a row share their axes (one map), and every
            panel's points are coloured by ``class_names``.
        class_names: label value -> name (unknown labels are grey).
        thumbnails: image data URIs; ``Panel.thumbs`` index into them.
        title: page heading.
        notes: lines shown under the heading (e.g. the thumbnail subsample).
        link: link selection across panels that have ``keys``.
        force: overwrite ``out``.
        palette: the class colours' matplotlib colour map (``--palette``; default tab10/tab20).

    Raises:
        DataError: ``out`` does not end in .html, or no panel.
        OutputExistsError: ``out`` exists and ``force`` is False.
    """
    from bokeh.embed import file_html
    from bokeh.layouts import column, gridplot
    from bokeh.models import (
        CDSView,
        ColumnDataSource,
        CustomJS,
        CustomJSHover,
        Div,
        GroupFilter,
        HoverTool,
        Legend,
        LegendItem,
        Range1d,
    )
    from bokeh.plotting import figure
    from bokeh.resources import INLINE

    from featviz.io.outputs import atomic_path, check_writable

    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise DataError(f"--html must end in .html, got {out.name!r}")
    flat = [p for row in rows for p in row]
    if not flat:
        raise DataError("nothing to draw: no panel")
    check_writable(out, force=force)
    labels_all = np.concatenate([p.labels for p in flat])
    n_classes = max(len(class_names), int(labels_all.max(initial=-1)) + 1)
    names = [class_names[i] if i < len(class_names) else str(i) for i in range(n_classes)]
    colors = class_colors(n_classes, palette)
    present = sorted(int(i) for i in np.unique(labels_all) if i >= 0)
    has_unknown = bool((labels_all < 0).any())
    thumbs_src = ColumnDataSource({"uri": list(thumbnails)}, name="featviz-thumbnails")
    n_missing = sum(int((p.thumbs < 0).sum()) for p in flat)
    why = "subsampled or not found" if thumbnails else "images not found"
    fmt = CustomJSHover(
        args=dict(thumbs=thumbs_src, blank=_BLANK, total=n_missing > 0, why=why), code=_THUMB_JS
    )
    pixels = any(p.yx is not None for p in flat)
    tip = (
        '<div style="max-width:260px">'
        '<img src="@thumb{src}" style="display:block;margin:2px 0 4px 0;image-rendering:auto">'
        '<div style="font-size:10px;color:#888">@thumb{note}</div>'
        "<div><b>@label_name</b></div>"
        '<div style="font-size:11px;word-break:break-all">@file</div>'
        + ('<div style="font-size:11px">(y, x) = (@py, @px)</div>' if pixels else "")
        + "</div>"
    )
    n_cols = max(len(r) for r in rows)
    width = 560 if n_cols == 1 else 460 if n_cols == 2 else 380
    figs, sources, items = [], [], {c: [] for c in present + ([-1] if has_unknown else [])}
    k = 0
    for row in rows:
        (x0, x1), (y0, y1) = _limits(row)
        xr, yr = Range1d(x0, x1), Range1d(y0, y1)
        n_max = max(len(p.coords) for p in row)
        fig_row = []
        for p in row:
            n = len(p.coords)
            order = np.random.default_rng(k).permutation(
                n
            )  # drawing order per class is shuffled too
            data = {
                "x": p.coords[:, 0],
                "y": p.coords[:, 1],
                "cls": [str(v) for v in p.labels],
                "label_name": [names[v] if v >= 0 else "unknown" for v in p.labels],
                "file": p.files,
                "thumb": p.thumbs,
                "row": np.arange(n),
            }
            if p.yx is not None:
                data["py"], data["px"] = p.yx[:, 0], p.yx[:, 1]
            data["key"] = p.keys if p.keys is not None else np.arange(n)
            for kk, v in p.extra.items():
                data[kk] = v
            data = {
                kk: (np.asarray(v)[order] if isinstance(v, np.ndarray) else [v[i] for i in order])
                for kk, v in data.items()
            }
            src = ColumnDataSource(data, name=f"featviz-source-{k}")
            f = figure(
                width=width,
                height=width,
                x_range=xr,
                y_range=yr,
                match_aspect=True,
                tools="pan,wheel_zoom,box_select,tap,reset,save",
                active_scroll="wheel_zoom",
                active_drag="pan",
                output_backend="webgl",
                title=f"{p.title}  (n={n:,})",
                name=f"featviz-panel-{k}",
            )
            f.xaxis.visible = f.yaxis.visible = False
            f.grid.visible = False
            size = point_size(n_max)
            alpha = float(np.clip(1.3 - 0.17 * np.log10(max(n_max, 1)), 0.35, 0.95))
            rends = []
            for c in items:
                view = CDSView(filter=GroupFilter(column_name="cls", group=str(c)))
                r = f.scatter(
                    "x",
                    "y",
                    source=src,
                    view=view,
                    size=size,
                    fill_color=colors[c] if c >= 0 else UNKNOWN,
                    line_color=None,
                    fill_alpha=alpha,
                    selection_fill_alpha=1.0,
                    nonselection_fill_alpha=0.08,
                    hover_fill_alpha=1.0,
                    hover_line_color="black",
                )
                items[c].append(r)
                rends.append(r)
            f.add_tools(HoverTool(renderers=rends, tooltips=tip, formatters={"@thumb": fmt}, limit=1))
            fig_row.append(f)
            sources.append((src, p.keys is not None))
            k += 1
        figs.append(fig_row)
    # one legend beside each row (every row's last panel keeps the same width); each entry
    # holds the class's renderers of every panel, so a click hides the class everywhere
    for fig_row in figs:
        legend = Legend(
            items=[
                LegendItem(label=names[c] if c >= 0 else "unknown", renderers=r)
                for c, r in items.items()
            ],
            click_policy="hide",
            title="class (click to hide)",
            location="top_left",
        )
        fig_row[-1].add_layout(legend, "right")
        fig_row[-1].width += 150
    if link:
        linked = [s for s, has in sources if has]
        for s in linked:
            others = [o for o in linked if o is not s]
            if others:
                s.selected.js_on_change(
                    "indices", CustomJS(args=dict(me=s, others=others), code=_LINK_JS)
                )
    head = f"<h2 style='margin:4px 0;font-family:sans-serif'>{_esc(title)}</h2>" if title else ""
    lines = list(notes) + [
        "hover a point for its thumbnail; box-select (toolbar) to select, and linked panels "
        "select the same rows; click a legend entry to hide a class; wheel to zoom"
    ]
    head += "".join(
        f"<div style='font-family:sans-serif;font-size:12px;color:#555'>{_esc(s)}</div>"
        for s in lines
    )
    grid = gridplot(
        [list(r) + [None] * (n_cols - len(r)) for r in figs],
        merge_tools=True,
        toolbar_options=dict(logo=None),
        toolbar_location="above",
    )
    layout = column(Div(text=head, name="featviz-head"), grid)
    page_js = _PAGE_JS % json.dumps([p.title for p in flat])
    html = file_html(
        layout,
        INLINE,
        title or "featviz map",
        template="{% block postamble %}" + page_js + "{% endblock %}",
    )
    with atomic_path(out, force=True) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return out


def _esc(s: str | None) -> str:
    import html

    return html.escape(str(s or ""))
