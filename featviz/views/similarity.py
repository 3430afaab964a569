"""Patch similarity: the cosine similarity of one patch's feature to every patch of every image.

What DINOv3's README figure and its dense-matching notebook show (dinov3 #216, #231; dinov2 #63):
name a patch (a pixel of the first image, or a patch by its row and column), take its feature at a
layer, and colour every patch of every image by the cosine similarity of its feature to that one.

1. The features are the layer's ``(C, h, w)`` map from the feature core (a ViT's patch tokens,
   its class/register/storage tokens left out by the model's ``TokenLayout``; a CNN's feature
   map), for all images at the same input size, through the view pipeline's eval transform.
2. Each patch feature is l2-normalised; the similarity of two patches is the dot product of their
   unit vectors, in [-1, 1]; the query patch's similarity to itself is 1.
3. A pixel (x, y) of the first image maps to the patch under it after the eval transform
   (``featviz.data.images.input_point``: resize, and the center crop of a square size); a point
   that the crop cuts away is refused.
4. Pictures: per query, all images share one colour scale (``joint_scale``): the lowest similarity
   over all images is dark, the highest (the query patch itself) bright, so images compare.

``matches`` adds mutual nearest-neighbour correspondences between two images (``views.matches``),
``html`` the interactive page (``views.similarity_page``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from featviz.errors import DataError, OptionError
from featviz.io.progress import Progress
from featviz.style import DEFAULT_STYLE, PlotStyle
from featviz.views.matches import Matches, matches_figure, mutual_nearest_neighbours
from featviz.views.runner import ViewResult, ViewRunner, safe_stem
from featviz.views.similarity_page import PAGE_BUDGET, joint_scale, page_maps, write_page

log = logging.getLogger(__name__)

CMAP = "inferno"
ALPHA = 0.6
QUERY_COLOR = (0.0, 0.9, 1.0)


@dataclass(frozen=True)
class Query:
    """One query patch.

    Attributes:
        image: Index of the image it is taken from (the first one from the command line).
        patch: (row, column) in the feature grid.
        point: The pixel (x, y) of that image it was named by (None: named by ``--patch``).
        input_point: Where the pixel lands in the model's input, (x, y) in pixels.
    """

    image: int
    patch: tuple[int, int]
    point: tuple[float, float] | None = None
    input_point: tuple[float, float] | None = None

    def to_dict(self, ids: Sequence[str]) -> dict[str, Any]:
        """The query as ``similarity.json`` records it."""
        return {
            "image": ids[self.image],
            "patch": list(self.patch),
            "point": None if self.point is None else list(self.point),
            "input_point": None if self.input_point is None else [round(v, 2) for v in self.input_point],
        }


# ------------------------------------------------------------------ the computation
def unit_features(maps: np.ndarray) -> np.ndarray:
    """(N, C, h, w) feature maps -> (N, h, w, C) float32 unit vectors (a zero feature stays zero).

    Raises:
        DataError: the maps hold NaN or Inf.
    """
    if maps.ndim != 4:
        raise DataError(f"feature maps must be (N, C, h, w), got shape {maps.shape}")
    x = np.ascontiguousarray(maps.transpose(0, 2, 3, 1), np.float32)
    if not np.isfinite(x).all():
        raise DataError("the feature maps contain NaN or Inf; check the model and the layer")
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def similarity_maps(unit: np.ndarray, image: int, patch: tuple[int, int]) -> np.ndarray:
    """(N, h, w) cosine similarity of every patch to ``patch`` of ``image`` ((N, h, w, C) unit vectors)."""
    return unit @ unit[image, patch[0], patch[1]]


def parse_pair(text: str, what: str = "--point") -> tuple[int, int]:
    """``"X,Y"`` (or ``"I,J"``) as two integers.

    Raises:
        DataError: not two comma-separated integers.
    """
    parts = [p.strip() for p in str(text).split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise DataError(f"{what} {text!r}: expected two integers separated by a comma, e.g. 40,25") from None


def point_query(
    point: tuple[int, int],
    image_wh: tuple[int, int],
    hw: tuple[int, int],
    grid: tuple[int, int],
    name: str,
    *,
    center_crop: bool | None = None,
) -> Query:
    """The query patch under pixel ``point`` = (x, y) of the first image (size ``image_wh`` = (w, h)).

    Raises:
        DataError: the point is outside the image, or the center crop cuts it away.
    """
    from featviz.data.images import input_point

    x, y = point
    w, h = image_wh
    if not (0 <= x < w and 0 <= y < h):
        raise DataError(
            f"--point {x},{y} is outside the first image {name} ({w}x{h} pixels: x in 0..{w - 1}, "
            f"y in 0..{h - 1}); give pixel coordinates of that image"
        )
    xy = input_point((x, y), (w, h), hw, center_crop)
    if xy is None:
        raise DataError(
            f"--point {x},{y} of {name} is cut away by the center crop to {hw[0]}x{hw[1]}; pick a point "
            "nearer the centre, or --image-size HxW, which resizes the whole image"
        )
    row = min(grid[0] - 1, int(xy[1] * grid[0] / hw[0]))
    col = min(grid[1] - 1, int(xy[0] * grid[1] / hw[1]))
    return Query(0, (row, col), (float(x), float(y)), xy)


def patch_query(patch: tuple[int, int], grid: tuple[int, int]) -> Query:
    """The query ``--patch I,J`` (row, column) of the first image.

    Raises:
        DataError: outside the feature grid.
    """
    i, j = patch
    if not (0 <= i < grid[0] and 0 <= j < grid[1]):
        raise DataError(
            f"--patch {i},{j} is outside the {grid[0]}x{grid[1]} feature grid (row 0..{grid[0] - 1}, "
            f"column 0..{grid[1] - 1})"
        )
    return Query(0, (int(i), int(j)))


def pick_pair(pair: str | None, ids: Sequence[str]) -> tuple[int, int]:
    """The two images ``--matches`` compares: both when there are two, else ``--pair A,B`` (ids or 0-based indices).

    Raises:
        DataError: fewer than two images, or more without a valid ``--pair``.
    """
    if len(ids) < 2:
        raise DataError(f"--matches needs two images, got {len(ids)}; give two images (or more and --pair A,B)")
    if pair is None:
        if len(ids) > 2:
            raise DataError(
                f"--matches compares two images and {len(ids)} were given; name them with --pair A,B "
                f"(image ids such as {ids[0]!r}, or 0-based positions)"
            )
        return 0, 1
    parts = [p.strip() for p in pair.split(",")]
    if len(parts) != 2:
        raise OptionError(f"--pair {pair!r}: expected two images separated by a comma")
    out = []
    for p in parts:
        if p in ids:
            out.append(list(ids).index(p))
        elif p.isdigit() and int(p) < len(ids):
            out.append(int(p))
        else:
            raise DataError(
                f"--pair: {p!r} is neither an image id nor a position 0..{len(ids) - 1}; "
                f"the ids are {', '.join(ids[:5])}{' …' if len(ids) > 5 else ''}"
            )
    if out[0] == out[1]:
        raise DataError(f"--pair {pair!r} names the same image twice; give two different images")
    return out[0], out[1]


# ------------------------------------------------------------------ pictures
def mark_patch(
    rgb: np.ndarray, patch: tuple[int, int], grid: tuple[int, int], color: Sequence[float] = QUERY_COLOR
) -> np.ndarray:
    """A copy of ``rgb`` with a square drawn around the patch (the query), outside it, thick enough for a thumbnail."""
    h, w = rgb.shape[:2]
    out = rgb.copy()
    t = max(2, min(h, w) // 100)
    r0, r1 = int(patch[0] * h / grid[0]) - t, int((patch[0] + 1) * h / grid[0]) + t
    c0, c1 = int(patch[1] * w / grid[1]) - t, int((patch[1] + 1) * w / grid[1]) + t
    for rows, cols in (
        ((r0, r0 + t), (c0, c1)),
        ((r1 - t, r1), (c0, c1)),
        ((r0, r1), (c0, c0 + t)),
        ((r0, r1), (c1 - t, c1)),
    ):
        out[max(0, rows[0]) : max(0, rows[1]), max(0, cols[0]) : max(0, cols[1])] = color
    return out


def overlay(
    rgb: np.ndarray, scaled: np.ndarray, query: Query | None, grid: tuple[int, int], cmap: str = CMAP
) -> np.ndarray:
    """One map over its image (``heat_overlay``, already scaled to [0, 1]), the query patch outlined."""
    from featviz.views.sheets import heat_overlay

    pic = heat_overlay(rgb, scaled, alpha=ALPHA, cmap=cmap, scale="clip")
    return pic if query is None else mark_patch(pic, query.patch, grid)


def similarity_sheet(
    path: Any,
    rgbs: Sequence[np.ndarray],
    scaled: np.ndarray,
    raw: np.ndarray,
    queries: Sequence[Query],
    ids: Sequence[str],
    grid: tuple[int, int],
    *,
    title: str,
    per_row: int = 5,
    indices: Sequence[int] | None = None,
    cmap: str = CMAP,
) -> None:
    """The contact sheet: per query, the overlays of ``indices`` (default: all; rows of ``per_row``), captioned."""
    from featviz.views.sheets import grid_sheet

    shown = list(range(len(rgbs))) if indices is None else list(indices)
    cells, titles, labels = [], [], []
    for q, query in enumerate(queries):
        for start in range(0, len(shown), per_row):
            row, tit = [], []
            for i in shown[start : start + per_row]:
                row.append(overlay(rgbs[i], scaled[q, i], query if i == query.image else None, grid, cmap))
                what = f"query {tuple(query.patch)}" if i == query.image else f"max {raw[q, i].max():.2f}"
                tit.append(f"{ids[i]} · {what}")
            cells.append(row)
            titles.append(tit)
            labels.append(f"q{q + 1} {tuple(query.patch)}" if start == 0 else "")
    grid_sheet(path, cells, cell_titles=titles, row_labels=labels, title=title, cell=1.9)


# ------------------------------------------------------------------ the command
@dataclass(eq=False)
class SimilarityResult(ViewResult):
    """What ``featviz similarity`` reports (``to_dict()``: its ``--json`` summary)."""

    out: str
    images: int
    arch: str
    layer: str
    image_size: tuple[int, int]
    grid: tuple[int, int]
    feature_dim: int
    tokens: dict[str, Any] | None
    queries: list[dict[str, Any]]
    matches: dict[str, Any] | None
    html: dict[str, Any] | None
    files: dict[str, Any]
    warnings: list[str]
    sheet: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` summary: the fields in order, sizes and grids as lists."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


def run_similarity(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    model: Any,
    points: Sequence[tuple[int, int]] = (),
    patches: Sequence[tuple[int, int]] = (),
    layer: str | None = None,
    image_size: int | str | Sequence[int] | None = None,
    html: bool = False,
    matches: int | None = None,
    pair: str | None = None,
    foreground_only: bool = False,
    batch_size: int = 8,
    device: str = "cpu",
    force: bool = False,
    description: dict[str, Any] | None = None,
    arguments: dict[str, Any] | None = None,
    progress: Progress | None = None,
    sheet_images: int = 20,
    page_budget: int = PAGE_BUDGET,
    limit: int | None = None,
    style: PlotStyle = DEFAULT_STYLE,
) -> SimilarityResult:
    """Everything ``featviz similarity`` does; writes ``out_dir`` as one atomic folder.

    Files: ``sheet.png`` (per query, the overlays of at most ``sheet_images`` images, spread over all
    of them by ``views.sheets.sheet_cut``; the cut is said),
    ``overlays/<image>.q<k>.png`` (query k's map over each image, at the input size),
    ``similarity.npz`` (``maps`` (Q, N, h, w) cosine similarities, ``queries`` (Q, 3) image, row,
    column; ``ids``, ``grid``, ``image_size``; with ``matches``: ``match_a``, ``match_b`` (M, 2),
    ``match_similarity`` (M,), ``foreground`` (2, h, w) with ``foreground_only``),
    ``similarity.json`` (protocol, queries, per-image statistics, matches, page), ``matches.png``,
    ``similarity.html`` and ``manifest.json``.

    Args:
        inputs: Image files and folders; the queries are taken from the first image.
        out_dir: The output folder.
        model: The model (any featviz loads).
        points: Query pixels (x, y) of the first image.
        patches: Query patches (row, column) of the first image's feature grid.
        layer: The layer (default: the feature core's).
        image_size: N or HxW (default: the model's).
        html: Also write the interactive page.
        matches: Draw at most this many mutual nearest neighbours between two images.
        pair: Which two images (ids or 0-based positions), when more than two are given.
        foreground_only: Matches among foreground patches only (``featviz pca``'s rule, fitted on the pair).
        batch_size: Images per batch.
        device: ``auto``, ``cpu`` or ``cuda``.
        force: Replace featviz's files in an existing ``out_dir``.
        description: The model's description, for the manifest.
        arguments: The command's arguments, for the manifest.
        progress: The progress wrapper of the batch loop.
        sheet_images: Images per query on the contact sheet (``--sheet-images``).
        page_budget: Bytes the page may take (``views.similarity_page``); its features are reduced to fit.
        limit: Only the first N images (``--limit``; the manifest says how many of how many).
        style: ``style.cmap``: the maps' colour map (PNGs and page; default ``inferno``).

    Returns:
        The result; its ``to_dict()`` is the summary that ``--json`` prints.

    Raises:
        DataError: no query and nothing else to show, a point or patch outside the image or grid, bad
            ``--matches`` inputs, a layer without a spatial map.
        UnknownNameError: no such layer.
        OutputExistsError: ``out_dir`` exists and ``force`` is False.
    """
    from featviz.data.images import load_image
    from featviz.models.features import arch_name, input_size, token_layout
    from featviz.views.pca import feature_maps, patch_pca
    from featviz.views.sheets import save_png, sheet_cut, with_caution

    runner = ViewRunner("similarity", out_dir, force=force, arguments=arguments, progress=progress)
    if not points and not patches and not html and matches is None:
        raise DataError("nothing to show: give a query with --point X,Y or --patch I,J (or --html, --matches N)")
    if matches is not None and matches < 1:
        raise DataError(f"--matches must be ≥ 1, got {matches}")
    if (foreground_only or pair is not None) and matches is None:
        raise OptionError("--foreground-only and --pair apply to --matches N; add --matches")
    hw = input_size(model, image_size)
    files, ids = runner.images(inputs, limit=limit)
    cut = sheet_cut(len(ids), sheet_images) if points or patches else None
    cmap = style.heat_cmap(CMAP)
    pair_ix = pick_pair(pair, ids) if matches is not None else None
    first_wh = load_image(files[0]).size if points else (0, 0)
    for p in points:  # checked before the model runs (the grid is not needed for that)
        point_query(p, first_wh, hw, (1, 1), ids[0])
    model = runner.place(model, device)
    lay = token_layout(model, hw)
    maps, rgbs, layer_name = feature_maps(runner, model, layer=layer, hw=hw, batch_size=batch_size)
    grid = (int(maps.shape[2]), int(maps.shape[3]))
    queries = [point_query(p, first_wh, hw, grid, ids[0]) for p in points] + [patch_query(p, grid) for p in patches]
    unit = unit_features(maps)
    raw = (
        np.stack([similarity_maps(unit, q.image, q.patch) for q in queries])
        if queries
        else np.zeros((0, len(ids), *grid), np.float32)
    )
    scaled = np.stack([joint_scale(m) for m in raw]) if queries else raw
    arch = arch_name(model)
    warnings: list[str] = []
    found: Matches | None = None
    fg = None
    if pair_ix is not None:
        a, b = pair_ix
        if foreground_only:
            fg = patch_pca(maps[[a, b]], components=1, foreground="auto").foreground
            if fg[0].all() or fg[1].all() or not fg[0].any() or not fg[1].any():
                warnings.append(
                    f"the foreground rule keeps {fg[0].mean():.0%} and {fg[1].mean():.0%} of the "
                    "patches of the two images: it does not separate objects from background at this "
                    "layer; the matches are searched among those patches anyway"
                )
                log.warning(warnings[-1])
        found = mutual_nearest_neighbours(
            unit[a], unit[b], mask_a=None if fg is None else fg[0], mask_b=None if fg is None else fg[1], limit=matches
        )
    head = " · ".join((arch, layer_name, f"{hw[0]}x{hw[1]} ({grid[0]}x{grid[1]} patches)"))
    per_image = [
        {
            "id": ids[i],
            "path": str(files[i]),
            "queries": [
                {
                    "max": float(raw[q, i].max()),
                    "mean": float(raw[q, i].mean()),
                    "min": float(raw[q, i].min()),
                    "argmax": [int(v) for v in np.unravel_index(int(raw[q, i].argmax()), grid)],
                }
                for q in range(len(queries))
            ],
        }
        for i in range(len(ids))
    ]
    protocol = {
        "arch": arch,
        "layer": layer_name,
        "image_size": list(hw),
        "resize": runner.resize,
        "grid": list(grid),
        "feature_dim": int(maps.shape[1]),
        "tokens": None if lay is None else lay.to_dict(),
        "similarity": "cosine: dot product of the l2-normalised patch features of the layer",
        "colour_scale": "per query, over all images: lowest similarity dark, highest bright "
        f"(matplotlib {cmap}, blended at {ALPHA:g} over the image)",
    }
    with runner.output() as tmp:
        files_out: dict[str, Any] = {
            "json": runner.path("similarity.json"),
            "maps": runner.path("similarity.npz"),
            "manifest": runner.path("manifest.json"),
        }
        if queries:
            (tmp / "overlays").mkdir()
            for q, query in enumerate(queries):
                for i in range(len(ids)):
                    pic = overlay(rgbs[i], scaled[q, i], query if i == query.image else None, grid, cmap)
                    save_png(pic, tmp / "overlays" / f"{safe_stem(ids[i])}.q{q + 1}.png", min_side=224)
            title = with_caution(
                model,
                f"{head} · cosine similarity to the query patch (cyan square) of {ids[0]}; "
                "per query one colour scale over all images: low to high"
                + (f" · {cut.caption()}" if cut is not None and cut.cut else ""),
            )
            similarity_sheet(
                tmp / "sheet.png",
                rgbs,
                scaled,
                raw,
                queries,
                ids,
                grid,
                title=title,
                cmap=cmap,
                indices=None if cut is None else cut.indices,
            )
            files_out.update(sheet=runner.path("sheet.png"), overlays=len(queries) * len(ids))
        arrays: dict[str, Any] = {
            "ids": np.array(ids),
            "maps": raw.astype(np.float32),
            "queries": np.array([[q.image, *q.patch] for q in queries], np.int64).reshape(-1, 3),
            "grid": np.array(grid),
            "image_size": np.array(hw),
        }
        match_record = None
        if found is not None and pair_ix is not None:
            a, b = pair_ix
            match_record = {**found.to_dict((ids[a], ids[b])), "limit": matches, "foreground_only": foreground_only}
            if fg is not None:
                match_record["foreground_share"] = [float(fg[0].mean()), float(fg[1].mean())]
                arrays["foreground"] = fg
            arrays.update(match_a=found.a, match_b=found.b, match_similarity=found.similarity)
            where = " among foreground patches" if foreground_only else ""
            mean = f"mean similarity {match_record['mean_similarity']:.2f}" if len(found.similarity) else "none"
            matches_figure(
                tmp / "matches.png",
                rgbs[a],
                rgbs[b],
                found,
                grid,
                titles=(ids[a], ids[b]),
                foreground=None if fg is None else (fg[0], fg[1]),
                title=with_caution(
                    model,
                    f"{head} · the {len(found.similarity)} strongest of {found.total} mutual nearest "
                    f"neighbours{where} ({mean}); colour: similarity",
                ),
            )
            files_out["matches"] = runner.path("matches.png")
        page = None
        if html:
            start = (queries[0].image, *queries[0].patch) if queries else (0, grid[0] // 2, grid[1] // 2)
            stored = write_page(
                tmp / "similarity.html",
                rgbs,
                unit,
                ids,
                query=start,
                title=with_caution(model, f"featviz similarity · {head}"),
                cmap=cmap,
                alpha=ALPHA,
                budget=page_budget,
            )
            checked = [(q.image, q.patch) for q in queries] or [(start[0], start[1:])]
            diffs = [np.abs(page_maps(stored.stored, m, p) - similarity_maps(unit, m, p)).max() for m, p in checked]
            if stored.retained < 0.9:
                warnings.append(
                    f"the page keeps {stored.k} of {stored.dims} feature dimensions ({stored.retained:.0%} of the "
                    f"energy) to stay under {page_budget / 1e6:g} MB; its maps differ from the PNGs' by up to "
                    f"{max(diffs):.2f}: give fewer images, or a smaller --image-size"
                )
                log.warning(warnings[-1])
            page = {
                **stored.to_dict(),
                "bytes": (tmp / "similarity.html").stat().st_size,
                "max_abs_difference": float(max(diffs)) if diffs else None,
            }
            files_out["html"] = runner.path("similarity.html")
        np.savez_compressed(tmp / "similarity.npz", **arrays)
        query_records = [q.to_dict(ids) for q in queries]
        from featviz.io.outputs import write_json

        write_json(
            tmp / "similarity.json",
            {
                "protocol": protocol,
                "queries": query_records,
                "images": per_image,
                "matches": match_record,
                "html": page,
                "warnings": warnings,
            },
        )
        runner.write_manifest(
            tmp,
            model={"arch": arch, "description": description},
            layer=layer_name,
            image_size=list(hw),
            grid=list(grid),
            feature_dim=int(maps.shape[1]),
            tokens=protocol["tokens"],
            device=str(runner.device),
            normalization=runner.normalization,
            queries=query_records,
            definitions={
                "similarity": protocol["similarity"],
                "colour_scale": protocol["colour_scale"],
                "matches": "mutual nearest neighbours by cosine similarity, strongest "
                "first"
                + ("; foreground: featviz pca's first-component rule fitted on the pair" if foreground_only else ""),
            },
            images=[{"id": ids[i], "path": str(files[i])} for i in range(len(ids))],
            warnings=warnings,
        )
    return SimilarityResult(
        out=str(runner.out_dir),
        images=len(ids),
        arch=arch,
        layer=layer_name,
        image_size=hw,
        grid=grid,
        feature_dim=int(maps.shape[1]),
        tokens=protocol["tokens"],
        queries=query_records,
        matches=match_record,
        html=page,
        files=files_out,
        warnings=warnings,
        sheet=None if cut is None else cut.to_dict(),
    )
