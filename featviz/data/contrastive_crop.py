"""ContrastiveCrop (Peng et al., CVPR 2022): crops that follow what the model attends to.

Two parts, each transcribed from the official code (xyupeng/ContrastiveCrop):

**Centre-suppressed sampling** (``ContrastiveCrop``, a ``torchvision.transforms.v2`` transform;
official ``datasets/transforms/ContrastiveCrop.py:16-66``). The crop's area and aspect ratio are
drawn exactly as ``RandomResizedCrop`` draws them (10 tries, then the central fallback); its
top-left corner is then drawn so that the crop's centre falls in the image's box::

    lo = clip(int(H * h0) - h // 2, 0, H - h);  hi = clip(int(H * h1) - h // 2, 0, H - h)
    top = lo + int((hi - lo) * Beta(alpha, alpha).sample())      (and the same for the left edge)

so the crop never leaves the image (a centre near the border is clipped inward) and, with
alpha < 1, the two views of an image tend to sit at opposite ends of the box. The box rides
along with the image as a ``tv_tensors.BoundingBoxes`` (pixel XYXY, float64 so that
``int(H * h0)`` is computed in double precision as the official ``float * int`` is), so every
v2 transform before the crop (featviz's optional affine) moves it with the image.

**Semantic-aware localisation** (``heatmaps``, ``boxes_from_heatmaps``, ``compute_boxes``;
official ``DDP_simsiam_ccrop.py:95-132``). The image, resized to (S, S) with no crop
(``datasets/transforms/imagenet.py:60-66``), goes through the model in eval mode; its last
feature map (``featviz.models.features.FeatureExtractor`` at ``heatmap_layer``: ResNet ``layer4``, a
ViT's last block as a patch map, since its final LayerNorm zeroes every token's channel mean)
is averaged over channels, min-max scaled to [0, 1] per image, upsampled bilinearly to (S, S);
the box is (first row, first column, last row, last column) of the pixels above the threshold k,
divided by S: ``(h0, w0, h1, w1)`` fractions, the official order. The official code sums over
channels, which min-max scaling makes the same map.

**Schedule** (``CropSchedule``; ``DDP_simsiam_ccrop.py:273, 279``): the first ``warmup`` epochs
use plain ``RandomResizedCrop``; from then on ContrastiveCrop with the current boxes (whole
images until the first update, ``datasets/cifar.py:7``); boxes are recomputed after every epoch
number (1-based) that is >= ``warmup``, a multiple of ``update_every`` and not the last.

Deviations, each named: an image whose heatmap is constant (a dead or untrained layer; the
official code divides by zero and fails) gets the whole image as its box and is counted
(``constant_heatmaps``); featviz recomputes the boxes after the epoch's evaluation, so with
PreciseBN they see the BatchNorm statistics the checkpoint carries (the official code uses the
running averages).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from featviz.errors import DataError

log = logging.getLogger(__name__)

CROPS = ("rrc", "contrastive")
WHOLE_BOX = (0.0, 0.0, 1.0, 1.0)  # official init_box: datasets/cifar.py:7, datasets/imagenet.py:8
SMALL_IMAGE = 96  # configs/small/* (CIFAR 32, Tiny-ImageNet 64, STL-10 96 px) use alpha 0.1; IN-200/1K 0.6

# The official defaults, with where they are (xyupeng/ContrastiveCrop at 408f143).
OFFICIAL = {
    "threshold": (0.10, "configs/small/cifar10/simsiam_ccrop.py:48, configs/IN1K/mocov2_ccrop.py:46 (box_thresh)"),
    "alpha_small": (0.1, "configs/small/cifar10/simsiam_ccrop.py:28 (alpha=0.1; every configs/small/* file)"),
    "alpha_large": (0.6, "configs/IN1K/mocov2_ccrop.py:27, configs/IN200/mocov2_ccrop.py:28 (alpha=0.6)"),
    "warmup": (0.2, "configs/small/cifar10/simsiam_ccrop.py:46,51 (warmup_epochs 100 of 500), "
                    "configs/IN1K/mocov2_ccrop.py:44,49 (20 of 100)"),
    "update_every": (0.2, "configs/small/cifar10/simsiam_ccrop.py:47 (loc_interval 100 of 500), "
                          "configs/IN1K/mocov2_ccrop.py:45 (20 of 100)"),
    "scale": ((0.2, 1.0), "datasets/transforms/small.py:25, datasets/transforms/imagenet.py:25"),
}


# ---------------------------------------------------------------- the transform
def box_tensor(box: Sequence[float] | torch.Tensor, size: tuple[int, int]) -> tv_tensors.BoundingBoxes:
    """A box ``(h0, w0, h1, w1)`` in fractions of the image as pixel XYXY ``BoundingBoxes``.

    The fractions are taken as float32 (how the official code stores them) and multiplied by
    the image size in float64, as the official ``height * h0`` is.
    """
    h, w = size
    b = torch.as_tensor(box, dtype=torch.float32).reshape(4).double()
    xyxy = torch.stack([b[1] * w, b[0] * h, b[3] * w, b[2] * h]).reshape(1, 4)
    return tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=(h, w))


def image_box(img: Image.Image | torch.Tensor, box: Sequence[float] | torch.Tensor) -> tv_tensors.BoundingBoxes:
    """``box_tensor`` for a PIL image or a (C, H, W) tensor."""
    return box_tensor(box, tuple(v2.functional.get_size(img)))


def _box_pixels(flat_inputs: list[Any], height: int, width: int) -> tuple[float, float, float, float]:
    """(y0, x0, y1, x1) of the sample's box in pixels (the whole image when it has none)."""
    for x in flat_inputs:
        if isinstance(x, tv_tensors.BoundingBoxes):
            if x.shape[0] != 1:
                raise DataError(f"ContrastiveCrop takes one box per image, got {x.shape[0]}")
            b = x if x.format == tv_tensors.BoundingBoxFormat.XYXY else v2.functional.convert_bounding_box_format(
                x, new_format=tv_tensors.BoundingBoxFormat.XYXY)
            x0, y0, x1, y1 = (float(v) for v in b.as_subclass(torch.Tensor)[0])
            return y0, x0, y1, x1
    return 0.0, 0.0, float(height), float(width)


class ContrastiveCrop(v2.RandomResizedCrop):
    """``RandomResizedCrop`` whose centre is drawn from Beta(alpha, alpha) inside the image's box.

    Call it as ``t(image, box_tensor(box, size))`` (or inside a ``v2.Compose`` with the box in
    the sample); without a box the whole image is the box. Every random number is drawn from
    torch's global generator in the official order (area, log-ratio per try; then the row and
    the column Beta draws), so a seeded call reproduces the official crop exactly.

    Args:
        size, scale, ratio, interpolation, antialias: as ``v2.RandomResizedCrop``.
        alpha: the Beta distribution's two (equal) concentrations; < 1 pushes the centres to the
            box's edges (the official small-image configs use 0.1, ImageNet 0.6; 1 is uniform).
    """

    def __init__(self, size: int | Sequence[int], scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation: Any = v2.InterpolationMode.BILINEAR,
                 antialias: bool = True, *, alpha: float = 0.6):
        """See the class docstring for the arguments."""
        super().__init__(size, scale=scale, ratio=ratio, interpolation=interpolation, antialias=antialias)
        if not alpha > 0:
            raise DataError(f"ContrastiveCrop alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)
        self.beta = torch.distributions.Beta(torch.tensor(self.alpha), torch.tensor(self.alpha))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """The crop (top, left, height, width) for one call, drawn in the official order (torchvision's hook)."""
        height, width = v2.query_size(flat_inputs)
        y0, x0, y1, x1 = _box_pixels(flat_inputs, height, width)
        area = height * width
        log_ratio = self._log_ratio
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top_lo = min(max(int(y0) - h // 2, 0), height - h)
                top_hi = min(max(int(y1) - h // 2, 0), height - h)
                left_lo = min(max(int(x0) - w // 2, 0), width - w)
                left_hi = min(max(int(x1) - w // 2, 0), width - w)
                top = top_lo + int((top_hi - top_lo) * self.beta.sample())
                left = left_lo + int((left_hi - left_lo) * self.beta.sample())
                return dict(top=top, left=left, height=h, width=w)
        in_ratio = width / height  # the central fallback, as RandomResizedCrop's
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return dict(top=(height - h) // 2, left=(width - w) // 2, height=h, width=w)


# ---------------------------------------------------------------- heatmaps and boxes
def box_input(size: int | tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """How an image enters the box computation: resized to (size, size) (or (H, W)), no crop, normalised.

    These are ``augment.finish``'s three steps (``featviz.data.augment`` imports this module, not the
    reverse).
    """
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return v2.Compose([v2.Resize(hw, antialias=True), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(mean), list(std))])


def heatmap_layer(model: nn.Module, layer: str | None = None) -> str:
    """The layer whose channel mean is the heatmap.

    ``layer`` when given, else the feature core's ``default_layer`` (ResNet ``layer4``, a timm CNN's
    last ``feature_info`` stage), except that a ViT whose default is its final ``norm`` uses its last
    block's output instead: a LayerNorm centres every token over the channels, so the channel mean of
    its output is zero up to rounding (a named deviation; the official code has ResNets only).
    """
    from featviz.models.features import default_layer, is_vit

    if layer is not None:
        return layer
    name = default_layer(model)
    if name == "norm" and is_vit(model):
        return f"blocks.{len(model.blocks) - 1}"
    return name


# a channel-mean map whose range is below this share of the features' magnitude counts as constant
CONSTANT_RTOL = 1e-5


@torch.no_grad()
def heatmaps(model: nn.Module, x: torch.Tensor, *, layer: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's heatmaps of ``x`` (N, 3, H, W), one per image.

    Each is the last feature map (``heatmap_layer``) averaged over channels, min-max scaled to [0, 1]
    per image and upsampled bilinearly to (H, W).

    Returns:
        (heatmaps (N, H, W) float32, constant (N,) bool: images whose map had no range, i.e. less
        than ``CONSTANT_RTOL`` of the features' largest magnitude (rounding noise); all zeros).
    """
    from featviz.models.features import FeatureExtractor

    with FeatureExtractor(model, heatmap_layer(model, layer)) as fx:
        fmap = fx(x)
    m = fmap.float().mean(1)  # (N, h, w)
    n = m.shape[0]
    flat = m.reshape(n, -1)
    lo, hi = flat.min(1, keepdim=True)[0], flat.max(1, keepdim=True)[0]
    rng = hi - lo
    scale = fmap.float().abs().reshape(n, -1).amax(1, keepdim=True)
    constant = ~(torch.isfinite(rng) & (rng > CONSTANT_RTOL * scale)).reshape(n)
    flat = torch.where(constant[:, None], torch.zeros_like(flat), (flat - lo) / torch.where(rng > 0, rng, 1))
    up = F.interpolate(flat.reshape(n, 1, *m.shape[1:]), size=tuple(x.shape[-2:]), mode="bilinear")
    return up[:, 0], constant


@dataclass
class Boxes:
    """Boxes of N images.

    ``boxes`` (N, 4) float32 ``(h0, w0, h1, w1)`` fractions; ``area`` the share of the heatmap's
    pixels inside each box; ``whole`` boxes spanning every row and column; ``constant`` images whose
    heatmap was constant (whole-image box).
    """

    boxes: torch.Tensor
    area: torch.Tensor
    whole: torch.Tensor
    constant: torch.Tensor

    def stats(self) -> dict[str, Any]:
        """The metrics line: count, mean box area, share of whole-image boxes, constant heatmaps."""
        return {"n": len(self.boxes), "mean_box_area": float(self.area.mean()) if len(self.area) else float("nan"),
                "whole_image_share": float(self.whole.float().mean()) if len(self.whole) else float("nan"),
                "constant_heatmaps": int(self.constant.sum())}


def boxes_from_heatmaps(h: torch.Tensor, threshold: float, constant: torch.Tensor | None = None) -> Boxes:
    """The bounding box of the region above ``threshold`` of each heatmap (N, H, W) in [0, 1].

    ``(h0, w0, h1, w1) = (first row, first column, last row, last column) / (H, W)`` of the pixels
    ``> threshold`` (official ``DDP_simsiam_ccrop.py:116-121``). A map with nothing above the
    threshold (only a constant one can have none, as a scaled map reaches 1) gets the whole image.
    """
    n, hh, ww = h.shape
    rows, cols = h.amax(2) > threshold, h.amax(1) > threshold  # (N, H), (N, W)
    empty = ~rows.any(1) | ~cols.any(1)
    if constant is not None:
        empty = empty | constant
    ar_h, ar_w = torch.arange(hh), torch.arange(ww)
    big = torch.iinfo(torch.int64).max
    r0 = torch.where(rows, ar_h, big).amin(1)
    r1 = torch.where(rows, ar_h, -1).amax(1)
    c0 = torch.where(cols, ar_w, big).amin(1)
    c1 = torch.where(cols, ar_w, -1).amax(1)
    boxes = torch.stack([r0 / hh, c0 / ww, r1 / hh, c1 / ww], 1).float()
    area = ((r1 - r0 + 1) * (c1 - c0 + 1)).double() / (hh * ww)
    whole = (r0 == 0) & (c0 == 0) & (r1 == hh - 1) & (c1 == ww - 1)
    if empty.any():
        boxes[empty] = torch.tensor(WHOLE_BOX)
        area[empty] = 1.0
        whole = whole | empty
    return Boxes(boxes, area.float(), whole, empty if constant is None else constant.clone())


def _items_image(item: Any) -> Image.Image:
    from featviz.data.images import load_image

    return item if isinstance(item, Image.Image) else load_image(item)


@torch.no_grad()
def compute_boxes(model: nn.Module, items: Sequence[Any], *, image_size: int, threshold: float,
                  mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu",
                  info: Any = None, batch_size: int = 256, layer: str | None = None) -> Boxes:
    """The boxes of ``items`` (paths or PIL images) from ``model`` in eval mode (its mode is restored).

    Under DDP (``info`` a ``featviz.distributed.DistInfo`` of several ranks) every rank first
    takes rank 0's buffers (BatchNorm statistics, as DDP's next forward would), computes the boxes
    of its contiguous shard and all-gathers them: every rank ends with all N boxes, in order.
    The global RNG is left untouched.
    """
    from featviz.distributed import DistInfo, gather_objects, shard

    info = info or DistInfo()
    if info.enabled:
        import torch.distributed as dist

        for b in model.buffers():
            dist.broadcast(b, 0)
    was = model.training
    model.eval()
    prep = box_input(image_size, mean, std)
    idx = list(shard(len(items), info))
    parts: list[Boxes] = []
    try:
        with torch.random.fork_rng(devices=[]):
            for s in range(0, len(idx), batch_size):
                x = torch.stack([prep(_items_image(items[i])) for i in idx[s:s + batch_size]]).to(device)
                hm, const = heatmaps(model, x, layer=layer)
                parts.append(boxes_from_heatmaps(hm.cpu(), threshold, const.cpu()))
    finally:
        model.train(was)
    mine = _cat(parts)
    if not info.enabled:
        return mine
    every = gather_objects({k: v.numpy() for k, v in asdict(mine).items()}, info)
    return _cat([Boxes(**{k: torch.from_numpy(v) for k, v in p.items()}) for p in every])


def _cat(parts: list[Boxes]) -> Boxes:
    if not parts:
        return Boxes(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.bool),
                     torch.zeros(0, dtype=torch.bool))
    return Boxes(*(torch.cat([getattr(p, k) for p in parts]) for k in ("boxes", "area", "whole", "constant")))


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two (N, 4) ``(h0, w0, h1, w1)`` box tensors (fractions)."""
    ih = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    iw = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = ih * iw
    area = lambda t: (t[:, 2] - t[:, 0]).clamp(min=0) * (t[:, 3] - t[:, 1]).clamp(min=0)  # noqa: E731
    union = area(a) + area(b) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.ones_like(inter))


# ---------------------------------------------------------------- the schedule (featviz train --crop contrastive)
def default_alpha(image_size: int) -> float:
    """The official alpha for a crop size: 0.1 for the small-image configs (<= 96 px), else 0.6."""
    return OFFICIAL["alpha_small"][0] if image_size <= SMALL_IMAGE else OFFICIAL["alpha_large"][0]


def default_epochs_share(epochs: int) -> int:
    """A fifth of the run, at least one epoch (the official warm-up and update interval)."""
    return max(1, int(round(epochs * OFFICIAL["warmup"][0])))


def resolve(d: dict[str, Any], src: dict[str, str]) -> None:
    """Fill the ``crop_*`` defaults of a resolved ``TrainConfig`` dict in place (sources in ``src``).

    With ``crop="contrastive"`` the global crops' scale becomes the official (0.2, 1.0)
    (``OFFICIAL["scale"]``) unless the user gave ``--min-scale`` (a preset's does not count).

    Raises:
        DataError: an unknown ``crop``, a value out of range, or ``crop_*`` set without
            ``crop="contrastive"``.
    """
    crop = d.get("crop") or "rrc"
    if crop not in CROPS:
        raise DataError(f"--crop {crop!r}: expected one of {', '.join(CROPS)}")
    keys = ("crop_threshold", "crop_alpha", "crop_update_every", "crop_warmup")
    if crop != "contrastive":
        given = [k for k in keys if d.get(k) is not None]
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise DataError(f"{flags} only apply with --crop contrastive (the run uses --crop {crop})")
        return
    for k in keys:
        if d.get(k) is not None:
            src.setdefault(k, "user")
    if src.get("min_scale") != "user":  # the official ccrop transforms crop with scale (0.2, 1.0)
        d["min_scale"], src["min_scale"] = OFFICIAL["scale"][0][0], f"official ContrastiveCrop ({OFFICIAL['scale'][1]})"
    if d.get("crop_threshold") is None:
        d["crop_threshold"], src["crop_threshold"] = OFFICIAL["threshold"][0], f"official ({OFFICIAL['threshold'][1]})"
    if d.get("crop_alpha") is None:
        small = int(d["image_size"]) <= SMALL_IMAGE
        key = "alpha_small" if small else "alpha_large"
        d["crop_alpha"] = default_alpha(int(d["image_size"]))
        src["crop_alpha"] = f"official for {'<=' if small else '>'} {SMALL_IMAGE} px crops ({OFFICIAL[key][1]})"
    for k, name in (("crop_warmup", "warmup"), ("crop_update_every", "update_every")):
        if d.get(k) is None:
            d[k] = default_epochs_share(int(d["epochs"]))
            src[k] = f"official: a fifth of the epochs ({OFFICIAL[name][1]})"
    if not 0 <= float(d["crop_threshold"]) < 1:
        raise DataError(f"--crop-threshold {d['crop_threshold']}: expected a value in [0, 1) (the paper: 0.05-0.20)")
    if not float(d["crop_alpha"]) > 0:
        raise DataError(f"--crop-alpha {d['crop_alpha']}: expected > 0 (the paper: < 1; 1 is uniform)")
    if int(d["crop_update_every"]) < 1:
        raise DataError(f"--crop-update-every {d['crop_update_every']}: expected at least 1 epoch")
    if int(d["crop_warmup"]) < 0:
        raise DataError(f"--crop-warmup {d['crop_warmup']}: expected 0 or more epochs")


@dataclass(frozen=True)
class CropSchedule:
    """When ContrastiveCrop is on and when the boxes are recomputed (epochs 0-based here).

    Official (1-based epoch ``E``): ``use_box = E >= warmup + 1``; update after epoch ``E`` when
    ``E >= warmup and E != epochs and E % loc_interval == 0`` (``DDP_simsiam_ccrop.py:273, 279``).
    """

    threshold: float
    alpha: float
    warmup: int
    update_every: int
    epochs: int

    def uses_boxes(self, epoch: int) -> bool:
        """Whether the views of ``epoch`` (0-based) use the boxes (after the warm-up)."""
        return epoch >= self.warmup

    def updates_after(self, epoch: int) -> bool:
        """Whether the boxes are recomputed after ``epoch`` (0-based)."""
        e = epoch + 1
        return e >= self.warmup and e != self.epochs and e % self.update_every == 0

    def update_epochs(self) -> list[int]:
        """The 1-based epochs after which the boxes are recomputed."""
        return [e + 1 for e in range(self.epochs) if self.updates_after(e)]

    def to_dict(self) -> dict[str, Any]:
        """The schedule for config.json, with its update epochs and the official source it follows."""
        return {**asdict(self), "updates_after_epochs": self.update_epochs(),
                "source": "xyupeng/ContrastiveCrop DDP_simsiam_ccrop.py:95-132, 273, 279; "
                          "datasets/transforms/ContrastiveCrop.py:16-66"}


class BoxTracker:
    """The boxes of a run's training images, their updates and their metrics lines.

    ``boxes`` start as whole images; ``update`` recomputes them with the model (all ranks) and
    returns the metrics record (mean box area, share of whole-image boxes, IoU with the previous
    boxes). ``state``/``load_state`` go into ``state.pt``, so a resumed run continues with the
    same boxes.
    """

    def __init__(self, schedule: CropSchedule, items: Sequence[Any], ids: Sequence[str], *, image_size: int,
                 mean: Sequence[float], std: Sequence[float]):
        """Whole-image boxes for ``items`` (ids ``ids``), computed at ``image_size`` with ``mean``/``std``."""
        self.schedule, self.items, self.ids = schedule, list(items), list(ids)
        self.image_size, self.mean, self.std = image_size, mean, std
        self.boxes = torch.tensor(WHOLE_BOX).repeat(len(self.items), 1)
        self.updated = 0  # the 1-based epoch of the last update (0: never)

    def for_epoch(self, epoch: int) -> torch.Tensor | None:
        """The boxes the views of ``epoch`` (0-based) use; None during the warm-up (RandomResizedCrop)."""
        return self.boxes if self.schedule.uses_boxes(epoch) else None

    def update(self, model: nn.Module, epoch: int, step: int, *, device: torch.device, info: Any = None
               ) -> dict[str, Any] | None:
        """Recompute the boxes after ``epoch`` (0-based) if the schedule says so; the metrics record."""
        if not self.schedule.updates_after(epoch):
            return None
        t0 = time.perf_counter()
        new = compute_boxes(model, self.items, image_size=self.image_size, threshold=self.schedule.threshold,
                            mean=self.mean, std=self.std, device=device, info=info)
        iou = box_iou(self.boxes, new.boxes)
        self.boxes, self.updated = new.boxes, epoch + 1
        st = new.stats()
        if st["constant_heatmaps"]:
            log.warning("ContrastiveCrop: %d of %d training images have a constant heatmap (a dead or untrained "
                        "layer?); their box is the whole image", st["constant_heatmaps"], st["n"])
        return {"event": "boxes", "kind": "boxes", "step": step, "epoch": epoch + 1, **st,
                "box_iou_previous": float(iou.mean()), "threshold": self.schedule.threshold,
                "seconds": round(time.perf_counter() - t0, 3)}

    def state(self) -> dict[str, torch.Tensor]:
        """The boxes and the last update's epoch, for ``state.pt``."""
        return {"ccrop_boxes": self.boxes.clone(), "ccrop_updated": torch.tensor(self.updated)}

    def load_state(self, st: dict[str, Any]) -> None:
        """Restore ``state()`` from a resumed run's ``state.pt``.

        Raises:
            DataError: the state has no boxes, or boxes for another number of images.
        """
        if "ccrop_boxes" not in st:
            raise DataError("--resume: this run's state.pt has no ContrastiveCrop boxes (was it started with "
                            "--crop rrc?); resume with the run's own --crop or start a new run")
        boxes = st["ccrop_boxes"].float()
        if boxes.shape != self.boxes.shape:
            raise DataError(f"--resume: state.pt holds {len(boxes)} boxes but the run has {len(self.boxes)} "
                            "training images; resume with the same --data and --limit")
        self.boxes, self.updated = boxes, int(st["ccrop_updated"])

    def save(self, path: Any) -> None:
        """``boxes.npz`` beside the run: ``boxes`` (N, 4) (h0, w0, h1, w1) fractions, ``ids``, ``epoch``."""
        from featviz.io.outputs import atomic_path

        with atomic_path(path) as tmp:
            np.savez(tmp, boxes=self.boxes.numpy(), ids=np.array(self.ids), epoch=np.int64(self.updated),
                     threshold=np.float32(self.schedule.threshold), image_size=np.int64(self.image_size))
