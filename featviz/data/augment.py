"""featviz's one augmentation pipeline (torchvision.transforms.v2).

Everything in featviz that augments an image goes through this module:

- the per-method training views (``Recipe``: two global ``View``s and optional local crops,
  each method's registration in ``featviz.train.methods`` names its recipe);
- the two views ``collapse`` draws to measure alignment (``view_pair``);
- the second view of the ``pair`` CAM target (``augment_batch``, on normalised tensors);
- CAC's low-level augmentation of its overlapping crops (``LowLevelAugment``, numpy-seeded);
- ContrastiveCrop's boxed crops (``crop_alpha``: the global views' ``RandomResizedCrop`` becomes
  ``featviz.data.contrastive_crop.ContrastiveCrop``, and ``ViewDataset.boxes`` hands each image its box);
- normalisation of arrays and PIL images into model input (``to_input``, ``normalize``).

A ``View`` is a paper's augmentation list (crop scale, flip, colour jitter, grayscale, blur,
solarize) with sizes relative to the image, so one recipe serves 16 px digits and 224 px
ImageNet: blur sigmas scale with the image side (the papers' values are for 224 px) and
Gaussian blur is dropped below 64 px, as SimCLR and SimSiam do for CIFAR ("we do not use blur
for CIFAR"); local crops are 96/224 of the global size.

Views are drawn from a per-sample seed (``ViewDataset``), so the same sample at the same epoch
gets the same views whatever the process count or a resume: DDP runs match single-process
ones, and a resumed run replays the exact augmentations of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from featviz.data.images import IMAGENET_MEAN, IMAGENET_STD, load_image
from featviz.errors import DataError

BLUR_MIN_SIZE = 64  # below this side the papers' CIFAR recipes drop Gaussian blur
LOCAL_RATIO = 96 / 224  # multi-crop local crops (SwAV, DINO) relative to the global crop


# ---------------------------------------------------------------- one view
@dataclass(frozen=True)
class View:
    """One augmented view as a paper lists it (values for 224 px ImageNet crops).

    Attributes:
        scale: RandomResizedCrop area range; ratio: its aspect-ratio range.
        hflip: probability of a horizontal flip.
        jitter: ColorJitter (brightness, contrast, saturation, hue), applied with ``jitter_p``.
        gray_p: RandomGrayscale probability.
        blur_p: Gaussian blur probability, sigma drawn from ``blur_sigma`` (224 px pixels).
        solarize_p: solarization probability (threshold 128, BYOL).
        interpolation: ``bilinear`` (torchvision's default, the MoCo/SimSiam code) or ``bicubic``.
        rotate, shear: a random affine before the crop, in degrees (none in the papers' recipes;
            the digits preset uses them for handwriting's slant), black fill.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    interpolation: str = "bilinear"
    rotate: float = 0.0
    shear: float = 0.0

    def with_(self, **changes: Any) -> View:
        """This view with ``changes`` applied (a frozen dataclass's ``replace``)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-able dict (recorded in a run's config.json)."""
        return asdict(self)

    # -- the three stages: geometry, photometry, tensor -----------------------------------
    def geometric(self, size: int | tuple[int, int], *, crop_alpha: float | None = None) -> list:
        """Crop and flip (what pixel-aligned view pairs share); ``size`` is a side or (h, w).

        With ``crop_alpha`` the crop is ``ContrastiveCrop`` (same scale, ratio, interpolation; its
        centre drawn from Beta(crop_alpha, crop_alpha) inside the box that comes with the image).
        """
        interp = v2.InterpolationMode.BICUBIC if self.interpolation == "bicubic" else v2.InterpolationMode.BILINEAR
        steps: list = []
        if self.rotate or self.shear:
            steps.append(v2.RandomAffine(degrees=self.rotate, shear=self.shear or None,
                                         interpolation=v2.InterpolationMode.BILINEAR))
        if crop_alpha is None:
            steps.append(v2.RandomResizedCrop(size, scale=self.scale, ratio=self.ratio, interpolation=interp,
                                              antialias=True))
        else:
            from featviz.data.contrastive_crop import ContrastiveCrop

            steps.append(ContrastiveCrop(size, scale=self.scale, ratio=self.ratio, interpolation=interp,
                                         antialias=True, alpha=crop_alpha))
        if self.hflip > 0:
            steps.append(v2.RandomHorizontalFlip(p=self.hflip))
        return steps

    def photometric(self, size: int, *, reference_size: int | None = None) -> list:
        """Colour jitter, grayscale, blur, solarize, for a crop of ``size`` pixels.

        ``reference_size`` is the global crop side the blur sigma scales with (local crops keep
        their global view's sigma, as DINO's 96 px crops keep the 224 px values).
        """
        ref = reference_size or size
        steps: list = []
        if self.jitter_p > 0 and any(self.jitter):
            steps.append(_maybe(v2.ColorJitter(*self.jitter), self.jitter_p))
        if self.gray_p > 0:
            steps.append(v2.RandomGrayscale(p=self.gray_p))
        if self.blur_p > 0 and ref >= BLUR_MIN_SIZE:
            s = ref / 224
            sigma = (self.blur_sigma[0] * s, self.blur_sigma[1] * s)
            steps.append(_maybe(v2.GaussianBlur(_blur_kernel(sigma[1], size), sigma=sigma), self.blur_p))
        if self.solarize_p > 0:
            steps.append(v2.RandomSolarize(threshold=128, p=self.solarize_p))
        return steps

    def transform(self, size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                  *, reference_size: int | None = None, crop_alpha: float | None = None) -> v2.Compose:
        """PIL image (or uint8 tensor) -> normalised float tensor of one view.

        With ``crop_alpha`` the transform is called as ``t(image, box)``; see ``geometric``.
        """
        return v2.Compose([*self.geometric(size, crop_alpha=crop_alpha),
                           *self.photometric(size, reference_size=reference_size), *finish(mean, std)])


def _maybe(t, p: float):
    return t if p >= 1 else v2.RandomApply([t], p=p)


def _blur_kernel(sigma_max: float, size: int) -> int:
    """An odd kernel covering +-3 sigma, at most the image side."""
    k = int(2 * round(3 * sigma_max) + 1)
    k = min(k, size if size % 2 else size - 1)
    return max(3, k)


def finish(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> list:
    """To a float tensor in [0, 1], then normalised: the last steps of every featviz pipeline."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def to_input(image: Image.Image | np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
             std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """An RGB image (PIL, or an (H, W, 3) uint8 array) as a normalised (3, H, W) float tensor."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return v2.Compose(finish(mean, std))(image)


def normalize(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
              ) -> torch.Tensor:
    """Normalise float images in [0, 1] (..., 3, H, W)."""
    return v2.functional.normalize(x, list(mean), list(std))


def denormalize(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                ) -> torch.Tensor:
    """Undo ``normalize``: model input back to [0, 1] images (clamped)."""
    m = torch.tensor(list(mean), dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(list(std), dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x * s + m).clamp(0, 1)


# ---------------------------------------------------------------- recipes (2 global views + local crops)
@dataclass(frozen=True)
class Recipe:
    """How to make the views of one image: two global crops and optional local crops.

    Attributes:
        globals_: the two global views (asymmetric in BYOL-style recipes).
        local: the local crops' view (multi-crop), at ``LOCAL_RATIO`` of the size.
        source: where the official code lists it (file and line).
        global_scale_without_local: the global crops' scale when no local crops are drawn
            (DINO: "when disabling multi-crop we recommend --global_crops_scale 0.14 1").
    """

    globals_: tuple[View, View]
    local: View | None = None
    source: str = ""
    global_scale_without_local: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a JSON-able dict (recorded in a run's config.json)."""
        return {"globals": [g.to_dict() for g in self.globals_],
                "local": None if self.local is None else self.local.to_dict(), "source": self.source}

    def adjusted(self, *, min_scale: float | None = None, global_scale: tuple[float, float] | None = None,
                 hflip: bool | None = None, jitter_strength: float | None = None, rotate: float | None = None,
                 shear: float | None = None) -> Recipe:
        """This recipe with a dataset's or a user's changes (``min_scale`` wins over ``global_scale``)."""
        def fix(v: View, is_global: bool) -> View:
            ch: dict[str, Any] = {}
            if is_global and global_scale is not None:
                ch["scale"] = tuple(global_scale)
            if is_global and min_scale is not None:
                ch["scale"] = (min_scale, max(min_scale, (ch.get("scale") or v.scale)[1]))
            if hflip is not None:
                ch["hflip"] = 0.5 if hflip else 0.0
            if jitter_strength is not None:
                ch["jitter"] = tuple(j * jitter_strength for j in v.jitter)
            if rotate is not None:
                ch["rotate"] = rotate
            if shear is not None:
                ch["shear"] = shear
            return v.with_(**ch)

        return replace(self, globals_=tuple(fix(g, True) for g in self.globals_),
                       local=None if self.local is None else fix(self.local, False))

    def without_local(self) -> Recipe:
        """The recipe when no local crops are drawn (``global_scale_without_local`` applied)."""
        if self.global_scale_without_local is None:
            return self
        return replace(self, globals_=tuple(g.with_(scale=self.global_scale_without_local) for g in self.globals_))


class MultiView:
    """Turn one image into the list of tensors a recipe asks for (globals first, then locals).

    With ``crop_alpha``, ``views(img, box)`` crops the global views with ContrastiveCrop inside
    ``box`` (``(h0, w0, h1, w1)`` fractions); ``views(img)`` stays RandomResizedCrop. Local crops
    are always RandomResizedCrop (the official ContrastiveCrop code has no multi-crop).
    """

    def __init__(self, recipe: Recipe, size: int, *, local_crops: int = 0, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, crop_alpha: float | None = None):
        self.recipe, self.size = recipe, size
        self.globals_ = [g.transform(size, mean, std) for g in recipe.globals_]
        self.boxed = None if crop_alpha is None else \
            [g.transform(size, mean, std, crop_alpha=crop_alpha) for g in recipe.globals_]
        self.locals_: list = []
        if local_crops and recipe.local is not None:
            local_size = max(8, int(round(size * LOCAL_RATIO)))
            t = recipe.local.transform(local_size, mean, std, reference_size=size)
            self.locals_ = [t] * local_crops

    def __call__(self, img, box=None) -> list[torch.Tensor]:
        """All the views of one image (``box``: its ContrastiveCrop box, when the recipe crops by box)."""
        if box is None or self.boxed is None:
            return [t(img) for t in self.globals_] + [t(img) for t in self.locals_]
        from featviz.data.contrastive_crop import image_box

        b = image_box(img, box)
        return [t(img, b)[0] for t in self.boxed] + [t(img) for t in self.locals_]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The torch seed of one sample's views at one epoch (``ViewDataset``)."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


class ViewDataset(torch.utils.data.Dataset):
    """Images (paths or PIL) -> (views, label, index), with views seeded by (seed, epoch, index).

    Call ``set_epoch`` before each epoch (like ``DistributedSampler``). ``boxes`` (N, 4), when
    set, are ContrastiveCrop's boxes of the images (``views(img, boxes[i])``).
    """

    def __init__(self, items: Sequence, labels: np.ndarray, views: MultiView, *, seed: int = 0):
        self.items, self.labels, self.views, self.seed, self.epoch = list(items), labels, views, seed, 0
        self.boxes: torch.Tensor | None = None

    def set_epoch(self, epoch: int) -> None:
        """Tell the pipeline the epoch (schedules that change with it read ``self.epoch``)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def _image(self, i: int) -> Image.Image:
        item = self.items[i]
        if isinstance(item, Image.Image):
            return item
        try:
            return load_image(item)
        except DataError as e:  # training must not silently skip: say which file
            raise DataError(f"training image {i}: {e}") from None

    def __getitem__(self, i: int):
        img = self._image(i)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, i))
            views = self.views(img) if self.boxes is None else self.views(img, self.boxes[i])
        return views, int(self.labels[i]), i


def collate_views(batch):
    """Stack per-view tensors: returns (list of (B, C, H, W), labels (B,), indices (B,))."""
    n_views = len(batch[0][0])
    views = [torch.stack([b[0][v] for b in batch]) for v in range(n_views)]
    return views, torch.tensor([b[1] for b in batch]), torch.tensor([b[2] for b in batch])


# ---------------------------------------------------------------- analysis views (collapse, CAM)
# SimSiam's / MoCo v2's view without blur: what `collapse` has always drawn for its two views
ANALYSIS_VIEW = View(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), interpolation="bicubic")


def view_pair(img, size: int | tuple[int, int], mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD, *, shared_geometry: bool = False,
              view: View = ANALYSIS_VIEW) -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmented, normalised tensors of one image (torch's global RNG drives the draws).

    ``size`` is N or (H, W) (the blur, if any, scales with the shorter side). With
    ``shared_geometry`` both views use one crop and flip (pixel-aligned pairs) and differ only
    photometrically.
    """
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    geometry = v2.Compose(view.geometric(hw))
    colour = v2.Compose([*view.photometric(min(hw)), *finish(mean, std)])
    if shared_geometry:
        base = geometry(img)
        return colour(base), colour(base)
    return colour(geometry(img)), colour(geometry(img))


def augment_batch(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                  *, seed: int = 0, view: View = ANALYSIS_VIEW) -> torch.Tensor:
    """One augmented view of each image of a normalised batch (N, 3, H, W), same size, normalised.

    Images go back to uint8 (as the pipeline sees decoded files), through ``view`` at the
    batch's size, and are normalised again; the draws are seeded by ``seed`` alone.
    """
    if x.ndim != 4:
        raise DataError(f"expected a batch (N, 3, H, W), got shape {tuple(x.shape)}")
    h, w = (int(s) for s in x.shape[-2:])
    t = v2.Compose([*view.geometric((h, w)), *view.photometric(min(h, w)), *finish(mean, std)])
    imgs = (denormalize(x.detach().float().cpu(), mean, std) * 255).round().to(torch.uint8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = torch.stack([t(im) for im in imgs])
    return out.to(x.device, x.dtype)


# ---------------------------------------------------------------- CAC's low-level augmentation
@dataclass(frozen=True)
class LowLevelParams:
    """The photometric changes one call of ``LowLevelAugment`` drew (for manifests)."""

    blur: bool
    jitter: bool
    brightness: float
    contrast: float
    saturation: float
    hue: float
    order: tuple[int, ...]
    grayscale: bool

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-able dict (recorded in a run's config.json)."""
        return asdict(self)


@dataclass(eq=False)
class LowLevelAugment:
    """CAC's low-level (photometric) augmentation with its own random source.

    CAC's ``train_transform`` (dvlab-research/Context-Aware-Consistency): Gaussian blur (cv2,
    5x5 kernel, sigma from the kernel size) with ``p_blur``; ``ColorJitter(brightness,
    contrast, saturation, hue)`` with ``p_jitter``, factors and order drawn as torchvision
    draws them; grayscale with ``p_gray``. The geometry is never changed. Every draw comes
    from the ``numpy.random.Generator`` given (or seeded), independent of torch's RNG.

    Args:
        seed: seed of the internal generator, or a ``numpy.random.Generator`` to share.
    """

    seed: int | np.random.Generator = 0
    p_blur: float = 0.5
    blur_kernel: int = 5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    p_jitter: float = 0.8
    p_gray: float = 0.2
    last: LowLevelParams | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.rng = self.seed if isinstance(self.seed, np.random.Generator) else np.random.default_rng(self.seed)

    def draw(self) -> LowLevelParams:
        """Draw the next set of photometric parameters."""
        r = self.rng
        b, c, s, h = self.jitter
        blur = bool(r.random() < self.p_blur)
        jit = bool(r.random() < self.p_jitter)
        return LowLevelParams(
            blur=blur, jitter=jit,
            brightness=float(r.uniform(max(0, 1 - b), 1 + b)), contrast=float(r.uniform(max(0, 1 - c), 1 + c)),
            saturation=float(r.uniform(max(0, 1 - s), 1 + s)), hue=float(r.uniform(-h, h)),
            order=tuple(int(i) for i in r.permutation(4)), grayscale=bool(r.random() < self.p_gray))

    def apply(self, image: np.ndarray | Image.Image, params: LowLevelParams) -> np.ndarray:
        """Apply ``params`` to an RGB uint8 image; returns an (H, W, 3) uint8 array."""
        import cv2

        F = v2.functional
        arr = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
        if params.blur:
            arr = cv2.GaussianBlur(arr, (self.blur_kernel, self.blur_kernel), 0)
        im = Image.fromarray(arr)
        if params.jitter:
            ops = (lambda x: F.adjust_brightness(x, params.brightness),
                   lambda x: F.adjust_contrast(x, params.contrast),
                   lambda x: F.adjust_saturation(x, params.saturation),
                   lambda x: F.adjust_hue(x, params.hue))
            for i in params.order:
                im = ops[i](im)
        if params.grayscale:
            im = F.rgb_to_grayscale(im, num_output_channels=3)
        return np.array(im, dtype=np.uint8)  # a writable copy (torch warns on read-only arrays)

    def __call__(self, image: np.ndarray | Image.Image) -> np.ndarray:
        """Apply a freshly drawn augmentation to ``image`` (the draw is kept in ``self.last``)."""
        self.last = self.draw()
        return self.apply(image, self.last)


# ---------------------------------------------------------------- the SSL methods' training views
# Colour jitter, grayscale and blur lists of the official code, for 224 px crops. Each SSL method's
# registration (featviz.train.methods) takes its recipe from METHOD_RECIPES (ViTs: VIT_RECIPES).
_SIMCLR_VIEW = View(scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5, interpolation="bicubic")
_MOCO_VIEW = View(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5)
_BYOL_1 = View(scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0, interpolation="bicubic")
_BYOL_2 = _BYOL_1.with_(blur_p=0.1, solarize_p=0.2)
_DINO_GLOBAL_1 = _BYOL_1.with_(scale=(0.4, 1.0))
_DINO_GLOBAL_2 = _BYOL_2.with_(scale=(0.4, 1.0))
_DINO_LOCAL = _BYOL_1.with_(scale=(0.05, 0.4), blur_p=0.5)

METHOD_RECIPES: dict[str, Recipe] = {
    "simclr": Recipe((_SIMCLR_VIEW, _SIMCLR_VIEW), source="simclr tf2/data_util.py:298-390 (crop 0.08-1, "
                     "color_jitter strength 1.0: 0.8/0.8/0.8/0.2 p 0.8, grayscale 0.2, blur p 0.5)"),
    "moco_v2": Recipe((_MOCO_VIEW, _MOCO_VIEW), source="moco main_moco.py:326-338 (aug_plus)"),
    "moco_v3": Recipe((_BYOL_1.with_(scale=(0.2, 1.0)), _BYOL_2.with_(scale=(0.2, 1.0))),
                      source="moco-v3 main_moco.py:261-282 (BYOL's views), CONFIG.md:15 (--crop-min=.2 for ResNets)"),
    "byol": Recipe((_BYOL_1, _BYOL_2), source="deepmind-research byol/utils/augmentations.py (view1: blur 1.0, "
                   "solarize 0; view2: blur 0.1, solarize 0.2; jitter 0.4/0.4/0.2/0.1 p 0.8, gray 0.2)"),
    "simsiam": Recipe((_MOCO_VIEW, _MOCO_VIEW), source="simsiam main_simsiam.py:229-238 (MoCo v2's views)"),
    "barlow_twins": Recipe((_BYOL_1.with_(scale=(0.08, 1.0)), _BYOL_2),
                           source="barlowtwins main.py:290-322 (BYOL's views)"),
    "swav": Recipe((_SIMCLR_VIEW.with_(scale=(0.14, 1.0)),) * 2, _SIMCLR_VIEW.with_(scale=(0.05, 0.14)),
                   source="swav src/multicropdataset.py:36-95 (color distortion s=1, blur p 0.5), "
                          "scripts/swav_400ep_bs256_pretrain.sh (2x224 at 0.14-1, 6x96 at 0.05-0.14)"),
    "dino": Recipe((_DINO_GLOBAL_1.with_(scale=(0.14, 1.0)), _DINO_GLOBAL_2.with_(scale=(0.14, 1.0))),
                   _DINO_LOCAL.with_(scale=(0.05, 0.14)),
                   source="dino README.md:207 (ResNet-50: --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14), "
                          "main_dino.py:419-456 (DataAugmentationDINO)"),
}
"""Each SSL method's training views (ResNet backbones), by method name."""

VIT_RECIPES: dict[str, Recipe] = {
    "moco_v3": Recipe((_BYOL_1, _BYOL_2), source="moco-v3 main_moco.py:117 (crop-min 0.08), CONFIG.md ViT commands"),
    "dino": Recipe((_DINO_GLOBAL_1, _DINO_GLOBAL_2), _DINO_LOCAL,
                   source="dino main_dino.py:107-117 (global 0.4-1 with multi-crop, 0.14-1 without; local 0.05-0.4), "
                          "419-456",
                   global_scale_without_local=(0.14, 1.0)),
}
"""The methods whose ViT recipe differs (their registrations' ``vit`` variant)."""


def analysis_view(method: str | None) -> View:
    """The view analysis draws for a model trained with ``method``.

    That is its recipe's first global view, or ``ANALYSIS_VIEW`` when the method is unknown or
    has no recipe.

    Args:
        method: the SSL method a checkpoint was trained with (its metadata's ``method``), or None.

    Returns:
        One ``View`` (collapse's two views and CAM's ``pair`` target draw it).
    """
    recipe = METHOD_RECIPES.get(method) if method else None
    return recipe.globals_[0] if recipe is not None else ANALYSIS_VIEW
