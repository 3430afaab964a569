"""The interactive page of a large map: ``map.html`` and its data folder ``map_files/`` beside it.

Above ``LARGE_PAGE_POINTS`` (200,000) points a Bokeh page with everything inlined is slow to open
and to hover, so ``featviz.maps.interactive.map_page`` writes this one instead (``--html-mode``
forces either). Still one command, no server: open ``map.html`` from disk; its folder must stay
beside it. What the folder holds:

- ``points.js``: every point's coordinates (float32), class (uint8/uint16), and, when they are
  not simply the point's order, its row and file index (uint32), plus pixel (y, x) (uint16) for
  pixel embeddings and the (point, thumbnail) pairs; binary arrays as base64 in one script (a
  ``file://`` page may load a script beside it, but browsers refuse it ``fetch``);
- ``names/NNNNN.js``: the distinct file names, 20,000 a chunk, loaded only when a hovered point
  needs one;
- ``thumbs/DDD/NNNNNN.webp``: thumbnails of a seeded random sample of the points
  (``max_thumbnails``, 20,000 by default); hovering any other point says it has none.

The page (``featviz.maps.large_script``) draws the points as a density raster on a 2-D canvas,
re-rasterised at every pan and zoom, and hover finds the nearest point with a grid index.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import numpy as np

from featviz.errors import DataError
from featviz.io.progress import Progress
from featviz.maps.large_script import SCRIPT, STYLE
from featviz.maps.page import UNKNOWN, _esc, _limits, class_colors

log = logging.getLogger(__name__)

LARGE_PAGE_POINTS = 200_000
"""``--html-mode auto`` writes the large page above this many points (the inline Bokeh page below)."""
NAMES_CHUNK = 20_000
THUMB_SIDE = 96
HTML_MODES = ("auto", "inline", "large")


def page_mode(n_points: int, mode: str = "auto") -> str:
    """``"inline"`` (one self-contained Bokeh file) or ``"large"`` (a canvas page and its folder)."""
    if mode not in HTML_MODES:
        raise DataError(f"--html-mode must be one of {', '.join(HTML_MODES)}, got {mode!r}")
    if mode == "auto":
        return "large" if n_points > LARGE_PAGE_POINTS else "inline"
    return mode


def folder_for(out: str | os.PathLike) -> Path:
    """The data folder that goes with the page ``out``: ``map.html`` -> ``map_files``."""
    out = Path(out)
    return out.with_name(out.stem + "_files")


def page_outputs(out: str | os.PathLike, n_points: int, mode: str | None = "auto") -> dict[str, str]:
    """What the page ``out`` adds to a command's outputs: ``{"html_files": folder}`` for a large page."""
    return {"html_files": str(folder_for(out))} if page_mode(n_points, mode or "auto") == "large" else {}


def check_large_outputs(out: str | os.PathLike, *, force: bool = False) -> None:
    """Check, before any work, that the page and its folder can be written.

    Raises:
        DataError: ``out`` does not end in .html.
        OutputError, OutputExistsError: see ``featviz.io.outputs.check_output``.
    """
    from featviz.io.outputs import check_output

    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise DataError(f"--html must end in .html, got {out.name!r}")
    check_output(out, force=force, folder=False)
    check_data_folder(out, force=force)


def check_data_folder(out: str | os.PathLike, *, force: bool = False) -> None:
    """Check the data folder of the page ``out`` (when it exists) as ``check_large_outputs`` does.

    Raises:
        OutputError, OutputExistsError: see ``featviz.io.outputs.check_output``.
    """
    from featviz.io.outputs import check_output

    check_output(folder_for(out), force=force, folder=True)


def pick_thumbnails(n_points: int, max_thumbnails: int, seed: int = 0) -> np.ndarray:
    """The points (sorted indices, in page order) that get a thumbnail: a seeded random sample."""
    if n_points <= max_thumbnails:
        return np.arange(n_points)
    return np.sort(np.random.default_rng(seed).choice(n_points, max_thumbnails, replace=False))


def _b64(a: np.ndarray) -> list[str]:
    a = np.ascontiguousarray(a)
    return [a.dtype.name, base64.b64encode(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()).decode()]


def _uint(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    top = int(a.max(initial=0))
    return a.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32)


def _first_seen_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes numbering the distinct values in order of first appearance, and those values."""
    uniq, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank[inverse.reshape(-1)], uniq[order]


def _thumbnails(m, embs, per_panel, resolvers, picked, starts, folder: Path, progress: Progress | None):
    """Write the picked points' thumbnails under ``folder/thumbs``; (points, ids) and what was missing."""
    from featviz.data import thumbnails as th

    store = th.ThumbnailStore(THUMB_SIDE)
    group = np.searchsorted(starts, picked, side="right") - 1
    # decode each image once: visit the picked points image by image
    keyed = []
    for i, g in zip(picked.tolist(), group.tolist(), strict=True):
        e, rows = per_panel[g]
        r = int(rows[i - starts[g]])
        keyed.append((g, str(e.ids[r]), i, r))
    keyed.sort()
    points, ids, missing = [], [], {}
    for g, _, i, r in keyed if progress is None else progress(keyed, description="thumbnails"):
        e, res = per_panel[g][0], resolvers[g]
        if e.is_pixels:
            y, x = (int(v) for v in e.yx[r])
            t = store.add(
                (res.key(r), y, x), lambda res=res, r=r, y=y, x=x: th._pixel_or_none(res.image(r), y, x, store.side)
            )
        else:
            t = store.add((res.key(r),), lambda res=res, r=r: th._image_or_none(res.image(r), store.side))
        if t < 0:
            missing.setdefault(g, set()).add(res.ids[r])
            continue
        points.append(i)
        ids.append(t)
    for t, data in enumerate(store.data):
        p = folder / "thumbs" / f"{t // 1000:03d}" / f"{t:06d}.webp"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    order = np.argsort(points, kind="stable")
    return np.asarray(points, np.uint32)[order], np.asarray(ids, np.uint32)[order], missing, len(store)


def write_large_page(
    m,
    embs: Sequence,
    out: str | os.PathLike,
    *,
    npz_paths: Sequence[str | os.PathLike | None] | None = None,
    image_root: str | os.PathLike | None = None,
    title: str | None = None,
    max_thumbnails: int = 20_000,
    seed: int = 0,
    notes: Sequence[str] = (),
    force: bool = False,
    palette: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """The large page of a ``TsneMap``: ``out`` and its folder ``folder_for(out)``, both written atomically.

    Arguments as ``featviz.maps.interactive.map_page``; ``max_thumbnails`` points (a seeded random
    sample) get a thumbnail file.

    Returns:
        The page's path.

    Raises:
        DataError: ``out`` does not end in .html.
        OutputExistsError: the page or its folder exists and ``force`` is False.
        OutputError: the folder exists and is not featviz's.
    """
    from featviz.data import thumbnails as th
    from featviz.io.outputs import atomic_dir, atomic_path

    out = Path(out)
    check_large_outputs(out, force=force)
    folder = folder_for(out)
    npz_paths = list(npz_paths or [None] * len(embs))
    per_panel = [(embs[g], m.rows[m.groups == g]) for g in range(len(embs))]
    sizes = [len(r) for _, r in per_panel]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n_points = int(starts[-1])
    coords = np.concatenate([m.coords[m.groups == g] for g in range(len(embs))]).astype(np.float32)
    labels = np.concatenate([m.labels[m.groups == g] for g in range(len(embs))]).astype(np.int64)
    n_classes = max(len(m.class_names), int(labels.max(initial=-1)) + 1)
    class_names = [m.class_names[i] if i < len(m.class_names) else str(i) for i in range(n_classes)]
    rows = np.concatenate([r for _, r in per_panel]).astype(np.int64)
    files = np.concatenate([np.asarray(e.ids)[r].astype(str) for e, r in per_panel])
    codes, distinct = _first_seen_codes(files)
    pixels = any(e.is_pixels for e, _ in per_panel)
    arrays = {
        "x": coords[:, 0],
        "y": coords[:, 1],
        "label": _uint(np.where(labels < 0, n_classes, labels)),
    }
    if not np.array_equal(rows, np.concatenate([np.arange(s) for s in sizes])):
        arrays["row"] = _uint(rows).astype(np.uint32)
    if not np.array_equal(codes, np.arange(n_points)):
        arrays["name"] = _uint(codes)
    if pixels:
        yx = np.concatenate([e.yx[r] if e.is_pixels else np.zeros((len(r), 2), np.int64) for e, r in per_panel])
        arrays["py"], arrays["px"] = _uint(yx[:, 0]), _uint(yx[:, 1])
    resolvers = [th.ImageResolver(e.ids, e.manifest, p, image_root) for e, p in zip(embs, npz_paths, strict=True)]
    note_lines = list(notes)
    method = m.info.get("method", "tsne")
    note_lines.insert(
        0,
        f"{ {'tsne': 't-SNE', 'umap': 'UMAP', 'pca': 'PCA'}.get(method, method) } map, {n_points:,} points"
        + (f", {len(sizes)} panels in one shared map" if len(sizes) > 1 else "")
        + f"; the large page (more than {LARGE_PAGE_POINTS:,} points, or --html-mode large): points drawn as a "
        "density raster (a pixel's colour is the mean of its points' classes, its opacity grows with their number); "
        f"its data is in {folder.name}/ beside it",
    )
    with atomic_dir(folder, force=force, command="tsne --html") as tmp:
        picked = pick_thumbnails(n_points, max_thumbnails, seed)
        t_pts, t_ids, missing, n_thumbs = _thumbnails(m, embs, per_panel, resolvers, picked, starts, tmp, progress)
        n_with = len(t_pts)
        if len(t_pts):
            arrays["thumb_point"], arrays["thumb_id"] = t_pts, t_ids
        for g, ids in missing.items():
            log.warning(
                "thumbnails: %d images of %s could not be found or read (looked in %s; e.g. %s); the map is "
                "written without them: pass --image-root DIR, the folder the ids are relative to",
                len(ids),
                m.group_names[g],
                resolvers[g].describe(),
                sorted(ids)[0],
            )
        if n_with == 0:
            no_thumb = ""
            note_lines.append("no thumbnails (images not found): hover shows each point's class, file and row")
        else:
            no_thumb = (
                f"no thumbnail: {n_with:,} of {n_points:,} points have one"
                + (f" (a random sample, seed {seed})" if n_points > max_thumbnails else "")
                + ("; some images not found" if missing else "")
            )
            note_lines.append(
                f"thumbnails for {n_with:,} of {n_points:,} points"
                + (
                    f" (a random sample, seed {seed}; at most {max_thumbnails:,}: --html-thumbnails N changes it)"
                    if n_points > max_thumbnails
                    else ""
                )
                + (f"; {sum(len(v) for v in missing.values()):,} images not found" if missing else "")
            )
        (tmp / "points.js").write_text(
            "window.FEATVIZ_POINTS = " + json.dumps({k: _b64(v) for k, v in arrays.items()}) + ";\n", encoding="utf-8"
        )
        (tmp / "names").mkdir()
        for c in range(0, len(distinct), NAMES_CHUNK):
            chunk = json.dumps([str(s) for s in distinct[c : c + NAMES_CHUNK]], ensure_ascii=False)
            (tmp / "names" / f"{c // NAMES_CHUNK:05d}.js").write_text(
                f"featviz_names({c // NAMES_CHUNK}, {chunk});\n", encoding="utf-8"
            )
        (x0, x1), (y0, y1) = _limits([SimpleNamespace(coords=coords)])
        meta = {
            "folder": quote(folder.name),
            "classes": class_names,
            "colors": class_colors(n_classes, palette),
            "unknown_color": UNKNOWN,
            "bounds": [x0, x1, y0, y1],
            "panels": [
                {"title": str(m.group_names[g]), "start": int(starts[g]), "n": sizes[g]} for g in range(len(sizes))
            ],
            "names_chunk": NAMES_CHUNK,
            "n_names": len(distinct),
            "n_thumbnails": n_thumbs,
            "note_no_thumb": no_thumb,
        }
    with atomic_path(out, force=force) as tmp_html:  # the page last: it names a folder already in place
        tmp_html.write_text(_html(meta, title, note_lines, folder.name), encoding="utf-8")
    return out


def _html(meta: dict, title: str | None, notes: Sequence[str], folder: str) -> str:
    lines = list(notes) + [
        "hover a point for its thumbnail, class, file and row; drag to pan, wheel to zoom, double-click to "
        "reset; shift-drag to select (the same rows in every panel; counted by class, downloadable as CSV; Esc "
        "clears); click a legend entry to hide a class"
    ]
    head = (f"<h2>{_esc(title)}</h2>" if title else "") + "".join(f"<div>{_esc(s)}</div>" for s in lines)
    data = json.dumps(meta, ensure_ascii=False).replace("</", "<\\/")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_esc(title or 'featviz map')}</title><style>{STYLE}</style></head><body>"
        f"<div id='featviz-head'>{head}</div>"
        "<div id='featviz-main'><div id='featviz-legend'></div></div><div id='featviz-card'></div>"
        f"<script type='application/json' id='featviz-meta'>{data}</script>"
        f"<script src='{_esc(quote(folder))}/points.js'></script>"
        f"<script>{SCRIPT}</script></body></html>\n"
    )
