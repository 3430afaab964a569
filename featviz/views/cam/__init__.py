"""Class activation maps for classifiers, segmenters and SSL encoders, on any named layer.

featviz drives pytorch-grad-cam (grad-cam 1.5.7): every heatmap comes from one of its method
classes, so the numbers are the numbers pytorch-grad-cam computes. Around it featviz adds what
the library leaves to the user (``shared/reference/features-and-apis.md`` §2.1, §5, §6):

* layers by dotted name (``layer4``, ``layer4[-1]``, ``blocks.11.norm1``) with suggestions, and
  a default per architecture (``featviz.models.features.default_cam_layer``: timm's ``feature_info``
  for any timm CNN);
* an automatic ``reshape_transform`` for ViTs from the feature core
  (``featviz.models.features.reshape_transform``: prefix tokens, any grid, non-square included);
* targets as code: ``top1``, ``class:N``, ``seg:CLASS`` and, for encoders without a classifier,
  ``similarity:REF_IMAGE``, ``self`` and ``pair``;
* guard rails: one target per image, errors never swallowed, gradients enabled temporarily on
  frozen or no-grad backbones (state restored), tuple/dict outputs wrapped, hooks always
  released, and blank or noise maps (which min-max scaling hides) flagged with their raw size;
* less work for gradient methods: the trunk below the target layer runs without autograd and
  no weight gradients are computed, so a backward pass only reaches down to the layer.

One module per concern: ``methods`` (the method table and the grad-cam adapter, ``explain``),
``transformer`` (LeGrad and Chefer et al.'s GAE for ViTs, transcribed from the official code, on
the model's own attention probabilities), ``mapstats`` (what min-max scaling hides; the model state
methods run in), ``targets``, ``layers`` (model probing), ``metrics`` (pytorch-grad-cam's
faithfulness for ``--metrics``), ``scores`` (``--score road,deletion,insertion``: RISE's
deletion/insertion AUC batched per map, ROAD), ``run`` (``run_cam``: the whole
command, on the views' one pipeline, ``featviz.views.runner.ViewRunner``) and ``render`` (overlays,
the contact sheet). Their public names are importable from here. The CLI imports this package only
inside ``featviz cam``; the model comes from ``featviz.models.loader.load_model(head=True)``.
"""

from __future__ import annotations

from featviz.views.cam.layers import ModelInfo, OutputSelector, layer_shapes, probe_model
from featviz.views.cam.methods import (
    CAM_METHODS,
    NOISE_RATIO,
    NOT_CAM_METHODS,
    CamMethod,
    GradientError,
    MapStats,
    explain,
    make_cam,
    not_applicable,
    parse_methods,
    release_cam,
)
from featviz.views.cam.metrics import METRIC_DEFINITIONS, ROAD_PERCENTILES, faithfulness
from featviz.views.cam.render import CAM_OVERLAY, CamRun, contact_sheet, overlay_png
from featviz.views.cam.run import CamResult, read_class_names, run_cam
from featviz.views.cam.scores import SCORE_DEFINITIONS, SCORES, parse_scores, score_maps
from featviz.views.cam.targets import (
    TARGET_KINDS,
    CamTarget,
    ClassTarget,
    CosineTarget,
    SegTarget,
    SelfTarget,
    TargetContext,
    TargetSpec,
    augment_views,
    bind_targets,
    check_target,
    default_target,
    make_targets,
    parse_target,
)
from featviz.views.cam.transformer import TRANSFORMER_METHODS, explain_transformer
from featviz.views.runner import image_ids

__all__ = [
    "CAM_METHODS", "CAM_OVERLAY", "METRIC_DEFINITIONS", "NOISE_RATIO", "NOT_CAM_METHODS", "ROAD_PERCENTILES",
    "TARGET_KINDS", "CamMethod", "CamResult", "CamRun", "CamTarget", "ClassTarget", "CosineTarget", "GradientError",
    "MapStats", "ModelInfo", "OutputSelector", "SegTarget", "SelfTarget", "TargetContext", "TargetSpec",
    "augment_views", "bind_targets", "check_target", "contact_sheet", "default_target", "explain", "faithfulness",
    "image_ids", "layer_shapes", "make_cam", "make_targets", "not_applicable", "overlay_png", "parse_methods",
    "parse_target", "probe_model", "read_class_names", "release_cam", "run_cam",
    "SCORES", "SCORE_DEFINITIONS", "TRANSFORMER_METHODS", "explain_transformer", "parse_scores", "score_maps",
]
