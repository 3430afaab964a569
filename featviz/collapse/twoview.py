"""Two augmented views of a folder of images through a model: the inputs of collapse metrics.

Alignment needs positive pairs, so every image is augmented twice (SimSiam-style views:
random resized crop, flip, colour jitter, grayscale) and both views go through the backbone.
The result is a dict of named ``(z1, z2)`` pairs: ``backbone`` always, extra named outputs
such as ``projector``/``predictor`` when the checkpoint carries heads (see ``checkpoint_heads``),
and ``pixels`` (dense features of the last stage) on request.

Pixel pairs share their geometry: both views use the same crop and flip and differ only in
colour, so the feature at grid cell (y, x) of view 1 is the positive of cell (y, x) of view 2.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featviz.data import load_image, normalization_of
from featviz.errors import DataError
from featviz.models import default_image_size, get_layer

log = logging.getLogger(__name__)

Head = Callable[[torch.Tensor], torch.Tensor]


def view_pair(img, size: int, mean: Sequence[float], std: Sequence[float], *, shared_geometry: bool = False,
              view=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmented, normalised tensors of one PIL image: ``featviz.augment.view_pair`` (the one
    augmentation pipeline; default ``augment.ANALYSIS_VIEW``, SimSiam's views without blur).

    With ``shared_geometry`` both views use one crop and flip (pixel-aligned pairs) and differ
    only photometrically.
    """
    from featviz import augment

    return augment.view_pair(img, size, mean, std, shared_geometry=shared_geometry, view=view or augment.ANALYSIS_VIEW)


def checkpoint_heads(checkpoint: str | os.PathLike | None) -> dict[str, Head]:
    """Extra named outputs computed from the pooled backbone features (projector, predictor).

    Only featviz-format checkpoints (``featviz train``) carry heads: ``projector.*`` and
    ``predictor.*`` tensors plus their JSON specs in the metadata, rebuilt with
    ``featviz.methods.build_head``. The predictor is applied to the projector's output, as in
    training.
    """
    if checkpoint is None or Path(checkpoint).suffix != ".safetensors":
        return {}
    from featviz.checkpoints import read_featviz
    from featviz.errors import CheckpointError

    try:
        tensors, meta = read_featviz(checkpoint)
    except CheckpointError:
        return {}  # a plain safetensors file (timm/torchvision weights): no heads
    from featviz.methods import build_head

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


def _dense_layer(model: nn.Module) -> tuple[nn.Module, int | None]:
    """The module whose output is the last dense feature map, and the ViT prefix-token count."""
    if hasattr(model, "patch_embed") and hasattr(model, "blocks"):
        return model.norm, int(getattr(model, "num_prefix_tokens", 1))
    if hasattr(model, "layer4"):
        return get_layer(model, "layer4"), None
    raise DataError(f"--pixels supports ResNet and ViT backbones; {type(model).__name__} has neither "
                    "layer4 nor ViT blocks")


def _to_nchw(t: torch.Tensor, prefix: int | None) -> torch.Tensor:
    if prefix is None:
        return t
    tokens = t[:, prefix:]
    side = int(round(tokens.shape[1] ** 0.5))
    if side * side != tokens.shape[1]:
        raise DataError(f"cannot arrange {tokens.shape[1]} patch tokens into a square grid; "
                        "use a square --image-size that is a multiple of the patch size")
    return tokens.transpose(1, 2).reshape(t.shape[0], -1, side, side)


@torch.no_grad()
def two_view_features(model: nn.Module, images: Sequence[Any], *, image_size: int | None = None,
                      batch_size: int = 64, seed: int = 0, pixels: bool = False, pixels_per_image: int = 64,
                      heads: dict[str, Head] | None = None, device: str | torch.device = "cpu",
                      progress: Callable[[Iterable], Iterable] | None = None,
                      ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[int]]:
    """Run two augmented views of every image through ``model`` (and its heads).

    Args:
        model: a featviz backbone (``forward`` gives pooled features).
        images: paths or PIL images.
        image_size: view size (default: the model's).
        batch_size: images per forward pass.
        seed: seeds the augmentations and the pixel sampling (same seed, same views).
        pixels: also return ``pixels``: dense features of the last stage (ResNet ``layer4``,
            ViT patch tokens), ``pixels_per_image`` cells per image, same cells in both views.
        heads: extra outputs computed from the pooled features (see ``checkpoint_heads``).
        device: where the model runs.
        progress: wrapper for the batch loop.

    Returns:
        (outputs, skipped): ``{"backbone": (z1, z2), ...}`` float32 arrays, and the indices of
        images that could not be decoded.

    Raises:
        DataError: no image could be decoded.
    """
    size = image_size or default_image_size(model)
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if fixed and getattr(model.patch_embed, "strict_img_size", True) and tuple(fixed) != (size, size):
        raise DataError(f"this ViT takes {fixed[0]}×{fixed[1]} inputs, got --image-size {size}; "
                        f"drop --image-size or pass {fixed[0]}")
    mean, std = normalization_of(model)
    model = model.to(device).eval()
    heads = heads or {}
    outs: dict[str, list[list[np.ndarray]]] = {k: [[], []] for k in ["backbone", *heads, *(["pixels"] if pixels else [])]}
    dense: list[torch.Tensor] = []
    hook = None
    if pixels:
        layer, prefix = _dense_layer(model)
        hook = layer.register_forward_hook(lambda _m, _i, o: dense.append(o[0] if isinstance(o, tuple) else o))
    rng = np.random.default_rng(seed)
    skipped: list[int] = []
    starts: Iterable[int] = range(0, len(images), batch_size)
    if progress is not None:
        starts = progress(starts)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for s in starts:
                v1, v2 = [], []
                for k, item in enumerate(images[s:s + batch_size], start=s):
                    try:
                        img = item if not isinstance(item, (str, os.PathLike)) else load_image(item)
                    except DataError as e:
                        log.warning("skipping image %d: %s", k, e)
                        skipped.append(k)
                        continue
                    a, b = view_pair(img, size, mean, std, shared_geometry=pixels)
                    v1.append(a)
                    v2.append(b)
                if not v1:
                    continue
                for view, x in enumerate((torch.stack(v1), torch.stack(v2))):
                    dense.clear()
                    h = model(x.to(device))
                    outs["backbone"][view].append(h.float().cpu().numpy())
                    for name, head in heads.items():
                        outs[name][view].append(head(h).float().cpu().numpy())
                    if pixels:
                        fmap = _to_nchw(dense[-1], prefix).float().cpu()
                        if view == 0:  # the same cells in both views
                            cells = fmap.shape[2] * fmap.shape[3]
                            pick = [rng.choice(cells, min(pixels_per_image, cells), replace=False) for _ in range(len(fmap))]
                        flat = fmap.flatten(2).transpose(1, 2)  # (B, cells, C)
                        outs["pixels"][view].append(np.concatenate([flat[i, p].numpy() for i, p in enumerate(pick)]))
    finally:
        if hook is not None:
            hook.remove()
    if not outs["backbone"][0]:
        raise DataError(f"none of the {len(images)} images could be decoded")
    return {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in outs.items()}, skipped


def model_collapse_reports(model: nn.Module, images: Sequence[Any], *, heads: dict[str, Head] | None = None,
                           image_size: int | None = None, batch_size: int = 64, seed: int = 0,
                           pixels: bool = False, pixels_per_image: int = 64, device: str | torch.device = "cpu",
                           progress: Callable[[Iterable], Iterable] | None = None, **report_kwargs: Any):
    """Collapse reports of every output of ``model`` on two augmented views of ``images``.

    Returns:
        (reports, skipped): ``{"backbone": CollapseReport, "projector": ..., "pixels": ...}``
        (alignment from the view pairs, other metrics from view 1), and undecodable image indices.
    """
    from featviz.collapse.metrics import collapse_report

    feats, skipped = two_view_features(model, images, image_size=image_size, batch_size=batch_size, seed=seed,
                                       pixels=pixels, pixels_per_image=pixels_per_image, heads=heads,
                                       device=device, progress=progress)
    return {name: collapse_report(z1, z2, seed=seed, **report_kwargs) for name, (z1, z2) in feats.items()}, skipped


def checkpoint_reports(checkpoint: str | os.PathLike | None, images: str | os.PathLike, *,
                       load_kwargs: dict[str, Any], image_size: int | None = None, batch_size: int = 64,
                       seed: int = 0, pixels: bool = False, pixels_per_image: int = 64, device: str = "auto",
                       progress: Callable[[Iterable], Iterable] | None = None, **report_kwargs: Any):
    """Collapse reports of a checkpoint (or a seeded random-init ``arch``) on two views of ``images``.

    ``load_kwargs`` are the model-loading options (arch, format, num_heads, checkpoint_key, trust).

    Returns:
        (reports, source, skipped): the reports per output (backbone, projector, predictor,
        pixels), a display name of the model, and the indices of undecodable images.
    """
    from featviz import data, models
    from featviz.distributed import resolve_device

    model, _ = models.resolve_model(checkpoint=checkpoint, seed=seed, **load_kwargs)
    items = data.labelled_images(images).items
    reports, skipped = model_collapse_reports(
        model, items, heads=checkpoint_heads(checkpoint), image_size=image_size, batch_size=batch_size,
        seed=seed, pixels=pixels, pixels_per_image=pixels_per_image, device=resolve_device(device),
        progress=progress, **report_kwargs)
    return reports, str(checkpoint or f"{load_kwargs.get('arch')} (random init)"), skipped


def checkpoint_metrics_fn(images: str | os.PathLike, load_kwargs: dict[str, Any], *, image_size: int | None = None,
                          batch_size: int = 64, seed: int = 0, device: str = "auto",
                          **report_kwargs: Any) -> Callable[[Path], dict[str, Any]]:
    """A function turning one checkpoint file into a metrics record, for ``watch`` on a run that
    writes checkpoints but no ``metrics.jsonl``: the projector's report when the checkpoint has one
    (what the SSL loss sees), else the backbone's."""
    from featviz import data
    from featviz.checkpoints import load_backbone
    from featviz.distributed import resolve_device

    items = data.labelled_images(images).items
    dev = resolve_device(device)

    def metrics(path: Path) -> dict[str, Any]:
        model, _ = load_backbone(path, **load_kwargs)
        reports, _ = model_collapse_reports(model, items, heads=checkpoint_heads(path), image_size=image_size,
                                            batch_size=batch_size, seed=seed, device=dev, **report_kwargs)
        name = "projector" if "projector" in reports else "backbone"
        return {**reports[name].to_dict(), "output": name}

    return metrics
