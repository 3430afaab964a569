"""High-norm "artifact" tokens, layer by layer: where they sit, what share, how much attention they take.

Darcet et al., "Vision Transformers Need Registers" (ICLR 2024), found that large ViTs (DINOv2,
OpenCLIP, DeiT-III) turn a few low-information background patches into tokens whose norm is far
above the rest ("about 10x", a bimodal histogram, their Fig. 3), that these tokens soak up the
class token's attention, and that register tokens take over that role. Their rule is a fixed
cutoff on the patch-token norm ("norm higher than 150" for DINOv2 ViT-g). A cutoff that fits one
model fits no other, so featviz takes the cutoff from the bimodal split itself:

- **threshold** (per layer, over the patch tokens of all images): Otsu's threshold on the token
  norms (``skimage.filters.threshold_otsu``'s rule: a 256-bin histogram between the smallest and
  the largest norm, the split between bins that maximises the between-class variance; skimage
  reports the centre of the last low bin, featviz the split itself, its upper edge); an outlier
  is a patch token whose norm is *above* it;
- **bimodal**: Otsu splits any histogram, a unimodal one too, so the split counts only where the
  histogram has a valley between the two sides: on a histogram of ``valley_bins(n)`` bins (the
  square-root rule, 8 to 64 bins, so that a few hundred tokens do not make a noisy valley), the
  lowest bin between the modes of the two sides is below ``DIP`` times the lower of the two modes;
  and outliers are few: the high side holds at most ``MAX_SHARE`` of the tokens (Darcet et al.
  count about 2 %; a split into two large groups is two populations, not outliers). Without a
  valley the layer has no outliers (``threshold`` null; ``otsu_threshold`` still says where
  Otsu would have cut);
- ``threshold=T`` (``--threshold``) replaces both by Darcet et al.'s fixed cutoff, for every layer.

The norms are those of the layer's output tokens (the residual stream of ``blocks.N``; of every
position of a CNN map), read through the feature core (``models.taps.layer_tokens``), which
also gives the prefix tokens (class, register, other: ``TokenLayout``). The class token's
attention is the model's own softmax in block N (``views.attention_probs``), mean over heads,
class token's row; its mass on the outliers is the sum of that row over the outlier patches of
layer ``blocks.N`` (the block's own output), per image, averaged over the images. Layers that are
not a block's output, CNNs and attention featviz cannot read exactly say ``"n/a"``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from featviz.errors import DataError, FeatvizError, OptionError
from featviz.io.progress import Progress
from featviz.registry import parse_layers
from featviz.style import DEFAULT_STYLE, PlotStyle
from featviz.views.runner import ViewResult, ViewRunner

log = logging.getLogger(__name__)

OTSU_BINS = 256
VALLEY_BINS = 64
DIP = 0.5
MAX_SHARE = 0.1
NA = "n/a"
_BLOCK = re.compile(r"blocks\.(\d+)")


# ------------------------------------------------------------------ the outlier rule
def otsu_threshold(values: np.ndarray, nbins: int = OTSU_BINS) -> float:
    """Otsu's threshold of ``values``: the split ``skimage.filters.threshold_otsu`` chooses, at its bin's upper edge.

    skimage maximises the between-class variance of bins ``0..k`` against ``k+1..`` and returns the
    centre of bin ``k``; the split it evaluated lies at that bin's upper edge, which is returned here
    (skimage's value + half a bin), so that "above the threshold" is exactly the high class.

    Raises:
        DataError: no values, or not finite.
    """
    v = np.asarray(values, np.float64).ravel()
    if v.size == 0 or not np.isfinite(v).all():
        raise DataError("token norms are empty or not finite; check the model and the layer")
    lo, hi = float(v.min()), float(v.max())
    if hi == lo:
        return lo
    hist, edges = np.histogram(v, bins=nbins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    hist = hist.astype(np.float64)
    w1 = np.cumsum(hist)
    w2 = np.cumsum(hist[::-1])[::-1]
    m1 = np.cumsum(hist * centres) / np.maximum(w1, 1e-300)
    m2 = (np.cumsum((hist * centres)[::-1]) / np.maximum(w2[::-1], 1e-300))[::-1]
    between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def valley_bins(n: int) -> int:
    """Bins of the valley test for ``n`` values: the square-root rule, between 8 and ``VALLEY_BINS``."""
    return int(np.clip(round(np.sqrt(n)), 8, VALLEY_BINS))


def valley_dip(values: np.ndarray, threshold: float, bins: int | None = None) -> float:
    """How deep the histogram dips between the two sides of ``threshold`` (0: empty valley; 1: none).

    The lowest count between the two sides' modes over the lower of the two modes' counts, on a
    ``bins``-bin histogram (default ``valley_bins``); 1.0 when a side is empty.
    """
    v = np.asarray(values, np.float64).ravel()
    bins = valley_bins(v.size) if bins is None else bins
    lo, hi = float(v.min()), float(v.max())
    if hi == lo or not (lo <= threshold < hi):
        return 1.0
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    cut = int(np.clip(np.searchsorted(edges, threshold, side="right") - 1, 0, bins - 1))  # the threshold's bin
    low, high = np.arange(cut + 1), np.arange(cut + 1, bins)
    if not len(high) or hist[high].sum() == 0:
        return 1.0
    a = int(low[np.argmax(hist[low])])
    b = int(high[np.argmax(hist[high])])
    peak = min(hist[a], hist[b])
    return float(hist[a : b + 1].min() / peak) if peak > 0 else 1.0


@dataclass(frozen=True)
class OutlierSplit:
    """One layer's outlier threshold and how it was found."""

    rule: str  # "otsu" or "fixed"
    threshold: float | None  # None: no outliers (no valley)
    otsu_threshold: float | None
    dip: float | None
    high_share: float | None  # the share of tokens above Otsu's threshold
    bimodal: bool | None  # a valley (dip < DIP) and a minority (high_share <= MAX_SHARE)

    def to_dict(self) -> dict[str, Any]:
        """As ``norms.json`` records it."""
        return {
            "rule": self.rule,
            "threshold": self.threshold,
            "otsu_threshold": self.otsu_threshold,
            "dip": self.dip,
            "high_share": self.high_share,
            "bimodal": self.bimodal,
        }


def outlier_split(norms: np.ndarray, threshold: float | None = None) -> OutlierSplit:
    """The outlier threshold of a layer's patch-token ``norms`` (the module's rule; ``threshold``: fixed)."""
    if threshold is not None:
        return OutlierSplit("fixed", float(threshold), None, None, None, None)
    t = otsu_threshold(norms)
    dip = valley_dip(norms, t)
    share = float((np.asarray(norms) > t).mean())
    bimodal = dip < DIP and share <= MAX_SHARE
    return OutlierSplit("otsu", t if bimodal else None, t, dip, share, bimodal)


def outliers(norms: np.ndarray, split: OutlierSplit) -> np.ndarray:
    """The boolean mask of the tokens above ``split``'s threshold (all False without one)."""
    if split.threshold is None:
        return np.zeros(np.shape(norms), bool)
    return np.asarray(norms) > split.threshold


def attention_mass(attention: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per image, the attention (``(N, h, w)``, a softmax row's patch part) summed over ``mask``'s patches."""
    return (np.asarray(attention, np.float64) * np.asarray(mask, bool)).reshape(len(attention), -1).sum(axis=1)


# ------------------------------------------------------------------ reading the model
@dataclass
class LayerNorms:
    """One layer of one model over all images (patch resolution)."""

    name: str
    block: int | None  # the block whose attention pairs with it (None: no attention)
    patch: np.ndarray  # (N, h, w) patch-token (or CNN position) norms
    prefix: np.ndarray | None  # (N, P) prefix-token norms (class, registers, others)
    attention: np.ndarray | None  # (N, h, w) class token -> patches, mean of heads
    prefix_attention: np.ndarray | None  # (N, P) class token -> prefix tokens


@dataclass
class ModelNorms:
    """What ``token_norms`` read from one model."""

    layers: list[LayerNorms]
    layout: Any  # TokenLayout | None
    image_size: tuple[int, int]
    attention_note: str | None  # why there is no attention, or None


def default_layers(model: Any) -> list[str]:
    """Every block of a ViT (``blocks.0`` … ``blocks.L-1``); a CNN's default dense layer."""
    from featviz.models.features import default_layer, is_vit

    if is_vit(model):
        return [f"blocks.{i}" for i in range(len(model.blocks))]
    return [default_layer(model)]


def _attention_blocks(model: Any, names: Sequence[str], layout: Any) -> tuple[dict[str, int], str | None]:
    """Which layer pairs with which block's attention, or why none does."""
    from featviz.models.features import is_vit
    from featviz.views.attention_probs import check_instrumentable, has_own_maps

    if layout is None or not is_vit(model):
        return {}, "the model has no attention (not a ViT)"
    if layout.class_tokens < 1:
        return {}, "the ViT has no class token"
    pairs = {n: int(m[1]) for n in names if (m := _BLOCK.fullmatch(n)) and int(m[1]) < len(model.blocks)}
    if not pairs:
        return {}, "no layer is a block's output (blocks.N)"
    if not has_own_maps(model):
        try:
            for i in set(pairs.values()):
                check_instrumentable(model.blocks[i].attn, i)
        except (FeatvizError, AttributeError) as e:
            return {}, str(e)
    return pairs, None


def token_norms(
    runner: ViewRunner,
    model: Any,
    layers: Sequence[str],
    *,
    hw: tuple[int, int],
    batch_size: int = 8,
    keep: Sequence[int] | None = None,
) -> tuple[ModelNorms, list[np.ndarray]]:
    """The norms (and class-token attention) of ``layers`` of ``model`` (placed by the runner) on its images.

    Also returns the RGB inputs in [0, 1] of the images ``keep`` (indices, in order; all when None).
    """
    import torch

    from featviz.models.features import resolve_layer, token_layout
    from featviz.models.taps import layer_tokens
    from featviz.views.attention_probs import model_attention

    names = list(dict.fromkeys(resolve_layer(model, n)[0] for n in layers))  # canonical, each once, in order
    layout = token_layout(model, hw)
    pairs, note = _attention_blocks(model, names, layout)
    blocks = sorted(set(pairs.values()))
    acc: dict[str, dict[str, list[np.ndarray]]] = {n: {"patch": [], "prefix": [], "att": [], "patt": []} for n in names}
    rgbs: list[np.ndarray] = []
    seen, kept = 0, None if keep is None else set(keep)
    loader = runner.loader(hw=hw, batch_size=batch_size)
    with torch.inference_mode(), runner.batches(loader) as batches:
        for x, _, _, _ in batches:
            x = x.to(runner.device)
            outs = layer_tokens(model, x, names)
            att = {}
            if blocks:
                gh, gw = layout.grid
                probs = model_attention(model, model.blocks, x, blocks, layout.prefix + gh * gw, query=0)
                att = {i: p.mean(dim=1)[:, 0].float().cpu().numpy() for i, p in probs.items()}  # (B, T)
            for n in names:
                t = outs[n]
                acc[n]["patch"].append(t.map.float().norm(dim=1).cpu().numpy())
                if t.prefix is not None:
                    acc[n]["prefix"].append(t.prefix.float().norm(dim=-1).cpu().numpy())
                if n in pairs:
                    row = att[pairs[n]]
                    acc[n]["att"].append(row[:, layout.prefix :].reshape(len(x), *layout.grid))
                    acc[n]["patt"].append(row[:, : layout.prefix])
            rows = [j for j in range(len(x)) if kept is None or seen + j in kept]
            seen += len(x)
            rgbs += list(runner.rgb(x[rows].cpu())) if rows else []
    cat = lambda v: np.concatenate(v) if v else None  # noqa: E731
    result = [
        LayerNorms(
            n, pairs.get(n), cat(acc[n]["patch"]), cat(acc[n]["prefix"]), cat(acc[n]["att"]), cat(acc[n]["patt"])
        )
        for n in names
    ]
    return ModelNorms(result, layout, hw, note), rgbs


# ------------------------------------------------------------------ statistics
def _summary(v: np.ndarray) -> dict[str, float]:
    v = np.asarray(v, np.float64).ravel()
    return {
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "p1": float(np.percentile(v, 1)),
        "p99": float(np.percentile(v, 99)),
        "max": float(v.max()),
    }


@dataclass
class LayerStats:
    """One layer's numbers (``to_dict``: its entry in ``norms.json``)."""

    layer: LayerNorms
    split: OutlierSplit
    mask: np.ndarray  # (N, h, w) outliers
    layout: Any
    note: str | None

    def to_dict(self) -> dict[str, Any]:
        """Every number of the layer, with its rule."""
        ly, m = self.layer, self.mask
        n_img, tokens = len(m), m[0].size
        d: dict[str, Any] = {
            "layer": ly.name,
            "block": ly.block,
            "grid": list(m.shape[1:]),
            "patch_norm": _summary(ly.patch),
            **self.split.to_dict(),
            "outliers": int(m.sum()),
            "outlier_share": float(m.mean()),
            "outliers_per_image": [int(v) for v in m.reshape(n_img, -1).sum(1)],
            "images_with_outliers": int(m.reshape(n_img, -1).any(1).sum()),
            "outlier_norm_mean": float(ly.patch[m].mean()) if m.any() else None,
        }
        lay = self.layout
        cls_n = reg_n = 0
        if lay is not None and ly.prefix is not None:
            cls_n, reg_n = lay.class_tokens, lay.register_tokens
        d["class_token_norm"] = _summary(ly.prefix[:, :cls_n]) if cls_n else None
        regs = ly.prefix[:, cls_n : cls_n + reg_n] if reg_n else None
        d["registers"] = (
            None
            if regs is None
            else {
                "count": reg_n,
                "norm": _summary(regs),
                "above_threshold_share": None
                if self.split.threshold is None
                else float((regs > self.split.threshold).mean()),
            }
        )
        if ly.attention is None:
            d["cls_attention"] = NA
            d["cls_attention_note"] = self.note or "this layer is not a block's output (blocks.N)"
            return d
        total = lay.prefix + tokens
        on_out = attention_mass(ly.attention, m)
        d["cls_attention"] = {
            "on_outliers": float(on_out.mean()),
            "on_outliers_per_image": [float(v) for v in on_out],
            "outlier_token_share": float(m.sum() / (n_img * total)),
            "on_patches": float(ly.attention.reshape(n_img, -1).sum(1).mean()),
            "on_class": float(ly.prefix_attention[:, :cls_n].sum(1).mean()),
            "on_registers": float(ly.prefix_attention[:, cls_n : cls_n + reg_n].sum(1).mean()) if reg_n else None,
        }
        return d


def layer_stats(norms: ModelNorms, threshold: float | None = None) -> list[LayerStats]:
    """Each layer's outlier split, mask and numbers (the module's rule, or the fixed ``threshold``)."""
    stats = []
    for ly in norms.layers:
        split = outlier_split(ly.patch, threshold)
        stats.append(LayerStats(ly, split, outliers(ly.patch, split), norms.layout, norms.attention_note))
    return stats


def shown_layer(stats: Sequence[LayerStats], name: str | None = None) -> int:
    """The layer the maps show: ``name``, else the one with the largest outlier share (the last of ties).

    Raises:
        DataError: ``name`` is not one of the layers read.
    """
    if name is not None:
        names = [s.layer.name for s in stats]
        if name not in names:
            raise DataError(f"--map-layer {name!r} is not one of the layers read ({', '.join(names)})")
        return names.index(name)
    shares = [float(s.mask.mean()) for s in stats]
    return len(shares) - 1 - int(np.argmax(shares[::-1]))


# ------------------------------------------------------------------ the command
@dataclass(eq=False)
class NormsResult(ViewResult):
    """What ``featviz norms`` reports (``to_dict()``: its ``--json`` summary, also ``norms.json``)."""

    out: str
    images: int
    rule: dict[str, Any]
    models: list[dict[str, Any]]
    files: dict[str, Any]
    warnings: list[str]
    sheet: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` summary."""
        return {
            "out": self.out,
            "images": self.images,
            "rule": self.rule,
            "models": self.models,
            "files": self.files,
            "warnings": self.warnings,
            "sheet": self.sheet,
        }


def rule_text(threshold: float | None) -> dict[str, Any]:
    """The outlier rule as ``norms.json`` states it."""
    if threshold is not None:
        return {
            "name": "fixed",
            "threshold": float(threshold),
            "definition": f"outlier = patch token whose L2 norm is above {threshold:g} (a fixed cutoff, as "
            "Darcet et al. 2024 use: 150 for DINOv2 ViT-g), in every layer",
        }
    return {
        "name": "otsu",
        "threshold": None,
        "otsu_bins": OTSU_BINS,
        "max_valley_bins": VALLEY_BINS,
        "dip": DIP,
        "max_share": MAX_SHARE,
        "definition": "per layer, over the patch tokens of all images: Otsu's threshold on the L2 norms "
        f"({OTSU_BINS}-bin histogram, skimage.filters.threshold_otsu's split, taken at the upper edge of its bin, "
        "i.e. skimage's value + half a bin); outlier = norm above it, only when the split is bimodal: on a "
        f"histogram of sqrt(tokens) bins (8 to {VALLEY_BINS}) the lowest bin between the two sides' modes is "
        f"below {DIP:g} x the lower mode, and the high side holds at most {MAX_SHARE:.0%} of the tokens "
        "(else no outliers, threshold null)",
    }


def labels_for(names: Sequence[str]) -> list[str]:
    """Unique, file-safe labels for the models (``name``, ``name-2`` …)."""
    from featviz.views.runner import safe_stem

    out: list[str] = []
    for n in names:
        base = safe_stem(n) or "model"
        label, k = base, 2
        while label in out:
            label, k = f"{base}-{k}", k + 1
        out.append(label)
    return out


def run_norms(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    models: Sequence[Any],
    names: Sequence[str] | None = None,
    descriptions: Sequence[dict[str, Any] | None] | None = None,
    layers: str | Sequence[str] | None = None,
    map_layer: str | None = None,
    threshold: float | None = None,
    image_size: int | str | Sequence[int] | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    force: bool = False,
    arguments: dict[str, Any] | None = None,
    progress: Progress | None = None,
    sheet_images: int = 40,
    limit: int | None = None,
    style: PlotStyle = DEFAULT_STYLE,
) -> NormsResult:
    """Everything ``featviz norms`` does, for one or several models; writes ``out_dir`` as one atomic folder.

    Files: ``norms.json`` (the summary: every number and the rule), ``norms.npz`` (``ids``, ``models``;
    per model ``i``: ``i/layers``, ``i/thresholds`` (NaN: no outliers); per layer ``i/<layer>/``:
    ``norms`` (N, h, w), ``outliers`` (N, h, w), ``prefix_norms`` (N, P) for ViT tokens,
    ``cls_attention`` (N, h, w) and ``cls_prefix_attention`` (N, P) where there is attention),
    ``norms_<model>.png`` (one figure per model), ``outliers_<model>.png``
    (the outlier maps of at most ``sheet_images`` images, spread over all by ``views.sheets.sheet_cut``;
    ``limit``: only the first N images; ``style.cmap``: the maps' colour map), ``comparison.png`` (two
    models or more), ``manifest.json``. ``layers``: ``"a,b"``, a list of such (``registry.parse_layers``),
    or None/``auto``: each model's ``default_layers``.

    Raises:
        OptionError: a layer list that names no layer (``--layers ,``), a threshold that is not positive.
        DataError: bad options, no images, a layer without a spatial map.
        OutputExistsError: ``out_dir`` exists and ``force`` is False.
    """
    from featviz.models.features import arch_name, input_size, resolve_layer
    from featviz.views.norms_figures import comparison_figure, model_figure, outlier_sheet
    from featviz.views.sheets import sheet_cut

    if not models:
        raise DataError("featviz norms needs a model: pass --checkpoint (several for a comparison) or --arch")
    if threshold is not None and not threshold > 0:
        raise OptionError(f"--threshold must be a positive norm, got {threshold:g}")
    layer_names = parse_layers(layers)  # None: each model's default_layers
    runner = ViewRunner("norms", out_dir, force=force, arguments=arguments, progress=progress)
    names = list(names) if names is not None else [arch_name(m) for m in models]
    labels = labels_for(names)
    descriptions = list(descriptions) if descriptions is not None else [None] * len(models)
    files, ids = runner.images(inputs, limit=limit)
    cut = sheet_cut(len(ids), sheet_images)
    cmap = style.heat_cmap("inferno")
    read, summaries, warnings = [], [], []
    for k, model in enumerate(models):
        model = runner.place(model, device)
        hw = input_size(model, image_size)
        wanted = layer_names or default_layers(model)
        mn, rgbs = token_norms(runner, model, wanted, hw=hw, batch_size=batch_size, keep=cut.indices)
        stats = layer_stats(mn, threshold)
        show = shown_layer(stats, None if map_layer is None else resolve_layer(model, map_layer)[0])
        if mn.attention_note and mn.layout is not None:
            warnings.append(f"{names[k]}: class-token attention n/a: {mn.attention_note}")
            log.warning(warnings[-1])
        read.append((mn, stats, show, rgbs))
        lay = mn.layout
        summaries.append(
            {
                "name": names[k],
                "label": labels[k],
                "arch": arch_name(model),
                "image_size": list(hw),
                "tokens": None if lay is None else lay.to_dict(),
                "map_layer": stats[show].layer.name,
                "layers": [s.to_dict() for s in stats],
                "description": descriptions[k],
            }
        )
        model.to("cpu")
    with runner.output() as tmp:
        arrays: dict[str, Any] = {"ids": np.array(ids), "models": np.array(names)}
        figures = []
        for k, (_, stats, show, rgbs) in enumerate(read):
            arrays.update(_arrays(k, stats))
            look = {"model": models[k], "indices": cut.indices, "cmap": cmap}
            model_figure(tmp / f"norms_{labels[k]}.png", summaries[k], stats, show, rgbs, ids, **look)
            outlier_sheet(
                tmp / f"outliers_{labels[k]}.png", summaries[k], stats[show], rgbs, ids, **look, caption=cut.caption()
            )
            figures.append(runner.path(f"norms_{labels[k]}.png"))
        if len(read) > 1:
            comparison_figure(
                tmp / "comparison.png",
                summaries,
                [(s, sh, r) for _, s, sh, r in read],
                ids,
                models=models,
                indices=cut.indices,
                cmap=cmap,
            )
        np.savez_compressed(tmp / "norms.npz", **arrays)
        result = NormsResult(
            out=str(runner.out_dir),
            images=len(ids),
            rule=rule_text(threshold),
            models=summaries,
            files={
                "json": runner.path("norms.json"),
                "npz": runner.path("norms.npz"),
                "manifest": runner.path("manifest.json"),
                "figures": figures,
                "outlier_sheets": [runner.path(f"outliers_{lb}.png") for lb in labels],
                "comparison": runner.path("comparison.png") if len(read) > 1 else None,
            },
            warnings=warnings,
            sheet=cut.to_dict(),
        )
        from featviz.io.outputs import write_json

        write_json(tmp / "norms.json", result.to_dict())
        runner.write_manifest(
            tmp,
            models=[{"name": s["name"], "arch": s["arch"], "description": s["description"]} for s in summaries],
            rule=result.rule,
            images=[{"id": i, "path": str(f)} for i, f in zip(ids, files, strict=True)],
            warnings=warnings,
        )
    return result


def _arrays(k: int, stats: Sequence[LayerStats]) -> dict[str, np.ndarray]:
    """Model ``k``'s arrays for ``norms.npz`` (per layer: grids differ between a CNN's stages)."""
    out = {
        f"{k}/layers": np.array([s.layer.name for s in stats]),
        f"{k}/thresholds": np.array(
            [np.nan if s.split.threshold is None else s.split.threshold for s in stats], np.float32
        ),
    }
    for s in stats:
        key = f"{k}/{s.layer.name}"
        out[f"{key}/norms"] = s.layer.patch.astype(np.float32)
        out[f"{key}/outliers"] = s.mask
        if s.layer.prefix is not None:
            out[f"{key}/prefix_norms"] = s.layer.prefix.astype(np.float32)
        if s.layer.attention is not None:
            out[f"{key}/cls_attention"] = s.layer.attention.astype(np.float32)
            out[f"{key}/cls_prefix_attention"] = s.layer.prefix_attention.astype(np.float32)
    return out
