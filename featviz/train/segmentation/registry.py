"""The segmentation methods' registry, ``SEG_METHODS`` (apart from the SSL methods' ``SSL_METHODS``).

Both methods train a ``featviz.models.segmenter.Segmenter`` with ``SegTask``: ``supervised_seg`` on
the labelled crops alone, ``cac`` adding CAC's directional contrast on unlabelled crop pairs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from featviz.registry import Registry
from featviz.train.optim import Optim


@dataclass(frozen=True)
class SegMethodRegistration:
    """One segmentation method: its optimiser (official and featviz's default) and its source.

    It answers the questions ``featviz.train.config.resolve_config`` asks of any method, as an
    SSL registration (``featviz.train.methods.MethodRegistration``) does: no training views of its
    own (``recipe`` None: ``SegTask`` makes the crops), no local crops, no dataset presets.

    Attributes:
        name: the registered name (``featviz train --method``).
        official: the official optimiser and schedule.
        optim: featviz's default.
        source: the official repository files.
        sync_bn: convert BatchNorm to SyncBatchNorm under CUDA DDP.
        default_arch: the backbone when ``--arch`` is not given (a dilated CPU-sized ResNet).
        default_image_size: the training crop when ``--image-size`` is not given.
    """

    name: str
    official: Optim
    optim: Optim
    source: str
    sync_bn: bool = True
    default_arch: str = "resnet18_w16-os8"
    default_image_size: int | None = 32
    recipe: None = None
    local_crops: int = 0
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def for_family(self, family: str) -> SegMethodRegistration:
        """The same registration: a segmentation method has no per-backbone variants."""
        return self


SEG_METHODS: Registry[SegMethodRegistration] = Registry("segmentation method")


def register(spec: SegMethodRegistration) -> SegMethodRegistration:
    """Register ``spec`` under its name (duplicates raise ``ValueError``)."""
    return SEG_METHODS.register(spec.name)(spec)


register(SegMethodRegistration(
    "supervised_seg",
    official=Optim("sgd", lr=0.01, weight_decay=1e-4, ref_batch=8,
                   source="Context-Aware-Consistency configs/voc_cac_deeplabv3+_resnet50_1over8_datalist0.json"),
    optim=Optim("sgd", lr=0.01, weight_decay=1e-4, ref_batch=8, source="CAC configs"),
    source="dvlab-research/Context-Aware-Consistency (labelled branch only)",
))
register(SegMethodRegistration(
    "cac",
    official=Optim("sgd", lr=0.01, weight_decay=1e-4, ref_batch=8,
                   source="Context-Aware-Consistency configs/voc_cac_deeplabv3+_resnet50_1over8_datalist0.json"),
    optim=Optim("sgd", lr=0.01, weight_decay=1e-4, ref_batch=8, source="CAC configs"),
    source="dvlab-research/Context-Aware-Consistency models/model.py, dataloaders/voc.py",
))
