"""Image and pixel embeddings from a backbone, on CPU, one GPU, or many processes (torchrun).

``embed_images`` pools one vector per image (the backbone's ``forward``); ``embed_pixels`` takes
a named layer's feature map and labels every feature-map cell from the nearest-downsampled
segmentation mask. ``run_embed`` is the whole ``featviz embed`` command: load the model, read
the inputs, shard them across torchrun processes, merge on rank 0 and write one ``.npz``.

Speed: on CUDA the forward runs under ``torch.autocast`` (bf16 where supported, else fp16) with
channels_last inputs, pinned host memory and DataLoader workers; on CPU it stays float32.
Features are always returned as float32.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from featviz.data.images import (
    IMAGE_EXTS,
    ImageDataset,
    LabelledImages,
    check_pixels,
    collate,
    find_images,
    labelled_images,
    load_image,
    normalization_of,
    resize_rule,
)
from featviz.data.masks import IGNORE_INDEX, array_wh, check_same_size, check_values, find_class_names, read_mask
from featviz.data.thumbnails import image_root
from featviz.distributed import DistInfo, barrier, init_distributed, shard
from featviz.errors import DataError, shorten
from featviz.io.artifacts import Embeddings, check_finite
from featviz.io.progress import Progress
from featviz.models.features import FeatureExtractor, default_layer, get_layer, input_size, parse_image_size

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ model and precision
def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain float32.

    ``auto`` is bf16 on GPUs that support it, fp16 on older GPUs, and float32 on CPU (CPU
    autocast is slower than float32 for convolutions on most machines).
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device`` in eval mode, channels_last on CUDA (the layout autocast convolutions want).

    Args:
        model: any module (a backbone, a segmenter).
        device: where it runs.

    Returns:
        The same module, moved.
    """
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device)


def default_workers(device: torch.device) -> int:
    """DataLoader workers: decode in parallel for a GPU; on CPU the model needs the cores."""
    if device.type == "cuda":
        return min(8, os.cpu_count() or 1)
    return 0


def _loader(dataset, *, batch_size: int, workers: int, device: torch.device, collate_fn):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_fn,
        pin_memory=device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None)


def _iterate(loader, progress: Progress | None):
    return progress(loader) if progress is not None else loader


# ------------------------------------------------------------------ image embeddings
@dataclass
class ImageFeatures:
    """Pooled features of the images one process handled."""

    index: np.ndarray  # (n,) positions in the input list
    features: np.ndarray  # (n, D) float32
    skipped: list[int]


def embed_images(model: torch.nn.Module, items: Sequence[Any], *, image_size: int | str | Sequence[int] | None = None,
                 batch_size: int = 64, device: torch.device | str = "cpu", precision: str = "auto",
                 workers: int | None = None, strict: bool = False, indices: Sequence[int] | None = None,
                 progress: Progress | None = None, center_crop: bool | None = None) -> ImageFeatures:
    """Pooled ``model(x)`` features for images (paths or PIL images).

    Args:
        model: a backbone whose forward returns (B, D).
        items: image paths or PIL images.
        image_size: input size, N or (H, W) or "HxW" (default: the model's); a ViT's must be a
            multiple of its patch size.
        batch_size: images per forward.
        device: torch device.
        precision: auto | fp32 | bf16 | fp16 (see ``autocast_dtype``).
        workers: DataLoader workers (default: ``default_workers``).
        strict: a bad image raises instead of being skipped.
        indices: the subset of ``items`` to embed (a torchrun shard); default all.
        progress: wraps the batch loop (a progress bar).
        center_crop: None = center crop for a square N, the whole image resized to exactly H×W
            otherwise (``featviz.data.images.eval_transform``).

    Returns:
        The features in input order, and the indices of images that could not be decoded.
    """
    from featviz.data.images import eval_transform

    device = torch.device(device)
    size = input_size(model, image_size)
    mean, std = normalization_of(model)
    # decode errors are handled here, in the main process, so that --strict reports one clean line
    # even when the failure happened in a DataLoader worker
    dataset = ImageDataset(items, None, eval_transform(size, mean, std, center_crop=center_crop), strict=False)
    if indices is not None:
        dataset = torch.utils.data.Subset(dataset, list(indices))
    workers = default_workers(device) if workers is None else workers
    loader = _loader(dataset, batch_size=batch_size, workers=workers, device=device, collate_fn=collate)
    model = prepare_model(model, device)
    dtype = autocast_dtype(device, precision)
    feats, idxs, skipped = [], [], []
    with torch.inference_mode(), _autocast(device, dtype):
        for x, _y, idx, bad in _iterate(loader, progress):
            for i in bad:  # too large is not undecodable: one line that says how to lift the limit
                check_pixels(items[i])
            if bad and strict:
                load_image(items[bad[0]])  # raises the DataError that names the file
            skipped += [int(i) for i in bad]
            if x is None:
                continue
            f = model(_to_device(x, device))
            if f.ndim != 2:
                raise DataError(f"the model's forward returned shape {tuple(f.shape)}; expected pooled (B, D)")
            feats.append(f.float().cpu())
            idxs.append(idx)
    if not feats:
        return ImageFeatures(np.zeros(0, np.int64), np.zeros((0, 0), np.float32), skipped)
    return ImageFeatures(torch.cat(idxs).numpy().astype(np.int64), torch.cat(feats).numpy(), skipped)


# ------------------------------------------------------------------ dense features

def grid_rows(size: int, cells: int) -> np.ndarray:
    """Source rows of a nearest-neighbour downsample from ``size`` to ``cells`` (torch's rule)."""
    return np.minimum((np.arange(cells) * (size / cells)).astype(np.int64), size - 1)


# ------------------------------------------------------------------ pixel embeddings
@dataclass
class PixelSet:
    """Images paired with their masks by file stem."""

    images: list[Path]
    masks: list[Path]
    class_names: list[str]
    ids: list[str]


def pair_masks(images: str | os.PathLike, masks: str | os.PathLike | None) -> PixelSet:
    """Match images to masks by file stem. A VOC root (``JPEGImages/`` + ``SegmentationClass/``) works.

    Raises:
        DataError: no masks folder, or no image has a mask.
    """
    root = Path(images)
    if masks is None and (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        root, masks = root / "JPEGImages", root / "SegmentationClass"
    if masks is None:
        raise DataError("--pixels needs --masks DIR (masks named like their images), or --images pointing "
                        "at a VOC root with JPEGImages/ and SegmentationClass/")
    mdir = Path(masks)
    if not mdir.is_dir():
        raise DataError(f"masks folder {str(mdir)!r} does not exist")
    by_stem = {p.stem: p for p in sorted(mdir.rglob("*")) if p.suffix.lower() in IMAGE_EXTS and p.is_file()}
    files = find_images(root)
    imgs, ms = [], []
    for f in files:
        if f.stem in by_stem:
            imgs.append(f)
            ms.append(by_stem[f.stem])
    if not imgs:
        raise DataError(f"none of the {len(files)} images in {str(root)!r} has a mask with the same file stem "
                        f"in {str(mdir)!r} (found {len(by_stem)} masks)")
    if len(imgs) < len(files):
        log.warning("%d of %d images have no mask in %s and are not embedded", len(files) - len(imgs),
                    len(files), mdir)
    base = root if root.is_dir() else root.parent
    return PixelSet(imgs, ms, find_class_names(mdir), [str(p.relative_to(base)) for p in imgs])


def check_mask_sizes(pixels: PixelSet, indices: Sequence[int]) -> None:
    """Fail before any forward pass when a mask's size differs from its image's (header reads only).

    Raises:
        DataError: the first mismatching pair, named.
    """
    for i in indices:
        try:
            with Image.open(pixels.images[i]) as im:
                isize = im.size
            with Image.open(pixels.masks[i]) as m:
                msize = m.size
        except Exception:  # noqa: BLE001 - undecodable files are reported (or skipped) by the loader
            continue
        check_same_size(msize, isize, mask=f"mask {pixels.masks[i].name}", image=f"image {pixels.images[i].name}")


class _PixelDataset(torch.utils.data.Dataset):
    def __init__(self, pixels: PixelSet, indices: Sequence[int], image_size: tuple[int, int] | None, mean, std):
        from torchvision import transforms as T

        self.pixels, self.indices, self.image_size = pixels, list(indices), image_size
        self.tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = self.indices[k]
        try:
            img = load_image(self.pixels.images[i])
        except DataError:
            return None, None, i
        mask = read_mask(self.pixels.masks[i])
        check_same_size(array_wh(mask), img.size, mask=f"mask {self.pixels.masks[i].name}",
                        image=f"image {self.pixels.images[i].name}")
        if self.image_size:
            img = img.resize((self.image_size[1], self.image_size[0]), Image.BICUBIC)
        return self.tf(img), mask, i


def _collate_by_shape(batch):
    """Group a batch into same-shape stacks (images of different sizes cannot be stacked)."""
    groups: dict[tuple, list] = {}
    skipped = []
    for x, m, i in batch:
        if x is None:
            skipped.append(i)
        else:
            groups.setdefault(tuple(x.shape), []).append((x, m, i))
    return [(torch.stack([g[0] for g in v]), [g[1] for g in v], [g[2] for g in v]) for v in groups.values()], skipped


@dataclass
class PixelFeatures:
    """Labelled pixel features of the images one process handled (before the final merge)."""

    features: np.ndarray  # (n, C) float32
    labels: np.ndarray  # (n,) int64
    image_index: np.ndarray  # (n,)
    yx: np.ndarray  # (n, 2) in mask pixels
    keys: np.ndarray  # (n,) sampling keys (for class-balanced bottom-K)
    skipped: list[int]
    ignore_only: list[int]
    grid: tuple[int, int] | None = None


def _bottom_k(labels: np.ndarray, keys: np.ndarray, k: int | None) -> np.ndarray:
    """Indices of the ``k`` smallest keys per class (all when ``k`` is None)."""
    if k is None:
        return np.arange(len(labels))
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) > k:
            idx = idx[np.argpartition(keys[idx], k - 1)[:k]]
        keep.append(idx)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def _concat_pixels(parts: list[PixelFeatures], k: int | None) -> PixelFeatures:
    parts = [p for p in parts if len(p.labels)] or parts[:1]
    cat = PixelFeatures(
        np.concatenate([p.features for p in parts]), np.concatenate([p.labels for p in parts]),
        np.concatenate([p.image_index for p in parts]), np.concatenate([p.yx for p in parts]),
        np.concatenate([p.keys for p in parts]),
        sorted(i for p in parts for i in p.skipped), sorted(i for p in parts for i in p.ignore_only),
        next((p.grid for p in parts if p.grid), None))
    if k is None:  # keep everything: no second copy of the features
        return cat
    keep = _bottom_k(cat.labels, cat.keys, k)
    return PixelFeatures(cat.features[keep], cat.labels[keep], cat.image_index[keep], cat.yx[keep],
                         cat.keys[keep], cat.skipped, cat.ignore_only, cat.grid)


def embed_pixels(model: torch.nn.Module, pixels: PixelSet, *, layer: str | None = None,
                 image_size: int | str | Sequence[int] | None = None, max_pixels_per_class: int | None = None,
                 seed: int = 0,
                 batch_size: int = 16, device: torch.device | str = "cpu", precision: str = "auto",
                 workers: int | None = None, strict: bool = False, indices: Sequence[int] | None = None,
                 ignore_index: int = IGNORE_INDEX, progress: Progress | None = None) -> PixelFeatures:
    """Dense features of ``layer``, one row per feature-map cell with a labelled mask pixel.

    Each cell is labelled from the mask downsampled with nearest neighbour (the cell's top-left
    source pixel, torch's ``nearest`` rule); cells on ``ignore_index`` are dropped. With
    ``max_pixels_per_class`` every class keeps at most that many cells, chosen uniformly at random
    with a key drawn from ``(seed, image index)``, so the choice does not depend on the batch
    size or on how torchrun shards the images.

    ``image_size`` (N, (H, W) or "HxW") resizes every image (the mask keeps its own size and is
    sampled at the map's grid); None keeps each image's own size.

    Returns:
        The kept pixels sorted by (image, y, x), plus skipped (undecodable) images and images
        whose masks had only ignore pixels.
    """
    device = torch.device(device)
    mean, std = normalization_of(model)
    hw = None if image_size is None else input_size(model, image_size)
    idx = list(range(len(pixels.images))) if indices is None else list(indices)
    check_mask_sizes(pixels, idx)
    dataset = _PixelDataset(pixels, idx, hw, mean, std)
    workers = default_workers(device) if workers is None else workers
    loader = _loader(dataset, batch_size=batch_size, workers=workers, device=device, collate_fn=_collate_by_shape)
    model = prepare_model(model, device)
    dtype = autocast_dtype(device, precision)
    parts: list[PixelFeatures] = []
    skipped: list[int] = []
    ignore_only: list[int] = []
    grid = None
    with FeatureExtractor(model, layer) as dense, torch.inference_mode(), _autocast(device, dtype):
        for groups, bad in _iterate(loader, progress):
            for i in bad:
                check_pixels(pixels.images[i])
            if bad and strict:
                load_image(pixels.images[bad[0]])  # raises the DataError that names the file
            skipped += bad
            for x, masks, ids in groups:
                fmap = dense(_to_device(x, device)).float().cpu()  # (B, C, h, w)
                h, w = fmap.shape[-2:]
                grid = (int(h), int(w))
                for b, (mask, i) in enumerate(zip(masks, ids, strict=True)):
                    check_values(mask, pixels.class_names, name=f"mask {pixels.masks[i].name}",
                                 ignore_index=ignore_index)
                    rows, cols = grid_rows(mask.shape[0], h), grid_rows(mask.shape[1], w)
                    lab = mask[np.ix_(rows, cols)]
                    ok = lab != ignore_index
                    if not ok.any():
                        ignore_only.append(i)
                        continue
                    yy, xx = np.nonzero(ok)
                    keys = np.random.default_rng([seed, i]).random(h * w)[yy * w + xx]
                    part = PixelFeatures(
                        fmap[b][:, torch.from_numpy(yy), torch.from_numpy(xx)].T.contiguous().numpy(),
                        lab[yy, xx].astype(np.int64), np.full(len(yy), i, np.int64),
                        np.stack([rows[yy], cols[xx]], 1).astype(np.int64), keys, [], [])
                    parts.append(part)
            if max_pixels_per_class is not None and len(parts) > 8:  # keep memory bounded while streaming
                parts = [_concat_pixels(parts, max_pixels_per_class)]
    if not parts:
        return PixelFeatures(np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64),
                             np.zeros((0, 2), np.int64), np.zeros(0), sorted(skipped), sorted(ignore_only), grid)
    out = _concat_pixels(parts, max_pixels_per_class)
    out.skipped, out.ignore_only, out.grid = sorted(skipped), sorted(ignore_only), grid
    return out


def _sort_pixels(p: PixelFeatures) -> PixelFeatures:
    order = np.lexsort((p.yx[:, 1], p.yx[:, 0], p.image_index))
    return PixelFeatures(p.features[order], p.labels[order], p.image_index[order], p.yx[order], p.keys[order],
                         p.skipped, p.ignore_only, p.grid)


# ------------------------------------------------------------------ the command
def _gather_to_main(obj: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (in rank order); None on other ranks."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def _skip_note(names: Sequence[str], n_total: int, what: str) -> None:
    """The skipped inputs on the console: how many, and the first few by name (the manifest lists them all)."""
    if names and len(names) < n_total:
        log.warning("skipped %d of %d %s that could not be decoded: %s (the manifest's skipped_images lists them "
                    "all; pass --strict to stop instead)", len(names), n_total, what,
                    shorten([Path(str(n)).name for n in names]))


def run_embed(*, out: str | os.PathLike | None, images: str | os.PathLike, checkpoint=None, arch: str | None = None,
              labels_csv=None, pixels: bool = False, masks=None, layer: str | None = None,
              max_pixels_per_class: int | None = None, image_size: int | str | Sequence[int] | None = None,
              batch_size: int = 64,
              device: str = "auto", precision: str = "auto", workers: int | None = None, seed: int = 0,
              strict: bool = False, drop_nonfinite: bool = False, force: bool = False,
              load_kwargs: dict[str, Any] | None = None, progress: Progress | None = None,
              tensorboard: str | os.PathLike | None = None, center_crop: bool | None = None,
              limit: int | None = None) -> Embeddings | None:
    """Everything ``featviz embed`` does; returns the merged embeddings (None on non-zero ranks).

    Under torchrun each rank embeds its shard; rank 0 gathers, merges in input order and writes
    ``out`` (when given). Outputs are checked before any work, and written atomically. ``center_crop``
    (None: on for a square N, off for H×W) chooses the pooled images' transform; the manifest's
    ``resize`` says what was done; ``limit`` keeps the first N images listed (the manifest's ``limit``). With
    ``tensorboard`` rank 0 also writes a TensorBoard projector folder there (``featviz.eval.projector``).

    Raises:
        DataError: no usable images/pixels, NaN features (unless ``drop_nonfinite``), bad masks.
        OutputExistsError: ``out`` exists and ``force`` is False.
    """
    from featviz.io.artifacts import check_save
    from featviz.io.outputs import check_output, manifest

    if out is not None:
        if Path(out).suffix != ".npz":
            raise DataError(f"--out must end in .npz, got {str(out)!r}")
        check_save(out, force=force)  # the .npz and its manifest, writable, before any work
    if pixels and center_crop:
        raise DataError("--center-crop applies to pooled image embeddings; --pixels takes each whole image so that "
                        "its mask stays aligned: drop --center-crop")
    if tensorboard is not None:
        from featviz.eval.projector import require_tensorboard

        require_tensorboard()
        check_output(tensorboard, force=force, folder=True)
    info = init_distributed(device)
    try:
        from featviz.models.loader import load_model

        model, desc = load_model(checkpoint, arch=arch, seed=seed, **(load_kwargs or {}))
        args = dict(images=str(images), checkpoint=None if checkpoint is None else str(checkpoint), arch=arch,
                    pixels=pixels, masks=None if masks is None else str(masks), layer=layer,
                    max_pixels_per_class=max_pixels_per_class, image_size=image_size, center_crop=center_crop,
                    batch_size=batch_size, device=device, precision=precision, strict=strict, limit=limit)
        extra = provenance(desc, info, precision, seed)
        run = dict(batch_size=batch_size, device=info.device, precision=precision, workers=workers, strict=strict,
                   progress=progress if info.is_main else None, limit=limit)
        if pixels:
            emb = _run_pixels(model, images, masks, layer, image_size, max_pixels_per_class, seed, info, run, extra)
        else:
            emb = _run_images(model, images, labels_csv, image_size, info, dict(run, center_crop=center_crop), extra)
        if emb is not None:  # rank 0 (or the only process) writes
            ok = check_finite(emb.features, drop=drop_nonfinite)
            if not ok.all():
                log.warning("dropped %d rows with NaN/Inf features", int((~ok).sum()))
                emb = emb.subset(np.flatnonzero(ok))
            emb.manifest = manifest("embed", args, **extra, **emb.manifest)
            if out is not None:
                emb.save(out, force=force)
            if tensorboard is not None:
                from featviz.eval.projector import write_projector

                write_projector(emb, tensorboard, npz_path=out, force=force)
        # every rank leaves together once the file is written: a rank that tore its process group
        # down while rank 0 still held it could abort in gloo's teardown ("terminate called without
        # an active exception"); on an error no rank waits here, so none can hang
        barrier(info)
        return emb
    finally:
        from featviz.distributed import cleanup

        cleanup(info)


def provenance(desc: Any, info: DistInfo, precision: str, seed: int) -> dict[str, Any]:
    """What an embedding run's manifest says of its model and where it ran (``desc``: the ``ModelDescription``)."""
    dtype = autocast_dtype(info.device, precision)
    return dict(seed=seed, checkpoint_report=desc.source, world_size=info.world_size, device=str(info.device),
                autocast=str(dtype).replace("torch.", "") if dtype else "float32",
                arch=None if desc.arch is None else desc.arch.to_dict(), model=desc.to_dict(),
                warnings=list(desc.warnings))  # the load's warnings (also on stderr)


def apply_limit(n_all: int, run: dict, extra: dict) -> int:
    """How many images ``run``'s ``limit`` keeps of ``n_all`` (all without one); said in the manifest."""
    if (limit := run.pop("limit", None)) is not None:
        if limit < 1:
            raise DataError(f"--limit must be ≥ 1, got {limit}")
        extra["limit"] = {"first": min(limit, n_all), "of": n_all}
    return n_all if limit is None else min(limit, n_all)


def _run_images(model, images, labels_csv, image_size, info: DistInfo, run: dict, extra: dict) -> Embeddings | None:
    size = input_size(model, image_size)
    src: LabelledImages = labelled_images(images, labels_csv=labels_csv, image_size=size[0])
    n = apply_limit(len(src), run, extra)
    src = LabelledImages(src.items[:n], src.labels[:n], src.class_names, src.ids[:n])
    extra["image_size"] = size[0] if size[0] == size[1] else list(size)
    extra["resize"] = resize_rule(size, run["center_crop"])
    part = embed_images(model, src.items, image_size=size, indices=shard(len(src), info), **run)
    parts = _gather_to_main(part, info)
    if parts is None:
        return None
    index = np.concatenate([p.index for p in parts])
    feats = np.concatenate([p.features for p in parts if len(p.index)]) if len(index) else np.zeros((0, 0))
    skipped = sorted(i for p in parts for i in p.skipped)
    _skip_note([src.ids[i] for i in skipped], len(src), "images")
    if not len(index):
        raise DataError(f"none of the {len(src)} images in {str(images)!r} could be decoded "
                        f"({shorten([Path(str(src.ids[i])).name for i in skipped], 3)}); check the files")
    order = np.argsort(index, kind="stable")
    index = index[order]
    ids = np.array(src.ids)[index]
    return Embeddings(feats[order], src.labels[index], src.class_names, ids,
                      manifest={"skipped_images": [src.ids[i] for i in skipped],
                                "image_root": image_root(src.items, src.ids)})


def _run_pixels(model, images, masks, layer, image_size, k, seed, info: DistInfo, run: dict,
                extra: dict) -> Embeddings | None:
    pix = pair_masks(images, masks)
    n = apply_limit(len(pix.images), run, extra)
    pix = PixelSet(pix.images[:n], pix.masks[:n], pix.class_names, pix.ids[:n])
    layer = layer or default_layer(model)
    get_layer(model, layer)  # fail fast with suggestions, before any decoding
    hw = parse_image_size(image_size)
    if hw is not None:
        input_size(model, hw)  # a ViT's size must be a multiple of its patch: say so before decoding
    extra.update(layer=layer, image_size=None if hw is None else hw[0] if hw[0] == hw[1] else list(hw),
                 resize="each image at its own size" if hw is None else resize_rule(hw, False),
                 max_pixels_per_class=k, ignore_index=IGNORE_INDEX)
    part = embed_pixels(model, pix, layer=layer, image_size=image_size, max_pixels_per_class=k, seed=seed,
                        indices=shard(len(pix.images), info), **run)
    parts = _gather_to_main(part, info)
    if parts is None:
        return None
    merged = _sort_pixels(_concat_pixels(parts, k))
    _skip_note([pix.ids[i] for i in merged.skipped], len(pix.images), "images")
    if merged.ignore_only:
        names = [pix.ids[i] for i in merged.ignore_only]
        if run["strict"] or not len(merged.labels):
            raise DataError(f"mask of {', '.join(names[:3])}{' …' if len(names) > 3 else ''} has only ignore "
                            f"({IGNORE_INDEX}) pixels at the feature resolution; nothing to embed there")
        log.warning("%d images have only ignore pixels at the feature resolution and give no rows: %s",
                    len(names), ", ".join(names[:5]))
    if not len(merged.labels):
        raise DataError(f"no labelled pixels in {len(pix.images)} images (all skipped or ignore)")
    n_classes = int(merged.labels.max()) + 1
    names = pix.class_names if len(pix.class_names) >= n_classes else \
        pix.class_names + [str(i) for i in range(len(pix.class_names), n_classes)]
    extra["feature_grid"] = merged.grid
    ids = np.array(pix.ids)[merged.image_index]
    return Embeddings(merged.features, merged.labels, names, ids, merged.image_index, merged.yx,
                      manifest={"images": pix.ids, "skipped_images": [pix.ids[i] for i in merged.skipped],
                                "image_root": image_root(pix.images, pix.ids)})
