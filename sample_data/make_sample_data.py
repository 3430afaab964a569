"""Regenerate the bundled sample data (deterministic; needs scikit-image and Pillow).

    python sample_data/make_sample_data.py

photos/<class>/*.jpg  20 crops (128 px) of scikit-image's public-domain sample photos, 5 classes.
seg/                  a small generated segmentation set in VOC layout: textured shapes on
                      textured backgrounds; classes in seg/classes.txt, 255 = ignore (object borders).
                      40 scenes of 240x180 px: the working resolution of the bundled segmenters
                      (crop 96, base 120: CAC's rescale draws a long side of 96-240 px, so a crop
                      is never upsampled). 12 train (labelled), 20 unlabeled, 8 val.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent
PHOTOS = {
    "cat": ["chelsea", "cat"],
    "astronaut": ["astronaut"],
    "coffee": ["coffee"],
    "rocket": ["rocket"],
    "cells": ["immunohistochemistry"],
}
SEG_CLASSES = ["background", "disc", "square", "triangle"]


def make_photos(rng: np.random.Generator) -> None:
    import skimage.data

    for cls, names in PHOTOS.items():
        out = HERE / "photos" / cls
        out.mkdir(parents=True, exist_ok=True)
        k = 0
        for name in names:
            img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
            per = 4 // len(names)
            for _ in range(per):
                w, h = img.size
                s = int(min(w, h) * rng.uniform(0.6, 0.95))
                x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
                crop = img.crop((x, y, x + s, y + s)).resize((128, 128), Image.BICUBIC)
                crop.save(out / f"{cls}_{k}.jpg", quality=85)
                k += 1


SEG_SIZE = (240, 180)  # (w, h): long side = 2.0 x base 120, the largest rescale CAC's pair crops draw
_REF = 96  # the scenes were first drawn at 96 px; shapes and texture periods scale with the short side


def _texture(rng: np.random.Generator, size: tuple[int, int], base: np.ndarray, freq: float) -> np.ndarray:
    w, h = size
    yy, xx = np.mgrid[:h, :w]
    angle = rng.uniform(0, np.pi)
    wave = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * freq + rng.uniform(0, 6.28))
    noise = rng.normal(0, 12, (h, w, 3))
    return np.clip(base[None, None] + 35 * wave[..., None] + noise, 0, 255)


def make_seg(rng: np.random.Generator, n: int = 40, size: tuple[int, int] = SEG_SIZE) -> None:
    root = HERE / "seg"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    w, h = size
    k = min(size) / _REF
    colors = {1: (200, 60, 50), 2: (60, 170, 70), 3: (60, 90, 210)}
    freqs = {1: 0.9 / k, 2: 0.45 / k, 3: 0.2 / k}  # texture periods in scene pixels scale with the scene
    names = []
    for i in range(n):
        bg_base = rng.uniform(90, 170, 3)
        img = _texture(rng, size, bg_base, 0.05 / k)
        mask = np.zeros((h, w), np.uint8)
        for cls in rng.permutation([1, 2, 3])[: int(rng.integers(2, 4))]:
            layer = Image.new("L", (w, h), 0)
            d = ImageDraw.Draw(layer)
            r = int(rng.integers(round(12 * k), round(22 * k)))
            cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
            if cls == 1:
                d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=1)
            elif cls == 2:
                d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=1)
            else:
                d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=1)
            m = np.array(layer, bool)
            tex = _texture(rng, size, np.array(colors[cls]) + rng.normal(0, 15, 3), freqs[cls])
            img[m] = tex[m]
            mask[m] = cls
        edge = np.array(Image.fromarray(mask).filter(ImageFilter.FIND_EDGES)) > 0
        mask[edge] = 255  # object borders are ignored, as in VOC
        name = f"scene_{i:03d}"
        Image.fromarray(img.astype(np.uint8)).save(root / "JPEGImages" / f"{name}.jpg", quality=90)
        Image.fromarray(mask).save(root / "SegmentationClass" / f"{name}.png")
        names.append(name)
    lists = root / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text("\n".join(names[:12]) + "\n")  # labelled
    (lists / "unlabeled.txt").write_text("\n".join(names[12:32]) + "\n")
    (lists / "val.txt").write_text("\n".join(names[32:]) + "\n")
    (root / "classes.txt").write_text("\n".join(SEG_CLASSES) + "\n")


if __name__ == "__main__":
    import sys

    if "--seg-only" not in sys.argv:
        make_photos(np.random.default_rng(0))
    make_seg(np.random.default_rng(1))
    print("wrote", *([] if "--seg-only" in sys.argv else [HERE / "photos", "and"]), HERE / "seg")
