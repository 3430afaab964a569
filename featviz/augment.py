"""Per-paper view recipes for SSL training, scaled to small images.

Each recipe follows its paper's ImageNet augmentation list; sizes scale with the image side
(blur kernels ~10% of it, local crops at 96/224 of it). Gaussian blur is dropped below 64 px, as
the SimCLR and SimSiam papers do for CIFAR ("we do not use blur for CIFAR").

Views are drawn from a per-sample seed (``ViewDataset``), so the same sample at the same epoch
gets the same views whatever the process count or a resume: DDP runs match single-process
ones, and a resumed run replays the exact augmentations of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from featviz.data import IMAGENET_MEAN, IMAGENET_STD, load_image
from featviz.errors import DataError


class GaussianBlur:
    """Gaussian blur with a random sigma (SimCLR appendix A: sigma in [0.1, 2.0])."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0), scale: float = 1.0):
        self.sigma, self.scale = sigma, scale

    def __call__(self, img: Image.Image) -> Image.Image:
        s = float(torch.empty(1).uniform_(*self.sigma)) * self.scale
        return img.filter(ImageFilter.GaussianBlur(radius=s))


class Solarize:
    """BYOL's solarization: invert pixels above 128."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, threshold=128)


def _maybe(t: Callable, p: float) -> Callable | None:
    if p <= 0:
        return None
    return t if p >= 1 else T.RandomApply([t], p=p)


def _view(size: int, *, scale: tuple[float, float], jitter: tuple[float, float, float, float],
          jitter_p: float = 0.8, gray_p: float = 0.2, blur_p: float = 0.0, solarize_p: float = 0.0,
          hflip: bool = True, min_scale: float | None = None,
          mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    blur_p = blur_p if size >= 64 else 0.0  # papers drop blur at CIFAR scale
    if min_scale is not None:
        scale = (min_scale, max(min_scale, scale[1]))
    steps = [
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip() if hflip else None,
        _maybe(T.ColorJitter(*jitter), jitter_p),
        _maybe(T.Grayscale(num_output_channels=3), gray_p),
        _maybe(GaussianBlur(scale=size / 224), blur_p),
        _maybe(Solarize(), solarize_p),
        T.ToTensor(),
        T.Normalize(mean, std),
    ]
    return T.Compose([s for s in steps if s is not None])


@dataclass(frozen=True)
class Recipe:
    """How to make the views of one image: global crops (one transform each) and local crops."""

    name: str
    globals_: tuple[dict, ...]
    local: dict | None = None


# (scale, jitter, blur_p, solarize_p) straight from the papers' ImageNet recipes
_SIMCLR = dict(scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5)
_MOCO_V2 = dict(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5)  # also SimSiam
_BYOL_1 = dict(scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0, solarize_p=0.0)
_BYOL_2 = dict(scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.1, solarize_p=0.2)

RECIPES: dict[str, Recipe] = {
    "simclr": Recipe("simclr", (_SIMCLR, _SIMCLR)),
    "moco_v2": Recipe("moco_v2", (_MOCO_V2, _MOCO_V2)),
    "simsiam": Recipe("simsiam", (_MOCO_V2, _MOCO_V2)),
    "byol": Recipe("byol", (_BYOL_1, _BYOL_2)),
    "moco_v3": Recipe("moco_v3", (_BYOL_1, _BYOL_2)),
    "barlow_twins": Recipe("barlow_twins", (_BYOL_1, _BYOL_2)),
    # multi-crop: 2 global crops + N local crops at 96/224 of the size (SwAV/DINO)
    "swav": Recipe("swav", ({**_SIMCLR, "scale": (0.14, 1.0)},) * 2, {**_SIMCLR, "scale": (0.05, 0.14)}),
    "dino": Recipe("dino", (_BYOL_1, _BYOL_2), {**_BYOL_2, "scale": (0.05, 0.4), "blur_p": 0.5, "solarize_p": 0.0}),
}


class MultiView:
    """Turn one PIL image into the list of tensors a method's recipe asks for."""

    def __init__(self, recipe: str, size: int, *, local_crops: int = 0, hflip: bool = True,
                 min_scale: float | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        r = RECIPES[recipe]
        self.globals_ = [_view(size, mean=mean, std=std, hflip=hflip, min_scale=min_scale, **g) for g in r.globals_]
        self.locals_ = []
        if local_crops and r.local is not None:  # local crops keep their small scale range
            local_size = max(8, int(round(size * 96 / 224)))
            self.locals_ = [_view(local_size, mean=mean, std=std, hflip=hflip, **r.local)] * local_crops

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [t(img) for t in self.globals_] + [t(img) for t in self.locals_]


class ViewDataset(torch.utils.data.Dataset):
    """Images (paths or PIL) -> (views, label, index), with views seeded by (seed, epoch, index).

    Call ``set_epoch`` before each epoch (like ``DistributedSampler``).
    """

    def __init__(self, items: Sequence, labels: np.ndarray, views: MultiView, *, seed: int = 0):
        self.items, self.labels, self.views, self.seed, self.epoch = list(items), labels, views, seed, 0

    def set_epoch(self, epoch: int) -> None:
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
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
            views = self.views(img)
        return views, int(self.labels[i]), i


def collate_views(batch):
    """Stack per-view tensors: returns (list of (B, C, H, W), labels (B,), indices (B,))."""
    n_views = len(batch[0][0])
    views = [torch.stack([b[0][v] for b in batch]) for v in range(n_views)]
    return views, torch.tensor([b[1] for b in batch]), torch.tensor([b[2] for b in batch])
