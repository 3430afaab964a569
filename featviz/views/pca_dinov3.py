"""DINOv3's PCA recipe (``featviz pca --recipe dinov3``): foreground, whitening, one fit for all images.

The DINOv3 repository's notebook ``notebooks/pca.ipynb`` ("Computing the PCA of a Foreground
Object", the recipe behind the paper's rainbow-coloured object figures) does, per image:

1. patch features of the last layer with the final norm (``get_intermediate_layers(..., norm=True)``;
   featviz's default ViT layer ``norm`` is that);
2. a foreground score per patch, from a logistic-regression classifier trained in the
   ``foreground_segmentation`` notebook on patches labelled by masks (the mask averaged over each
   patch, ``patch_quant_filter``), median-filtered (``scipy.signal.medfilt2d``, kernel 3);
   foreground = filtered score > 0.5;
3. ``PCA(n_components=3, whiten=True)`` fitted on the foreground patches;
4. every patch projected, ``sigmoid(2 · projection)`` as R, G, B, background black.

featviz does the same, with two differences, each a named choice:

- **one fit for all images** (``featviz pca`` colours mean the same thing in every image): step 3
  fits on the foreground patches of all images together (the notebook has one image; with one
  image featviz is the notebook);
- **the foreground score** (the notebook's classifier, ``fg_classifier.pkl``, is trained on
  DINOv3 features of the notebook's own labelled images, which featviz does not have offline):
  ``mask_dir`` gives masks, and the score is each mask averaged over each patch (the notebook's
  ``patch_quant_filter``, the very labels its classifier was trained on); without masks,
  ``foreground="auto"`` takes DINOv2's rule, the first principal component above ``threshold``
  (``views.pca.first_component``), as a 0/1 score; ``foreground="none"`` keeps every patch.
  The median filter and the 0.5 cut apply to the score in every case, as in the notebook.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from featviz.errors import DataError
from featviz.views.pca import PatchPca, first_component, patch_matrix, rgb_of

SIGMOID_GAIN = 2.0
MEDIAN_KERNEL = 3
FOREGROUND_CUT = 0.5
_MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")


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
    """DINOv3's notebook recipe on (N, C, h, w) maps, fitted jointly (see the module docstring).

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


# ------------------------------------------------------------------ masks
def find_mask(mask_dir: Path, image_id: str) -> Path | None:
    """The mask of ``image_id`` in ``mask_dir``: same relative path or same file name, any image extension."""
    rel = Path(image_id)
    for stem in (rel.with_suffix(""), Path(rel.stem)):
        for ext in _MASK_EXTENSIONS:
            for cand in (mask_dir / (str(stem) + ext), mask_dir / (str(stem) + ext.upper())):
                if cand.is_file():
                    return cand
    return None


def mask_scores(
    mask_dir: str | os.PathLike,
    files: Sequence[Path],
    ids: Sequence[str],
    *,
    hw: tuple[int, int],
    grid: tuple[int, int],
) -> np.ndarray:
    """(N, h, w) foreground scores: each image's mask, transformed as its image, averaged over each patch.

    A mask has its image's size; its last band is read (the alpha of an RGBA cut-out, as the
    notebook's ``split()[-1]``; the grey level of an L mask), as a share of 255, or as 0/1 when
    its values are 0 and 1 (class-index masks). It goes through the images' own transform
    (``data.images.eval_transform``: the same resize and crop), and is averaged over each patch
    of the ``grid`` (the notebook's ``patch_quant_filter``).

    Raises:
        DataError: no such folder, a missing mask, a mask of another size.
    """
    import torch
    from PIL import Image

    from featviz.data.images import eval_transform
    from featviz.data.masks import array_wh, check_same_size

    root = Path(mask_dir)
    if not root.is_dir():
        raise DataError(f"--mask-dir {root}: not a folder; give the folder of foreground masks named like the images")
    transform = eval_transform(hw, (0.0,), (1.0,))
    scores = []
    for f, i in zip(files, ids, strict=True):
        path = find_mask(root, i)
        if path is None:
            raise DataError(
                f"no mask for {i} in {root} (looked for {Path(i).with_suffix('.png')} and {Path(i).stem}.<ext>); "
                "every image needs a mask of its size (white = foreground)"
            )
        with Image.open(path) as im:
            band = im.split()[-1] if im.mode in ("RGBA", "LA", "L") else im.convert("L")
            arr = np.asarray(band, np.float32)
        with Image.open(f) as image:
            check_same_size(array_wh(arr), image.size, mask=f"mask {path.name}", image=f"image {i}")
        arr = arr / 255.0 if arr.max() > 1 else arr
        m = transform(Image.fromarray(arr))[:1].clamp(0, 1)[None]  # (1, 1, H, W)
        scores.append(torch.nn.functional.adaptive_avg_pool2d(m, grid)[0, 0].numpy())
    return np.stack(scores).astype(np.float32)
