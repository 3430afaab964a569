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

log = logging.getLogger(__name__)

FOREGROUND = ("auto", "none")


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
    first = first_mean = score = None
    evr1 = thr = None
    flipped = False
    fg = np.ones(len(x), bool)
    if foreground == "auto":
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
        evr1, thr = float(p1.explained_variance_ratio_[0]), float(threshold)
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
    colours = np.clip((proj - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    rgb = np.zeros((len(x), 3), np.float32)
    rgb[:, : min(3, components)] = colours[:, :3]
    if components == 1:
        rgb[:] = colours[:, :1]
    rgb[~fg] = 0
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


# ------------------------------------------------------------------ features of images
def feature_maps(
    runner: ViewRunner,
    model: Any,
    *,
    layer: str | None,
    hw: tuple[int, int],
    batch_size: int = 8,
    keep_images: int | None = None,
) -> tuple[np.ndarray, list[np.ndarray], str]:
    """The (N, C, h, w) maps of ``layer`` for the runner's images.

    ``model`` is placed by ``runner.place``. Also returns the first ``keep_images`` RGB inputs in
    [0, 1] (all when None) and the layer's name.
    """
    import torch

    from featviz.models.features import FeatureExtractor

    loader = runner.loader(hw=hw, batch_size=batch_size)
    maps, rgbs = [], []
    with FeatureExtractor(model, layer) as dense, torch.inference_mode(), runner.batches(loader) as batches:
        for x, _, _, _ in batches:
            maps.append(dense(x.to(runner.device)).float().cpu().numpy())
            room = len(x) if keep_images is None else max(0, keep_images - len(rgbs))
            rgbs += list(runner.rgb(x[:room]))
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

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` summary."""
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
) -> PcaResult:
    """Everything ``featviz pca`` does; writes ``out_dir`` as one atomic folder.

    Files: ``sheet.png`` (input | PCA image, per image), ``rgb/<image>.png`` (the PCA image at the
    input's size), ``pca.npz`` (``components`` (k, C), ``mean``, ``explained_variance(_ratio)``,
    ``projections`` (N, h, w, k), ``foreground`` (N, h, w), ``rgb`` (N, h, w, 3), the first PCA's
    ``first_component``/``first_mean``/``first_score``, ``ids``) and ``manifest.json``.

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
    hw = input_size(model, image_size)
    files, ids = runner.images(inputs)
    model = runner.place(model, device)
    maps, rgbs, layer_name = feature_maps(
        runner, model, layer=layer, hw=hw, batch_size=batch_size, keep_images=sheet_images
    )
    res = patch_pca(
        maps, components=components, foreground=foreground, threshold=threshold, seed=seed
    )
    arch = arch_name(model)
    share = res.foreground_share
    warnings = []
    if foreground == "auto" and (share.mean() > 0.9 or share.mean() < 0.05):
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
            if i < len(rgbs):
                pictures.append(pic)
        shown = len(rgbs)
        per_row = 1 if shown <= 4 else 2 if shown <= 8 else 4
        cells, titles = [], []
        for r in range(0, shown, per_row):
            row, tit = [], []
            for i in range(r, min(r + per_row, shown)):
                row += [rgbs[i], pictures[i]]
                tit += [ids[i], "PCA"]
            cells.append(row)
            titles.append(tit)
        evr = ", ".join(f"{v:.0%}" for v in res.explained_variance_ratio[:3])
        fg_note = (
            f"foreground: first component > {threshold:g} ({share.mean():.0%} of patches)"
            if foreground == "auto"
            else "no background removal"
        )
        title = with_caution(
            model,
            f"{arch} · {layer_name} · {hw[0]}x{hw[1]} ({maps.shape[2]}x{maps.shape[3]} patches) · "
            f"PCA of {len(ids)} images jointly · {fg_note} · "
            f"RGB = components 1-3 ({evr} of the variance)"
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
            foreground=foreground,
            threshold=threshold if foreground == "auto" else None,
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
        )
        runner.write_manifest(
            tmp,
            model={"arch": arch, "description": description},
            layer=layer_name,
            image_size=list(hw),
            grid=list(result.grid),
            feature_dim=result.feature_dim,
            definitions={
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
