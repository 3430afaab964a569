"""A ViT's class-token self-attention, per head, at any input size, and attention rollout.

The attention is the one the model itself computes, never re-derived from q·kᵀ by hand (a
re-derivation drops rotary position embeddings, relative position biases or separate q/k/v
projections and returns a plausible-looking but different map): ``views.attention_probs`` runs each
timm attention module it knows on its unfused path and records the softmax it computes (RoPE,
q/k norms and biases applied), or asks a model that has ``attention_maps(x, block)`` (featviz's
Hugging Face adapter); any other attention is refused in one line. ``tests/test_attention.py``
checks it against a block-by-block transcription, ``tests/test_rope_views.py`` against DINOv3's
attention with its rotary embedding.

What is shown, as in DINO's ``visualize_attention.py`` (Caron et al. 2021):

- per head, the class token's attention to the patch tokens (row 0 of A, the patch columns):
  softmax probabilities over *all* tokens, so register/distillation tokens are excluded from
  the map but their share of the class token's attention is reported (``prefix_share``);
- the mean over heads;
- DINO's threshold masks: per map, the smallest set of patches holding ``threshold`` of the
  map's mass over the patches (sort ascending, cumulative sum of the renormalised values,
  keep ``> 1 - threshold``).

Attention rollout (Abnar & Zuidema 2020, ``compute_joint_attention`` of their code): per block
the heads are fused (``mean``, or ``max``/``min`` as in jacobgil/vit-explain), optionally the
lowest ``discard_ratio`` of the fused weights are zeroed (vit-explain's option; the class
token's attention to itself is kept), the identity is added for the residual, rows are
renormalised, and the blocks are multiplied, ``R = Â_L … Â_1``; the map is the class token's
row over the patches. vit-explain divides by column sums (``a / a.sum(dim=-1)`` broadcasts that
way); featviz renormalises rows, as Abnar & Zuidema's code does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featviz.errors import ArchitectureError, DataError
from featviz.io.progress import Progress
from featviz.models import features
from featviz.models.features import TokenLayout, arch_name, input_size
from featviz.style import DEFAULT_STYLE, PlotStyle
from featviz.views.attention_probs import model_attention
from featviz.views.runner import ViewResult, ViewRunner, safe_stem
from featviz.views.sheets import sheet_cut, with_caution

log = logging.getLogger(__name__)

HEAD_FUSIONS = ("mean", "max", "min")


# ------------------------------------------------------------------ the model's tokens
def vit_blocks(model: nn.Module) -> nn.ModuleList | nn.Sequential:
    """The transformer blocks of a timm-style ViT.

    Raises:
        ArchitectureError: a CNN or another model without ``blocks`` and ``patch_embed``.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or getattr(model, "patch_embed", None) is None or not len(blocks):
        name = arch_name(model)
        raise ArchitectureError(
            f"featviz attention needs a ViT with a class token; {name} has no transformer "
            "blocks (a CNN?): use `featviz cam` for its class-activation maps, or "
            "`featviz pca` for its feature maps"
        )
    return blocks


def token_layout(model: nn.Module, hw: tuple[int, int]) -> TokenLayout:
    """The prefix tokens and the patch grid of ``model`` for an ``hw`` input.

    The feature core's ``token_layout``, once the model is known to be a ViT with a class token.

    Raises:
        ArchitectureError: not a ViT, or a ViT without a class token.
        DataError: ``hw`` is not a size this ViT takes.
    """
    vit_blocks(model)
    layout = features.token_layout(model, hw)
    assert layout is not None  # a model with patch_embed has patches
    if layout.class_tokens < 1:
        raise ArchitectureError(
            "this ViT has no class token (I-JEPA-style average pooling, SigLIP's attention pool), so "
            "it has no class-token attention to show; use `featviz cam` or `featviz pca`"
        )
    return layout


def _resolve_layer(blocks: Sequence[nn.Module], layer: int | None) -> int:
    n = len(blocks)
    i = n - 1 if layer is None else int(layer)
    if not -n <= i < n:
        raise DataError(
            f"--layer {layer} is out of range: the model has {n} blocks "
            f"(0..{n - 1}, or -1 for the last)"
        )
    return i % n


@dataclass
class AttentionBatch:
    """Maps of one batch at patch resolution."""

    heads: np.ndarray  # (B, H, h, w) class-token attention to each patch, per head
    prefix_share: np.ndarray  # (B, H) class-token attention on the prefix tokens (itself included)
    rollout: np.ndarray | None  # (B, h, w)


def fuse_heads(a: torch.Tensor, fusion: str) -> torch.Tensor:
    """(B, H, N, N) -> (B, N, N) by ``mean``, ``max`` or ``min`` over heads."""
    if fusion == "mean":
        return a.mean(dim=1)
    if fusion == "max":
        return a.amax(dim=1)
    if fusion == "min":
        return a.amin(dim=1)
    raise DataError(f"--head-fusion {fusion!r}: expected one of {', '.join(HEAD_FUSIONS)}")


def rollout(
    attentions: Sequence[torch.Tensor], *, head_fusion: str = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """Attention rollout over blocks in forward order: ``R = Â_L … Â_1`` (B, N, N).

    ``Â = rownorm(fuse(A) with the lowest discard_ratio zeroed + I)``.
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise DataError(f"--discard-ratio must be in [0, 1), got {discard_ratio}")
    result = None
    for a in attentions:
        f = fuse_heads(a.float(), head_fusion).clone()
        b, n, _ = f.shape
        if discard_ratio > 0:
            flat = f.view(b, -1)
            drop = flat.topk(int(flat.shape[1] * discard_ratio), dim=-1, largest=False).indices
            keep_self = drop != 0  # the class token's attention to itself stays
            flat.scatter_(1, drop, torch.where(keep_self, 0.0, flat.gather(1, drop)))
        aug = f + torch.eye(n, dtype=f.dtype, device=f.device)
        aug = aug / aug.sum(dim=-1, keepdim=True)
        result = aug if result is None else aug @ result
    assert result is not None
    return result


@torch.no_grad()
def class_attention(
    model: nn.Module,
    x: torch.Tensor,
    *,
    layer: int | None = None,
    rollout_maps: bool = False,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> AttentionBatch:
    """The class token's attention in block ``layer`` (default: the last) for a batch ``x``.

    Returns:
        Per-head patch maps (B, H, h, w), the prefix tokens' share, and, with ``rollout_maps``,
        the rollout through blocks ``0..layer``.
    """
    blocks = vit_blocks(model)
    li = _resolve_layer(blocks, layer)
    lay = token_layout(model, (x.shape[-2], x.shape[-1]))
    wanted = list(range(li + 1)) if rollout_maps else [li]
    gh, gw = lay.grid
    probs = model_attention(model, blocks, x, wanted, lay.prefix + gh * gw)
    cls_row = probs[li][:, :, 0]  # (B, H, N): the class token's row
    heads = cls_row[:, :, lay.prefix :].reshape(len(x), -1, gh, gw)
    share = cls_row[:, :, : lay.prefix].sum(-1)
    roll = None
    if rollout_maps:
        r = rollout([probs[i] for i in wanted], head_fusion=head_fusion, discard_ratio=discard_ratio)
        roll = r[:, 0, lay.prefix :].reshape(len(x), gh, gw).cpu().numpy()
    return AttentionBatch(heads.cpu().numpy(), share.cpu().numpy(), roll)


def threshold_masks(maps: np.ndarray, threshold: float) -> np.ndarray:
    """DINO's masks: per map (last two axes), the patches that hold ``threshold`` of its mass.

    The values are sorted ascending and renormalised to sum 1; a patch is kept when the cumulative
    sum at its place exceeds ``1 - threshold`` (``visualize_attention.py``).
    """
    if not 0.0 < threshold <= 1.0:
        raise DataError(f"--threshold must be in (0, 1], got {threshold}")
    shape = maps.shape
    flat = maps.reshape(-1, shape[-2] * shape[-1]).astype(np.float64)
    order = np.argsort(flat, axis=1, kind="stable")
    val = np.take_along_axis(flat, order, 1)
    val = val / np.maximum(val.sum(axis=1, keepdims=True), 1e-30)
    keep_sorted = np.cumsum(val, axis=1) > (1.0 - threshold)
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, 1)
    return keep.reshape(shape)


# ------------------------------------------------------------------ the command
@dataclass
class AttentionRun:
    """Everything ``run_attention`` computed (before rendering)."""

    ids: list[str]
    heads: np.ndarray  # (N, H, h, w)
    mean: np.ndarray  # (N, h, w)
    masks: np.ndarray  # (N, H, h, w) bool
    mean_mask: np.ndarray  # (N, h, w) bool
    prefix_share: np.ndarray  # (N, H)
    rollout: np.ndarray | None  # (N, h, w)
    layout: TokenLayout
    layer: int
    image_size: tuple[int, int]


@dataclass(eq=False)
class AttentionResult(ViewResult):
    """What ``featviz attention`` reports (``to_dict()``: its ``--json`` summary)."""

    out: str
    images: int
    arch: str
    layer: int  # the block shown
    blocks: int
    heads: int
    layout: TokenLayout
    image_size: tuple[int, int]
    prefix_attention_share: float  # the class token's attention on the prefix tokens, mean of heads and images
    threshold: float
    rollout: dict[str, Any] | None  # head_fusion, discard_ratio, blocks; None without rollout
    files: dict[str, Any]
    notes: list[str]
    sheet: dict[str, int] | None = None  # {"shown", "of"}: the contact sheet's rows

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` summary."""
        return {
            "out": self.out,
            "images": self.images,
            "arch": self.arch,
            "layer": self.layer,
            "blocks": self.blocks,
            "heads": self.heads,
            "grid": list(self.layout.grid),
            "image_size": list(self.image_size),
            "prefix_tokens": self.layout.to_dict(),
            "prefix_attention_share": self.prefix_attention_share,
            "threshold": self.threshold,
            "rollout": self.rollout,
            "files": self.files,
            "notes": self.notes,
            "sheet": self.sheet,
        }


def run_attention(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    model: nn.Module,
    layer: int | None = None,
    image_size: int | str | Sequence[int] | None = None,
    threshold: float = 0.6,
    rollout_maps: bool = False,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    batch_size: int = 8,
    device: str = "cpu",
    force: bool = False,
    description: dict[str, Any] | None = None,
    arguments: dict[str, Any] | None = None,
    progress: Progress | None = None,
    sheet_images: int = 24,
    limit: int | None = None,
    style: PlotStyle = DEFAULT_STYLE,
) -> AttentionResult:
    """Everything ``featviz attention`` does; writes ``out_dir`` as one atomic folder.

    Files: ``maps.npz`` (``attention`` (N, heads, h, w): image ``i``'s per-head maps at patch
    resolution; ``mean`` (N, h, w); ``masks`` (N, heads, h, w) and ``mean_mask`` (N, h, w), bool;
    ``prefix_share`` (N, heads); ``rollout`` (N, h, w) with ``rollout_maps``; ``ids``),
    ``contact_sheet.png`` (rows = images; columns = input, heads, mean, mask[, rollout]),
    ``overlays/<image>.{head<j>,mean,mask[,rollout]}.png`` and ``manifest.json``.

    ``sheet_images``: at most this many rows on the sheet (``featviz.views.sheets.sheet_cut``: spread
    over all images, the cut said); ``limit``: only the first N images; ``style.cmap``: the heatmaps'
    colour map (default ``inferno``).

    Returns:
        The result; its ``to_dict()`` is the summary that ``--json`` prints.

    Raises:
        ArchitectureError: not a ViT with a class token (a CNN: use ``featviz cam``).
        DataError: bad size, layer, threshold, fusion or discard ratio; unreadable images.
        OutputExistsError: ``out_dir`` exists and ``force`` is False.
    """
    runner = ViewRunner("attention", out_dir, force=force, arguments=arguments, progress=progress)
    blocks = vit_blocks(model)
    li = _resolve_layer(blocks, layer)
    if head_fusion not in HEAD_FUSIONS:
        raise DataError(f"--head-fusion {head_fusion!r}: expected one of {', '.join(HEAD_FUSIONS)}")
    if not 0.0 <= discard_ratio < 1.0:
        raise DataError(f"--discard-ratio must be in [0, 1), got {discard_ratio}")
    if not 0.0 < threshold <= 1.0:
        raise DataError(f"--threshold must be in (0, 1], got {threshold}")
    hw = input_size(model, image_size)
    lay = token_layout(model, hw)
    files, ids = runner.images(inputs, limit=limit)
    cut = sheet_cut(len(files), sheet_images)
    shown = set(cut.indices)
    cmap = style.heat_cmap("inferno")
    model = runner.place(model, device)
    loader = runner.loader(hw=hw, batch_size=batch_size)
    heads, shares, rolls, rgbs = [], [], [], []  # rgbs: only the images the contact sheet shows
    arch = arch_name(model)
    with runner.output() as tmp:
        (tmp / "overlays").mkdir()
        start = 0
        with runner.batches(loader) as batches:
            for x, _, _, _ in batches:
                out = class_attention(
                    model,
                    x.to(runner.device),
                    layer=li,
                    rollout_maps=rollout_maps,
                    head_fusion=head_fusion,
                    discard_ratio=discard_ratio,
                )
                batch = _run_of(ids[start : start + len(x)], out, threshold, lay, li, hw)
                rgb = runner.rgb(x)
                for j, img in enumerate(rgb):  # written as they come: memory stays one batch of images
                    write_overlays(tmp / "overlays", safe_stem(ids[start + j]), img, batch, j, cmap=cmap)
                rgbs += [img for j, img in enumerate(rgb) if start + j in shown]
                heads.append(out.heads)
                shares.append(out.prefix_share)
                if out.rollout is not None:
                    rolls.append(out.rollout)
                start += len(x)
        run = _run_of(
            ids,
            AttentionBatch(
                np.concatenate(heads),
                np.concatenate(shares),
                np.concatenate(rolls) if rolls else None,
            ),
            threshold,
            lay,
            li,
            hw,
        )
        share = float(run.prefix_share.mean())
        notes = []
        if lay.prefix > 1:
            notes.append(
                f"{_prefix_in_words(lay)}: the maps show the patches only; the class token sends "
                f"{share:.1%} of its attention (mean over heads and images) to the prefix tokens, "
                "itself included"
            )
        arrays = {
            "ids": np.array(ids),
            "attention": run.heads,
            "mean": run.mean,
            "masks": run.masks,
            "mean_mask": run.mean_mask,
            "prefix_share": run.prefix_share,
            "grid": np.array(lay.grid),
            "image_size": np.array(hw),
        }
        if run.rollout is not None:
            arrays["rollout"] = run.rollout
        np.savez_compressed(tmp / "maps.npz", **arrays)
        title = with_caution(
            model,
            f"{arch} · block {li} of {len(blocks)} · class-token attention per head · "
            f"{hw[0]}x{hw[1]} ({lay.grid[0]}x{lay.grid[1]} patches) · "
            f"mask keeps {threshold:g} of the mass" + (f" · {cut.caption()}" if cut.cut else "")
        )
        contact_sheet(tmp / "contact_sheet.png", rgbs, run, title=title, rows=cut.indices, cmap=cmap)
        result = AttentionResult(
            out=str(runner.out_dir),
            images=len(ids),
            arch=arch,
            layer=li,
            blocks=len(blocks),
            heads=int(run.heads.shape[1]),
            layout=lay,
            image_size=hw,
            prefix_attention_share=share,
            threshold=threshold,
            rollout={"head_fusion": head_fusion, "discard_ratio": discard_ratio, "blocks": f"0..{li}"}
            if rollout_maps
            else None,
            files={
                "contact_sheet": runner.path("contact_sheet.png"),
                "maps": runner.path("maps.npz"),
                "manifest": runner.path("manifest.json"),
                "overlays": len(list((tmp / "overlays").iterdir())),
            },
            notes=notes,
            sheet=cut.to_dict(),
        )
        runner.write_manifest(
            tmp,
            model={"arch": arch, "description": description},
            layer=li,
            blocks=len(blocks),
            heads=result.heads,
            image_size=list(hw),
            tokens=lay.to_dict(),
            device=str(runner.device),
            normalization=runner.normalization,
            definitions={
                "attention": "the block's own attention probabilities, as the model computes "
                "them (q/k norms, rotary or relative position terms applied): class-token row, "
                "patch columns; probabilities over all tokens (prefix tokens not renormalised "
                "away)",
                "mask": f"DINO visualize_attention: patches holding {threshold:g} of each "
                "map's patch mass",
                "rollout": None
                if not rollout_maps
                else f"Abnar & Zuidema 2020: heads fused by {head_fusion}, lowest "
                f"{discard_ratio:g} zeroed, "
                "(A + I) row-normalised, multiplied over blocks 0..layer",
            },
            images=[
                {
                    "id": ids[i],
                    "path": str(files[i]),
                    "prefix_share": [float(v) for v in run.prefix_share[i]],
                }
                for i in range(len(ids))
            ],
            notes=notes,
        )
    for n in notes:
        log.info(n)
    return result


def _run_of(
    ids, out: AttentionBatch, threshold: float, lay: TokenLayout, li: int, hw
) -> AttentionRun:
    heads = out.heads.astype(np.float32)
    mean = heads.mean(axis=1)
    roll = None if out.rollout is None else out.rollout.astype(np.float32)
    return AttentionRun(
        list(ids),
        heads,
        mean,
        threshold_masks(heads, threshold),
        threshold_masks(mean, threshold),
        out.prefix_share.astype(np.float32),
        roll,
        lay,
        li,
        hw,
    )


def _prefix_in_words(lay: TokenLayout) -> str:
    """The prefix tokens in words: ``1 class + 4 register prefix tokens``."""
    parts = [f"{lay.class_tokens} class"]
    if lay.register_tokens:
        parts.append(f"{lay.register_tokens} register")
    if lay.other_prefix:
        parts.append(f"{lay.other_prefix} other (distillation)")
    return " + ".join(parts) + " prefix token" + ("s" if lay.prefix != 1 else "")


# ------------------------------------------------------------------ pictures
def write_overlays(folder: Path, stem: str, rgb: np.ndarray, run: AttentionRun, i: int, *,
                   cmap: str = "inferno") -> None:
    """``<stem>.head<j>.png``, ``.mean.png``, ``.mask.png`` (and ``.rollout.png``) of image i."""
    from featviz.views.sheets import heat_overlay, mask_overlay, save_png

    for j in range(run.heads.shape[1]):
        save_png(heat_overlay(rgb, run.heads[i, j], cmap=cmap), folder / f"{stem}.head{j}.png", min_side=224)
    save_png(heat_overlay(rgb, run.mean[i], cmap=cmap), folder / f"{stem}.mean.png", min_side=224)
    save_png(mask_overlay(rgb, run.mean_mask[i]), folder / f"{stem}.mask.png", min_side=224)
    if run.rollout is not None:
        save_png(heat_overlay(rgb, run.rollout[i], cmap=cmap), folder / f"{stem}.rollout.png", min_side=224)


def contact_sheet(
    path: Path, rgbs: Sequence[np.ndarray], run: AttentionRun, *, title: str = "",
    rows: Sequence[int] | None = None, cmap: str = "inferno",
) -> None:
    """Rows = images; columns = input, each head, the mean over heads, its mask[, rollout].

    ``rgbs[k]`` is image ``rows[k]`` of the run (default: the first ones).
    """
    from featviz.views.sheets import grid_sheet, heat_overlay, mask_overlay

    n_heads = run.heads.shape[1]
    rows = list(range(len(rgbs))) if rows is None else list(rows)
    cells, contours = [], []
    for i, rgb in zip(rows, rgbs, strict=True):
        row = [rgb] + [heat_overlay(rgb, run.heads[i, j], cmap=cmap) for j in range(n_heads)]
        row += [heat_overlay(rgb, run.mean[i], cmap=cmap), mask_overlay(rgb, run.mean_mask[i])]
        cont = [None] + [run.masks[i, j] for j in range(n_heads)] + [None, run.mean_mask[i]]
        if run.rollout is not None:
            row.append(heat_overlay(rgb, run.rollout[i], cmap=cmap))
            cont.append(None)
        cells.append(row)
        contours.append(cont)
    cols = ["input"] + [f"head {j}" for j in range(n_heads)] + ["mean", "mask (mean)"]
    if run.rollout is not None:
        cols.append("rollout")
    grid_sheet(
        path,
        cells,
        col_titles=cols,
        row_labels=[run.ids[i] for i in rows],
        title=title,
        contours=contours,
    )
