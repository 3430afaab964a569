"""Image input: robust decoding, folders/CSVs/built-in sets with labels, and eval transforms.

Decoding follows ``shared/reference/checkpoints-and-safety.md`` §6: a restricted set of Pillow
decoders, ``load()`` inside ``try`` (truncated files fail here, not later), frame 0 of animations,
EXIF orientation applied, 16-bit and alpha images converted explicitly, the decompression-bomb
limit kept.
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from featviz.errors import DataError, ImageTooLargeError
from featviz.models.description import IMAGENET_MEAN, IMAGENET_STD, describe

log = logging.getLogger(__name__)

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
BUILTIN = ("digits",)


_WARNED_BUILTIN: set[Path] = set()


def is_builtin(source: str | os.PathLike) -> bool:
    """Whether ``source`` names a built-in set (``digits``) rather than a folder or file.

    The bare name always means the built-in set; when a folder or file of that name exists in the
    current folder too, a warning names both choices (``./digits`` reads the folder).
    """
    name = str(source)
    if name not in BUILTIN:
        return False
    here = Path(name).resolve()
    if here.exists() and here not in _WARNED_BUILTIN:  # said once per run
        _WARNED_BUILTIN.add(here)
        log.warning("'%s' is scikit-learn's built-in %s set, not the %s ./%s in this folder; pass ./%s to read "
                    "that instead", name, name, "folder" if Path(name).is_dir() else "file", name, name)
    return True


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to an RGB ``PIL.Image``.

    Raises:
        DataError: missing, unreadable, truncated or not an image; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path, formats=ALLOWED_FORMATS)
            if getattr(im, "n_frames", 1) > 1:
                log.warning("%s has %d frames; using the first", path.name, im.n_frames)
                im.seek(0)
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(_too_large(path)) from None
    except UnidentifiedImageError as e:
        raise DataError(f"{str(path)!r} is not a readable image ({type(e).__name__}: {e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{str(path)!r} is corrupt or truncated ({e})") from None
    im = ImageOps.exif_transpose(im)
    return _to_rgb(im)


def set_max_image_pixels(n: int | None) -> None:
    """Set Pillow's decompression-bomb limit to ``n`` pixels (0 or None: no limit); ``--max-image-pixels``."""
    if n is not None and n < 0:
        raise DataError(f"--max-image-pixels must be >= 0 (0 = no limit), got {n}")
    Image.MAX_IMAGE_PIXELS = n or None


def _too_large(path: Path) -> str:
    limit = Image.MAX_IMAGE_PIXELS
    saved, Image.MAX_IMAGE_PIXELS = limit, None
    try:  # the header only, to say how large; nothing is decoded
        with Image.open(path, formats=ALLOWED_FORMATS) as im:
            w, h = im.size
    except Exception:  # noqa: BLE001 - the size is only for the message
        w = h = 0
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    size = f"{w}x{h} = {w * h:,} pixels" if w else "larger than allowed"
    return (f"{str(path)!r} is {size}, above Pillow's decompression-bomb limit of {limit:,} pixels (a guard against "
            f"malicious files); if you trust it, pass --max-image-pixels {max(w * h, 1):d} (0 = no limit)")


def check_pixels(item: Any) -> None:
    """Raise ``ImageTooLargeError`` when ``item`` (a path) is above the decompression-bomb limit.

    Loops that skip undecodable images call it for the ones they skipped: a large image is not a
    broken one, and the user can lift the limit.
    """
    if isinstance(item, (str, os.PathLike)) and Image.MAX_IMAGE_PIXELS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # judged below
                with Image.open(item, formats=ALLOWED_FORMATS) as im:
                    w, h = im.size
        except Image.DecompressionBombError:
            raise ImageTooLargeError(_too_large(Path(item))) from None
        except Exception:  # noqa: BLE001 - undecodable: the caller's skip rule applies
            return
        if w * h > Image.MAX_IMAGE_PIXELS:
            raise ImageTooLargeError(_too_large(Path(item)))


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # scale, don't clip at 255
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def find_images(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of image files.

    Raises:
        DataError: an input does not exist, or no image file is found.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    found: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTS and q.is_file()
                            and not any(part.startswith(".") for part in q.relative_to(p).parts))
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"{str(p)!r} does not exist; expected an image file or a folder of images")
    if not found:
        raise DataError(f"no images found in {', '.join(map(str, items))} "
                        f"(looked for {', '.join(sorted(IMAGE_EXTS))})")
    return found


@dataclass
class LabelledImages:
    """Image sources with integer labels (-1 = unknown) and class names.

    ``items`` are file paths, or in-memory ``PIL.Image``s for built-in sets.
    """

    items: list[Any]
    labels: np.ndarray
    class_names: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        """The number of images."""
        return len(self.items)


def labelled_images(source: str | os.PathLike, *, labels_csv: str | os.PathLike | None = None,
                    image_size: int = 32) -> LabelledImages:
    """Images and labels from a folder, a CSV of ``path,label``, or a built-in set.

    A folder with class subfolders labels each image by its subfolder (sorted names);
    images directly in the folder get -1. ``digits`` is scikit-learn's 8x8 digits,
    upsampled to ``image_size``.

    Raises:
        DataError: nothing to read, or a CSV row points at a missing file.
    """
    if is_builtin(source):
        return digits(image_size)
    if labels_csv is not None or str(source).endswith(".csv"):
        return _from_csv(Path(labels_csv or source), base=None if labels_csv is None else Path(source))
    root = Path(source)
    files = find_images(root)
    classes = sorted({f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1}) \
        if root.is_dir() else []
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index.get(f.relative_to(root).parts[0], -1) if root.is_dir() and
                       len(f.relative_to(root).parts) > 1 else -1 for f in files], np.int64)
    ids = [str(f.relative_to(root)) if root.is_dir() else f.name for f in files]
    return LabelledImages(files, labels, classes, ids)


def _from_csv(path: Path, base: Path | None) -> LabelledImages:
    if not path.is_file():
        raise DataError(f"labels CSV {str(path)!r} does not exist")
    rows = [r for r in csv.reader(path.read_text().splitlines()) if r and not r[0].startswith("#")]
    if rows and rows[0][0].lower() in ("path", "file", "image", "filename"):
        rows = rows[1:]
    if not rows:
        raise DataError(f"labels CSV {str(path)!r} has no rows; expected lines of path,label")
    root = base or path.parent
    files, names = [], []
    for r in rows:
        f = Path(r[0]) if Path(r[0]).is_absolute() else root / r[0]
        if not f.is_file():
            raise DataError(f"{path.name}: image {r[0]!r} does not exist (resolved to {str(f)!r})")
        files.append(f)
        names.append(r[1].strip() if len(r) > 1 and r[1].strip() else "")
    classes = sorted({n for n in names if n}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index.get(n, -1) for n in names], np.int64)
    return LabelledImages(files, labels, classes, [r[0] for r in rows])


def digits(image_size: int = 32) -> LabelledImages:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes) as RGB images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = [Image.fromarray((x / 16.0 * 255).astype(np.uint8)).resize((image_size, image_size), Image.BILINEAR)
            .convert("RGB") for x in d.images]
    return LabelledImages(imgs, d.target.astype(np.int64), [str(i) for i in range(10)],
                          [f"digits/{i}" for i in range(len(imgs))])


def normalization_of(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a model's source used (``describe(model).normalization``)."""
    norm = describe(model).normalization
    return tuple(norm.mean), tuple(norm.std)


class _ResizeCover:
    """Resize (keeping the aspect ratio) so that the image covers ``size`` / ``crop_pct``."""

    def __init__(self, size: tuple[int, int], crop_pct: float):
        self.size, self.crop_pct = size, crop_pct

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        scale = max(self.size[0] / h, self.size[1] / w) / self.crop_pct
        return img.resize((max(self.size[1], round(w * scale)), max(self.size[0], round(h * scale))), Image.BICUBIC)


def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))


def center_crop_default(image_size: int | Sequence[int]) -> bool:
    """The one rule for ``--center-crop``'s default: on for a square size N, off for H×W."""
    h, w = _hw(image_size)
    return h == w


def eval_transform(image_size: int | tuple[int, int], mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD, *, resize: int | None = None,
                   center_crop: bool | None = None):
    """Resize (and, for a square size, center-crop) to ``image_size`` (N, or (H, W)), to tensor, normalise.

    ``center_crop`` None takes ``center_crop_default``: the classification-style center crop for a
    square N, the whole image resized to exactly H×W for a non-square (H, W), so that an image already
    at H×W reaches the model unchanged and dense overlays cover the whole picture.

    With the center crop, a square size resizes the short side to ``size / 0.875`` (``size`` itself up
    to 64 px, or ``resize``) and crops the center; a non-square (H, W) resizes the image, keeping its
    aspect ratio, just enough to cover (H, W) / 0.875, then crops the center (H, W): nothing is
    stretched. Without it, the whole image is resized (bicubic) to exactly H×W.
    """
    from torchvision import transforms as T

    hw = _hw(image_size)
    finish = [T.ToTensor(), T.Normalize(mean, std)]
    if not (center_crop_default(hw) if center_crop is None else center_crop):
        return T.Compose([T.Resize(hw, interpolation=T.InterpolationMode.BICUBIC), *finish])
    if hw[0] == hw[1]:
        side = hw[0]
        resize = resize or (side if side <= 64 else int(round(side / 0.875)))
        return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(side), *finish])
    crop_pct = 1.0 if max(hw) <= 64 else 0.875
    return T.Compose([_ResizeCover(hw, crop_pct), T.CenterCrop(hw), *finish])


def input_point(xy: Sequence[float], image_wh: Sequence[int], image_size: int | Sequence[int],
                center_crop: bool | None = None) -> tuple[float, float] | None:
    """Where pixel ``xy`` = (x, y) of an image of size ``image_wh`` = (w, h) lands in the model's input.

    The geometry of ``eval_transform(image_size, center_crop=center_crop)``: the pixel's centre
    (x + 0.5, y + 0.5) is scaled as the resize scales the image and shifted by the crop's offset.

    Returns:
        (x, y) in the input's pixels (continuous: [0, W) x [0, H)), or None when the center crop
        cuts the point away.
    """
    h_in, w_in = _hw(image_size)
    w, h = int(image_wh[0]), int(image_wh[1])
    if not (center_crop_default((h_in, w_in)) if center_crop is None else center_crop):
        rw, rh, left, top = w_in, h_in, 0, 0  # the whole image resized to exactly H×W
    else:
        if h_in == w_in:  # torchvision's Resize(int): the short side to `short`, the long one truncated
            short = h_in if h_in <= 64 else int(round(h_in / 0.875))
            rw, rh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        else:  # _ResizeCover
            scale = max(h_in / h, w_in / w) / (1.0 if max(h_in, w_in) <= 64 else 0.875)
            rw, rh = max(w_in, round(w * scale)), max(h_in, round(h * scale))
        left, top = int(round((rw - w_in) / 2.0)), int(round((rh - h_in) / 2.0))  # torchvision's CenterCrop
    x = (float(xy[0]) + 0.5) * rw / w - left
    y = (float(xy[1]) + 0.5) * rh / h - top
    return (x, y) if 0 <= x < w_in and 0 <= y < h_in else None


def resize_rule(image_size: int | Sequence[int], center_crop: bool | None = None) -> str:
    """What ``eval_transform(image_size, center_crop=center_crop)`` does, in words (manifests' ``resize``)."""
    h, w = _hw(image_size)
    if not (center_crop_default((h, w)) if center_crop is None else center_crop):
        return f"whole image resized to {h}x{w}"
    if h == w:
        short = h if h <= 64 else int(round(h / 0.875))
        return f"center crop: short side resized to {short}, center {h}x{w} cropped"
    pct = 1.0 if max(h, w) <= 64 else 0.875
    return f"center crop: resized to cover {h}x{w}" + (f" / {pct:g}" if pct != 1 else "") + \
        f" (aspect ratio kept), center {h}x{w} cropped"


class ImageDataset(torch.utils.data.Dataset):
    """Decodes ``items`` (paths or PIL images) lazily; a bad file yields ``None`` (see ``collate``).

    Items are ``(tensor | None, label, index)``; with ``strict`` a bad file raises ``DataError``.
    """

    def __init__(self, items: Sequence[Any], labels: Sequence[int] | None, transform, *, strict: bool = False):
        """``items`` with ``labels`` (None: all -1), each decoded image passed through ``transform``."""
        self.items, self.transform, self.strict = list(items), transform, strict
        self.labels = np.full(len(self.items), -1, np.int64) if labels is None else np.asarray(labels)

    def __len__(self) -> int:
        """The number of items."""
        return len(self.items)

    def __getitem__(self, i: int):
        """``(tensor | None, label, index)`` of item ``i``."""
        item = self.items[i]
        try:
            img = item if isinstance(item, Image.Image) else load_image(item)
        except DataError:
            if self.strict:
                raise
            return None, int(self.labels[i]), i
        return self.transform(img), int(self.labels[i]), i


def collate(batch):
    """Stack a batch, dropping items whose image failed to decode.

    Returns:
        (images (B, C, H, W) or None, labels (B,), indices (B,), skipped indices list).
    """
    good = [b for b in batch if b[0] is not None]
    skipped = [b[2] for b in batch if b[0] is None]
    if not good:
        return None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped
    x = torch.stack([b[0] for b in good])
    return x, torch.tensor([b[1] for b in good]), torch.tensor([b[2] for b in good]), skipped
