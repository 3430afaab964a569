"""Interactive maps: one self-contained HTML file (Bokeh, JavaScript inlined; no server/network).

Above ``featviz.maps.large_page.LARGE_PAGE_POINTS`` (200,000) points ``map_page`` writes the large
page instead (a canvas page and its data folder beside it; ``mode`` forces either).

The page and what it does are ``featviz.maps.page``; this module makes its panels from a fitted map
(``map_page``) or from the CAC figure's views (``views_page``), with their thumbnails.

Thumbnails are stored once per image (or pixel) as small WebP data URIs and looked up by
index when hovering, so a shared map of the same images costs one set. ``MAX_THUMBNAILS``
(20,000) thumbnails at most, and at most ``THUMB_BUDGET`` bytes of them; beyond that a seeded,
stated random subsample of points has one (the page and a warning say how many).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from featviz.errors import DataError
from featviz.io.progress import Progress
from featviz.maps.page import Panel, write_html

log = logging.getLogger(__name__)

MAX_THUMBNAILS = 20_000
THUMB_BUDGET = (
    24_000_000  # bytes of encoded thumbnails (the page adds ~1.3 MB of Bokeh and the data)
)


def _correspondence_keys(embs_rows: Sequence[tuple[object, np.ndarray]]) -> list[np.ndarray] | None:
    """Integer keys per panel (same image id, and same (y, x) for pixels -> same key), or None.

    None when no two panels share a row: then linking would only ever select nothing.
    """
    table: dict[tuple, int] = {}
    keys = []
    for emb, rows in embs_rows:
        ids = emb.ids[rows]
        if emb.is_pixels:
            yx = emb.yx[rows]
            kk = [
                table.setdefault((str(i), int(a), int(b)), len(table))
                for i, (a, b) in zip(ids, yx, strict=True)
            ]
        else:
            kk = [table.setdefault((str(i),), len(table)) for i in ids]
        keys.append(np.asarray(kk, np.int64))
    if len(keys) < 2:
        return None
    seen = [set(k.tolist()) for k in keys]
    shared = any(seen[i] & seen[j] for i in range(len(seen)) for j in range(i + 1, len(seen)))
    return keys if shared else None


def map_page(
    m,
    embs: Sequence,
    out: str | os.PathLike,
    *,
    npz_paths: Sequence[str | os.PathLike | None] | None = None,
    image_root: str | os.PathLike | None = None,
    title: str | None = None,
    max_thumbnails: int = MAX_THUMBNAILS,
    budget: int = THUMB_BUDGET,
    seed: int = 0,
    notes: Sequence[str] = (),
    force: bool = False,
    palette: str | None = None,
    mode: str = "auto",
    progress: Progress | None = None,
) -> Path:
    """The HTML page of a ``TsneMap`` (any method) with thumbnails from its embeddings files.

    Up to ``LARGE_PAGE_POINTS`` (200,000) points (``mode="auto"``), or with ``mode="inline"``: one
    self-contained Bokeh file, thumbnails inlined. Above, or with ``mode="large"``: a canvas page
    and its data folder beside it (``featviz.maps.large_page``).

    Args:
        m: the fitted map (``featviz.maps.projection.TsneMap``); its ``groups`` index ``embs``.
        embs: the ``Embeddings`` the map was made from, in panel order.
        out: the ``.html`` file.
        npz_paths: where each embeddings file lives (relative image roots are tried from there).
        image_root: the folder the images' ids are relative to (overrides the manifests).
        title: page heading.
        max_thumbnails: at most this many distinct thumbnails (a seeded random subsample of the
            points beyond that; stated on the page).
        budget: at most this many bytes of encoded thumbnails (further subsampled to fit).
        seed: seed of the subsample.
        notes: extra lines for the page.
        force: overwrite ``out``.
        palette: the class colours' matplotlib colour map (``--palette``; default tab10/tab20).
        mode: ``"auto"``, ``"inline"`` or ``"large"`` (``--html-mode``).
        progress: wraps the loop that reads the images and makes the thumbnails (a progress bar).

    Returns:
        The page's path. A warning (not an error) says when images cannot be found; the map is
        written without their thumbnails.
    """
    from featviz.data import thumbnails as th
    from featviz.maps import large_page

    if large_page.page_mode(len(m.coords), mode) == "large":
        return large_page.write_large_page(
            m, embs, out, npz_paths=npz_paths, image_root=image_root, title=title, max_thumbnails=max_thumbnails,
            seed=seed, notes=notes, force=force, palette=palette, progress=progress)
    npz_paths = list(npz_paths or [None] * len(embs))
    per_panel = [(embs[g], m.rows[m.groups == g]) for g in range(len(embs))]
    resolvers = [
        th.ImageResolver(e.ids, e.manifest, p, image_root)
        for e, p in zip(embs, npz_paths, strict=True)
    ]
    # which thumbnails are wanted: one per distinct image (or pixel); subsample when too many
    wanted: dict[tuple, list[tuple[int, int]]] = {}
    for g, ((e, rows), res) in enumerate(zip(per_panel, resolvers, strict=True)):
        for k, r in enumerate(rows):
            r = int(r)
            ident = (res.key(r),) + ((int(e.yx[r][0]), int(e.yx[r][1])) if e.is_pixels else ())
            wanted.setdefault(ident, []).append((g, k))
    keys = list(wanted)
    n_points = sum(len(r) for _, r in per_panel)
    note_lines = list(notes)
    if len(keys) > max_thumbnails:
        pick = np.sort(np.random.default_rng(seed).choice(len(keys), max_thumbnails, replace=False))
        keys = [keys[i] for i in pick]
    store = th.ThumbnailStore(th.side_for(len(keys)))
    thumbs = [np.full(len(r), -1, np.int64) for _, r in per_panel]
    missing: dict[int, set[str]] = {}
    for ident in keys if progress is None else progress(keys, description="thumbnails"):
        g, k = wanted[ident][0]
        e, rows = per_panel[g]
        res, r = resolvers[g], int(rows[k])
        if e.is_pixels:
            y, x = ident[1:]
            t = store.add(
                ident,
                lambda res=res, r=r, y=y, x=x: th._pixel_or_none(res.image(r), y, x, store.side),
            )
        else:
            t = store.add(ident, lambda res=res, r=r: th._image_or_none(res.image(r), store.side))
        if t < 0:
            missing.setdefault(g, set()).add(res.ids[r])
        for gg, kk in wanted[ident]:
            thumbs[gg][kk] = t
    uris = store.uris()
    if store.nbytes > budget:  # keep a random subset of thumbnails that fits
        order = np.random.default_rng(seed + 1).permutation(len(uris))
        sizes = np.array([len(u) for u in uris])[order]
        keep = np.zeros(len(uris), bool)
        keep[order[np.cumsum(sizes) <= budget]] = True
        for t in thumbs:
            t[(t >= 0) & ~keep[np.maximum(t, 0)]] = -1
    n_with = sum(int((t >= 0).sum()) for t in thumbs)
    for g, ids in missing.items():
        log.warning(
            "thumbnails: %d images of %s could not be found or read (looked in %s; e.g. %s); "
            "the map is "
            "written without them: pass --image-root DIR, the folder the ids are relative to",
            len(ids),
            m.group_names[g],
            resolvers[g].describe(),
            sorted(ids)[0],
        )
    if n_with < n_points:
        msg = (
            f"thumbnails for {n_with:,} of {n_points:,} points"
            + (
                f" (a random subsample, seed {seed}: at most {max_thumbnails:,} thumbnails / "
                f"{budget / 1e6:.0f} MB keep the page small and responsive)"
                if len(wanted) > len(keys) or store.nbytes > budget
                else ""
            )
            + (f"; {sum(len(v) for v in missing.values()):,} images not found" if missing else "")
        )
        note_lines.append(msg)
        if not missing:
            log.warning("%s", msg)
    keys_per_panel = _correspondence_keys(per_panel)
    panels = []
    for g, (e, rows) in enumerate(per_panel):
        sel = m.groups == g
        panels.append(
            Panel(
                m.group_names[g],
                m.coords[sel],
                m.labels[sel],
                files=e.ids[rows],
                yx=e.yx[rows] if e.is_pixels else None,
                keys=None if keys_per_panel is None else keys_per_panel[g],
                thumbs=thumbs[g],
            )
        )
    method = m.info.get("method", "tsne")
    note_lines.insert(
        0,
        f"{ {'tsne': 't-SNE', 'umap': 'UMAP', 'pca': 'PCA'}.get(method, method) } map, "
        f"{n_points:,} points"
        + (f", {len(panels)} panels in one shared map" if len(panels) > 1 else ""),
    )
    return write_html(
        out, [panels], m.class_names, uris, title=title, notes=note_lines, force=force, palette=palette
    )


def views_page(
    out: str | os.PathLike,
    view_images: Sequence[np.ndarray],
    view_yx: Sequence[np.ndarray],
    rows: Sequence[tuple[str, Sequence[np.ndarray]]],
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    view_names: Sequence[str],
    window: int | None = None,
    source: str | None = None,
    title: str | None = None,
    notes: Sequence[str] = (),
    force: bool = False,
) -> Path:
    """A page of views of the same pixels (CAC's Figure 3): a row per model, a panel per view.

    Every panel shows the same P pixels, so all panels are linked: selecting pixels in one
    selects them in every view and every row. Hover shows a crop of the view's image around the
    pixel with the pixel marked.

    Args:
        out: the ``.html`` file.
        view_images: per view, the (H, W, 3) uint8 image the model saw (crop, flips included).
        view_yx: per view, (P, 2) the (y, x) of each pixel in that view's image.
        rows: (row name, per-view (P, 2) map coordinates) for each model.
        labels: (P,) class of each pixel.
        class_names: label value -> name.
        view_names: one name per view.
        window: crop side around the pixel, in image pixels (default: a third of the image).
        source: the image the views were cut from (the hover names it with the view).
        title: page heading.
        notes: lines shown under the heading.
        force: overwrite ``out``.
    """
    from featviz.data import thumbnails as th

    labels = np.asarray(labels, np.int64)
    n_views = len(view_images)
    if len(view_yx) != n_views or len(view_names) != n_views:
        raise DataError(
            f"give one image, one (y, x) array and one name per view ({n_views} images)"
        )
    store = th.ThumbnailStore(th.side_for(n_views * len(labels)))
    thumbs = []
    for v, (img, yx) in enumerate(zip(view_images, view_yx, strict=True)):
        pil = th.Image.fromarray(np.asarray(img, np.uint8)).convert("RGB")
        thumbs.append(
            np.array(
                [
                    store.add_pixel((v, i), pil, int(y), int(x), window=window)
                    for i, (y, x) in enumerate(yx)
                ],
                np.int64,
            )
        )
    keys = np.arange(len(labels))
    grid = []
    for name, coords in rows:
        if len(coords) != n_views:
            raise DataError(
                f"row {name!r} has {len(coords)} coordinate arrays; expected {n_views} (one a view)"
            )
        grid.append(
            [
                Panel(
                    f"{name} · {view_names[v]}",
                    coords[v],
                    labels,
                    files=[f"{source + ' · ' if source else ''}{view_names[v]} crop"] * len(labels),
                    yx=np.asarray(view_yx[v]),
                    keys=keys,
                    thumbs=thumbs[v],
                )
                for v in range(n_views)
            ]
        )
    lines = [f"{len(labels):,} pixels seen in {n_views} views; {len(rows)} row(s), one map per row"]
    return write_html(
        out, grid, class_names, store.uris(), title=title, notes=lines + list(notes), force=force
    )
