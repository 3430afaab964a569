"""``featviz crops``: ContrastiveCrop's picture and numbers for any checkpoint.

Per image: the heatmap (``featviz.data.contrastive_crop.heatmaps``: the model's last feature map,
channel mean, scaled to [0, 1], upsampled) and its box (the region above k), then view pairs
sampled under ContrastiveCrop beside pairs under RandomResizedCrop with the same scale and
ratio. The geometry is the crop only (no flip or colour: they do not move pixels between the
views). The numbers come from many sampled pairs per image (``samples``), the picture shows the
first ``pairs``:

- ``iou``: intersection over union of the two views of a pair (in image pixels);
- ``inside_box``: the share of a view's area inside the box;
- with masks (class-index PNGs as for ``featviz embed --pixels``: 0 background, 255 ignore, any
  other value an object): ``object_share``, the share of a view's labelled pixels that are
  object pixels, and ``views_without_object``, the share of views with no object pixel at all
  (what small objects risk); per image also the object's share of the image and the share of
  its pixels inside the box (``object_in_box``: does the box find the object?).

Files (one atomic folder): ``sheet.png``; ``crops.npz`` (``ids``, ``boxes`` (N, 4) (h0, w0, h1,
w1) fractions, ``box_area``, ``heatmaps`` (N, h, w) float16, per method ``views_<m>`` (N, S, 2,
4) (top, left, height, width), ``iou_<m>`` (N, S), ``inside_<m>`` (N, S, 2), with masks
``object_<m>`` (N, S, 2)); ``manifest.json`` (arguments, versions, the summary).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from featviz.errors import DataError
from featviz.io.progress import Progress
from featviz.style import DEFAULT_STYLE, PlotStyle
from featviz.views.runner import ViewResult, ViewRunner
from featviz.views.sheets import sheet_cut

log = logging.getLogger(__name__)

METHODS = ("contrastive", "rrc")
TITLES = {"contrastive": "ContrastiveCrop", "rrc": "RandomResizedCrop"}
VIEW_PX = 96


# ---------------------------------------------------------------- geometry and statistics
def sample_views(crop: Any, size: tuple[int, int], box: Sequence[float], n: int, seed: int) -> np.ndarray:
    """``n`` pairs of crops (n, 2, 4) = (top, left, height, width) from ``crop.make_params``.

    On an image of ``size`` (H, W) with ``box``; seeded, the global RNG is left untouched.
    """
    from featviz.data.contrastive_crop import box_tensor

    b = box_tensor(box, size)
    out = np.zeros((n, 2, 4), np.int64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(n):
            for v in range(2):
                p = crop.make_params([b])
                out[i, v] = (p["top"], p["left"], p["height"], p["width"])
    return out


def box_pixels(box: Sequence[float], size: tuple[int, int], grid: tuple[int, int]) -> tuple[float, ...]:
    """The box's extent in image pixels (y0, x0, y1, x1).

    The heatmap pixels above the threshold span rows h0 .. h1 + 1/grid_h of the image (the
    official box stores the last row's start).
    """
    h, w = size
    return (box[0] * h, box[1] * w, min(1.0, box[2] + 1 / grid[0]) * h, min(1.0, box[3] + 1 / grid[1]) * w)


def _overlap(a0, a1, b0, b1):
    return np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0, None)


def pair_iou(views: np.ndarray) -> np.ndarray:
    """IoU of the two crops of each pair (n, 2, 4) -> (n,)."""
    t, le, h, w = (views[..., k].astype(np.float64) for k in range(4))
    inter = _overlap(t[:, 0], t[:, 0] + h[:, 0], t[:, 1], t[:, 1] + h[:, 1]) * \
        _overlap(le[:, 0], le[:, 0] + w[:, 0], le[:, 1], le[:, 1] + w[:, 1])
    union = h[:, 0] * w[:, 0] + h[:, 1] * w[:, 1] - inter
    return inter / union


def inside_share(views: np.ndarray, box_px: Sequence[float]) -> np.ndarray:
    """The share of each crop's area inside the box (n, 2)."""
    y0, x0, y1, x1 = box_px
    t, le, h, w = (views[..., k].astype(np.float64) for k in range(4))
    return _overlap(t, t + h, y0, y1) * _overlap(le, le + w, x0, x1) / (h * w)


def _integral(a: np.ndarray) -> np.ndarray:
    return np.pad(a.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))


def _rect_sums(ii: np.ndarray, views: np.ndarray) -> np.ndarray:
    t, le, h, w = (views[..., k] for k in range(4))
    return ii[t + h, le + w] - ii[t, le + w] - ii[t + h, le] + ii[t, le]


def object_share(views: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The share of each crop's labelled pixels (mask != 255) that are object pixels, (n, 2).

    Object pixels are neither 0 nor 255; NaN for a crop with no labelled pixel.
    """
    valid = mask != 255
    obj = valid & (mask != 0)
    n_valid = _rect_sums(_integral(valid), views)
    n_obj = _rect_sums(_integral(obj), views)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_valid > 0, n_obj / np.maximum(n_valid, 1), np.nan)


def _mean(a) -> float | None:
    a = np.asarray(a, np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else None


def _read_masks(files: Sequence[Path], masks: str | os.PathLike) -> list[np.ndarray | None]:
    """Each image's class-index mask by file stem (None when it has none; a warning counts them)."""
    from featviz.data.images import IMAGE_EXTS
    from featviz.data.masks import read_mask

    mdir = Path(masks)
    if not mdir.is_dir():
        raise DataError(f"--masks {str(mdir)!r} is not a folder; expected a folder of class-index PNGs named "
                        "like the images (0 background, 255 ignore)")
    by_stem = {p.stem: p for p in sorted(mdir.rglob("*")) if p.suffix.lower() in IMAGE_EXTS and p.is_file()}
    out: list[np.ndarray | None] = []
    for f in files:
        m = by_stem.get(f.stem)
        if m is None:
            out.append(None)
            continue
        arr = read_mask(m)
        with Image.open(f) as im:
            size = im.size
        if arr.shape != (size[1], size[0]):
            raise DataError(f"mask {str(m)!r} is {arr.shape[1]}x{arr.shape[0]} but image {str(f)!r} is "
                            f"{size[0]}x{size[1]}; masks must have their image's size")
        out.append(arr)
    found = sum(m is not None for m in out)
    if not found:
        raise DataError(f"none of the {len(files)} images has a mask with the same file stem in {str(mdir)!r} "
                        f"(found {len(by_stem)} image files there, e.g. {next(iter(by_stem), 'none')!r}, for images "
                        f"like {files[0].stem!r}); point --masks at the class-index PNGs named like the images "
                        "(VOC: SegmentationClass/)")
    if found < len(files):
        log.warning("%d of %d images have no mask in %s: their object statistics are left out",
                    len(files) - found, len(files), mdir)
    return out


# ---------------------------------------------------------------- the command
@dataclass(eq=False)
class CropsResult(ViewResult):
    """What ``featviz crops`` reports (``to_dict()``: its ``--json`` summary).

    ``manifest.json`` holds the summary without ``per_image``, which it keeps beside it.
    """

    images: int
    masks: int  # images with a mask
    arch: str
    layer: str
    heatmap_size: tuple[int, int]
    threshold: float
    alpha: float
    scale: tuple[float, float]
    ratio: tuple[float, float]
    pairs: int
    samples: int
    seed: int
    mean_box_area: float
    whole_image_share: float
    constant_heatmaps: int
    methods: dict[str, dict[str, Any]]  # contrastive, rrc -> mean iou, inside_box (object_share, ...)
    image_object_share: float | None  # with masks only
    object_in_box: float | None  # with masks only
    warnings: list[str]
    sheet_images: list[str]
    files: dict[str, str]
    per_image: list[dict[str, Any]]
    sheet: dict[str, int] | None = None  # {"shown", "of"}: the sheet's images

    def to_dict(self, *, per_image: bool = True) -> dict[str, Any]:
        """The ``--json`` summary (``per_image=False``: the one ``manifest.json`` holds as ``summary``)."""
        d: dict[str, Any] = {
            "images": self.images, "masks": self.masks, "arch": self.arch, "layer": self.layer,
            "heatmap_size": list(self.heatmap_size), "threshold": self.threshold, "alpha": self.alpha,
            "scale": list(self.scale), "ratio": list(self.ratio), "pairs": self.pairs, "samples": self.samples,
            "seed": self.seed, "mean_box_area": self.mean_box_area, "whole_image_share": self.whole_image_share,
            "constant_heatmaps": self.constant_heatmaps, **self.methods,
        }
        if self.masks:
            d["image_object_share"] = self.image_object_share
            d["object_in_box"] = self.object_in_box
        d.update(warnings=self.warnings, sheet_images=self.sheet_images, sheet=self.sheet, files=self.files)
        if per_image:
            d["per_image"] = self.per_image
        return d


def run_crops(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    model: Any,
    threshold: float = 0.10,
    alpha: float | None = None,
    pairs: int = 4,
    samples: int = 256,
    masks: str | os.PathLike | None = None,
    image_size: int | str | Sequence[int] | None = None,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    layer: str | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    seed: int = 0,
    force: bool = False,
    sheet_images: int = 12,
    description: dict[str, Any] | None = None,
    arguments: dict[str, Any] | None = None,
    progress: Progress | None = None,
    style: PlotStyle = DEFAULT_STYLE,
) -> CropsResult:
    """Everything ``featviz crops`` does; writes ``out_dir`` as one atomic folder.

    ``sheet_images``: at most this many images on the sheet (``featviz.views.sheets.sheet_cut``:
    spread over all images, the cut said); ``style.cmap``: the heatmaps' colour map (default ``inferno``).

    Returns:
        The result; its ``to_dict()`` is the summary that ``--json`` prints (also in ``manifest.json``).

    Raises:
        DataError: bad options, no images, unreadable masks or a mask of another size.
        OutputExistsError: ``out_dir`` exists and ``force`` is False.
    """
    from torchvision.transforms import v2

    from featviz.data.contrastive_crop import (
        ContrastiveCrop,
        box_input,
        boxes_from_heatmaps,
        default_alpha,
        heatmap_layer,
        heatmaps,
    )
    from featviz.models.features import arch_name, input_size, resolve_layer

    runner = ViewRunner("crops", out_dir, force=force, arguments=arguments, progress=progress)
    if not 0 <= threshold < 1:
        raise DataError(f"--threshold {threshold}: expected a value in [0, 1) (the paper: 0.05-0.20)")
    if pairs < 1 or samples < pairs:
        raise DataError(f"--pairs {pairs} and --samples {samples}: expected 1 <= pairs <= samples")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise DataError(f"--scale {scale[0]:g} {scale[1]:g}: expected 0 < min <= max <= 1")
    hw = input_size(model, image_size)
    alpha = default_alpha(min(hw)) if alpha is None else float(alpha)
    if not alpha > 0:
        raise DataError(f"--alpha {alpha}: expected > 0 (the paper: < 1; 1 is uniform)")
    files, ids = runner.images(inputs)
    mask_list = _read_masks(files, masks) if masks is not None else [None] * len(files)

    model = runner.place(model, device)
    loader = runner.loader(transform=box_input(hw, runner.mean, runner.std), batch_size=batch_size)
    crops = {"contrastive": ContrastiveCrop(VIEW_PX, scale=scale, ratio=ratio, alpha=alpha),
             "rrc": v2.RandomResizedCrop(VIEW_PX, scale=scale, ratio=ratio)}
    heat, boxes_l, areas, whole, const = [], [], [], [], []
    layer_name = resolve_layer(model, heatmap_layer(model, layer))[0]
    with torch.no_grad(), runner.batches(loader) as batches:
        for x, _, _, _ in batches:
            hm, c = heatmaps(model, x.to(runner.device), layer=layer_name)
            b = boxes_from_heatmaps(hm.cpu(), threshold, c.cpu())
            heat.append(hm.cpu().numpy())
            boxes_l.append(b.boxes.numpy())
            areas.append(b.area.numpy())
            whole.append(b.whole.numpy())
            const.append(b.constant.numpy())
    heat_a, boxes = np.concatenate(heat), np.concatenate(boxes_l)
    area_a, whole_a, const_a = np.concatenate(areas), np.concatenate(whole), np.concatenate(const)

    per_image: list[dict[str, Any]] = []
    arrays: dict[str, list] = {f"{k}_{m}": [] for m in METHODS for k in ("views", "iou", "inside", "object")}
    sizes = []
    for i, f in enumerate(files):
        with Image.open(f) as im:
            size = (im.size[1], im.size[0])
        sizes.append(size)
        bpx = box_pixels(boxes[i], size, hw)
        row: dict[str, Any] = {"id": ids[i], "box": boxes[i].tolist(), "box_area": float(area_a[i]),
                               "whole_image_box": bool(whole_a[i]), "constant_heatmap": bool(const_a[i])}
        mask = mask_list[i]
        if mask is not None:
            valid, obj = mask != 255, (mask != 0) & (mask != 255)
            row["image_object_share"] = _mean([obj.sum() / max(1, valid.sum())])
            y0, x0, y1, x1 = (int(np.floor(bpx[0])), int(np.floor(bpx[1])), int(np.ceil(bpx[2])),
                              int(np.ceil(bpx[3])))
            row["object_in_box"] = float(obj[y0:y1, x0:x1].sum() / obj.sum()) if obj.any() else None
        for m in METHODS:
            v = sample_views(crops[m], size, boxes[i], samples, seed * 1_000_003 + i)
            iou, ins = pair_iou(v), inside_share(v, bpx)
            arrays[f"views_{m}"].append(v)
            arrays[f"iou_{m}"].append(iou)
            arrays[f"inside_{m}"].append(ins)
            st = {"iou": float(iou.mean()), "inside_box": float(ins.mean())}
            if mask is not None:
                o = object_share(v, mask)
                arrays[f"object_{m}"].append(o)
                st["object_share"] = _mean(o)
                st["views_without_object"] = float((o == 0).mean())
            else:
                arrays[f"object_{m}"].append(np.full((samples, 2), np.nan))
            row[m] = st
        per_image.append(row)

    n_masks = sum(m is not None for m in mask_list)
    methods: dict[str, dict[str, Any]] = {}
    for m in METHODS:
        st = {"iou": _mean([r[m]["iou"] for r in per_image]),
              "inside_box": _mean([r[m]["inside_box"] for r in per_image])}
        if n_masks:
            st["object_share"] = _mean([r[m].get("object_share", np.nan) for r in per_image])
            st["views_without_object"] = _mean([r[m].get("views_without_object", np.nan) for r in per_image])
        methods[m] = st
    warnings = []
    if const_a.any():
        warnings.append(f"{int(const_a.sum())} of {len(files)} images have a constant heatmap (a dead or untrained "
                        "layer?); their box is the whole image")
        log.warning(warnings[-1])
    cut = sheet_cut(len(files), sheet_images)
    pick = list(cut.indices)
    result = CropsResult(
        images=len(files), masks=n_masks, arch=arch_name(model), layer=layer_name, heatmap_size=hw,
        threshold=threshold, alpha=alpha, scale=scale, ratio=ratio, pairs=pairs, samples=samples, seed=seed,
        mean_box_area=float(area_a.mean()), whole_image_share=float(whole_a.mean()),
        constant_heatmaps=int(const_a.sum()), methods=methods,
        image_object_share=_mean([r.get("image_object_share", np.nan) for r in per_image]) if n_masks else None,
        object_in_box=_mean([r.get("object_in_box") if r.get("object_in_box") is not None else np.nan
                             for r in per_image]) if n_masks else None,
        warnings=warnings, sheet_images=[ids[i] for i in pick], sheet=cut.to_dict(),
        files={"sheet": runner.path("sheet.png"), "npz": runner.path("crops.npz"),
               "manifest": runner.path("manifest.json")},
        per_image=per_image,
    )

    with runner.output() as tmp:
        npz = {"ids": np.array(ids), "boxes": boxes, "box_area": area_a, "whole_image_box": whole_a,
               "heatmaps": heat_a.astype(np.float16), "heatmap_size": np.array(hw)}
        for k, v in arrays.items():
            if k.startswith("object_") and not n_masks:
                continue
            npz[k] = np.stack(v)
        np.savez_compressed(tmp / "crops.npz", **npz)
        _sheet(tmp / "sheet.png", [files[i] for i in pick], [ids[i] for i in pick], heat_a[pick], boxes[pick], hw,
               {k: [v[i] for i in pick] for k, v in arrays.items()}, [per_image[i] for i in pick],
               [mask_list[i] for i in pick], result, pairs, total=len(files), cmap=style.heat_cmap("inferno"),
               model=model)
        runner.write_manifest(tmp, model=description or {}, summary=result.to_dict(per_image=False),
                              per_image=per_image)
    return result


# ---------------------------------------------------------------- the sheet
def _views_strip(img, views: np.ndarray) -> np.ndarray:
    """The two crops of a pair, side by side at VIEW_PX, white between them."""
    import torchvision.transforms.functional as TF

    cells = [np.asarray(TF.resized_crop(img, int(t), int(le), int(h), int(w), [VIEW_PX, VIEW_PX]), np.float32) / 255
             for t, le, h, w in views]
    gap = np.ones((VIEW_PX, 6, 3), np.float32)
    return np.concatenate([cells[0], gap, cells[1]], 1)


def _stat_line(st: dict[str, Any]) -> str:
    s = f"IoU {st['iou']:.2f} · in box {100 * st['inside_box']:.0f}%"
    if st.get("object_share") is not None:
        s += f" · object {100 * st['object_share']:.0f}%"
    return s


def _sheet(path: Path, files: Sequence[Path], ids: Sequence[str], heat: np.ndarray, boxes: np.ndarray,
           grid: tuple[int, int], arrays: dict[str, list], per_image: list[dict[str, Any]],
           masks: Sequence[np.ndarray | None], summary: Mapping[str, Any], pairs: int, *, total: int,
           cmap: str = "inferno", model: Any = None) -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from featviz.data.images import load_image
    from featviz.views.sheets import heat_overlay, with_caution

    rows = len(files)
    imgs = [load_image(f) for f in files]
    aspect = float(np.median([im.size[0] / im.size[1] for im in imgs]))
    cw = 2.3
    widths = [aspect, aspect, aspect, 2.06, 2.06]
    fig = Figure(figsize=(cw * sum(widths) + 0.3, cw * rows + 1.0), layout="constrained")
    axes = fig.subplots(rows, 5, squeeze=False, gridspec_kw={"width_ratios": widths})
    pair_colors = colormaps["tab10"]
    for r in range(rows):
        img = imgs[r]
        rgb = np.asarray(img, np.float32) / 255
        h, w = rgb.shape[:2]
        bpx = box_pixels(boxes[r], (h, w), grid)
        panels = [heat_overlay(rgb, heat[r].astype(np.float32), alpha=0.55, scale="clip", cmap=cmap), rgb, rgb]
        for c in range(5):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
        for c, pic in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(pic, interpolation="bilinear")
            ax.add_patch(Rectangle((bpx[1], bpx[0]), bpx[3] - bpx[1], bpx[2] - bpx[0], fill=False,
                                   ec="white", lw=1.6 if c == 0 else 1.0, ls="--" if c == 0 else ":"))
            if masks[r] is not None and c == 0:
                obj = ((masks[r] != 0) & (masks[r] != 255)).astype(float)
                if 0 < obj.mean() < 1:
                    ax.contour(obj, levels=[0.5], colors=["#39e75f"], linewidths=0.9)
            if c > 0:
                m = METHODS[c - 1]
                for k in range(pairs):
                    for v in range(2):
                        t, le, vh, vw = arrays[f"views_{m}"][r][k, v]
                        ax.add_patch(Rectangle((le, t), vw, vh, fill=False, ec=pair_colors(k % 10), lw=1.3,
                                               ls="-" if v == 0 else "--"))
                        ax.plot(le + vw / 2, t + vh / 2, "o", ms=2.5, color=pair_colors(k % 10))
                ax.set_xlim(-0.5, w - 0.5)
                ax.set_ylim(h - 0.5, -0.5)
        row = per_image[r]
        box_note = "whole image" if row["whole_image_box"] else f"box {100 * row['box_area']:.0f}% of the map"
        extra = ""
        if row.get("object_in_box") is not None:
            extra = (f"\nobject {100 * row['image_object_share']:.0f}% of image, "
                     f"{100 * row['object_in_box']:.0f}% in box")
        axes[r, 0].set_title(f"{_short(ids[r])}\n{box_note}{extra}", fontsize=7)
        for c, m in ((1, "contrastive"), (2, "rrc")):
            axes[r, c].set_title(f"{TITLES[m]}: {pairs} pairs\n{_stat_line(row[m])}", fontsize=7)
        for c, m in ((3, "contrastive"), (4, "rrc")):
            axes[r, c].imshow(_views_strip(img, arrays[f"views_{m}"][r][0]), interpolation="bilinear")
            axes[r, c].set_title(f"{TITLES[m]} pair 1\nIoU {arrays[f'iou_{m}'][r][0]:.2f}", fontsize=7)
    s = summary
    lines = [f"{s['arch']} · {s['layer']} · heatmap {s['heatmap_size'][0]}x{s['heatmap_size'][1]} · k = "
             f"{s['threshold']:g} · α = {s['alpha']:g} · scale {s['scale'][0]:g}-{s['scale'][1]:g} · "
             f"box dashed white, pair k: view 1 solid, view 2 dashed, dots = centres"
             + (f" · showing {rows} of {total} images" if total > rows else "")]
    means = " | ".join(f"{TITLES[m]}: {_stat_line(s[m])}" for m in METHODS)
    lines.append(f"over {s['samples']} pairs per image, mean of {s['images']} images: {means} · "
                 f"mean box {100 * s['mean_box_area']:.0f}% of the map, {100 * s['whole_image_share']:.0f}% whole")
    fig.suptitle(with_caution(model, "\n".join(lines)), fontsize=8)
    fig.savefig(path, dpi=90)


def _short(text: str, n: int = 30) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]
