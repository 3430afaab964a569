"""Choice names shared by the CLI and the registries (torch-free).

The CLI needs these names for ``--help`` without importing torch; tests keep them in sync
with the registries that hold the real objects.
"""

from __future__ import annotations

from typing import Literal

FormatName = Literal[
    "auto", "featviz", "moco", "moco_v3", "simsiam", "barlow_twins", "vicreg", "swav", "dino", "dinov2",
    "ibot", "ijepa", "msn", "mae", "solo_learn", "lightly", "simclr_v1", "cac", "efficientnet_pytorch", "timm",
    "torchvision", "dinov3", "dinov3_convnext", "open_clip", "franca",
]

CheckpointKey = Literal["teacher", "student", "target_encoder", "encoder"]

MethodName = Literal[
    "simclr", "moco_v2", "moco_v3", "byol", "simsiam", "barlow_twins", "swav", "dino", "supervised_seg", "cac",
]

OptimizerName = Literal["sgd", "adamw", "lars", "larc"]

CropName = Literal["rrc", "contrastive"]
"""``featviz train --crop`` (featviz.data.contrastive_crop.CROPS; a test keeps them in sync)."""

PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]

FigureName = Literal["cac"]

MapMethod = Literal["tsne", "umap", "pca"]

HtmlMode = Literal["auto", "inline", "large"]
"""``featviz tsne --html-mode`` (featviz.maps.large_page.HTML_MODES)."""
"""``featviz tsne --method`` (featviz.maps.projection.MAP_METHODS; a test keeps them in sync)."""

MapBackend = Literal["auto", "opentsne", "torchdr"]
"""``featviz tsne --backend`` (featviz.maps.backends.BACKENDS; a test keeps them in sync)."""

CAM_METHOD_NAMES = (
    "gradcam", "hirescam", "gradcam_elementwise", "gradcam++", "xgradcam", "ablationcam", "scorecam",
    "eigencam", "eigengradcam", "layercam", "fullgrad", "kpca_cam", "fem", "shapleycam", "finercam",
    "seg_eigen_cam", "refinecam", "sess", "random_cam", "legrad", "gae",
)
"""``featviz cam --method`` names (featviz.views.cam.CAM_METHODS holds the classes; a test keeps them in sync)."""
