"""Figure 3 of CAC (Lai et al., CVPR 2021): contextual vs low-level augmentation in one t-SNE space.

Layout (as in the paper): a top row with the three input crops, the overlapping region in a
yellow box; then one row per model with three t-SNE panels:

- I. Original: crop 1 (no photometric change);
- II. Contextual aug: crop 2, the same region seen with different surroundings;
- III. Low-level aug: crop 1 with CAC's blur / colour jitter / grayscale only.

The crops come from CAC's generator (``featviz.data.cac_crops``). Features (``--features``): for
segmenters the ``decoder`` output avg-pooled to stride 8 (what CAC's classifier and projector
read; the default) or the ``projector`` output; for plain encoders the ``backbone`` (ResNet
``layer4``) or any layer. Each view's map is read on its **own native grid**, never resized: crop
offsets are snapped to the features' stride (the least common multiple over the rows), so the
same image pixel falls at the same place of a cell in every view. Maps are flipped back when the
crop was flipped and sliced to the overlap. The **same image pixels** are sampled in every view
and every model; each row is one openTSNE map over I ∪ II ∪ III. Beside the picture a JSON gives, per row,
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

from featviz.data import cac_crops as crops
from featviz.data.masks import array_wh, check_same_size
from featviz.errors import DataError
from featviz.io.progress import Progress

log = logging.getLogger(__name__)

VIEW_NAMES = ("I. Original", "II. Contextual aug", "III. Low-level aug")
KNN_K = 10
_FEATURE_TITLES = {"decoder": "decoder features", "projector": "projector features",
                   "backbone": "backbone features"}


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


FEATURE_KINDS = ("decoder", "projector", "backbone")


def is_segmenter(model: torch.nn.Module) -> bool:
    """A whole segmenter (``featviz.train.segmentation.Segmenter``): it has CAC's pixel features."""
    return callable(getattr(model, "pixel_features", None)) and hasattr(model, "head")


def resolve_features(models: Sequence[FigureModel], features: str | None) -> str:
    """The features every row shows: ``features``, or the default for these rows.

    Default: ``decoder`` when every row is a segmenter (CAC's 256-d stride-8 decoder output, the
    classifier's input: the one feature a supervised-only and a CAC model share), ``backbone``
    when none is. A figure must compare like with like, so mixed rows need an explicit choice.

    Raises:
        DataError: mixed rows without ``features``; ``decoder``/``projector`` on a row that lacks it.
    """
    seg = [is_segmenter(m.model) for m in models]
    if features is None:
        if all(seg):
            return "decoder"
        if not any(seg):
            return "backbone"
        kinds = ", ".join(f"{m.name!r} ({'segmenter' if s else 'encoder'})" for m, s in zip(models, seg, strict=True))
        raise DataError(f"the rows mix segmenters and plain encoders ({kinds}); pass --features backbone to compare "
                        "their backbones, or give only segmenters (default: decoder features)")
    if features in ("decoder", "projector"):
        plain = [m.name for m, s in zip(models, seg, strict=True) if not s]
        if plain:
            raise DataError(f"--features {features} needs segmenters, but {', '.join(map(repr, plain))} "
                            f"{'is a plain encoder' if len(plain) == 1 else 'are plain encoders'} (no decoder); "
                            "use --features backbone or a layer name")
        if features == "projector":
            bare = [m.name for m in models if getattr(m.model, "projector", None) is None]
            if bare:
                raise DataError(f"--features projector: {', '.join(map(repr, bare))} "
                                f"{'has' if len(bare) == 1 else 'have'} no CAC projector (supervised-only "
                                "models have none); use --features decoder, the feature every row shares")
    return features


def _feature_layer(model: torch.nn.Module, features: str) -> tuple[torch.nn.Module, str | None]:
    """The module and layer a ``backbone``/LAYER choice reads (None layer: segmenter pixel features)."""
    if features in ("decoder", "projector"):
        return model, None
    if features == "backbone":
        from featviz.models.features import default_layer

        target = model.backbone if is_segmenter(model) else model
        return target, default_layer(target)
    return model, features


def feature_maps(model: torch.nn.Module, features: str, x: torch.Tensor) -> torch.Tensor:
    """The (N, C, h, w) map ``features`` names for a batch, at its native resolution (never resized).

    ``features`` is ``decoder``/``projector`` (segmenters: ``pixel_features``), ``backbone`` (the
    backbone's default layer, ResNet ``layer4``) or a layer name.
    """
    from featviz.models.features import FeatureExtractor

    target, layer = _feature_layer(model, features)
    with torch.inference_mode():
        if layer is None:
            return model.pixel_features(x, features)
        with FeatureExtractor(target, layer) as fx:  # the feature core: one (N, C, H, W) rule for every model
            return fx(x)


def _check_stride(h: int, w: int, crop_size: int, what: str) -> int:
    s = crop_size // h if h else 0
    if not h or s * h != crop_size or s * w != crop_size:
        raise DataError(f"{what} gives a {h}x{w} map on a {crop_size}-px crop: not a whole stride, so the crops "
                        "cannot be placed on its grid; choose a --crop-size that the map's stride divides "
                        f"(e.g. a multiple of {max(1, round(crop_size / max(h, 1)))})")
    return s


def native_stride(model: torch.nn.Module, features: str, crop_size: int, device: torch.device | str = "cpu") -> int:
    """The stride of a model's ``features`` map on a ``crop_size`` crop (a probe forward pass).

    Raises:
        DataError: the map does not tile the crop with a whole stride (the message names the
            stride and a crop size that works when a second probe can tell).
    """
    if features in ("decoder", "projector"):
        s = int(getattr(model, "feature_stride", crops.CAC_STRIDE))
        if crop_size % s:
            raise DataError(f"--crop-size {crop_size} is not a multiple of the {features} features' stride {s}; "
                            f"use e.g. {(crop_size // s + 1) * s}")
        return s

    def probe(size: int) -> tuple[int, int]:
        fmap = feature_maps(model, features, torch.zeros(1, 3, size, size, device=device))
        return int(fmap.shape[-2]), int(fmap.shape[-1])

    h, w = probe(crop_size)
    try:
        return _check_stride(h, w, crop_size, f"--features {features}")
    except DataError:
        big = -(-crop_size // 64) * 64 * 2  # a multiple of 64: whole for the usual CNN strides
        h2, w2 = probe(big)
        s = big // h2 if h2 else 0
        if s and s * h2 == big and s * w2 == big:
            raise DataError(f"--features {features} has stride {s}, which does not divide --crop-size {crop_size} "
                            f"({h}x{w} map); use a multiple of {s}, e.g. {(crop_size // s + 1) * s}") from None
        raise


def view_features(model: torch.nn.Module, views: CacViews, *, features: str = "decoder",
                  device: torch.device | str = "cpu") -> tuple[list[np.ndarray], dict[str, Any]]:
    """Per view, (P, C) float32 features of the sampled overlap points, each view on its own grid.

    The map is taken at its native resolution (no resizing), flipped back, and read at the cell
    that holds each sampled point. Crop offsets are multiples of ``views.sample.pair.stride``,
    which the map's stride divides, so a point sits at the same place inside its cell in every
    view: view II is read on view II's own grid, never interpolated onto view I's.

    Returns:
        (features per view, {"features", "layer", "feature_stride", "feature_dim"}).

    Raises:
        DataError: the map's stride does not divide the crops' snapping stride.
    """
    from torchvision import transforms as T

    from featviz.data.images import normalization_of
    from featviz.eval.embed import prepare_model

    device = torch.device(device)
    mean, std = normalization_of(model)
    tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    x = torch.stack([tf(im) for im in views.images]).to(device)
    model = prepare_model(model, device)
    fmap = feature_maps(model, features, x).float()
    pair = views.sample.pair
    s = _check_stride(fmap.shape[-2], fmap.shape[-1], pair.crop_size, f"--features {features}")
    if pair.stride % s:
        raise DataError(f"--features {features} has stride {s}, which does not divide the crops' stride {pair.stride}; "
                        "the views would be read off each other's grids")
    k = pair.stride // s
    out = []
    for v in range(3):
        f = crops.unflip(fmap[v], views.flips[v])
        rows = (views.grids[v][0].start + views.cells[:, 0]) * k
        cols = (views.grids[v][1].start + views.cells[:, 1]) * k
        out.append(f[:, rows, cols].T.contiguous().cpu().numpy())
    _, layer = _feature_layer(model, features)
    return out, {"features": features, "layer": layer, "feature_stride": s, "feature_dim": int(fmap.shape[1])}


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


def view_pixels(views: CacViews) -> list[np.ndarray]:
    """Per view, (P, 2) (y, x) of each sampled point in ``views.images[v]`` as displayed (flips included).

    The point is its stride cell's top-left pixel, the one whose mask label it carries (a test
    checks the labels of all three views' masks there).
    """
    p = views.sample.pair
    out = []
    for v in range(3):
        y = (views.grids[v][0].start + views.cells[:, 0]) * p.stride
        x = (views.grids[v][1].start + views.cells[:, 1]) * p.stride
        if views.flips[v]:
            x = p.crop_size - 1 - x
        out.append(np.stack([y, x], 1).astype(np.int64))
    return out


def _overlap_box_display(pair: crops.CropPair, which: int, flipped: bool) -> tuple[int, int, int, int]:
    top, left, bottom, right = pair.overlap1 if which == 1 else pair.overlap2
    if flipped:
        left, right = pair.crop_size - right, pair.crop_size - left
    return top, left, bottom, right


def draw_figure(views: CacViews, rows: list[dict[str, Any]], row_coords: list[list[np.ndarray]],
                class_names: Sequence[str], out: Path, *, features: str | None = None, dpi: int = 150) -> None:
    """Render the figure: crops with the yellow overlap box on top, one t-SNE row per model."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from featviz.io.outputs import atomic_path
    from featviz.maps.plotting import class_colors, draw_scatter, legend_handles, shared_limits

    n_rows = 1 + len(rows)
    fig = Figure(figsize=(9.6, 3.1 * n_rows + 0.6), layout="constrained")
    axes = fig.subplots(n_rows, 3, squeeze=False)
    pair = views.sample.pair
    for v in range(3):
        ax = axes[0][v]
        ax.imshow(views.images[v])
        top, left, bottom, right = _overlap_box_display(pair, 2 if v == 1 else 1, views.flips[v])
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, edgecolor="yellow",
                               linewidth=2.2))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(VIEW_NAMES[v] + ("  (flipped)" if views.flips[v] else ""), fontsize=10)
    axes[0][0].set_ylabel("input crops", fontsize=10)
    n_classes = max(len(class_names), int(views.labels.max()) + 1)
    colors = class_colors(n_classes)
    for i, (row, coords) in enumerate(zip(rows, row_coords, strict=True), start=1):
        xlim, ylim = shared_limits(coords)
        m = row["metrics"]
        cos, knn = m["cosine_same_pixel"], m["knn_class_agreement"]
        notes = ["", f"cos(I,II) {cos['I_vs_II']:.2f} · kNN agr. {knn['II_to_I']:.2f}",
                 f"cos(I,III) {cos['I_vs_III']:.2f} · kNN agr. {knn['III_to_I']:.2f}"]
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
    what = _FEATURE_TITLES.get(features, f"{features} features") if features else "pixel features"
    dims = sorted({(r.get("feature_dim"), r.get("feature_stride")) for r in rows if r.get("feature_dim")})
    detail = f" ({', '.join(f'{d}-d, stride {s}' for d, s in dims)})" if dims else ""
    fig.suptitle(f"t-SNE of the overlap region's {what}{detail} (yellow box); one shared map per row over "
                 "I ∪ II ∪ III", fontsize=10)
    with atomic_path(out, force=True) as tmp:
        fig.savefig(tmp, dpi=dpi, format=out.suffix.lower().lstrip("."))


@dataclass
class FigureModel:
    """One row of the figure: a display name, the model and where it came from."""

    name: str
    model: torch.nn.Module
    source: dict[str, Any]


@dataclass
class FigureRows:
    """What one figure shows: the views, and per row the features, map coordinates and metrics."""

    views: CacViews
    rows: list[dict[str, Any]]
    features: list[list[np.ndarray]]
    coords: list[list[np.ndarray]]
    class_names: list[str]
    tsne: Any
    stride: int


def load_figure_models(checkpoints: Sequence[str | os.PathLike] = (), *, arch: str | None = None,
                       seeds: Sequence[int] = (0,), names: Sequence[str] | None = None,
                       load_kwargs: dict[str, Any] | None = None) -> list[FigureModel]:
    """The figure's rows: one per checkpoint, in order, or one random-init ``arch`` per seed.

    A whole segmenter (featviz's or CAC's layout) keeps its decoder, classifier and projector.
    ``names`` replaces the default row names (the checkpoint's name, or arch and seed).

    Raises:
        DataError: neither checkpoints nor ``arch``, or ``names`` of another length than the rows.
    """
    from featviz.io.outputs import checkpoint_display_name
    from featviz.models.loader import load_model
    from featviz.models.segmenter import describe_segmenter

    kw = dict(load_kwargs or {})
    rows: list[FigureModel] = []
    if checkpoints:
        for c in checkpoints:
            model, desc = load_model(c, arch=arch, head=True, **kw)
            src: dict[str, Any] = {"checkpoint": str(c), "description": desc.to_dict()}
            if desc.kind == "segmenter":
                src["segmenter"] = describe_segmenter(model)
            rows.append(FigureModel(checkpoint_display_name(c), model, src))
    elif arch:
        for s in seeds or (0,):
            model, desc = load_model(arch=arch, seed=s, num_heads=kw.get("num_heads"))
            rows.append(FigureModel(f"{arch} random init (seed {s})", model,
                                    {"arch": arch, "init_seed": s, "description": desc.to_dict()}))
    else:
        raise DataError("the CAC figure needs checkpoints (one row each), or an architecture for random-init rows")
    if names is not None:
        if len(names) != len(rows):
            raise DataError(f"{len(names)} row names for {len(rows)} rows; give one per row")
        rows = [FigureModel(n, r.model, r.source) for n, r in zip(names, rows, strict=True)]
    return rows


def working_crop(models: Sequence[FigureModel], crop_size: int | None, base_size: int | None) -> tuple[int, int, str]:
    """Crop and base size of the figure, and why: returns (crop, base, why).

    Given ones win; else the rows' training crop (featviz and CAC checkpoints record it) when they
    agree; else CAC VOC's 320 / 400.
    """
    if crop_size is not None and base_size is not None:
        return crop_size, base_size, "given"
    from featviz.models.description import describe

    recorded = [(describe(m.model).source or {}).get("crop") for m in models]
    known = {(c["crop_size"], c["base_size"]) for c in recorded if c}
    if len(known) == 1 and all(recorded):
        c, b = known.pop()
        return crop_size or c, base_size or b, "the checkpoints' training crop"
    if len(known) > 1:
        log.warning("the rows were trained at different crops %s; drawing at CAC VOC's %d/%d (pass --crop-size and "
                    "--base-size to choose)", sorted(known), crops.CAC_CROP_SIZE, crops.CAC_BASE_SIZE)
    return crop_size or crops.CAC_CROP_SIZE, base_size or crops.CAC_BASE_SIZE, "CAC VOC's default"


def figure_rows(models: Sequence[FigureModel], img, mask: np.ndarray, *, features: str | None = None,
                crop_size: int = crops.CAC_CROP_SIZE, base_size: int = crops.CAC_BASE_SIZE,
                iou_bound: tuple[float, float] = crops.CAC_IOU_BOUND, max_pixels: int = 1000, seed: int = 0,
                perplexity: float = 30.0, n_iter: int = 500, device: str | torch.device = "cpu",
                class_names: Sequence[str] = (), progress: Progress | None = None) -> FigureRows:
    """The figure's numbers for one image (no drawing, no files): crops, features, maps, metrics.

    Each row's features are read on their native grid; the crops are snapped to the least common
    multiple of the rows' strides, so every row and view samples the same image pixels.

    Raises:
        DataError: see ``resolve_features``, ``native_stride``, ``make_views``.
    """
    from featviz.eval.embed import prepare_model
    from featviz.maps.projection import TsneParams, clamp_perplexity, fit

    features = resolve_features(models, features)
    strides = [native_stride(prepare_model(m.model, torch.device(device)), features, crop_size, device) for m in models]
    stride = int(np.lcm.reduce(strides))
    if crop_size % stride:
        raise DataError(f"the rows' feature strides {strides} need crop offsets on a {stride}-px grid, which a "
                        f"{crop_size}-px crop does not tile; choose --crop-size as a multiple of {stride}")
    views = make_views(img, mask, seed=seed, crop_size=crop_size, base_size=base_size, iou_bound=iou_bound,
                       stride=stride, max_pixels=max_pixels)
    n_classes = int(views.labels.max()) + 1
    names = list(class_names) + [str(i) for i in range(len(class_names), n_classes)]
    params = TsneParams(perplexity=clamp_perplexity(perplexity, 3 * len(views.labels)), seed=seed, n_iter=n_iter)
    rows, all_feats, all_coords = [], [], []
    items = progress(list(models)) if progress else models
    for fm in items:
        feats, info = view_features(fm.model, views, features=features, device=device)
        coords = np.split(fit(np.concatenate(feats), params), 3)
        all_feats.append(feats)
        all_coords.append(coords)
        rows.append({"name": fm.name, "source": fm.source, **info,
                     "metrics": row_metrics(feats, coords, views.labels, names)})
    return FigureRows(views, rows, all_feats, all_coords, names, params, stride)


def cac_figure(models: Sequence[FigureModel], image: str | os.PathLike, mask: str | os.PathLike,
               out: str | os.PathLike, *, features: str | None = None,
               iou_bound: tuple[float, float] = crops.CAC_IOU_BOUND, crop_size: int | None = None,
               base_size: int | None = None, layer: str | None = None, max_pixels: int = 1000, seed: int = 0,
               perplexity: float = 30.0, n_iter: int = 500, device: str = "cpu",
               class_names: Sequence[str] | None = None, force: bool = False,
               progress: Progress | None = None, html: str | os.PathLike | None = None) -> dict[str, Any]:
    """Build CAC's Figure 3 for ``models`` on one image and mask; write PNG/PDF/SVG + JSON + NPZ.

    Args:
        models: the rows (``load_figure_models``).
        image: the image.
        mask: its class mask (255 = ignore).
        out: the figure (.png, .pdf or .svg); the JSON and NPZ go beside it.
        features: ``decoder`` (default for segmenters: the stride-8 decoder output CAC's classifier
            and projector read), ``projector`` (every row needs one), ``backbone`` (default for
            plain encoders; a segmenter's backbone ``layer4``) or a layer name.
        iou_bound: the crops' IoU range (CAC: 0.1 to 1.0).
        crop_size: crop side; default: the checkpoints' training crop if recorded, else 320.
        base_size: rescale base; default: the checkpoints' training base if recorded, else 400.
        layer: the same as ``features=LAYER`` (older spelling).
        max_pixels: overlap pixels shown per view.
        seed: seeds the crops, the pixel sample and t-SNE.
        perplexity: t-SNE perplexity (clamped for few points).
        n_iter: t-SNE iterations.
        device: where the models run.
        class_names: label value -> name (default: a classes.txt beside the mask or one folder up).
        force: overwrite outputs.
        progress: wraps the loop over rows (a progress bar).
        html: also write the interactive page (``featviz.maps.interactive.views_page``): a row per model,
            a panel per view, every panel linked (they show the same pixels), hover = a crop of the
            view around the pixel.

    Returns:
        The JSON report (also written to ``out`` with suffix ``.json``); each row records its
        ``features``, ``layer``, ``feature_stride`` and ``feature_dim``.

    Raises:
        DataError: bad image/mask (size mismatch, no labelled overlap), too few points, features a
            row lacks, a stride the crop cannot be snapped to.
        OutputExistsError: one of the outputs exists and ``force`` is False.
    """
    from featviz.data.images import load_image
    from featviz.data.masks import find_class_names, read_mask
    from featviz.io.outputs import atomic_path, check_writable, manifest, write_json
    from featviz.maps.plotting import check_format

    out = check_format(out)
    json_path, npz_path = out.with_suffix(".json"), out.with_suffix(".npz")
    for p in (out, json_path, npz_path):
        check_writable(p, force=force)
    if html is not None:
        if Path(html).suffix.lower() not in (".html", ".htm"):
            raise DataError(f"--html must end in .html, got {Path(html).name!r}")
        check_writable(html, force=force)
    if not models:
        raise DataError("give at least one --checkpoint (or --arch for a random-init row)")
    if layer is not None and features is not None and layer != features:
        raise DataError(f"--layer {layer} and --features {features} disagree; give one (--features LAYER)")
    features = resolve_features(models, features or layer)
    crop_size, base_size, crop_from = working_crop(models, crop_size, base_size)
    img = load_image(image)
    m = read_mask(mask)
    check_same_size(array_wh(m), img.size, mask=f"mask {Path(mask).name}", image=f"image {Path(image).name}")
    if not (m != crops.IGNORE_INDEX).any():
        raise DataError(f"mask {Path(mask).name} has only ignore ({crops.IGNORE_INDEX}) pixels; nothing to show")
    names = list(class_names or find_class_names(Path(mask).parent))
    fr = figure_rows(models, img, m.astype(np.uint8), features=features, crop_size=crop_size, base_size=base_size,
                     iou_bound=iou_bound, max_pixels=max_pixels, seed=seed, perplexity=perplexity, n_iter=n_iter,
                     device=device, class_names=names, progress=progress)
    views, names = fr.views, fr.class_names
    scale = views.sample.long_side / max(img.size)
    if scale > 1:
        log.warning("%s (%dx%d) is upscaled x%.2f to a long side of %d px before cropping (CAC's rescale of "
                    "--base-size %d); upsampled pixels show interpolation, not image structure: use a larger "
                    "image or a smaller --base-size", Path(image).name, img.size[0], img.size[1], scale,
                    views.sample.long_side, base_size)
    p = views.sample.pair
    report = manifest(
        "tsne --figure cac", {"image": str(image), "mask": str(mask), "features": features,
                              "iou_bound": list(iou_bound), "crop_size": crop_size, "base_size": base_size,
                              "max_pixels": max_pixels, "seed": seed, "perplexity": perplexity},
        figure=out.name, features=features, crop_from=crop_from, stride=fr.stride, class_names=names,
        views=list(VIEW_NAMES), n_pixels=int(len(views.labels)),
        class_counts={names[c]: int((views.labels == c).sum()) for c in np.unique(views.labels)},
        crop_pair=p.to_dict(), rescaled_long_side=views.sample.long_side, rescale_factor=round(scale, 4),
        low_level=views.low_level.to_dict(), tsne=fr.tsne.to_dict(), rows=fr.rows,
        note="cells are (row, col) on the stride grid inside the overlap box of each crop (crop coordinates, "
             "unflipped); each row reads its features on each view's own grid, at the cell holding the point; "
             "kNN agreement: share of II (III) points whose 10 nearest I points in the map vote their class")
    draw_figure(views, fr.rows, fr.coords, names, out, features=features)
    with atomic_path(npz_path, force=True) as tmp, open(tmp, "wb") as f:
        np.savez(f, cells=views.cells, labels=views.labels, class_names=np.array(names, dtype=str),
                 row_names=np.array([r["name"] for r in fr.rows], dtype=str),
                 **{f"coords_row{i}": np.concatenate(c) for i, c in enumerate(fr.coords)})
    write_json(json_path, report, force=True)
    if html is not None:
        from featviz.maps import interactive

        interactive.views_page(html, views.images, view_pixels(views),
                               [(r["name"], c) for r, c in zip(fr.rows, fr.coords, strict=True)], views.labels, names,
                               view_names=VIEW_NAMES, source=Path(image).name,
                               title=f"CAC Figure 3: {Path(image).name} ({features} features)",
                               notes=["the pixels of the crops' overlap (yellow box in the PNG); each row is one "
                                      "t-SNE map over I ∪ II ∪ III"], force=force)
    return report
