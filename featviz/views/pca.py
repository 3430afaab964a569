"""The "PCA of patch features" picture of the DINOv2 paper, for any layer of any model.

What the DINOv2 authors describe (Oquab et al. 2023, Fig. 1 and Fig. 9: "we compute a PCA
between the patches of the images ... after thresholding the first component, we compute a
second PCA on the remaining patches"; their ``patch_features`` notebook projects the tokens on a
precomputed foreground direction, thresholds, fits ``PCA(3)`` on the foreground tokens, min-max
scales each component and paints the background black):

1. the patch (or pixel) features of all images go into one matrix, so colours mean the same
   thing in every image;
2. ``foreground="auto"``: a first PCA over all patches; its first component, thresholded at
   ``threshold`` (default 0: "patches with a negative score" are background), separates the
   foreground. A component's sign is arbitrary; featviz orients it so that the image borders
   score lower than the interiors (background touches the frame more than the object does),
   where DINOv2 used a direction precomputed for its own model, which no other model has;
3. a second PCA with ``components`` components is fitted on the foreground patches only; every
   patch is projected, each component is min-max scaled over the foreground patches, and the
   first three become R, G and B; background patches are black.

``foreground="none"`` skips step 2 (one PCA over all patches, no background removal).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from featviz.errors import DataError
from featviz.io.progress import Progress
from featviz.views.runner import ViewResult, ViewRunner, safe_stem
from featviz.views.sheets import sheet_cut

log = logging.getLogger(__name__)

FOREGROUND = ("auto", "none")
RECIPES = ("dinov2", "dinov3")


@dataclass
class PatchPca:
    """The two PCAs and what they give per image (all arrays at patch resolution)."""

    rgb: np.ndarray  # (N, h, w, 3) float32 in [0, 1], background black
    projections: np.ndarray  # (N, h, w, k) float32, second-PCA coordinates of every patch
    foreground: np.ndarray  # (N, h, w) bool
    components: np.ndarray  # (k, C) second PCA
    mean: np.ndarray  # (C,)
    explained_variance: np.ndarray  # (k,)
    explained_variance_ratio: np.ndarray  # (k,) of the patches it was fitted on
    first_component: np.ndarray | None  # (C,) oriented foreground direction
    first_mean: np.ndarray | None
    first_score: np.ndarray | None  # (N, h, w)
    first_explained_variance_ratio: float | None
    threshold: float | None
    flipped: bool
    scale: np.ndarray  # (2, k) per-component (min, max) used for the colours

    @property
    def foreground_share(self) -> np.ndarray:
        """(N,) each image's share of foreground patches."""
        return self.foreground.reshape(len(self.foreground), -1).mean(axis=1)


def _border(h: int, w: int) -> np.ndarray:
    b = np.zeros((h, w), bool)
    b[0], b[-1], b[:, 0], b[:, -1] = True, True, True, True
    return b


def patch_matrix(features: np.ndarray, components: int) -> np.ndarray:
    """The (N·h·w, C) float32 matrix of (N, C, h, w) maps, checked for ``components`` components.

    Raises:
        DataError: not 4-D, ``components`` out of range, too few patches, NaN or Inf.
    """
    if features.ndim != 4:
        raise DataError(f"feature maps must be (N, C, h, w), got shape {features.shape}")
    n, c, h, w = features.shape
    if not 1 <= components <= c:
        raise DataError(
            f"--components must be between 1 and the feature width {c}, got {components}"
        )
    x = np.ascontiguousarray(features.transpose(0, 2, 3, 1).reshape(-1, c), np.float32)
    if len(x) <= components:
        raise DataError(
            f"{len(x)} patches are too few for {components} components; use more or larger images"
        )
    if not np.isfinite(x).all():
        raise DataError("the feature maps contain NaN or Inf; check the model and the layer")
    return x


def first_component(
    x: np.ndarray, shape: tuple[int, int, int], *, threshold: float = 0.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, bool]:
    """The first PCA of all patches ``x``, oriented so that border patches score lower (step 2).

    Returns:
        The component (C,), the mean (C,), every patch's score (N, h, w), the explained variance
        ratio and whether the sign was flipped.
    """
    from sklearn.decomposition import PCA

    n, h, w = shape
    p1 = PCA(n_components=1, random_state=seed).fit(x)
    first, first_mean = p1.components_[0].astype(np.float32), p1.mean_.astype(np.float32)
    score = ((x - first_mean) @ first).reshape(n, h, w)
    if h >= 3 and w >= 3:
        border = _border(h, w)
        flipped = bool(score[:, border].mean() > score[:, ~border].mean())
    else:  # no interior: call the smaller side foreground
        flipped = bool((score > threshold).mean() > 0.5)
    if flipped:
        first, score = -first, -score
    return first, first_mean, score, float(p1.explained_variance_ratio_[0]), flipped


def rgb_of(colours: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """(patches, k) colours in [0, 1] as (patches, 3) RGB: components 1-3 (one: grey), background black."""
    rgb = np.zeros((len(colours), 3), np.float32)
    rgb[:, : min(3, colours.shape[1])] = colours[:, :3]
    if colours.shape[1] == 1:
        rgb[:] = colours[:, :1]
    rgb[~fg] = 0
    return rgb


def patch_pca(
    features: np.ndarray,
    *,
    components: int = 3,
    foreground: str = "auto",
    threshold: float = 0.0,
    seed: int = 0,
) -> PatchPca:
    """PCA images of (N, C, h, w) feature maps fitted jointly (see the module docstring).

    Raises:
        DataError: bad shapes/options, or fewer patches than components.
    """
    from sklearn.decomposition import PCA

    if foreground not in FOREGROUND:
        raise DataError(f"--foreground {foreground!r}: expected one of {', '.join(FOREGROUND)}")
    x = patch_matrix(features, components)
    n, c, h, w = features.shape
    first = first_mean = score = None
    evr1 = thr = None
    flipped = False
    fg = np.ones(len(x), bool)
    if foreground == "auto":
        first, first_mean, score, evr1, flipped = first_component(x, (n, h, w), threshold=threshold, seed=seed)
        thr = float(threshold)
        fg = (score > threshold).reshape(-1)
        if fg.sum() <= components:
            log.warning(
                "the first component keeps only %d of %d patches as foreground (threshold %g); "
                "fitting the colours on all patches instead, as --foreground none would",
                int(fg.sum()),
                len(x),
                threshold,
            )
            fg = np.ones(len(x), bool)
    p2 = PCA(n_components=components, random_state=seed).fit(x[fg])
    proj = p2.transform(x).astype(np.float32)
    lo, hi = proj[fg].min(axis=0), proj[fg].max(axis=0)
    rgb = rgb_of(np.clip((proj - lo) / np.maximum(hi - lo, 1e-12), 0, 1), fg)
    return PatchPca(
        rgb.reshape(n, h, w, 3),
        proj.reshape(n, h, w, components),
        fg.reshape(n, h, w),
        p2.components_.astype(np.float32),
        p2.mean_.astype(np.float32),
        p2.explained_variance_.astype(np.float32),
        p2.explained_variance_ratio_.astype(np.float32),
        first,
        first_mean,
        score,
        evr1,
        thr,
        flipped,
        np.stack([lo, hi]).astype(np.float32),
    )


# ------------------------------------------------------------------ DINOv3's recipe
SIGMOID_GAIN = 2.0
MEDIAN_KERNEL = 3
FOREGROUND_CUT = 0.5


def filtered_foreground(score: np.ndarray) -> np.ndarray:
    """(N, h, w) scores -> foreground: each image's median filter (kernel 3, scipy's), then > 0.5."""
    from scipy.signal import medfilt2d

    return np.stack([medfilt2d(np.asarray(s, np.float64), kernel_size=MEDIAN_KERNEL) for s in score]) > FOREGROUND_CUT


def dinov3_pca(
    features: np.ndarray,
    *,
    foreground_score: np.ndarray | None = None,
    foreground: str = "auto",
    components: int = 3,
    threshold: float = 0.0,
    seed: int = 0,
) -> PatchPca:
    """DINOv3's notebook recipe on (N, C, h, w) maps, fitted jointly (``--recipe dinov3``).

    facebookresearch/dinov3 ``notebooks/pca.ipynb`` (the paper's rainbow-coloured objects), per
    image: the last layer's features with the final norm; a foreground score per patch (a logistic
    regression trained on mask-labelled patches in its ``foreground_segmentation`` notebook),
    ``scipy.signal.medfilt2d(score, 3) > 0.5``; ``PCA(3, whiten=True)`` fitted on the foreground;
    every patch projected, ``sigmoid(2·x)`` as RGB, background black. featviz's two named
    differences: the fit is on the foreground patches of **all images together** (with one image,
    the notebook), and the **score** (the notebook's classifier is not available offline) is
    ``foreground_score`` (``--mask-dir``'s masks averaged per patch, the very labels that
    classifier was trained on) or, without it, ``foreground="auto"``: the first-component rule
    (``first_component`` > ``threshold``) as 0/1; ``"none"`` keeps every patch. The median filter
    and the 0.5 cut apply in every case, as in the notebook.

    Args:
        features: The patch features.
        foreground_score: (N, h, w) scores in [0, 1] (masks averaged per patch); None: ``foreground``.
        foreground: Without scores: ``auto`` (first principal component > ``threshold``) or ``none``.
        components: Whitened components fitted; the first three are R, G, B.
        threshold: The first-component cut of ``foreground="auto"``.
        seed: The PCAs' random state.

    Raises:
        DataError: bad shapes/options, too few patches, or fewer foreground patches than components.
    """
    from sklearn.decomposition import PCA

    x = patch_matrix(features, components)
    n, _, h, w = features.shape
    first = first_mean = first_score = None
    evr1 = thr = None
    flipped = False
    if foreground_score is not None:
        if foreground_score.shape != (n, h, w):
            raise DataError(f"foreground scores have shape {foreground_score.shape}, the features {(n, h, w)}")
        fg = filtered_foreground(foreground_score)
    elif foreground == "auto":
        first, first_mean, first_score, evr1, flipped = first_component(x, (n, h, w), threshold=threshold, seed=seed)
        thr = float(threshold)
        fg = filtered_foreground((first_score > threshold).astype(np.float64))
    elif foreground == "none":
        fg = np.ones((n, h, w), bool)
    else:
        raise DataError(f"--foreground {foreground!r}: expected auto or none")
    fg = fg.reshape(-1)
    if fg.sum() <= components:
        raise DataError(
            f"only {int(fg.sum())} of {len(x)} patches are foreground, too few for {components} whitened "
            "components; check the masks (white = foreground), or use --foreground none"
        )
    pca = PCA(n_components=components, whiten=True, random_state=seed).fit(x[fg])
    proj = pca.transform(x).astype(np.float32)
    rgb = rgb_of(1.0 / (1.0 + np.exp(-SIGMOID_GAIN * proj)), fg)
    return PatchPca(
        rgb.reshape(n, h, w, 3),
        proj.reshape(n, h, w, components),
        fg.reshape(n, h, w),
        pca.components_.astype(np.float32),
        pca.mean_.astype(np.float32),
        pca.explained_variance_.astype(np.float32),
        pca.explained_variance_ratio_.astype(np.float32),
        first,
        first_mean,
        first_score,
        evr1,
        thr,
        flipped,
        np.array([[-np.inf] * components, [np.inf] * components], np.float32),
    )


# ------------------------------------------------------------------ features of images
def feature_maps(
    runner: ViewRunner,
    model: Any,
    *,
    layer: str | None,
    hw: tuple[int, int],
    batch_size: int = 8,
    keep: Sequence[int] | None = None,
) -> tuple[np.ndarray, list[np.ndarray], str]:
    """The (N, C, h, w) maps of ``layer`` for the runner's images.

    ``model`` is placed by ``runner.place``. Also returns the RGB inputs in [0, 1] of the images
    ``keep`` (in order; all when None) and the layer's name.
    """
    import torch

    from featviz.models.features import FeatureExtractor

    loader = runner.loader(hw=hw, batch_size=batch_size)
    maps, rgbs = [], []
    wanted = None if keep is None else set(keep)
    start = 0
    with FeatureExtractor(model, layer) as dense, torch.inference_mode(), runner.batches(loader) as batches:
        for x, _, _, _ in batches:
            maps.append(dense(x.to(runner.device)).float().cpu().numpy())
            rgbs += [img for j, img in enumerate(runner.rgb(x)) if wanted is None or start + j in wanted]
            start += len(x)
        name = dense.layer
    return np.concatenate(maps), rgbs, str(name)


# ------------------------------------------------------------------ the command
@dataclass(eq=False)
class PcaResult(ViewResult):
    """What ``featviz pca`` reports (``to_dict()``: its ``--json`` summary)."""

    out: str
    images: int
    arch: str
    layer: str
    image_size: tuple[int, int]
    grid: tuple[int, int]
    feature_dim: int
    components: int
    foreground: str
    threshold: float | None  # None with foreground="none"
    foreground_share: float  # mean over the images
    explained_variance_ratio: list[float]
    first_component_explained_variance_ratio: float | None
    files: dict[str, Any]
    warnings: list[str]
    recipe: str = "dinov2"
    sheet: dict[str, int] | None = None  # {"shown", "of"}: the sheet's images

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` summary (``recipe`` and ``whiten`` follow for ``--recipe dinov3``; absent: dinov2)."""
        extra = {} if self.recipe == "dinov2" else {"recipe": self.recipe, "whiten": True}
        return {
            "out": self.out,
            "images": self.images,
            "arch": self.arch,
            "layer": self.layer,
            "image_size": list(self.image_size),
            "grid": list(self.grid),
            "feature_dim": self.feature_dim,
            "components": self.components,
            "foreground": self.foreground,
            "threshold": self.threshold,
            "foreground_share": self.foreground_share,
            "explained_variance_ratio": self.explained_variance_ratio,
            "first_component_explained_variance_ratio": self.first_component_explained_variance_ratio,
            "files": self.files,
            "warnings": self.warnings,
            "sheet": self.sheet,
            **extra,
        }


def run_pca(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    model: Any,
    layer: str | None = None,
    image_size: int | str | Sequence[int] | None = None,
    components: int = 3,
    foreground: str = "auto",
    threshold: float = 0.0,
    batch_size: int = 8,
    device: str = "cpu",
    seed: int = 0,
    force: bool = False,
    description: dict[str, Any] | None = None,
    arguments: dict[str, Any] | None = None,
    progress: Progress | None = None,
    sheet_images: int = 40,
    recipe: str = "dinov2",
    mask_dir: str | os.PathLike | None = None,
    limit: int | None = None,
) -> PcaResult:
    """Everything ``featviz pca`` does; writes ``out_dir`` as one atomic folder.

    Files: ``sheet.png`` (input | PCA image, per image), ``rgb/<image>.png`` (the PCA image at the
    input's size), ``pca.npz`` (``components`` (k, C), ``mean``, ``explained_variance(_ratio)``,
    ``projections`` (N, h, w, k), ``foreground`` (N, h, w), ``rgb`` (N, h, w, 3), the first PCA's
    ``first_component``/``first_mean``/``first_score``, ``ids``) and ``manifest.json``.

    ``recipe="dinov3"`` is DINOv3's notebook recipe instead (``dinov3_pca``): foreground from
    ``mask_dir``'s masks, or ``foreground``'s rule, median-filtered; a whitened PCA on the foreground
    patches of all images; ``sigmoid(2·x)`` colours. ``pca.npz`` then also has ``foreground_score``.

    ``sheet_images``: at most this many images on the sheet (``featviz.views.sheets.sheet_cut``:
    spread over all images, the cut said); ``limit``: only the first N images.

    Returns:
        The result; its ``to_dict()`` is the summary that ``--json`` prints.

    Raises:
        DataError: bad options or size, no images, a layer without a spatial map.
        OutputExistsError: ``out_dir`` exists and ``force`` is False.
    """
    from featviz.models.features import arch_name, input_size
    from featviz.views.sheets import grid_sheet, save_png, upsample, with_caution

    runner = ViewRunner("pca", out_dir, force=force, arguments=arguments, progress=progress)
    if foreground not in FOREGROUND:
        raise DataError(f"--foreground {foreground!r}: expected one of {', '.join(FOREGROUND)}")
    if components < 1:
        raise DataError(f"--components must be ≥ 1, got {components}")
    if recipe not in RECIPES:
        raise DataError(f"--recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
    if mask_dir is not None and recipe != "dinov3":
        raise DataError(
            "--mask-dir belongs to DINOv3's recipe: add --recipe dinov3 (DINOv2's takes the first component)"
        )
    hw = input_size(model, image_size)
    files, ids = runner.images(inputs, limit=limit)
    cut = sheet_cut(len(files), sheet_images)
    model = runner.place(model, device)
    maps, rgbs, layer_name = feature_maps(runner, model, layer=layer, hw=hw, batch_size=batch_size, keep=cut.indices)
    score = None
    if recipe == "dinov3":
        from featviz.views.pca_masks import mask_scores

        if mask_dir is not None:
            score = mask_scores(mask_dir, files, ids, hw=hw, grid=(maps.shape[2], maps.shape[3]))
        res = dinov3_pca(
            maps, foreground_score=score, foreground=foreground, components=components, threshold=threshold,
            seed=seed,
        )
    else:
        res = patch_pca(
            maps, components=components, foreground=foreground, threshold=threshold, seed=seed
        )
    fg_rule = "masks" if score is not None else foreground
    arch = arch_name(model)
    share = res.foreground_share
    warnings = []
    if fg_rule == "auto" and (share.mean() > 0.9 or share.mean() < 0.05):
        warnings.append(
            f"the first component calls {share.mean():.0%} of the patches foreground: it does not "
            "separate objects from background at this layer (a random or collapsed model, or a "
            "layer too early); the colours are fitted on those patches anyway"
        )
        log.warning(warnings[-1])
    with runner.output() as tmp:
        (tmp / "rgb").mkdir()
        pictures = []  # the PCA images at the input size; kept for the sheet only
        for i in range(len(ids)):
            pic = upsample(res.rgb[i], hw)
            save_png(pic, tmp / "rgb" / f"{safe_stem(ids[i])}.png", min_side=224)
            if i in cut.indices:
                pictures.append(pic)
        shown = len(rgbs)
        per_row = 1 if shown <= 4 else 2 if shown <= 8 else 4
        cells, titles = [], []
        for r in range(0, shown, per_row):
            row, tit = [], []
            for k in range(r, min(r + per_row, shown)):
                row += [rgbs[k], pictures[k]]
                tit += [ids[cut.indices[k]], "PCA"]
            cells.append(row)
            titles.append(tit)
        evr = ", ".join(f"{v:.0%}" for v in res.explained_variance_ratio[:3])
        fg_note = (
            f"foreground: first component > {threshold:g} ({share.mean():.0%} of patches)"
            if fg_rule == "auto"
            else f"foreground: masks ({share.mean():.0%} of patches)"
            if fg_rule == "masks"
            else "no background removal"
        )
        if recipe == "dinov3":
            fg_note = fg_note.replace("foreground: ", "foreground (median-filtered): ")
        title = with_caution(
            model,
            f"{arch} · {layer_name} · {hw[0]}x{hw[1]} ({maps.shape[2]}x{maps.shape[3]} patches) · "
            f"PCA of {len(ids)} images jointly · {fg_note} · "
            f"RGB = components 1-3 ({evr} of the variance)" + (f" · {cut.caption()}" if cut.cut else "")
        )
        if recipe == "dinov3":
            title = with_caution(
                model,
                f"DINOv3 recipe · {arch} · {layer_name} · {hw[0]}x{hw[1]} ({maps.shape[2]}x{maps.shape[3]} "
                f"patches) · {fg_note} · whitened PCA of the foreground of {len(ids)} images jointly · "
                f"RGB = sigmoid(2 x whitened components 1-3) ({evr} of the variance)"
                + (f" · {cut.caption()}" if cut.cut else ""),
            )
        grid_sheet(tmp / "sheet.png", cells, cell_titles=titles, title=title, cell=1.9)
        arrays = {
            "ids": np.array(ids),
            "components": res.components,
            "mean": res.mean,
            "explained_variance": res.explained_variance,
            "explained_variance_ratio": res.explained_variance_ratio,
            "projections": res.projections,
            "foreground": res.foreground,
            "rgb": res.rgb,
            "scale": res.scale,
            "grid": np.array(maps.shape[2:]),
            "image_size": np.array(hw),
        }
        if res.first_component is not None:
            arrays.update(
                first_component=res.first_component,
                first_mean=res.first_mean,
                first_score=res.first_score,
                first_explained_variance_ratio=np.float32(res.first_explained_variance_ratio),
                threshold=np.float32(threshold),
            )
        if score is not None:
            arrays["foreground_score"] = score
        np.savez_compressed(tmp / "pca.npz", **arrays)
        result = PcaResult(
            out=str(runner.out_dir),
            images=len(ids),
            arch=arch,
            layer=layer_name,
            image_size=hw,
            grid=(int(maps.shape[2]), int(maps.shape[3])),
            feature_dim=int(maps.shape[1]),
            components=components,
            foreground=fg_rule,
            threshold=threshold if fg_rule == "auto" else None,
            foreground_share=float(share.mean()),
            explained_variance_ratio=[float(v) for v in res.explained_variance_ratio],
            first_component_explained_variance_ratio=res.first_explained_variance_ratio,
            files={
                "sheet": runner.path("sheet.png"),
                "pca": runner.path("pca.npz"),
                "manifest": runner.path("manifest.json"),
                "rgb": len(ids),
            },
            warnings=warnings,
            recipe=recipe,
            sheet=cut.to_dict(),
        )
        runner.write_manifest(
            tmp,
            model={"arch": arch, "description": description},
            layer=layer_name,
            image_size=list(hw),
            grid=list(result.grid),
            feature_dim=result.feature_dim,
            definitions=_dinov3_definitions(fg_rule, threshold, res.flipped)
            if recipe == "dinov3"
            else {
                "fit": "one PCA over the patches of all images together "
                "(sklearn.decomposition.PCA, centred)",
                "foreground": None
                if foreground == "none"
                else f"first principal component of all patches > {threshold:g}, its sign "
                "chosen so that border patches score lower than interior ones "
                f"(flipped: {res.flipped})",
                "colours": "second PCA fitted on the foreground patches; each component "
                "min-max scaled over "
                "them; components 1-3 = R, G, B; background black",
            },
            images=[
                {"id": ids[i], "path": str(files[i]), "foreground_share": float(share[i])}
                for i in range(len(ids))
            ],
            warnings=warnings,
        )
    return result


def _dinov3_definitions(fg_rule: str, threshold: float, flipped: bool) -> dict[str, Any]:
    """The manifest's ``definitions`` for ``--recipe dinov3`` (DINOv3's notebooks/pca.ipynb)."""
    score = {
        "masks": "each mask (--mask-dir) through the images' transform, averaged over each patch "
        "(the notebook's patch_quant_filter)",
        "auto": f"1 where the first principal component of all patches > {threshold:g} (sign: border "
        f"patches lower; flipped: {flipped}), else 0",
        "none": None,
    }[fg_rule]
    return {
        "recipe": "dinov3: facebookresearch/dinov3 notebooks/pca.ipynb",
        "foreground": None
        if score is None
        else f"score = {score}; scipy.signal.medfilt2d(score, kernel_size=3) > 0.5 per image",
        "fit": "PCA(whiten=True) over the foreground patches of all images together (the notebook: one image)",
        "colours": "sigmoid(2 x whitened components 1-3) = R, G, B; background black",
    }
