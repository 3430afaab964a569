"""VOC-layout segmentation data: the folder and the seeded training crops (labelled + CAC pairs)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featviz.data.images import IMAGENET_MEAN, IMAGENET_STD, load_image
from featviz.errors import DataError


class VOCFolder:
    """A VOC-layout folder: JPEGImages/, SegmentationClass/ (PNG, 255 = ignore), ImageSets/Segmentation/*.txt."""

    def __init__(self, root: str | os.PathLike):
        """The folder ``root``, with the class names of its ``classes.txt`` when it has one.

        Raises:
            DataError: ``root`` has no ``JPEGImages/``.
        """
        self.root = Path(root)
        if not (self.root / "JPEGImages").is_dir():
            raise DataError(f"{str(self.root)!r} is not a VOC-layout folder: expected JPEGImages/, "
                            "SegmentationClass/ and ImageSets/Segmentation/{train,val,unlabeled}.txt")
        classes = self.root / "classes.txt"
        self.class_names = [c.strip() for c in classes.read_text().splitlines() if c.strip()] \
            if classes.exists() else None

    def ids(self, split: str) -> list[str]:
        """The image ids of ``split`` (``train``, ``val``, ``unlabeled``); without lists, every image trains."""
        f = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if f.exists():
            return [line.split()[0] for line in f.read_text().splitlines() if line.strip()]
        if split == "train":  # no lists: every image is a training image
            return sorted(p.stem for p in (self.root / "JPEGImages").glob("*.jpg"))
        return []

    def image_path(self, i: str) -> Path:
        """The JPEG of image ``i``."""
        return self.root / "JPEGImages" / f"{i}.jpg"

    def image(self, i: str) -> Image.Image:
        """Image ``i`` as RGB."""
        return load_image(self.image_path(i))

    def mask_path(self, i: str) -> Path:
        """The mask PNG of image ``i``."""
        return self.root / "SegmentationClass" / f"{i}.png"

    def mask(self, i: str) -> np.ndarray:
        """Image ``i``'s class mask (H, W) uint8, 255 where ignored.

        Raises:
            DataError: the image has no mask.
        """
        p = self.mask_path(i)
        if not p.exists():
            raise DataError(f"image {i!r} has no mask {str(p)!r}")
        return np.asarray(Image.open(p), dtype=np.uint8)


class SegDataset(torch.utils.data.Dataset):
    """Labelled crops (+ a CAC pair of an unlabelled image), seeded by (seed, epoch, index).

    Labelled: CAC's ``base_dataset._augmentation`` (long side 0.5-2.0x base, pad, crop, flip; no
    photometric change). Unlabelled: CAC's ``PairVOCDataset`` pair (long side 0.8-2.0x base, two
    overlapping crops, independent flips), each crop with its own low-level augmentation draw.
    """

    def __init__(self, voc: VOCFolder, labelled: list[str], unlabelled: list[str], *, crop_size: int,
                 iou_bound: tuple[float, float], seed: int, base_size: int):
        """Crops of ``crop_size`` from the ``labelled`` ids (and pairs from the ``unlabelled`` ones)."""
        self.voc, self.labelled, self.unlabelled = voc, labelled, unlabelled
        self.crop_size, self.iou_bound, self.seed, self.base_size, self.epoch = crop_size, iou_bound, seed, base_size, 0
        self._norm = (np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32))

    def set_epoch(self, epoch: int) -> None:
        """The epoch the seeds of the next items take."""
        self.epoch = epoch

    def __len__(self) -> int:
        """The number of labelled images."""
        return len(self.labelled)

    def _tensor(self, arr: np.ndarray) -> torch.Tensor:
        x = (arr.astype(np.float32) / 255.0 - self._norm[0]) / self._norm[1]
        return torch.from_numpy(x.transpose(2, 0, 1).copy())

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Labelled crop ``i`` (``image``, ``mask``) and, with unlabelled images, a CAC pair.

        The pair is ``u1``, ``u2`` (the two crops), ``ov1``, ``ov2`` (their overlap boxes) and ``flip``.
        """
        from featviz.data.cac_crops import LowLevelAugment, cac_pair, labelled_crop

        rng = np.random.default_rng([self.seed, self.epoch, i])
        lid = self.labelled[i]
        lab = labelled_crop(self.voc.image(lid), self.voc.mask(lid), rng, base_size=self.base_size,
                            crop_size=self.crop_size)
        item = {"image": self._tensor(lab.image), "mask": torch.from_numpy(lab.mask.astype(np.int64))}
        if self.unlabelled:
            uid = self.unlabelled[int(rng.integers(len(self.unlabelled)))]
            u = cac_pair(self.voc.image(uid), None, rng, base_size=self.base_size, crop_size=self.crop_size,
                         iou_bound=self.iou_bound)
            aug = LowLevelAugment(rng)  # CAC's train_transform, drawn once per crop
            item.update(u1=self._tensor(aug(u.crop1)), u2=self._tensor(aug(u.crop2)),
                        ov1=torch.tensor(u.pair.overlap1), ov2=torch.tensor(u.pair.overlap2),
                        flip=torch.tensor(u.pair.flip))
        return item

