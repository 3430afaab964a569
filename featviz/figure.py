"""Figure 3 of CAC (Lai et al., CVPR 2021): contextual vs low-level augmentation in one t-SNE space.

Layout (as in the paper): a top row with the three input crops, the overlapping region in a
yellow box; then one row per model with three t-SNE panels:

- I. Original: crop 1 (no photometric change);
- II. Contextual aug: crop 2, the same region seen with different surroundings;
- III. Low-level aug: crop 1 with CAC's blur / colour jitter / grayscale only.

The crops come from CAC's generator (``featviz.crops``). Features are taken from a layer,
resized to the stride-8 grid of the crop (CAC's feature stride), flipped back when the crop was
flipped, and sliced to the overlap. The **same overlap cells** are sampled in every view and every
model; each row is one openTSNE map over I ∪ II ∪ III. Beside the picture a JSON gives, per row,
the numbers the picture shows (same-pixel cosine I-II and I-III, cross-view kNN class agreement,
per-class silhouette in the map) and an ``.npz`` keeps the coordinates and pixel indices.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from featviz import crops
from featviz.errors import DataError
from featviz.masks import array_wh, check_same_size
from featviz.progress import Progress

log = logging.getLogger(__name__)

VIEW_NAMES = ("I. Original", "II. Contextual aug", "III. Low-level aug")
KNN_K = 10


@dataclass
class CacViews:
    """The three input views of one image and the overlap cells they share.

    Attributes:
        images: three (S, S, 3) uint8 crops as the model sees them (flips included).
        flips: whether each view is horizontally flipped.
        grids: per view, (rows, cols) slices of the unflipped stride grid that hold the overlap.
        cells: (P, 2) sampled (row, col) cells inside the overlap (relative to the overlap box).
        labels: (P,) class of each sampled cell.
        sample: the crop pair geometry.
        low_level: the photometric parameters drawn for view III.
    """

    images: list[np.ndarray]
    flips: list[bool]
    grids: list[tuple[slice, slice]]
    cells: np.ndarray
    labels: np.ndarray
    sample: crops.CACSample
    low_level: crops.LowLevelParams


def make_views(image, mask: np.ndarray, *, seed: int = 0, crop_size: int = crops.CAC_CROP_SIZE,
               base_size: int = crops.CAC_BASE_SIZE, iou_bound: tuple[float, float] = crops.CAC_IOU_BOUND,
               stride: int = crops.CAC_STRIDE, max_pixels: int = 1000,
               ignore_index: int = crops.IGNORE_INDEX) -> CacViews:
    """Draw CAC's crop pair and low-level augmentation, and sample the overlap cells to show.

    Raises:
        DataError: the mask's size differs from the image's, or the overlap has no labelled cell.
    """
    rng = np.random.default_rng(seed)
    s = crops.cac_pair(image, mask, rng, base_size=base_size, crop_size=crop_size, iou_bound=iou_bound,
                       stride=stride)
    aug = crops.LowLevelAugment(np.random.default_rng([seed, 1]))
    view3 = aug(s.crop1)
    p = s.pair
    g1, g2 = p.overlap_grid(1), p.overlap_grid(2)
    # nearest downsample to the stride grid (each cell's top-left pixel), on the unflipped mask
    lab = crops.unflip(s.mask1, p.flip[0])[::stride, ::stride][g1]
    rr, cc = np.nonzero(lab != ignore_index)
    if not len(rr):
        raise DataError("the crops' overlap has no labelled pixel (the mask is ignore/255 there); try another "
                        "--seed, a wider --iou-bound, or an image whose mask labels more of it")
    if len(rr) > max_pixels:
        keep = np.sort(np.random.default_rng([seed, 2]).choice(len(rr), max_pixels, replace=False))
        rr, cc = rr[keep], cc[keep]
    return CacViews([s.crop1, s.crop2, view3], [p.flip[0], p.flip[1], p.flip[0]], [g1, g2, g1],
                    np.stack([rr, cc], 1), lab[rr, cc].astype(np.int64), s, aug.last)


def view_features(model: torch.nn.Module, views: CacViews, *, layer: str | None = None,
                  device: torch.device | str = "cpu") -> list[np.ndarray]:
    """Per view, (P, C) float32 features of the sampled overlap cells (same cells in every view).

    The layer's map is resized (bilinear) to the crop's stride grid, flipped back, sliced to the
    overlap and indexed by ``views.cells``.
    """
    from torchvision import transforms as T

    from featviz.data import normalization_of
    from featviz.embed import DenseFeatures, _prepare

    device = torch.device(device)
    mean, std = normalization_of(model)
    tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    x = torch.stack([tf(im) for im in views.images]).to(device)
    size = views.sample.pair.crop_size // views.sample.pair.stride
    model = _prepare(model, device)
    with DenseFeatures(model, layer) as dense, torch.inference_mode():
        fmap = dense(x).float()
    if fmap.shape[-2:] != (size, size):
        fmap = F.interpolate(fmap, size=(size, size), mode="bilinear", align_corners=False)
    out = []
    for v in range(3):
        f = crops.unflip(fmap[v], views.flips[v])[:, views.grids[v][0], views.grids[v][1]]
        out.append(f[:, views.cells[:, 0], views.cells[:, 1]].T.contiguous().cpu().numpy())
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.sum(a * b, 1) / np.maximum(na, 1e-12)))


def cross_view_agreement(anchor: np.ndarray, anchor_labels: np.ndarray, other: np.ndarray,
                         other_labels: np.ndarray, k: int = KNN_K) -> float:
    """Fraction of ``other`` points whose k nearest ``anchor`` points (in the map) vote their own class."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(anchor))
    idx = NearestNeighbors(n_neighbors=k).fit(anchor).kneighbors(other, return_distance=False)
    votes = anchor_labels[idx]
    pred = np.array([np.bincount(v).argmax() for v in votes])
    return float((pred == other_labels).mean())


def per_class_silhouette(coords: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, float] | None:
    """Mean silhouette per class in the map (None with fewer than two classes)."""
    from sklearn.metrics import silhouette_samples

    if len(np.unique(labels)) < 2:
        return None
    s = silhouette_samples(coords, labels)
    return {(class_names[c] if c < len(class_names) else str(c)): float(s[labels == c].mean())
            for c in np.unique(labels)}


def row_metrics(feats: list[np.ndarray], coords: list[np.ndarray], labels: np.ndarray,
                class_names: Sequence[str]) -> dict[str, Any]:
    """The numbers one figure row shows."""
    allc = np.concatenate(coords)
    alll = np.concatenate([labels] * 3)
    sil = per_class_silhouette(allc, alll, class_names)
    return {
        "cosine_same_pixel": {"I_vs_II": _cosine(feats[0], feats[1]), "I_vs_III": _cosine(feats[0], feats[2])},
        "knn_class_agreement": {"II_to_I": cross_view_agreement(coords[0], labels, coords[1], labels),
                                "III_to_I": cross_view_agreement(coords[0], labels, coords[2], labels), "k": KNN_K},
        "silhouette_per_class": sil,
        "silhouette_mean": None if sil is None else float(np.mean(list(sil.values()))),
    }


def _overlap_box_display(pair: crops.CropPair, which: int, flipped: bool) -> tuple[int, int, int, int]:
    t, l, b, r = pair.overlap1 if which == 1 else pair.overlap2
    if flipped:
        l, r = pair.crop_size - r, pair.crop_size - l
    return t, l, b, r


def draw_figure(views: CacViews, rows: list[dict[str, Any]], row_coords: list[list[np.ndarray]],
                class_names: Sequence[str], out: Path, *, dpi: int = 150) -> None:
    """Render the figure: crops with the yellow overlap box on top, one t-SNE row per model."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from featviz.outputs import atomic_path
    from featviz.plotting import class_colors, draw_scatter, legend_handles, shared_limits

    n_rows = 1 + len(rows)
    fig = Figure(figsize=(9.6, 3.1 * n_rows + 0.6), layout="constrained")
    axes = fig.subplots(n_rows, 3, squeeze=False)
    pair = views.sample.pair
    for v in range(3):
        ax = axes[0][v]
        ax.imshow(views.images[v])
        t, l, b, r = _overlap_box_display(pair, 2 if v == 1 else 1, views.flips[v])
        ax.add_patch(Rectangle((l - 0.5, t - 0.5), r - l, b - t, fill=False, edgecolor="yellow", linewidth=2.2))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(VIEW_NAMES[v] + ("  (flipped)" if views.flips[v] else ""), fontsize=10)
    axes[0][0].set_ylabel("input crops", fontsize=10)
    n_classes = max(len(class_names), int(views.labels.max()) + 1)
    colors = class_colors(n_classes)
    for i, (row, coords) in enumerate(zip(rows, row_coords), start=1):
        xlim, ylim = shared_limits(coords)
        m = row["metrics"]
        notes = ["", f"cos(I,II) {m['cosine_same_pixel']['I_vs_II']:.2f} · kNN agr. {m['knn_class_agreement']['II_to_I']:.2f}",
                 f"cos(I,III) {m['cosine_same_pixel']['I_vs_III']:.2f} · kNN agr. {m['knn_class_agreement']['III_to_I']:.2f}"]
        for v in range(3):
            ax = axes[i][v]
            draw_scatter(ax, coords[v], views.labels, colors, n_for_style=len(coords[v]), seed=v)
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            if notes[v]:
                ax.text(0.02, 0.02, notes[v], transform=ax.transAxes, fontsize=7, color="#333333")
        axes[i][0].set_ylabel(row["name"], fontsize=10)
    present = sorted(int(c) for c in np.unique(views.labels))
    fig.legend(handles=legend_handles(class_names, colors, present), loc="outside lower center",
               ncol=min(len(present), 6), frameon=False, fontsize=9)
    fig.suptitle("t-SNE of overlap-region pixel features (yellow box); one shared map per row over I ∪ II ∪ III",
                 fontsize=10)
    with atomic_path(out, force=True) as tmp:
        fig.savefig(tmp, dpi=dpi, format=out.suffix.lower().lstrip("."))


@dataclass
class FigureModel:
    """One row of the figure: a display name, the model and where it came from."""

    name: str
    model: torch.nn.Module
    source: dict[str, Any]


def cac_figure(models: Sequence[FigureModel], image: str | os.PathLike, mask: str | os.PathLike,
               out: str | os.PathLike, *, iou_bound: tuple[float, float] = crops.CAC_IOU_BOUND,
               crop_size: int = crops.CAC_CROP_SIZE, base_size: int = crops.CAC_BASE_SIZE,
               stride: int = crops.CAC_STRIDE, layer: str | None = None, max_pixels: int = 1000, seed: int = 0,
               perplexity: float = 30.0, n_iter: int = 500, device: str = "cpu", class_names: Sequence[str] | None = None,
               force: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Build CAC's Figure 3 for ``models`` on one image and mask; write PNG/PDF/SVG + JSON + NPZ.

    Returns:
        The JSON report (also written to ``out`` with suffix ``.json``).

    Raises:
        DataError: bad image/mask (size mismatch, no labelled overlap), too few points.
        OutputExistsError: one of the outputs exists and ``force`` is False.
    """
    from featviz.data import load_image
    from featviz.embed import find_class_names, read_mask
    from featviz.outputs import atomic_path, check_writable, manifest, write_json
    from featviz.plotting import check_format
    from featviz.tsne import TsneParams, clamp_perplexity, fit

    out = check_format(out)
    json_path, npz_path = out.with_suffix(".json"), out.with_suffix(".npz")
    for p in (out, json_path, npz_path):
        check_writable(p, force=force)
    if not models:
        raise DataError("give at least one --checkpoint (or --arch for a random-init row)")
    img = load_image(image)
    m = read_mask(mask)
    check_same_size(array_wh(m), img.size, mask=f"mask {Path(mask).name}", image=f"image {Path(image).name}")
    if not (m != crops.IGNORE_INDEX).any():
        raise DataError(f"mask {Path(mask).name} has only ignore ({crops.IGNORE_INDEX}) pixels; nothing to show")
    names = list(class_names or find_class_names(Path(mask).parent))
    views = make_views(img, m.astype(np.uint8), seed=seed, crop_size=crop_size, base_size=base_size,
                       iou_bound=iou_bound, stride=stride, max_pixels=max_pixels)
    n_classes = int(views.labels.max()) + 1
    names += [str(i) for i in range(len(names), n_classes)]
    params = TsneParams(perplexity=clamp_perplexity(perplexity, 3 * len(views.labels)), seed=seed, n_iter=n_iter)
    rows, row_coords, arrays = [], [], {}
    items = progress(list(enumerate(models))) if progress else enumerate(models)
    for r, fm in items:
        feats = view_features(fm.model, views, layer=layer, device=device)
        coords = fit(np.concatenate(feats), params)
        per_view = np.split(coords, 3)
        row_coords.append(per_view)
        rows.append({"name": fm.name, "source": fm.source, "feature_dim": int(feats[0].shape[1]),
                     "metrics": row_metrics(feats, per_view, views.labels, names)})
        arrays[f"coords_row{r}"] = coords
    p = views.sample.pair
    report = manifest(
        "tsne --figure cac", {"image": str(image), "mask": str(mask), "iou_bound": list(iou_bound),
                              "crop_size": crop_size, "base_size": base_size, "stride": stride, "layer": layer,
                              "max_pixels": max_pixels, "seed": seed, "perplexity": perplexity},
        figure=out.name, class_names=names, views=list(VIEW_NAMES), n_pixels=int(len(views.labels)),
        class_counts={names[c]: int((views.labels == c).sum()) for c in np.unique(views.labels)},
        crop_pair=p.to_dict(), rescaled_long_side=views.sample.long_side, low_level=views.low_level.to_dict(),
        tsne=params.to_dict(), rows=rows,
        note="cells are (row, col) on the stride grid inside the overlap box of each crop (crop coordinates, unflipped); "
             "kNN agreement: share of II (III) points whose 10 nearest I points in the map vote their class")
    draw_figure(views, rows, row_coords, names, out)
    with atomic_path(npz_path, force=True) as tmp, open(tmp, "wb") as f:
        np.savez(f, cells=views.cells, labels=views.labels, class_names=np.array(names, dtype=str),
                 row_names=np.array([r["name"] for r in rows], dtype=str), **arrays)
    write_json(json_path, report, force=True)
    return report
