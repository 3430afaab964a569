"""CAC's unsupervised loss (directional context-aware contrast) and its memory of negatives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featviz.errors import DataError
from featviz.models.segmenter import FEATURE_STRIDE

# CAC's defaults: configs/voc_cac_deeplabv3+_resnet50_1over8_datalist0.json "model"
CAC_WEIGHT_UNSUP = 0.1
CAC_TEMP = 0.1
CAC_POS_THRESH = 0.75
CAC_SELECTED_NUM = 6400
CAC_STEP_SAVE = 1
CAC_EPOCH_START_UNSUP = 5
CAC_NEG_CHUNK = 8000  # models/model.py: negatives in chunks of b = 8000; the max of chunk 0 stabilises exp
CAC_EPS = 1e-8


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """CAC's ``concat_all_gather``: ``x`` from every rank in rank order, under ``no_grad``.

    The result carries no gradient (alone: ``x.detach()``), so each rank's loss is its own and
    DDP averages the gradients; nothing assumes the loss is the same on every rank.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x.detach()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.detach().contiguous())
    return torch.cat(out)


def directional_contrast(f1: torch.Tensor, f2: torch.Tensor, conf1: torch.Tensor, conf2: torch.Tensor,
                         label1: torch.Tensor, negatives: torch.Tensor, neg_labels: torch.Tensor, *,
                         temp: float = CAC_TEMP, pos_thresh: float = CAC_POS_THRESH,
                         chunk: int = CAC_NEG_CHUNK) -> torch.Tensor:
    """One direction of CAC's directional context-aware loss, pooled over all anchors given.

    l = -log( e^{pos} / (e^{pos} + sum_{n: label_n != label1} e^{f1 . f_n / temp} + eps) + eps ),
    pos = f1 . sg(f2) / temp; the mean over anchors with M_d = 1[conf2 > pos_thresh and conf1 <
    conf2]: the less confident feature moves toward the more confident one, never the other way.
    As ``models/model.py`` computes it: negatives in chunks of ``chunk`` (8000), the exponentials
    shifted by the row maximum of [pos, chunk 0] (same-label negatives included in that maximum),
    eps = 1e-8 in the denominator and in the log, 1e-12 in the mean.

    Args:
        f1: (P, d) l2-normalised features of the anchors: image pixels in the first crop.
        f2: (P, d) the same pixels' features in the other crop (no gradient flows into them).
        conf1: (P,) max softmax probability per anchor pixel.
        conf2: (P,) the same in the other crop.
        label1: (P,) pseudo labels of the anchors (negatives with the same label are left out).
        negatives: (M, d) sampled pixel features, used as given (CAC gathers them without
            gradient: pass ``gather_no_grad`` output).
        neg_labels: (M,) their pseudo labels.
        temp: the contrast temperature.
        pos_thresh: the confidence a counterpart needs to pull an anchor.
        chunk: negatives per chunk (CAC's 8000; the first chunk's maximum shifts the exponentials).

    Returns:
        The scalar loss (0 when no pixel passes the directional mask).
    """
    if len(f1) == 0:
        return f1.sum() * 0.0
    pos = (f1 * f2.detach()).sum(-1, keepdim=True) / temp  # (P, 1)
    down = f1.new_zeros(len(f1))
    neg_max = None
    for start in range(0, max(1, len(negatives)), chunk):
        negs, labs = negatives[start:start + chunk], neg_labels[start:start + chunk]
        mask = (labs.unsqueeze(0) != label1.unsqueeze(-1)).to(f1.dtype)  # (P, b)
        logits = f1 @ negs.T / temp
        if neg_max is None:
            logits = torch.cat([pos, logits], 1)
            mask = torch.cat([torch.ones_like(pos), mask], 1)
            neg_max = logits.max(1, keepdim=True)[0]
        down = down + (torch.exp(logits - neg_max) * mask).sum(-1)
    prob = torch.exp(pos - neg_max).squeeze(-1) / (down + CAC_EPS)
    m = ((conf2 > pos_thresh) & (conf1 < conf2)).to(f1.dtype)
    loss = -torch.log(prob + CAC_EPS)
    return (loss * m).sum() / (m.sum() + 1e-12)


@dataclass
class CACSettings:
    """CAC's unsupervised-loss settings (``models/model.py``; defaults from its VOC config)."""

    weight_unsup: float = CAC_WEIGHT_UNSUP
    temp: float = CAC_TEMP
    pos_thresh: float = CAC_POS_THRESH
    selected_num: int = CAC_SELECTED_NUM
    step_save: int = CAC_STEP_SAVE
    epoch_start_unsup: int = CAC_EPOCH_START_UNSUP

    @classmethod
    def from_config(cls, cfg: Any) -> CACSettings:
        """Read the settings from a ``TrainConfig`` (attributes it lacks keep CAC's defaults)."""
        return cls(**{k: type(getattr(cls, k))(getattr(cfg, k)) for k in cls.__dataclass_fields__
                      if getattr(cfg, k, None) is not None})

    def to_dict(self) -> dict[str, Any]:
        """The settings by name (the checkpoint's ``hparams``)."""
        return dict(self.__dict__)


def overlap_pixels(maps: list[torch.Tensor], box: tuple[int, int, int, int], flip: bool,
                   stride: int = FEATURE_STRIDE) -> list[torch.Tensor]:
    """Flip each (..., h, w) map of one crop back and cut CAC's overlap ``[ul//8 : br//8]``.

    Each cut is flattened to (n, ...) rows in row-major pixel order (``permute(1, 2, 0).view(-1, c)``
    for features).
    """
    top, left, bottom, right = (int(v) for v in box)
    out = []
    for m in maps:
        m = m.flip(-1) if flip else m
        m = m[..., top // stride:bottom // stride, left // stride:right // stride]
        out.append(m.reshape(-1) if m.ndim == 2 else m.permute(1, 2, 0).reshape(-1, m.shape[0]))
    return out


def cac_unsupervised_loss(z1: torch.Tensor, z2: torch.Tensor, logits1: torch.Tensor, logits2: torch.Tensor,
                          overlap1: torch.Tensor, overlap2: torch.Tensor, flips: torch.Tensor,
                          settings: CACSettings, rng: np.random.Generator,
                          bank: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                          ) -> tuple[torch.Tensor, dict[str, Any]]:
    """CAC's unsupervised loss on one batch of crop pairs (``models/model.py`` ``CAC.forward``, semi).

    Args:
        z1: (B, d, h, w) projected, normalised stride-8 features of crop set 1.
        z2: the same of crop set 2.
        logits1: (B, K, h, w) the classifier on crop set 1's pooled features (detached).
        logits2: the same of crop set 2.
        overlap1: (B, 4) overlap boxes (top, left, bottom, right) in crop 1.
        overlap2: the same in crop 2.
        flips: (B, 2) whether crop 1 / crop 2 was flipped.
        settings: weight_unsup, temp, pos_thresh, selected_num.
        rng: the batch's one sampling draw: ``selected_num`` pixels of each crop set, without
            replacement (CAC: two ``np.random.choice(b*h*w, selected_num, replace=False)``).
        bank: the earlier steps' gathered negatives (oldest first), at most ``step_save``.

    Returns:
        (weight_unsup * (loss1 + loss2), parts) with parts ``loss1``, ``loss2``, ``negatives``
        (this step's gathered (features, labels), for the bank) and ``selected`` (the indices).
    """
    with torch.no_grad():
        p1, p2 = F.softmax(logits1.float(), 1), F.softmax(logits2.float(), 1)
        conf1, lab1 = p1.max(1)
        conf2, lab2 = p2.max(1)
    rows = {k: [] for k in ("f1", "f2", "l1", "l2", "c1", "c2")}
    for i in range(len(z1)):
        f1, l1, c1 = overlap_pixels([z1[i], lab1[i], conf1[i]], overlap1[i].tolist(), bool(flips[i][0]))
        f2, l2, c2 = overlap_pixels([z2[i], lab2[i], conf2[i]], overlap2[i].tolist(), bool(flips[i][1]))
        for k, v in zip(rows, (f1, f2, l1, l2, c1, c2), strict=True):
            rows[k].append(v)
    f1, f2, l1, l2, c1, c2 = (torch.cat(rows[k]) for k in rows)
    if f1.shape != f2.shape:
        raise DataError(f"the overlap boxes of the two crops differ in size ({tuple(f1.shape)} vs {tuple(f2.shape)})")
    b, d, h, w = z1.shape
    n = min(settings.selected_num, b * h * w)
    idx1 = torch.as_tensor(rng.choice(b * h * w, n, replace=False), device=z1.device)
    idx2 = torch.as_tensor(rng.choice(b * h * w, n, replace=False), device=z1.device)
    flat1, flat2 = z1.permute(0, 2, 3, 1).reshape(-1, d), z2.permute(0, 2, 3, 1).reshape(-1, d)
    cur = gather_no_grad(torch.cat([flat1[idx1], flat2[idx2]]))
    cur_labels = gather_no_grad(torch.cat([lab1.reshape(-1)[idx1], lab2.reshape(-1)[idx2]]))
    earlier = list(bank or [])
    negatives = torch.cat([e[0] for e in earlier] + [cur])
    neg_labels = torch.cat([e[1] for e in earlier] + [cur_labels])
    kw = dict(temp=settings.temp, pos_thresh=settings.pos_thresh)
    loss1 = directional_contrast(f1, f2, c1, c2, l1, negatives, neg_labels, **kw)
    loss2 = directional_contrast(f2, f1, c2, c1, l2, negatives, neg_labels, **kw)
    parts = {"loss1": loss1, "loss2": loss2, "negatives": (cur, cur_labels), "selected": (idx1, idx2),
             "n_overlap": int(len(f1))}
    return settings.weight_unsup * (loss1 + loss2), parts


class NegativeBank(nn.Module):
    """CAC's ``step_save`` memory: the gathered negatives of the last ``step_save`` steps.

    Kept as buffers (``state.pt`` saves them, so ``--resume`` replays the same negatives) but not
    exported into the model checkpoint. ``steps`` counts training steps, seeding each step's
    sampling draw.
    """

    def __init__(self, step_save: int, size: int, dim: int):
        """Room for ``step_save`` steps of ``size`` negatives of ``dim`` features."""
        super().__init__()
        self.step_save = step_save
        self.register_buffer("features", torch.zeros(max(step_save, 0), size, dim))
        self.register_buffer("labels", torch.zeros(max(step_save, 0), size, dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def entries(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The kept (features, labels) of earlier steps, oldest first."""
        k = int(self.filled)
        return [(self.features[i], self.labels[i]) for i in range(self.step_save - k, self.step_save)]

    @torch.no_grad()
    def push(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Append this step's negatives, dropping the oldest beyond ``step_save``."""
        if self.step_save <= 0:
            return
        if features.shape != self.features.shape[1:]:
            raise DataError(f"negative bank expects {tuple(self.features.shape[1:])} negatives, got "
                            f"{tuple(features.shape)}")
        self.features.copy_(torch.cat([self.features[1:], features[None].to(self.features)]))
        self.labels.copy_(torch.cat([self.labels[1:], labels[None].to(self.labels)]))
        self.filled.fill_(min(int(self.filled) + 1, self.step_save))

