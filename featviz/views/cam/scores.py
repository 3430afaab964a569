"""Faithfulness scores of each map (``featviz cam --score road,deletion,insertion``).

- **deletion / insertion** (Petsiuk et al., RISE, BMVC 2018; eclique/RISE ``evaluation.py``,
  ``CausalMetric``): the pixels are taken in the map's order (``np.flip(np.argsort(map))``: most
  relevant first), ``step`` at a time; deletion starts from the image and replaces them with the
  baseline (0 in the model's normalised input, i.e. the dataset's mean colour: RISE's
  ``torch.zeros_like``), insertion starts from the blurred image (RISE's ``gkern(11, 5)`` Gaussian,
  ``conv2d`` with padding 5, on the normalised input) and puts them back. The target's score is
  taken after every step (``n + 1`` values, ``n = ceil(H·W / step)``) and the AUC is RISE's
  ``auc``: ``(Σ s − s₀/2 − sₙ/2) / n``. Deletion: lower is better; insertion: higher is better.
  All ``n + 1`` images of one map go through the model in batched forwards.
- **road** (Rong et al., ICML 2022): pytorch-grad-cam's ``ROADCombined`` at ``ROAD_PERCENTILES``:
  the mean over percentiles of ``ROADLeastRelevantFirst`` minus ``ROADMostRelevantFirst`` (each the
  score change after noisy linear imputation), halved. Higher is better.

The score is RISE's for a class: the softmax probability of the class; for the SSL targets the
target's similarity: the cosine similarity of the embedding to the reference (``similarity:``,
``pair``) or to the image's own clean embedding (``self``); for ``seg:`` the class's softmax
probability averaged over the target's mask (``score_target``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from featviz.registry import parse_names
from featviz.views.cam.targets import CamTarget, ClassTarget, SegTarget, SelfTarget

SCORES = ("road", "deletion", "insertion")
HIGHER_IS_BETTER = {"road": True, "deletion": False, "insertion": True}
ROAD_PERCENTILES = (20, 40, 60, 80)
"""The percentiles ``--score road`` averages over (pytorch-grad-cam's ``ROADCombined(percentiles=...)``)."""
DEFAULT_STEPS = 20
BLUR_KLEN, BLUR_NSIG = 11, 5
SCORE_DEFINITIONS = {
    "deletion": "RISE deletion AUC: the target's score as the most relevant pixels are set to the baseline 0 "
                "(normalised input: the mean colour), `step` pixels at a time; (Σs − s₀/2 − sₙ/2)/n; lower = better",
    "insertion": "RISE insertion AUC: the score as the most relevant pixels are put back into the blurred image "
                 f"(Gaussian gkern({BLUR_KLEN}, {BLUR_NSIG})), `step` pixels at a time; higher = better",
    "road": "pytorch-grad-cam ROADCombined: mean over the percentiles of (LeRF − MoRF)/2 score changes after noisy "
            "linear imputation; higher = better",
    "score": "softmax probability of the class (RISE); cosine similarity to the reference (similarity:, pair) or "
             "to the clean embedding (self); seg: the class's mean softmax probability over the mask",
}


def parse_scores(spec: str | Sequence[str] | None) -> list[str]:
    """``"road,deletion"`` (or a list of such, or ``"all"``) -> score names; None or empty -> [].

    Raises:
        UnknownNameError: a name that is not one of ``SCORES`` (with suggestions).
        OptionError: a value that names no score at all (``","``).
    """
    if not spec:
        return []
    return parse_names(spec, SCORES, option="--score", kind="score")


class ScoreTarget:
    """The score a faithfulness metric follows for one bound ``CamTarget`` (see the module docstring)."""

    def __init__(self, target: CamTarget):
        self.target = target

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        """The score of one output (or a batch of them)."""
        t = self.target
        if isinstance(t, ClassTarget):
            return output.float().softmax(-1)[..., t.category]
        if isinstance(t, SelfTarget):
            return F.cosine_similarity(output.float(), t.direction.to(output.device).float(), dim=-1)
        if isinstance(t, SegTarget):
            prob = output.float().softmax(-3)[..., t.category, :, :]
            mask = t.mask.to(output.device).float()
            return (prob * mask).sum(dim=(-2, -1)) / mask.sum()
        return t(output).float()  # CosineTarget: cosine similarity to its reference


def gkern(klen: int = BLUR_KLEN, nsig: float = BLUR_NSIG) -> torch.Tensor:
    """RISE's blurring kernel (3, 3, klen, klen): a Gaussian-smoothed Dirac on the diagonal channels."""
    from scipy.ndimage import gaussian_filter

    inp = np.zeros((klen, klen))
    inp[klen // 2, klen // 2] = 1
    k = gaussian_filter(inp, nsig)
    kern = np.zeros((3, 3, klen, klen))
    for c in range(3):
        kern[c, c] = k
    return torch.from_numpy(kern.astype("float32"))


def blur(x: torch.Tensor) -> torch.Tensor:
    """RISE's insertion substrate: ``conv2d(x, gkern(11, 5), padding=5)``."""
    return F.conv2d(x, gkern().to(x.device, x.dtype), padding=BLUR_KLEN // 2)


def auc(arr: np.ndarray) -> float:
    """RISE's normalised area under the curve: ``(Σ a − a₀/2 − aₙ/2) / n``."""
    return float((arr.sum() - arr[0] / 2 - arr[-1] / 2) / (arr.shape[0] - 1))


def step_pixels(hw: tuple[int, int], steps: int) -> int:
    """Pixels changed per step for ``steps`` steps over an H×W map (RISE's ``step``)."""
    return math.ceil(hw[0] * hw[1] / max(1, int(steps)))


@dataclass
class ScoreCount:
    """Model evaluations a scoring run cost: images forwarded and batched passes."""

    forwards: int = 0
    passes: int = 0
    per_map: dict[str, int] = field(default_factory=dict)


def causal_curve(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, cam: np.ndarray,
                 score: Callable[[torch.Tensor], torch.Tensor], mode: str, step: int, batch_size: int = 32,
                 count: ScoreCount | None = None) -> np.ndarray:
    """RISE's ``CausalMetric.single_run`` scores for one image (1, 3, H, W) and its map (H, W), batched.

    Returns:
        The ``n + 1`` scores, from the start image (clean for deletion, blurred for insertion) on.
    """
    hw = cam.shape[0] * cam.shape[1]
    n_steps = (hw + step - 1) // step
    if mode == "deletion":
        start, finish = x, torch.zeros_like(x)
    else:
        start, finish = blur(x), x
    order = np.flip(np.argsort(cam.reshape(-1, hw), axis=1), axis=-1)[0]  # most relevant first, as RISE
    rank = np.empty(hw, dtype=np.int64)
    rank[order] = np.arange(hw)
    rank_t = torch.from_numpy(rank).to(x.device).view(1, 1, *cam.shape)
    scores = []
    for lo in range(0, n_steps + 1, batch_size):
        ks = torch.arange(lo, min(n_steps + 1, lo + batch_size), device=x.device)
        changed = rank_t < (ks * step).view(-1, 1, 1, 1)  # step i has the first i·step pixels changed
        imgs = torch.where(changed, finish, start)
        with torch.no_grad():
            out = forward(imgs)
        scores.append(score(out).detach().float().cpu().numpy())
        if count is not None:
            count.forwards += len(ks)
            count.passes += 1
    return np.concatenate(scores).astype(np.float64)


def road_scores(model: nn.Module, x: torch.Tensor, maps: np.ndarray, targets: Sequence[Callable],
                percentiles: Sequence[int] = ROAD_PERCENTILES, count: ScoreCount | None = None) -> np.ndarray:
    """pytorch-grad-cam's ``ROADCombined(percentiles)`` for a batch (each image's map, its score target)."""
    from pytorch_grad_cam.metrics.road import ROADCombined

    with torch.no_grad():
        out = np.asarray(ROADCombined(percentiles=list(percentiles))(x, maps, list(targets), model), np.float64)
    if count is not None:  # per percentile, MoRF and LeRF each forward the clean and the imputed batch
        count.forwards += 4 * len(percentiles) * x.shape[0]
        count.passes += 4 * len(percentiles)
    return out.reshape(x.shape[0], -1)[:, 0]


MAX_SCORE_BATCH = 256
"""Perturbed images per forward at most; below it all ``n + 1`` images of one map go in one pass."""


def score_maps(model: nn.Module, x: torch.Tensor, maps: np.ndarray, targets: Sequence[CamTarget],
               scores: Sequence[str], *, steps: int = DEFAULT_STEPS, batch_size: int | None = None,
               percentiles: Sequence[int] = ROAD_PERCENTILES) -> tuple[dict[str, np.ndarray], list[int]]:
    """Every requested score of every image's map: ``({score: (B,)}, forwards per image)``.

    ``model`` is run in eval mode (its mode is restored); targets must be bound (on the clean image).
    """
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    out: dict[str, np.ndarray] = {}
    per_image = [0] * x.shape[0]
    stargets = [ScoreTarget(t) for t in targets]
    step = step_pixels(tuple(maps.shape[-2:]), steps)
    n_steps = (maps.shape[-2] * maps.shape[-1] + step - 1) // step
    batch_size = batch_size or min(n_steps + 1, MAX_SCORE_BATCH)
    try:
        for name in scores:
            if name == "road":
                c = ScoreCount()
                out[name] = road_scores(model, x, maps, stargets, percentiles, c)
                per_image = [p + c.forwards // x.shape[0] for p in per_image]
                continue
            vals = []
            for i in range(x.shape[0]):
                c = ScoreCount()
                curve = causal_curve(model, x[i:i + 1], maps[i], stargets[i], name, step, batch_size, c)
                vals.append(auc(curve))
                per_image[i] += c.forwards
            out[name] = np.asarray(vals)
    finally:
        for m, flag in was:
            m.training = flag
    return out, per_image


def ranking(means: dict[str, dict[str, float]], score: str) -> list[str]:
    """Methods best first by their mean ``score`` (lower first for deletion); NaN means last."""
    sign = -1.0 if HIGHER_IS_BETTER[score] else 1.0
    have = [m for m, d in means.items() if score in d]
    return sorted(have, key=lambda m: (math.isnan(means[m][score]), sign * means[m][score]))
