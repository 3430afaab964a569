"""Two augmented views of a folder of images through a model: the inputs of collapse metrics.

Alignment needs positive pairs, so every image is augmented twice (SimSiam-style views:
random resized crop, flip, colour jitter, grayscale) and both views go through the backbone.
The result is a dict of named ``(z1, z2)`` pairs: ``backbone`` always, extra named outputs
such as ``projector``/``predictor`` when the checkpoint carries heads (see ``checkpoint_heads``),
and ``pixels`` (dense features of a layer, by default the feature core's ``default_layer``:
ResNet ``layer4``, a ViT's final ``norm`` as its patch grid) on request. Views may be
non-square (``--image-size 224x320``): a ViT takes any multiple of its patch size.

Pixel pairs share their geometry: both views use the same crop and flip and differ only in
colour, so the feature at grid cell (y, x) of view 1 is the positive of cell (y, x) of view 2.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from featviz.data.images import load_image, normalization_of
from featviz.errors import DataError
from featviz.models.description import ModelDescription
from featviz.models.features import FeatureExtractor, input_size

log = logging.getLogger(__name__)

Head = Callable[[torch.Tensor], torch.Tensor]


def view_pair(img, size: int | tuple[int, int], mean: Sequence[float], std: Sequence[float], *,
              shared_geometry: bool = False, view=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmented, normalised tensors of one PIL image: ``featviz.data.augment.view_pair``.

    That is the one augmentation pipeline; the default view is ``augment.ANALYSIS_VIEW``, SimSiam's
    views without blur.

    ``size`` is N or (H, W). With ``shared_geometry`` both views use one crop and flip
    (pixel-aligned pairs) and differ only photometrically.
    """
    from featviz.data import augment

    return augment.view_pair(img, size, mean, std, shared_geometry=shared_geometry, view=view or augment.ANALYSIS_VIEW)


def checkpoint_heads(checkpoint: str | os.PathLike | None) -> dict[str, Head]:
    """Extra named outputs computed from the pooled backbone features (projector, predictor).

    Only featviz-format checkpoints (``featviz train``) carry heads: ``projector.*`` and
    ``predictor.*`` tensors plus their JSON specs in the metadata, rebuilt with
    ``featviz.train.methods.build_head``. The predictor is applied to the projector's output, as in
    training.
    """
    if checkpoint is None or Path(checkpoint).suffix != ".safetensors":
        return {}
    from featviz.errors import CheckpointError
    from featviz.models.checkpoints import read_featviz

    try:
        tensors, meta = read_featviz(checkpoint)
    except CheckpointError:
        return {}  # a plain safetensors file (timm/torchvision weights): no heads
    from featviz.models.heads import build_head

    specs = meta.get("heads") or {}
    modules: dict[str, nn.Module] = {}
    for name in ("projector", "predictor"):
        weights = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
        if not weights:
            continue
        if name not in specs:
            log.warning("%s has %s weights but no spec to rebuild them; skipping that head",
                        Path(checkpoint).name, name)
            continue
        head = build_head(specs[name])
        head.load_state_dict(weights, strict=True)
        modules[name] = head.eval()
    heads: dict[str, Head] = {}
    if "projector" in modules:
        heads["projector"] = modules["projector"]
        if "predictor" in modules:
            heads["predictor"] = lambda h: modules["predictor"](modules["projector"](h))
    return heads


Size = int | str | Sequence[int] | None


def _decode(item: Any, k: int) -> Any | None:
    """A PIL image from a path (None, with a warning, when it cannot be decoded) or the image itself."""
    if not isinstance(item, (str, os.PathLike)):
        return item
    try:
        return load_image(item)
    except DataError as e:
        log.warning("skipping image %d: %s", k, e)
        return None


def _view_batch(images: Sequence[Any], start: int, batch_size: int, size: tuple[int, int], mean, std, *,
                shared_geometry: bool, skipped: list[int], views: int = 2) -> tuple[torch.Tensor, ...] | None:
    """``views`` views of ``images[start:start + batch_size]`` as that many batches; None when none decodes.

    Views come in pairs from ``view_pair``; views 3, 4, … are drawn after the first pair.
    """
    out: list[list[torch.Tensor]] = [[] for _ in range(views)]
    for k, item in enumerate(images[start:start + batch_size], start=start):
        img = _decode(item, k)
        if img is None:
            skipped.append(k)
            continue
        drawn: list[torch.Tensor] = []
        while len(drawn) < views:
            drawn += view_pair(img, size, mean, std, shared_geometry=shared_geometry)
        for j in range(views):
            out[j].append(drawn[j])
    return tuple(torch.stack(v) for v in out) if out[0] else None


def _pick_cells(fmap: torch.Tensor, per_image: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``per_image`` distinct grid cells of each image's map (all of them when the grid is smaller)."""
    cells = fmap.shape[2] * fmap.shape[3]
    return [rng.choice(cells, min(per_image, cells), replace=False) for _ in range(len(fmap))]


def _cell_rows(fmap: torch.Tensor, pick: list[np.ndarray]) -> np.ndarray:
    """The picked cells' feature vectors, (sum of picks, C) float32."""
    flat = fmap.float().cpu().flatten(2).transpose(1, 2)  # (B, cells, C)
    return np.concatenate([flat[i, p].numpy() for i, p in enumerate(pick)])


@torch.no_grad()
def two_view_features(model: nn.Module, images: Sequence[Any], *, image_size: Size = None,
                      batch_size: int = 64, seed: int = 0, pixels: bool = False, pixels_per_image: int = 64,
                      layer: str | None = None, heads: dict[str, Head] | None = None,
                      device: str | torch.device = "cpu", progress: Callable[[Iterable], Iterable] | None = None,
                      views: int = 2) -> tuple[dict[str, tuple[np.ndarray, ...]], list[int]]:
    """Run two (or ``views``) augmented views of every image through ``model`` (and its heads).

    Args:
        model: a featviz backbone (``forward`` gives pooled features).
        images: paths or PIL images.
        image_size: view size, N or (H, W) or ``"HxW"`` (default: the model's); a ViT's must be a
            multiple of its patch size.
        batch_size: images per forward pass.
        seed: seeds the augmentations and the pixel sampling (same seed, same views).
        pixels: also return ``pixels``: the (N, C, H, W) map of ``layer`` (the feature core's rule),
            ``pixels_per_image`` cells per image, the same cells in both views.
        pixels_per_image: cells sampled per image with ``pixels``.
        layer: the layer for ``pixels`` (default ``featviz.models.features.default_layer``: ResNet
            ``layer4``, ViT ``norm``).
        heads: extra outputs computed from the pooled features (see ``checkpoint_heads``).
        device: where the model runs.
        progress: wrapper for the batch loop.
        views: augmented views per image (Q ≥ 2; LiDAR's classes).

    Returns:
        (outputs, skipped): ``{"backbone": (z1, z2, …), ...}`` float32 arrays, one per view, and the
        indices of images that could not be decoded.

    Raises:
        DataError: no image could be decoded, or a ViT cannot take ``image_size``.
        NoSpatialMapError: ``layer`` has no spatial map.
    """
    size = input_size(model, image_size)
    mean, std = normalization_of(model)
    model = model.to(device).eval()
    heads = heads or {}
    fx = FeatureExtractor(model, layer) if pixels else None
    if views < 2:
        raise DataError(f"--views must be at least 2 (two views make a positive pair), got {views}")
    outs: dict[str, tuple[list, ...]] = {k: tuple([] for _ in range(views))
                                         for k in ["backbone", *heads, *(["pixels"] if pixels else [])]}
    rng = np.random.default_rng(seed)
    skipped: list[int] = []
    starts: Iterable[int] = range(0, len(images), batch_size)
    if progress is not None:
        starts = progress(starts)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for s in starts:
            batch = _view_batch(images, s, batch_size, size, mean, std, shared_geometry=pixels, skipped=skipped,
                                views=views)
            if batch is None:
                continue
            pick = None
            for view, x in enumerate(batch):
                h, fmap = fx.run(x.to(device)) if fx is not None else (model(x.to(device)), None)
                outs["backbone"][view].append(h.float().cpu().numpy())
                for name, head in heads.items():
                    outs[name][view].append(head(h).float().cpu().numpy())
                if fmap is not None:
                    pick = pick if pick is not None else _pick_cells(fmap, pixels_per_image, rng)  # same cells twice
                    outs["pixels"][view].append(_cell_rows(fmap, pick))
    if not outs["backbone"][0]:
        raise DataError(f"none of the {len(images)} images could be decoded")
    return {k: tuple(np.concatenate(per_view) for per_view in v) for k, v in outs.items()}, skipped


def model_collapse_reports(model: nn.Module, images: Sequence[Any], *, heads: dict[str, Head] | None = None,
                           image_size: Size = None, batch_size: int = 64, seed: int = 0,
                           pixels: bool = False, pixels_per_image: int = 64, layer: str | None = None,
                           device: str | torch.device = "cpu", progress: Callable[[Iterable], Iterable] | None = None,
                           views: int = 2, **report_kwargs: Any):
    """Collapse reports of every output of ``model`` on two (or ``views``) augmented views of ``images``.

    Returns:
        (reports, skipped): ``{"backbone": CollapseReport, "projector": ..., "pixels": ...}``
        (alignment from views 1 and 2, LiDAR from all the views of each image, other metrics from
        view 1), and undecodable image indices.
    """
    import dataclasses

    from featviz.collapse.lidar import lidar
    from featviz.collapse.metrics import collapse_report

    feats, skipped = two_view_features(model, images, image_size=image_size, batch_size=batch_size, seed=seed,
                                       pixels=pixels, pixels_per_image=pixels_per_image, layer=layer, heads=heads,
                                       device=device, progress=progress, views=views)
    reports = {}
    for name, z in feats.items():
        rep = collapse_report(z[0], z[1], seed=seed, **report_kwargs)
        if views > 2:
            keep = np.flatnonzero(np.all([np.isfinite(v).all(axis=1) for v in z], axis=0))
            rep = dataclasses.replace(rep, lidar=lidar(list(z), rows=keep), lidar_views=views)
        reports[name] = rep
    return reports, skipped


class CheckpointReports(NamedTuple):
    """What ``checkpoint_reports`` measured, and on which model."""

    reports: dict[str, Any]  # output name -> CollapseReport
    source: str  # a display name of the model
    skipped: list[int]  # undecodable image indices
    model: ModelDescription  # what was loaded (warnings included), for report.json


def checkpoint_reports(checkpoint: str | os.PathLike | None, images: str | os.PathLike, *,
                       load_kwargs: dict[str, Any], image_size: Size = None, batch_size: int = 64,
                       seed: int = 0, pixels: bool = False, pixels_per_image: int = 64, layer: str | None = None,
                       device: str = "auto", progress: Callable[[Iterable], Iterable] | None = None,
                       views: int = 2, **report_kwargs: Any) -> CheckpointReports:
    """Collapse reports of a checkpoint (or a seeded random-init ``arch``) on two views of ``images``.

    ``load_kwargs`` are the model-loading options of ``featviz.models.loader.load_model`` (arch, format,
    num_heads, checkpoint_key, trust).

    Returns:
        ``CheckpointReports``: the reports per output (backbone, projector, predictor, pixels), a
        display name of the model, the indices of undecodable images, and the model's description.
    """
    from featviz.data import images as data
    from featviz.distributed import resolve_device
    from featviz.models.loader import load_model

    model, desc = load_model(checkpoint, seed=seed, **load_kwargs)
    items = data.labelled_images(images).items
    reports, skipped = model_collapse_reports(
        model, items, heads=checkpoint_heads(checkpoint), image_size=image_size, batch_size=batch_size,
        seed=seed, pixels=pixels, pixels_per_image=pixels_per_image, layer=layer, device=resolve_device(device),
        progress=progress, views=views, **report_kwargs)
    return CheckpointReports(reports, str(checkpoint or f"{load_kwargs.get('arch')} (random init)"), skipped, desc)


def checkpoint_metrics_fn(images: str | os.PathLike, load_kwargs: dict[str, Any], *, image_size: Size = None,
                          batch_size: int = 64, seed: int = 0, device: str = "auto", views: int = 2,
                          **report_kwargs: Any) -> Callable[[Path], dict[str, Any]]:
    """A function turning one checkpoint file into a metrics record.

    It is for ``watch`` on a run that writes checkpoints but no ``metrics.jsonl``: the record is the
    projector's report when the checkpoint has one (what the SSL loss sees), else the backbone's; the
    load's warnings ride along.
    """
    from featviz.data import images as data
    from featviz.distributed import resolve_device
    from featviz.models.loader import load_model

    items = data.labelled_images(images).items
    dev = resolve_device(device)

    def metrics(path: Path) -> dict[str, Any]:
        model, desc = load_model(path, **load_kwargs)
        reports, _ = model_collapse_reports(model, items, heads=checkpoint_heads(path), image_size=image_size,
                                            batch_size=batch_size, seed=seed, device=dev, views=views,
                                            **report_kwargs)
        name = "projector" if "projector" in reports else "backbone"
        record = {**reports[name].to_dict(), "output": name}
        if desc.warnings:
            record["load_warnings"] = list(desc.warnings)
        return record

    return metrics
