"""Explanations made for ViTs: LeGrad and Chefer et al.'s generic attention explainability (GAE).

Both differentiate the target with respect to the attention probabilities the model itself computes
(``featviz.views.attention_probs.recording_attention``: timm's unfused path, RoPE included, or
transformers' eager attention), so a ViT with any prefix tokens (class, registers, storage), at any
input size the model takes, non-square included, is explained without a ``reshape_transform``.

- **GAE** (Chefer, Gur & Wolf, ICCV 2021; hila-chefer/Transformer-MM-Explainability's
  ``generate_relevance``): ``R = I``; for every block in order ``R += mean_heads(clamp(∇A ⊙ A, min=0)) @ R``;
  the map is the class token's row of ``R`` over the patch columns (prefix columns dropped),
  upsampled bilinearly by the patch size and min-max scaled.
- **LeGrad** (Bousselham et al., 2024; WalBouss/LeGrad ``compute_legrad_clip``): for each block ``l``
  from ``LEGRAD_LAYER_INDEX`` on, the block's tokens are averaged, put through the model's own
  final norm and head (``forward_head``), and the target is taken of that; its gradient with
  respect to block ``l``'s own attention is clamped at 0, averaged over heads and queries, its
  patch keys form a map, upsampled by the patch size; the maps are summed over blocks and min-max
  scaled.

Two generalisations of the official code, which handles a class token only, are named in
``docs/cam.md``: the prefix tokens dropped are all of them (registers too), and a model without a
class token (average pooling) reads GAE's relevance as the mean of the patch rows (``GAE_POOLED_ROW``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from featviz.errors import ArchitectureError
from featviz.models.features import TokenLayout, token_layout
from featviz.views.attention_probs import recording_attention
from featviz.views.cam.layers import ModelInfo
from featviz.views.cam.mapstats import MapStats, classify, model_state
from featviz.views.cam.targets import CamTarget

log = logging.getLogger(__name__)

TRANSFORMER_METHODS = ("legrad", "gae")
LEGRAD_LAYER_INDEX = -2
"""The first block LeGrad reads, as the official ``LeWrapper(model, layer_index=-2)``: the last two blocks."""
GAE_POOLED_ROW = "class token's row; without a class token, the mean of the patch tokens' rows"
CNN_METHODS = "gradcam, gradcam++, layercam, scorecam, eigencam"


def transformer_blocks(model: nn.Module) -> Sequence[nn.Module] | None:
    """The transformer blocks of a ViT (timm, or featviz's Hugging Face adapter); None for a CNN."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or getattr(model, "patch_embed", None) is None or not len(blocks):
        return None
    return blocks


def why_not(method: str, model: nn.Module) -> str | None:
    """Why ``method`` (legrad/gae) cannot explain ``model`` (None when it can): one line."""
    if transformer_blocks(model) is None:
        return (f"{method} explains a vision transformer through its attention, and this model has no transformer "
                f"blocks (a CNN); use a CNN method: {CNN_METHODS}")
    if method == "legrad" and not callable(getattr(model, "forward_head", None)):
        return (f"legrad puts each block's tokens through the model's own norm and head (timm's forward_head), and "
                f"{type(model).__name__} has none; use gae")
    return None


def _upsample_minmax(maps: torch.Tensor, layout: TokenLayout) -> tuple[np.ndarray, torch.Tensor]:
    """(B, gh, gw) patch maps -> bilinear × patch size (the official ``F.interpolate``), min-max per map."""
    up = F.interpolate(maps[:, None].float(), scale_factor=layout.patch, mode="bilinear")[:, 0]
    lo = up.flatten(1).min(1)[0][:, None, None]
    hi = up.flatten(1).max(1)[0][:, None, None]
    span = hi - lo
    scaled = torch.where(span > 0, (up - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                         torch.zeros_like(up))
    return scaled.detach().cpu().numpy().astype(np.float32), up


def _stats(raw: torch.Tensor, grads: Sequence[torch.Tensor], targets: list[CamTarget]) -> list[MapStats]:
    out = []
    for i, t in enumerate(targets):
        r = raw[i].detach().double().clamp(min=0)
        g = float(torch.sqrt(sum((gr[i].detach().double() ** 2).sum() for gr in grads)))
        mx = float(r.max()) if torch.isfinite(r).all() else float("nan")
        out.append(classify(MapStats(mx, float(r.mean()), g), t.slope))
    return out


def _bind(targets: list[CamTarget], out: torch.Tensor) -> None:
    for t, o in zip(targets, out, strict=True):
        if not t.bound:
            t.bind(o.detach())


def _objective(targets: list[CamTarget], out: torch.Tensor) -> torch.Tensor:
    return torch.stack([t(o) for t, o in zip(targets, out, strict=True)]).sum()


def explain_transformer(info: ModelInfo, model: nn.Module, x: torch.Tensor, method: str, targets: list[CamTarget],
                        *, legrad_layer_index: int = LEGRAD_LAYER_INDEX) -> tuple[np.ndarray, list[MapStats]]:
    """LeGrad's or GAE's maps for a batch (one target per image), as ``explain`` returns them.

    Args:
        info: The probed model (``probe_model``); ``info.forward`` is run.
        model: The ViT itself (its blocks, token layout and, for LeGrad, ``norm`` and ``forward_head``).
        x: Normalised images (B, 3, H, W) on the model's device.
        method: ``legrad`` or ``gae``.
        targets: One target per image; bound on this batch's clean output when not yet.
        legrad_layer_index: LeGrad's first block (negative: from the end), the official ``layer_index``.

    Returns:
        maps (B, H, W) float32 in [0, 1] and per-image ``MapStats`` (raw map before scaling).

    Raises:
        ValueError: not one target per image.
        ArchitectureError: a CNN, an attention featviz cannot read exactly, or (LeGrad) a head
            that is not the model's output.
    """
    if len(targets) != x.shape[0]:
        raise ValueError(f"one target per image is required: got {len(targets)} targets for {x.shape[0]} images")
    why = why_not(method, model)
    if why:
        raise ArchitectureError(why)
    blocks = transformer_blocks(model)
    assert blocks is not None
    layout = token_layout(model, tuple(x.shape[-2:]))
    assert layout is not None
    n = len(blocks)
    if method == "gae":
        indices = list(range(n))
    else:
        start = legrad_layer_index if legrad_layer_index >= 0 else n + legrad_layer_index
        indices = list(range(max(0, start), n))
    tokens = layout.prefix + layout.grid[0] * layout.grid[1]
    with model_state(info.forward), recording_attention(model, blocks, indices) as rec:
        xin = x.detach().clone().requires_grad_(True)  # the graph starts at the input; no weight gradients
        feats: dict[int, torch.Tensor] = {}
        handles = []
        if method == "legrad":
            handles = [blocks[i].register_forward_hook(_keep(feats, i)) for i in indices]
        try:
            out = info.forward(xin)
        finally:
            for h in handles:
                h.remove()
        _bind(targets, out)
        attn = rec.probabilities(tokens, x.shape[0])
        if method == "gae":
            raw, grads = _gae(attn, indices, targets, out, layout)
        else:
            raw, grads = _legrad(model, attn, feats, indices, targets, out, layout)
    maps, up = _upsample_minmax(raw, layout)
    return maps, _stats(up, grads, targets)


def _keep(store: dict[int, torch.Tensor], i: int):
    def hook(_m, _args, output):
        store[i] = output[0] if isinstance(output, (tuple, list)) else output

    return hook


def _gae(attn: dict[int, torch.Tensor], indices: list[int], targets: list[CamTarget], out: torch.Tensor,
         layout: TokenLayout) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Chefer et al.'s relevance: R = I; R += mean_heads(clamp(∇A ⊙ A, min=0)) @ R, block by block."""
    probs = [attn[i] for i in indices]
    grads = torch.autograd.grad(_objective(targets, out), probs)
    b, _, t, _ = probs[0].shape
    r = torch.eye(t, device=probs[0].device, dtype=torch.float64).expand(b, t, t).clone()
    for a, g in zip(probs, grads, strict=True):
        cam = (g.double() * a.detach().double()).clamp(min=0).mean(dim=1)
        r = r + cam @ r
    p = layout.prefix
    row = r[:, 0, p:] if layout.class_tokens >= 1 else r[:, p:, p:].mean(dim=1)
    return row.reshape(b, *layout.grid), list(grads)


def _legrad(model: nn.Module, attn: dict[int, torch.Tensor], feats: dict[int, torch.Tensor], indices: list[int],
            targets: list[CamTarget], out: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, list]:
    """LeGrad: per block, ∂ target(head(norm(mean of its tokens))) / ∂ its attention, clamped, averaged."""
    _check_head(model, feats[indices[-1]], out)
    total = None
    grads = []
    for k, i in enumerate(indices):
        tok = feats[i]
        pooled = tok.mean(dim=1, keepdim=True).expand_as(tok)  # every token the mean: any pooling reads it
        score = _objective(targets, model.forward_head(model.norm(pooled)))
        (g,) = torch.autograd.grad(score, [attn[i]], retain_graph=k < len(indices) - 1)
        grads.append(g)
        rel = g.double().clamp(min=0).mean(dim=1).mean(dim=1)[:, layout.prefix:]  # heads, then queries
        total = rel if total is None else total + rel
    assert total is not None
    # the official code sums the maps after upsampling; bilinear upsampling is linear, so this is the same
    return total.reshape(out.shape[0], *layout.grid), grads


def _check_head(model: nn.Module, last: torch.Tensor, out: torch.Tensor) -> None:
    """LeGrad reads the model's head: its output on the last block's tokens must be the model's output."""
    with torch.no_grad():
        mine = model.forward_head(model.norm(last.detach()))
    if mine.shape != out.shape or not torch.allclose(mine.float(), out.detach().float(), rtol=1e-3, atol=1e-4):
        raise ArchitectureError(
            "legrad puts each block's tokens through the model's norm and forward_head, but those do not give this "
            "model's output from its last block (a wrapper or extra head on top?); use gae")
