"""Faithfulness scores of maps: ROAD and confidence change (pytorch-grad-cam's metrics)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from featviz.views.cam.layers import ModelInfo
from featviz.views.cam.targets import CamTarget

log = logging.getLogger(__name__)



METRIC_DEFINITIONS = {
    "road_morf": "ROAD, most relevant first: mean target change after imputing the top p% pixels, "
                 "p ∈ {20, 40, 60, 80} (lower = more faithful)",
    "road_lerf": "ROAD, least relevant first: mean target change after imputing the bottom p% pixels "
                 "(higher = more faithful)",
    "road_combined": "(road_lerf − road_morf) / 2 (higher = more faithful)",
    "confidence_drop": "max(0, target(x) − target(x · map)): pytorch-grad-cam DropInConfidence (lower = better)",
    "confidence_increase": "1 if target(x · map) > target(x) else 0: IncreaseInConfidence (higher = better)",
}
ROAD_PERCENTILES = (20, 40, 60, 80)


def faithfulness(info: ModelInfo, x: torch.Tensor, maps: np.ndarray, targets: list[CamTarget]) -> dict[str, np.ndarray]:
    """Per-image ROAD and confidence-change scores (pytorch-grad-cam metrics) for bound targets.

    Works for any target, embedding targets included: each target keeps what it bound on the
    clean image (class, direction, reference), so perturbed images are scored against it. The
    definitions are pytorch-grad-cam's (``ROAD*RelevantFirstAverage``, ``DropInConfidence``,
    ``IncreaseInConfidence``); the clean image is scored once instead of once per metric.
    """
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst

    model = info.forward
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    n = len(targets)

    def after(metric) -> np.ndarray:
        return np.asarray(metric(x, maps, targets, model, return_diff=False), np.float64).reshape(n, -1)[:, 0]

    try:
        with torch.no_grad():
            out = model(x)
            base = np.array([float(t(o)) for t, o in zip(targets, out, strict=True)])
            morf = np.mean([after(ROADMostRelevantFirst(p)) - base for p in ROAD_PERCENTILES], axis=0)
            lerf = np.mean([after(ROADLeastRelevantFirst(p)) - base for p in ROAD_PERCENTILES], axis=0)
            change = after(CamMultImageConfidenceChange()) - base
    finally:
        for m, flag in was:
            m.training = flag
    return {"road_morf": morf, "road_lerf": lerf, "road_combined": (lerf - morf) / 2,
            "confidence_drop": np.maximum(-change, 0), "confidence_increase": (change > 0).astype(np.float64)}


