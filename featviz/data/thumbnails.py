"""Thumbnails of the images (or pixel neighbourhoods) behind embedding rows (torch-free).

Used by the interactive HTML map (hover shows the thumbnail) and the TensorBoard projector
export (the sprite). Two kinds:

- image rows: the whole image, fitted into a ``side`` x ``side`` square;
- pixel rows: a square crop around the pixel, resized to ``side``, with the pixel marked by a
  ring and crosshair ticks (the crop is shifted inside the image near borders, the marker still
  sits on the pixel).

Finding the files: an embeddings file records ``ids`` per row and, in its manifest, the folder
the ids are relative to (``image_root``, absolute, written by ``featviz embed``) and the
arguments it was made with. ``ImageResolver`` tries, in order: an explicit root, the manifest's
``image_root``, its ``arguments.images`` (relative to the working folder, then to the
embeddings file's folder), then the ids themselves as paths. The built-in ``digits`` set is
re-created from scikit-learn. When images cannot be found the caller gets ``None`` and a count,
so it can warn once and carry on without thumbnails.
"""

from __future__ import annotations

import base64
import io
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

log = logging.getLogger(__name__)

FORMAT = "WEBP"  # 2-3x smaller than JPEG at these sizes (64 px photos: ~0.8 kB vs 1.6 kB)
QUALITY = 60
MARK = (255, 40, 40)


def side_for(n: int) -> int:
    """Thumbnail side in pixels for ``n`` thumbnails: big when few, 48 px from 8,000 on.

    At 48 px a WebP photo thumbnail is ~0.55 kB (0.75 kB as base64), so 20,000 of them take
    ~15 MB of HTML.
    """
    return 96 if n <= 2_000 else 64 if n <= 8_000 else 48


def image_root(paths: Sequence[Any], ids: Sequence[str]) -> str | None:
    """The absolute folder that relative ``ids`` name ``paths`` from, or None when they do not.

    ``featviz embed`` records this in the manifest so thumbnails can be found later from any
    working folder. Ids that are absolute paths, or paths that are not files (in-memory images),
    give None.
    """
    root: Path | None = None
    for p, i in zip(paths, ids, strict=True):
        if not isinstance(p, (str, os.PathLike)):
            return None
        rel = Path(i)
        if rel.is_absolute():
            return None
        p = Path(os.path.abspath(p))
        if len(p.parts) <= len(rel.parts) or Path(*p.parts[-len(rel.parts) :]) != rel:
            return None
        r = Path(*p.parts[: -len(rel.parts)])
        if root is None:
            root = r
        elif r != root:
            return None
    return None if root is None else str(root)


def decode(path: str | os.PathLike) -> Image.Image | None:
    """An RGB image, EXIF orientation applied; None when it cannot be read.

    (featviz.data.images.load_image is the strict decoder for embedding; it imports torch, which the
    map stages must not.)
    """
    try:
        with Image.open(path) as im:
            im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                return Image.alpha_composite(bg, im).convert("RGB")
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(im, dtype=np.float64)
                a = np.clip(a / max(a.max(), 1.0) * 255.0, 0, 255).astype(np.uint8)
                return Image.fromarray(a).convert("RGB")
            return im.convert("RGB")
    except Exception:  # noqa: BLE001 - any decoder failure means "no thumbnail", reported by the caller
        return None


def _digits(image_size: int = 32) -> list[Image.Image]:
    """scikit-learn's digits as the images ``featviz embed --images digits`` embedded."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return [
        Image.fromarray((x / 16.0 * 255).astype(np.uint8))
        .resize((image_size, image_size), Image.BILINEAR)
        .convert("RGB")
        for x in d.images
    ]


def _side(value: Any, default: int = 32) -> int:
    """The square side ``featviz embed`` built digits at: ``16``, ``"16"``, ``[16, 16]`` or ``"16x16"``."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    try:
        return int(str(value).lower().replace("×", "x").replace(",", "x").split("x")[0])
    except ValueError:
        return default


class ImageResolver:
    """Finds and decodes the image behind each row of an embeddings file (with a small cache).

    Args:
        ids: the rows' ids (``Embeddings.ids``).
        manifest: the embeddings manifest.
        npz_path: where the embeddings file lives (relative roots are tried from there).
        root: an explicit folder the ids are relative to (overrides the manifest).
    """

    def __init__(
        self,
        ids: Sequence[str],
        manifest: dict[str, Any] | None = None,
        npz_path: str | os.PathLike | None = None,
        root: str | os.PathLike | None = None,
    ):
        """See the class docstring for the arguments."""
        self.ids = [str(i) for i in ids]
        self.manifest = manifest or {}
        args = self.manifest.get("arguments") or {}
        self.digits = args.get("images") == "digits" or (
            bool(self.ids) and all(i.startswith("digits/") for i in self.ids[:50])
        )
        self._digits: list[Image.Image] | None = None
        self.roots = self._candidate_roots(root, args, npz_path)
        self.root: Path | None = None
        self._cache: OrderedDict[str, Image.Image | None] = OrderedDict()
        self._keys: dict[str, str] = {}

    def _candidate_roots(self, root, args, npz_path) -> list[Path]:
        if root is not None:
            return [Path(root)]
        cands: list[Path] = []
        if self.manifest.get("image_root"):
            cands.append(Path(self.manifest["image_root"]))
        src = args.get("images")
        if src and src != "digits":
            s = Path(src)
            base = s if not s.suffix else s.parent  # a CSV or a single file: ids are relative to its folder
            if args.get("pixels") and (base / "JPEGImages").is_dir():
                base = base / "JPEGImages"
            cands.append(base)
            if npz_path is not None and not base.is_absolute():
                cands.append(Path(npz_path).resolve().parent / base)
        cands.append(Path("."))
        return cands

    def describe(self) -> str:
        """Where images are looked for, for messages."""
        return "built-in digits" if self.digits else ", ".join(str(r) for r in self.roots[:3])

    def path(self, i: int) -> Path | None:
        """The file of row ``i`` (first root under which it exists), or None."""
        rel = Path(self.ids[i])
        if rel.is_absolute():
            return rel if rel.is_file() else None
        if self.root is not None and (self.root / rel).is_file():
            return self.root / rel
        for r in self.roots:
            if (r / rel).is_file():
                self.root = r  # later rows almost always share it
                return r / rel
        return None

    def key(self, i: int) -> str:
        """A key naming row ``i``'s image across files: its resolved path (or digits index)."""
        if self.digits:
            return f"digits:{self.ids[i]}"
        rel = self.ids[i]
        if rel not in self._keys:
            p = self.path(i)
            self._keys[rel] = str(p.resolve()) if p is not None else f"missing:{rel}"
        return self._keys[rel]

    def image(self, i: int) -> Image.Image | None:
        """Row ``i``'s decoded image (None when missing or unreadable)."""
        if self.digits:
            if self._digits is None:
                args = self.manifest.get("arguments") or {}
                self._digits = _digits(_side(self.manifest.get("image_size") or args.get("image_size")))
            k = self.ids[i].rpartition("/")[2]
            return self._digits[int(k)] if k.isdigit() and int(k) < len(self._digits) else None
        key = self.ids[i]
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        p = self.path(i)
        img = None if p is None else decode(p)
        self._cache[key] = img
        if len(self._cache) > 64:
            self._cache.popitem(last=False)
        return img


def image_thumbnail(img: Image.Image, side: int) -> Image.Image:
    """``img`` fitted into ``side`` x ``side`` (aspect kept; small images are scaled up)."""
    w, h = img.size
    s = side / max(w, h)
    return img.resize(
        (max(1, round(w * s)), max(1, round(h * s))),
        Image.NEAREST if s >= 4 else Image.BICUBIC if s > 1 else Image.LANCZOS,
    )


def pixel_thumbnail(
    img: Image.Image | np.ndarray, y: int, x: int, side: int, *, window: int | None = None
) -> Image.Image:
    """A ``side`` x ``side`` crop around pixel (y, x) of ``img`` with the pixel marked.

    ``window`` is the crop's side in image pixels (default: a third of the shorter side, at
    least 32); near a border the crop shifts inward so it stays inside the image. The mark is
    a red ring with ticks on a white halo, so the pixel itself stays visible in its middle.
    """
    if isinstance(img, np.ndarray):
        img = Image.fromarray(np.asarray(img, np.uint8)).convert("RGB")
    w_img, h_img = img.size
    win = window or max(32, min(w_img, h_img) // 3)
    win = int(min(win, w_img, h_img))
    x0 = min(max(int(x) - win // 2, 0), w_img - win)
    y0 = min(max(int(y) - win // 2, 0), h_img - win)
    crop = img.crop((x0, y0, x0 + win, y0 + win)).resize((side, side), Image.BICUBIC if win < side else Image.LANCZOS)
    s = side / win
    cx, cy = (x - x0 + 0.5) * s, (y - y0 + 0.5) * s
    d = ImageDraw.Draw(crop)
    r = max(3.0, side / 12)
    ticks = ((1, 0), (-1, 0), (0, 1), (0, -1))
    for col, wd in (((255, 255, 255), 4), (MARK, 2)):
        d.ellipse((cx - r - 1, cy - r - 1, cx + r + 1, cy + r + 1), outline=col, width=wd)
        for dx, dy in ticks:
            a, b = r * 1.5, r * 2.6
            d.line((cx + dx * a, cy + dy * a, cx + dx * b, cy + dy * b), fill=col, width=wd)
    return crop


def encode(img: Image.Image) -> bytes:
    """``img`` encoded as a small ``FORMAT`` (WebP) file."""
    buf = io.BytesIO()
    img.save(buf, FORMAT, quality=QUALITY, method=2)  # method 2: as small as 4 here, faster
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    """A ``data:`` URI of encoded thumbnail bytes."""
    return f"data:image/{FORMAT.lower()};base64," + base64.b64encode(data).decode("ascii")


class ThumbnailStore:
    """Encoded thumbnails, deduplicated by key; rows refer to them by index (-1 = none).

    Args:
        side: thumbnail side in pixels.
    """

    def __init__(self, side: int):
        """An empty store of ``side``-pixel thumbnails."""
        self.side = side
        self.data: list[bytes] = []
        self._index: dict[Any, int] = {}

    def __len__(self) -> int:
        """The number of distinct thumbnails."""
        return len(self.data)

    @property
    def nbytes(self) -> int:
        """The encoded size of every thumbnail together."""
        return sum(len(d) for d in self.data)

    def add(self, key: Any, make) -> int:
        """Index of ``key``'s thumbnail; ``make()`` (-> PIL image or None) runs once per key."""
        if key in self._index:
            return self._index[key]
        img = make()
        if img is None:
            self._index[key] = -1
            return -1
        self.data.append(encode(img))
        self._index[key] = len(self.data) - 1
        return self._index[key]

    def add_image(self, key: Any, img: Image.Image | None) -> int:
        """Index of ``key``'s thumbnail of a whole image (-1 when ``img`` is None)."""
        return self.add(key, lambda: None if img is None else image_thumbnail(img, self.side))

    def add_pixel(
        self,
        key: Any,
        img: Image.Image | np.ndarray | None,
        y: int,
        x: int,
        *,
        window: int | None = None,
    ) -> int:
        """Index of ``key``'s thumbnail of the pixel (y, x): a crop around it, the pixel marked."""
        return self.add(
            key,
            lambda: None if img is None else pixel_thumbnail(img, y, x, self.side, window=window),
        )

    def uris(self) -> list[str]:
        """Every thumbnail as a data URI, in index order."""
        return [data_uri(d) for d in self.data]

    def images(self) -> list[Image.Image]:
        """Every thumbnail decoded (RGB), in index order."""
        out = []
        for d in self.data:
            with Image.open(io.BytesIO(d)) as im:
                out.append(im.convert("RGB"))
        return out


def for_embeddings(
    emb,
    rows: np.ndarray,
    store: ThumbnailStore,
    *,
    npz_path=None,
    root=None,
    resolver: ImageResolver | None = None,
) -> tuple[np.ndarray, int, ImageResolver]:
    """Thumbnail indices (into ``store``) for ``rows`` of an ``Embeddings``; -1 where none.

    Pixel rows get a crop around their (y, x); image rows the image. Returns the indices, how
    many distinct images could not be found or read, and the resolver (which says where it looked).
    """
    res = resolver or ImageResolver(emb.ids, emb.manifest, npz_path, root)
    out = np.full(len(rows), -1, np.int64)
    missing: set[str] = set()
    for k, r in enumerate(rows):
        r = int(r)
        key = res.key(r)
        if emb.is_pixels:
            y, x = (int(v) for v in emb.yx[r])
            out[k] = store.add((key, y, x), lambda r=r, y=y, x=x: _pixel_or_none(res.image(r), y, x, store.side))
        else:
            out[k] = store.add(key, lambda r=r: _image_or_none(res.image(r), store.side))
        if out[k] < 0:
            missing.add(res.ids[r])
    return out, len(missing), res


def _image_or_none(img, side):
    return None if img is None else image_thumbnail(img, side)


def _pixel_or_none(img, y, x, side):
    return None if img is None else pixel_thumbnail(img, y, x, side)
