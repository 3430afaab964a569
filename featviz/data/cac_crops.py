"""CAC's overlapping-crop generator and low-level augmentation (Lai et al., CVPR 2021).

This follows ``dataloaders/voc.py`` ``PairVOCDataset.__getitem__`` of
dvlab-research/Context-Aware-Consistency (see ``shared/reference/features-and-apis.md`` §3):

1. a random rescale of the long side to ``randint(0.8 * base_size, 2.0 * base_size)``
   (bicubic image, nearest-neighbour mask);
2. padding to the crop size (image with the mean colour, mask with the ignore index);
3. crop 1 at a random corner; up to ``max_iters`` draws of crop 2 whose offset from crop 1 is
   snapped to a multiple of ``stride`` and whose IoU with crop 1 lies in ``iou_bound``
   (crop 2 = crop 1 when every draw fails);
4. the overlap box in each crop's coordinates;
5. an independent horizontal flip per crop, undone on the features (``unflip``).

The labelled branch (``labelled_crop``) is CAC's ``base/base_dataset.py`` ``_augmentation``: a
rescale of the long side to ``randint(0.5 * base, 2.0 * base)``, padding, one random crop and a
horizontal flip with p=0.5; no photometric change.

The low-level augmentation (``LowLevelAugment``, in ``featviz.data.augment``) is CAC's photometric
``train_transform``: a 5x5 Gaussian blur with p=0.5, ``ColorJitter(0.4, 0.4, 0.4, 0.1)`` with p=0.8 and grayscale
with p=0.2. Every random draw comes from a ``numpy.random.Generator`` the caller passes, so a
fixed seed gives the same crops and the same augmentation on every run, independent of
torch's or Python's global random state.

Used by ``featviz tsne --figure cac`` and by CAC training (``featviz train``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from featviz.data.masks import IGNORE_INDEX, array_wh, check_same_size
from featviz.errors import DataError

IMAGENET_MEAN_RGB = (124, 116, 104)  # ImageNet mean * 255, CAC's image padding value

# CAC configs/voc_cac_deeplabv3+_resnet50_1over8_datalist0.json
CAC_CROP_SIZE = 320
CAC_BASE_SIZE = 400
CAC_IOU_BOUND = (0.1, 1.0)
CAC_STRIDE = 8
CAC_SCALE_RANGE = (0.8, 2.0)  # the unlabelled pair (dataloaders/voc.py PairVOCDataset)
CAC_LABELLED_SCALE_RANGE = (0.5, 2.0)  # the labelled branch (base/base_dataset.py _resize)
CAC_MAX_ITERS = 50


@dataclass(frozen=True)
class CropPair:
    """Where two overlapping crops lie, and how to find their shared pixels.

    Coordinates are in pixels of the rescaled, padded image (``size`` before padding).
    Overlap boxes are ``(top, left, bottom, right)`` in each crop's own (unflipped) coordinates;
    both boxes cover the same image pixels and are multiples of ``stride`` apart.

    Attributes:
        size: (h, w) of the image after the random rescale, before padding.
        crop_size: side of the square crops.
        stride: feature stride the offsets are snapped to.
        crop1: (y, x) upper-left corner of crop 1.
        crop2: (y, x) upper-left corner of crop 2.
        overlap1: overlap box in crop 1.
        overlap2: overlap box in crop 2.
        flip: (flip1, flip2) horizontal flips applied to the crops.
        iou: intersection over union of the two crop windows.
        tries: draws of crop 2 that were needed (``max_iters`` = none fitted: crop 2 = crop 1).
    """

    size: tuple[int, int]
    crop_size: int
    stride: int
    crop1: tuple[int, int]
    crop2: tuple[int, int]
    overlap1: tuple[int, int, int, int]
    overlap2: tuple[int, int, int, int]
    flip: tuple[bool, bool]
    iou: float
    tries: int

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-able (tuples stay tuples)."""
        return asdict(self)

    def overlap_grid(self, which: int) -> tuple[slice, slice]:
        """The overlap as slices of a stride-``stride`` feature map of crop ``which`` (1 or 2).

        Same slicing as CAC's ``output[:, :, ul[0]//8:br[0]//8, ul[1]//8:br[1]//8]``, applied to
        unflipped features.
        """
        top, left, bottom, right = self.overlap1 if which == 1 else self.overlap2
        s = self.stride
        return slice(top // s, bottom // s), slice(left // s, right // s)


def rescale(image: Image.Image, mask: np.ndarray | None, long_side: int) -> tuple[Image.Image, np.ndarray | None]:
    """Resize so the long side is ``long_side``: bicubic image, nearest-neighbour mask (CAC's rule)."""
    w, h = image.size
    if h > w:
        nh, nw = long_side, int(1.0 * long_side * w / h + 0.5)
    else:
        nh, nw = int(1.0 * long_side * h / w + 0.5), long_side
    image = image.resize((nw, nh), Image.BICUBIC)
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((nw, nh), Image.NEAREST))
    return image, mask


def sample_crop_pair(size: tuple[int, int], rng: np.random.Generator, *, crop_size: int = CAC_CROP_SIZE,
                     iou_bound: tuple[float, float] = CAC_IOU_BOUND, stride: int = CAC_STRIDE,
                     max_iters: int = CAC_MAX_ITERS, flip: bool = True) -> CropPair:
    """Draw two crop windows on an image of ``size`` (h, w) whose IoU lies in ``iou_bound``.

    Args:
        size: (h, w) of the (already rescaled) image; it is padded to ``crop_size`` if smaller.
        rng: the random source (a fixed seed gives the same pair).
        crop_size: side of the square crops.
        iou_bound: accepted IoU range (CAC's config: 0.1-1.0).
        stride: crop 2's offset from crop 1 is a multiple of this (the feature stride).
        max_iters: draws of crop 2 before giving up (then crop 2 = crop 1).
        flip: draw an independent horizontal flip per crop (p=0.5 each).

    Raises:
        DataError: a bound outside [0, 1] or empty, or a crop smaller than the stride.
    """
    lo, hi = iou_bound
    if not (0.0 <= lo <= hi <= 1.0):
        raise DataError(f"--iou-bound must satisfy 0 <= LO <= HI <= 1, got {lo} {hi}")
    if crop_size < stride or crop_size % stride:
        raise DataError(f"crop size {crop_size} must be a positive multiple of the stride {stride}")
    h, w = size
    hp, wp = max(h, crop_size), max(w, crop_size)  # padded size
    x1 = int(rng.integers(0, wp - crop_size + 1))
    y1 = int(rng.integers(0, hp - crop_size + 1))
    x2 = y2 = 0
    iou = 0.0
    k = 0
    while k < max_iters:
        x2 = int(rng.integers(0, wp - crop_size + 1))
        y2 = int(rng.integers(0, hp - crop_size + 1))
        # the offset between crops must be a multiple of the stride, so overlap pixels of the two
        # crops fall on the same feature-grid cells
        x2 = (x2 - x1) // stride * stride + x1
        y2 = (y2 - y1) // stride * stride + y1
        if x2 < 0:
            x2 += stride
        if y2 < 0:
            y2 += stride
        dx, dy = crop_size - abs(x2 - x1), crop_size - abs(y2 - y1)
        if dx > 0 and dy > 0:
            inter = dx * dy
            iou = inter / (2 * crop_size * crop_size - inter)
            if lo <= iou <= hi:
                break
        k += 1
    if k == max_iters:  # CAC's fallback: identical windows
        x2, y2, iou = x1, y1, 1.0
    hs, ws = h // stride * stride, w // stride * stride
    ov1 = (max(0, y2 - y1), max(0, x2 - x1),
           min(crop_size, crop_size + y2 - y1, hs), min(crop_size, crop_size + x2 - x1, ws))
    ov2 = (max(0, y1 - y2), max(0, x1 - x2),
           min(crop_size, crop_size + y1 - y2, hs), min(crop_size, crop_size + x1 - x2, ws))
    flips = (bool(rng.random() < 0.5), bool(rng.random() < 0.5)) if flip else (False, False)
    return CropPair((h, w), crop_size, stride, (y1, x1), (y2, x2), ov1, ov2, flips, float(iou), k)


def _pad(a: np.ndarray, crop_size: int, value) -> np.ndarray:
    ph, pw = max(0, crop_size - a.shape[0]), max(0, crop_size - a.shape[1])
    if not (ph or pw):
        return a
    pad = ((0, ph), (0, pw)) + ((0, 0),) * (a.ndim - 2)
    if a.ndim == 3:  # per-channel constant (the mean colour)
        return np.stack([np.pad(a[..., c], pad[:2], constant_values=value[c]) for c in range(a.shape[2])], -1)
    return np.pad(a, pad, constant_values=value)


def apply_crop_pair(image: Image.Image | np.ndarray, mask: np.ndarray | None, pair: CropPair, *,
                    padding_rgb: tuple[int, int, int] = IMAGENET_MEAN_RGB, ignore_index: int = IGNORE_INDEX,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Cut the two crops (and mask crops) of ``pair`` out of an image already rescaled to ``pair.size``.

    Returns:
        (crop1, crop2, mask1, mask2): uint8 (S, S, 3) crops and (S, S) masks (``None`` without a
        mask), with each crop's horizontal flip applied.
    """
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    if img.shape[:2] != tuple(pair.size):
        raise DataError(f"image is {img.shape[1]}x{img.shape[0]} but the crop pair was drawn for "
                        f"{pair.size[1]}x{pair.size[0]}; rescale it first")
    s = pair.crop_size
    img = _pad(img, s, padding_rgb)
    m = None if mask is None else _pad(np.asarray(mask), s, ignore_index)
    outs = []
    for (y, x), f in zip((pair.crop1, pair.crop2), pair.flip, strict=True):
        c = img[y:y + s, x:x + s]
        mc = None if m is None else m[y:y + s, x:x + s]
        if f:
            c = c[:, ::-1]
            mc = None if mc is None else mc[:, ::-1]
        outs.append((np.ascontiguousarray(c), None if mc is None else np.ascontiguousarray(mc)))
    return outs[0][0], outs[1][0], outs[0][1], outs[1][1]


def unflip(features, flipped: bool):
    """Undo a crop's horizontal flip on a feature map (…, H, W): torch tensor or numpy array."""
    if not flipped:
        return features
    if isinstance(features, np.ndarray):
        return features[..., ::-1]
    return features.flip(-1)


@dataclass
class CACSample:
    """One CAC training/figure sample: two crops, their masks and the geometry that links them."""

    crop1: np.ndarray
    crop2: np.ndarray
    mask1: np.ndarray | None
    mask2: np.ndarray | None
    pair: CropPair
    long_side: int


def cac_pair(image: Image.Image, mask: np.ndarray | None, rng: np.random.Generator, *,
             base_size: int = CAC_BASE_SIZE, crop_size: int = CAC_CROP_SIZE,
             iou_bound: tuple[float, float] = CAC_IOU_BOUND, stride: int = CAC_STRIDE,
             scale_range: tuple[float, float] = CAC_SCALE_RANGE, max_iters: int = CAC_MAX_ITERS,
             flip: bool = True) -> CACSample:
    """CAC's full pair generator: random rescale, two overlapping crops, independent flips.

    Args:
        image: the RGB image.
        mask: (H, W) class mask with ``IGNORE_INDEX`` for unlabelled pixels, or None.
        rng: the random source.
        base_size: the long side is rescaled to ``randint(scale_range[0]*base, scale_range[1]*base)``.
        crop_size: crop side (see ``sample_crop_pair``).
        iou_bound: the crops' IoU range (see ``sample_crop_pair``).
        stride: crop offsets snap to multiples of this (see ``sample_crop_pair``).
        scale_range: the rescale range, as multiples of ``base_size``.
        max_iters: tries before giving up (see ``sample_crop_pair``).
        flip: flip each crop independently with probability 1/2 (see ``sample_crop_pair``).

    Raises:
        DataError: the mask's size differs from the image's.
    """
    if mask is not None:
        check_same_size(array_wh(mask), image.size)
    lo, hi = int(base_size * scale_range[0]), int(base_size * scale_range[1])
    long_side = int(rng.integers(lo, hi + 1))
    image, mask = rescale(image, None if mask is None else np.asarray(mask), long_side)
    pair = sample_crop_pair((image.size[1], image.size[0]), rng, crop_size=crop_size, iou_bound=iou_bound,
                            stride=stride, max_iters=max_iters, flip=flip)
    c1, c2, m1, m2 = apply_crop_pair(image, mask, pair)
    return CACSample(c1, c2, m1, m2, pair, long_side)


@dataclass
class LabelledCrop:
    """One labelled training crop: the image, its mask and where it came from."""

    image: np.ndarray
    mask: np.ndarray
    long_side: int
    corner: tuple[int, int]
    flip: bool


def labelled_crop(image: Image.Image, mask: np.ndarray, rng: np.random.Generator, *, base_size: int = CAC_BASE_SIZE,
                  crop_size: int = CAC_CROP_SIZE, scale_range: tuple[float, float] = CAC_LABELLED_SCALE_RANGE,
                  padding_rgb: tuple[int, int, int] = IMAGENET_MEAN_RGB, ignore_index: int = IGNORE_INDEX,
                  ) -> LabelledCrop:
    """CAC's labelled-branch augmentation (``base_dataset._augmentation``): rescale, pad, crop, flip.

    The long side goes to ``randint(scale_range[0] * base, scale_range[1] * base)`` (bicubic image,
    nearest mask), the image is padded bottom/right to the crop (mean colour, mask ``ignore_index``),
    one window is cut at a random corner and flipped horizontally with p=0.5. No blur, jitter or
    grayscale: CAC's labelled loader has ``jitter`` off.

    Raises:
        DataError: the mask's size differs from the image's.
    """
    mask = np.asarray(mask)
    if tuple(mask.shape[:2]) != (image.size[1], image.size[0]):
        raise DataError(f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is {image.size[0]}x{image.size[1]}; "
                        "masks must have the image's size")
    lo, hi = int(base_size * scale_range[0]), int(base_size * scale_range[1])
    long_side = int(rng.integers(lo, hi + 1))
    image, mask = rescale(image, mask, long_side)
    img = _pad(np.asarray(image.convert("RGB"), dtype=np.uint8), crop_size, padding_rgb)
    m = _pad(mask, crop_size, ignore_index)
    y = int(rng.integers(0, img.shape[0] - crop_size + 1))
    x = int(rng.integers(0, img.shape[1] - crop_size + 1))
    img, m = img[y:y + crop_size, x:x + crop_size], m[y:y + crop_size, x:x + crop_size]
    flip = bool(rng.random() < 0.5)
    if flip:
        img, m = img[:, ::-1], m[:, ::-1]
    return LabelledCrop(np.ascontiguousarray(img), np.ascontiguousarray(m), long_side, (y, x), flip)


def __getattr__(name: str):
    """``LowLevelAugment`` / ``LowLevelParams``, from ``featviz.data.augment`` on first access.

    They live in the one augmentation pipeline; imported lazily so that this module stays torch-free.
    """
    if name in ("LowLevelAugment", "LowLevelParams"):
        from featviz.data import augment

        return getattr(augment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
