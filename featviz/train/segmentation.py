"""Semantic segmentation: DeepLabv3+ segmenters, their checkpoints, VOC-layout data, supervised and CAC training.

``Segmenter`` = a torchvision ResNet backbone (dilated by ``-os8``/``-os16`` arch names) plus a
DeepLabv3+ head (ASPP on ``layer4``, a 1x1-reduced ``layer1`` skip, two 3x3 convs, a 1x1
classifier) and, for CAC, a projector. ``forward`` returns per-pixel logits ``(N, C, H, W)`` at
the input size.

Two checkpoint layouts load whole (``load_segmenter``; ``segmenter_layout`` tells them apart from
the header or key names alone):

- ``featviz``: ``backbone.*`` + ``head.*`` (+ ``projector.*``), specs in the ``featviz`` metadata;
- ``cac``: CAC's official DeepLabv3+ checkpoints (dvlab-research/Context-Aware-Consistency,
  ``trainer.py``/``base/base_trainer.py``: ``{"state_dict": model.state_dict(), "config": ...}``),
  keys ``[module.]encoder.backbone.*`` (its ResNet-50/101), ``encoder.aspp.*``, ``encoder.decoder.*``,
  ``classifier.1.*`` and ``project.*``; output stride 16 (its code's default) or 8.

CAC (Lai et al., "Semi-supervised Semantic Segmentation with Directional Context-aware
Consistency", CVPR 2021) trains, on two overlapping crops of an unlabelled image, a projector
(Conv1x1 -> ReLU -> Conv1x1, l2-normalised) on the stride-8 decoder features with the directional
contrastive loss: each overlap pixel is pulled toward its counterpart in the other crop only where
that counterpart is the more confident one (and above ``pos_thresh``); negatives are
``selected_num`` random pixels per crop set, gathered from every rank without gradient and kept
for ``step_save`` more steps, whose pseudo label differs from the anchor's. ``SegTask`` (method
``cac``) follows ``models/model.py`` ``CAC.forward`` line by line; docs/train.md lists CAC's
defaults beside featviz's.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from featviz.data.images import IMAGENET_MEAN, IMAGENET_STD, load_image
from featviz.data.masks import IGNORE_INDEX
from featviz.errors import CheckpointError, DataError
from featviz.models.description import IMAGENET, ModelDescription, Normalization, attach, describe

log = logging.getLogger(__name__)

FEATURE_STRIDE = 8  # CAC's pixel features: decoder output avg-pooled from stride 4 to 8

# CAC's defaults: configs/voc_cac_deeplabv3+_resnet50_1over8_datalist0.json "model"
CAC_WEIGHT_UNSUP = 0.1
CAC_TEMP = 0.1
CAC_POS_THRESH = 0.75
CAC_SELECTED_NUM = 6400
CAC_STEP_SAVE = 1
CAC_EPOCH_START_UNSUP = 5
CAC_NEG_CHUNK = 8000  # models/model.py: negatives in chunks of b = 8000; the max of chunk 0 stabilises exp
CAC_EPS = 1e-8

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle"]


# ---------------------------------------------------------------- model
def _conv_bn(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class DeepLabV3PlusHead(nn.Module):
    """ASPP on the deep features + a low-level skip from ``layer1`` -> decoder features and logits.

    The same computation as CAC's ``models/modeling/{aspp,decoder}.py`` plus its classifier
    (``Dropout(0.1)`` + 1x1 conv) when built with ``align_corners=True``, ``decoder_dropout=0.5``,
    ``classifier_dropout=0.1`` (what ``head_spec`` writes now; older featviz checkpoints have
    neither dropout and ``align_corners=False``). Dropout layers hold no weights, so the tensor
    names are the same either way.
    """

    def __init__(self, in_ch: int, low_ch: int, num_classes: int, dim: int = 256, low_dim: int = 48,
                 rates: tuple[int, ...] = (6, 12, 18), *, align_corners: bool = False, decoder_dropout: float = 0.0,
                 classifier_dropout: float = 0.0):
        super().__init__()
        from torchvision.models.segmentation.deeplabv3 import ASPP

        self.aspp = ASPP(in_ch, list(rates), dim)  # 1x1, three atrous 3x3, image pooling; 1x1 project, Dropout(0.5)
        self.low = _conv_bn(low_ch, low_dim, 1)
        self.fuse = nn.Sequential(_conv_bn(dim + low_dim, dim, 3), _conv_bn(dim, dim, 3))
        self.fuse_dropout = nn.Dropout(decoder_dropout)  # CAC: between the two 3x3 convs
        self.classifier_dropout = nn.Dropout(classifier_dropout)
        self.classifier = nn.Conv2d(dim, num_classes, 1)
        self.align_corners = align_corners

    def features(self, deep: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """Decoder features (N, dim, H/4, W/4): the 256-d output CAC's encoder returns."""
        x = self.aspp(deep)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        x = self.fuse[0](torch.cat([x, self.low(low)], dim=1))
        return self.fuse[1](self.fuse_dropout(x))

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        """Logits at ``f``'s resolution (CAC's ``classifier``: dropout, then the 1x1 conv)."""
        return self.classifier(self.classifier_dropout(f))


def head_spec(backbone: nn.Module, num_classes: int, crop_size: int) -> dict[str, Any]:
    """A DeepLabv3+ head spec scaled to the backbone width and crop size (ResNet-50: 256/48, 6/12/18)."""
    c1, c4 = (getattr(blk, "conv3", blk.conv2).out_channels for blk in (backbone.layer1[-1], backbone.layer4[-1]))
    dim = int(min(256, max(32, c4 // 2)))
    stride = _output_stride(backbone)
    fmap = max(1, crop_size // stride)
    # DeepLab's 6/12/18 suit a 20-cell map at output stride 16 (CAC: crop 320); scale to ours
    rates = tuple(sorted({max(1, round(r * fmap / 20)) for r in (6, 12, 18)}))
    return {"type": "deeplabv3plus", "in_ch": int(c4), "low_ch": int(c1), "num_classes": int(num_classes),
            "dim": dim, "low_dim": max(8, dim * 48 // 256), "rates": list(rates),
            "align_corners": True, "decoder_dropout": 0.5, "classifier_dropout": 0.1}


def _output_stride(backbone: nn.Module) -> int:
    name = describe(backbone).name
    stride = 8 if name.endswith("-os8") else 16 if name.endswith("-os16") else 32
    return stride // 4 if "-cifar" in name else stride


def _low_stride(backbone: nn.Module) -> int:
    """Stride of ``layer1`` (the decoder's resolution): 4, or 1 with a CIFAR stem."""
    return 1 if "-cifar" in describe(backbone).name else 4


class Segmenter(nn.Module):
    """A ResNet backbone + DeepLabv3+ head (+ CAC projector); ``forward`` -> logits (N, C, H, W).

    ``pixel_features(x, "decoder" | "projector")`` are CAC's stride-8 pixel features: the decoder
    output avg-pooled to stride 8 (the classifier's input on unlabelled crops) and its
    l2-normalised projection. ``forward(x, u1, u2)`` is one training step's network pass in CAC's
    order (labelled batch, then each unlabelled crop set separately), so DDP sees a single forward.
    """

    feature_stride = FEATURE_STRIDE

    def __init__(self, backbone: nn.Module, head: dict[str, Any], projector: dict[str, Any] | None = None,
                 class_names: list[str] | None = None):
        super().__init__()
        if not hasattr(backbone, "layer4"):
            from featviz.errors import ArchitectureError

            raise ArchitectureError(f"segmentation needs a torchvision ResNet backbone, got "
                                    f"{describe(backbone).name!r}; use e.g. resnet50-os16 or resnet18_w16-os8")
        self.backbone = backbone
        self.head_spec, self.projector_spec = dict(head), projector
        self.head = DeepLabV3PlusHead(head["in_ch"], head["low_ch"], head["num_classes"], head["dim"],
                                      head["low_dim"], tuple(head["rates"]),
                                      align_corners=bool(head.get("align_corners", False)),
                                      decoder_dropout=float(head.get("decoder_dropout", 0.0)),
                                      classifier_dropout=float(head.get("classifier_dropout", 0.0)))
        self.projector = None
        if projector is not None:  # CAC: Conv1x1(out_dim) -> ReLU -> Conv1x1(proj_final_dim)
            hidden = int(projector.get("hidden", head["dim"]))
            self.projector = nn.Sequential(nn.Conv2d(head["dim"], hidden, 1), nn.ReLU(inplace=True),
                                           nn.Conv2d(hidden, projector["out"], 1))
        self.num_classes = head["num_classes"]
        self.class_names = list(class_names or [str(i) for i in range(self.num_classes)])

    def _stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        low = b.layer1(x)
        return b.layer4(b.layer3(b.layer2(low))), low

    def decoder_features(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder features at ``layer1``'s stride (4; 1 with a CIFAR stem)."""
        deep, low = self._stages(x)
        return self.head.features(deep, low)

    def to_stride8(self, f: torch.Tensor) -> torch.Tensor:
        """Average-pool decoder features to stride 8 (CAC: ``avg_pool2d(2)`` from stride 4)."""
        k = FEATURE_STRIDE // _low_stride(self.backbone)
        return F.avg_pool2d(f, k) if k > 1 else f

    def project(self, f: torch.Tensor) -> torch.Tensor:
        """CAC's projection of stride-8 decoder features, l2-normalised over channels."""
        if self.projector is None:
            raise CheckpointError("this segmenter has no CAC projector (a supervised-only model); "
                                  "use the decoder features")
        return F.normalize(self.projector(f), dim=1)

    def pixel_features(self, x: torch.Tensor, which: str = "decoder") -> torch.Tensor:
        """Stride-8 pixel features as CAC contrasts them: ``decoder`` (the 256-d decoder output
        avg-pooled by 2; the classifier's input) or ``projector`` (l2-normalised; CAC models only)."""
        if which not in ("decoder", "projector"):
            raise ValueError(f"which must be 'decoder' or 'projector', got {which!r}")
        f = self.to_stride8(self.decoder_features(x))
        return self.project(f) if which == "projector" else f

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input size: the classifier on the stride-4 decoder features, upsampled
        bilinearly (CAC's eval and labelled-branch path)."""
        out = self.head.classify(self.decoder_features(x))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=self.head.align_corners)

    def forward(self, x: torch.Tensor, u1: torch.Tensor | None = None, u2: torch.Tensor | None = None):
        """Logits (N, C, H, W); with unlabelled crop sets ``u1``, ``u2`` also, per set, a dict of
        ``z`` (projected, normalised stride-8 features) and ``logits`` (the classifier on the pooled
        features, computed without gradient: CAC detaches them into pseudo labels and confidences)."""
        out = self.logits(x)
        if u1 is None:
            return out
        sets = []
        for u in (u1, u2):
            f = self.to_stride8(self.decoder_features(u))
            z = self.project(f)
            with torch.no_grad():
                cls = self.head.classify(f)
            sets.append({"z": z, "logits": cls})
        return out, sets[0], sets[1]


# ---------------------------------------------------------------- checkpoints -> segmenters
_CAC_PARTS = ("encoder.backbone.", "encoder.aspp.", "encoder.decoder.", "classifier.1.weight")


def _cac_module_prefix(keys) -> str | None:
    """``"module."`` or ``""`` when ``keys`` are CAC's DeepLabv3+ model (DDP-saved or not); None otherwise."""
    keys = list(keys)
    for m in ("module.", ""):
        if all(any(k.startswith(m + p) for k in keys) for p in _CAC_PARTS):
            return m
    return None


def _state_dict_of(obj: Any) -> dict[str, Any] | None:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        return obj
    return None


def segmenter_layout(path: str | os.PathLike, *, trust: bool = False) -> str | None:
    """Which whole-segmenter layout a checkpoint has: ``"featviz"``, ``"cac"`` or None.

    Reads only the safetensors header, or the pickle's key names (``torch.load`` with
    ``weights_only=True`` and ``mmap=True``: no code runs and no tensor data is read). A file that
    cannot be read that way gives None; the real load then reports why. With ``trust`` a pickle
    outside the allow-list is read in full (``weights_only=False``; only for files you trust).
    """
    from featviz.models.checkpoints import featviz_metadata, sniff

    path = Path(path)
    meta = featviz_metadata(path)
    if meta is not None:
        return "featviz" if "head" in (meta.get("heads") or {}) else None
    try:
        kind = sniff(path)
    except CheckpointError:
        return None
    if kind == "safetensors":
        return None  # a safetensors file without featviz metadata holds no head specs
    try:
        from featviz.models.checkpoints import allowed_globals  # the allow-list read_checkpoint uses

        with torch.serialization.safe_globals(allowed_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except Exception:  # noqa: BLE001 - unreadable here: not ours to classify
        if not trust:
            return None
        from featviz.models.checkpoints import read_checkpoint

        try:
            obj = read_checkpoint(path, trust=True).obj
        except CheckpointError:
            return None
    sd = _state_dict_of(obj)
    return "cac" if sd is not None and _cac_module_prefix(sd) is not None else None


def load_segmenter(path: str | os.PathLike, *, trust: bool = False, output_stride: int | None = None,
                   class_names: list[str] | None = None) -> Segmenter:
    """Rebuild a whole ``Segmenter`` (eval mode) from a featviz segmentation checkpoint or one of
    CAC's official DeepLabv3+ checkpoints.

    The model's ``forward`` gives per-pixel logits (N, C, H, W); ``class_names`` and its
    ``ModelDescription`` (``featviz.models.description.describe``: kind ``segmenter``, method, classes,
    normalisation) are attached. ``describe(model).source`` holds the layout (``format``:
    ``featviz`` | ``cac``), ``crop`` (the crop and base size it was trained with, when known) and
    ``output_stride``.

    Args:
        path: the checkpoint.
        trust: read a pickle with ``weights_only=False`` (only for files you trust).
        output_stride: CAC checkpoints: 8 or 16 (default: the config's, else 16, the value CAC's
            ``DeepLab`` is built with). The weights are the same for both; the dilation differs.
        class_names: override the class names (default: featviz metadata; CAC: VOC's 21 or
            Cityscapes' 19 classes by the config's dataset and the classifier's size).

    Raises:
        CheckpointError: neither layout, or the tensors do not fit it.
    """
    from featviz.models.checkpoints import read_checkpoint

    ck = read_checkpoint(path, trust=trust)
    meta = ck.featviz_meta
    if meta is not None:
        model = _featviz_segmenter(ck, meta, Path(path))
    else:
        sd = _state_dict_of(ck.obj)
        prefix = _cac_module_prefix(sd) if sd is not None else None
        if prefix is None:
            psp = sd is not None and any(k.removeprefix("module.").startswith("encoder.") for k in sd) and not \
                any(".aspp." in k for k in sd)
            raise CheckpointError(
                f"{Path(path).name} is not a whole segmenter: "
                + ("it looks like CAC's PSPNet variant (backbone 'psp'), which featviz does not rebuild; "
                   if psp else "")
                + "expected a featviz segmentation checkpoint (`featviz train -m supervised_seg|cac`) or CAC's "
                "DeepLabv3+ checkpoint (keys encoder.backbone/aspp/decoder.*, classifier.1.*); "
                "use its encoder alone with --features backbone")
        config = ck.obj.get("config") if isinstance(ck.obj, dict) and isinstance(ck.obj.get("config"), dict) else {}
        model = _cac_segmenter(sd, prefix, config, Path(path), output_stride)
    if class_names is not None:
        if len(class_names) != model.num_classes:
            raise CheckpointError(f"{len(class_names)} class names for a {model.num_classes}-class segmenter")
        model.class_names = list(class_names)
        attach(model, describe(model).with_changes(class_names=tuple(class_names)))
    return model.eval()


def describe_segmenter(model: Segmenter) -> dict[str, Any]:
    """What ``inspect`` shows of a whole segmenter: layout, backbone, strides, head widths, classes."""
    spec, desc = model.head_spec, describe(model)
    src = desc.source or {}
    return {"kind": "segmenter", "layout": src.get("format"), "method": desc.method, "arch": desc.name,
            "output_stride": src.get("output_stride") or _output_stride(model.backbone),
            "dilation": src.get("dilation", "torchvision"), "aspp_rates": list(spec["rates"]),
            "decoder_dim": int(spec["dim"]), "feature_stride": FEATURE_STRIDE,
            "projector_dim": None if model.projector is None else int(model.projector[-1].out_channels),
            "num_classes": model.num_classes, "class_names": list(model.class_names),
            "trained_crop": src.get("crop")}


def _featviz_segmenter(ck, meta: dict[str, Any], path: Path) -> Segmenter:
    from featviz.models.architectures import ArchSpec, build_backbone

    heads = meta.get("heads") or {}
    if "head" not in heads:
        raise CheckpointError(f"{path.name} holds no segmentation head (method {meta.get('method')!r}); "
                              "expected a checkpoint from `featviz train --method supervised_seg|cac`")
    with torch.device("meta"):  # no random init: every tensor comes from the file
        backbone = build_backbone(ArchSpec.from_dict(meta["arch"])).train()
        model = Segmenter(backbone, heads["head"], heads.get("projector"), meta.get("class_names"))
    missing, unexpected = _assign(model, ck.obj)
    if missing or unexpected:
        raise CheckpointError(f"{path.name} does not fit its own metadata: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    norm = Normalization.from_dict(meta["normalization"], "featviz checkpoint metadata") \
        if meta.get("normalization") else IMAGENET
    source = {"format": "featviz", "path": str(path), "heads": sorted(heads), "crop": meta.get("crop"),
              "output_stride": _output_stride(backbone)}
    attach(model, ModelDescription(
        arch=describe(backbone).arch, kind="segmenter", head="head", num_classes=model.num_classes,
        class_names=tuple(model.class_names), normalization=norm, input_size=describe(backbone).input_size,
        method=meta.get("method"), source=source))
    return model


def _assign(model: nn.Module, sd: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load ``sd`` into a model built on the meta device (float tensors as float32); returns
    (missing, unexpected) keys. Anything left on the meta device counts as missing."""
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    return sorted(set(missing) | set(left)), list(unexpected)


def cac_dilate(backbone: nn.Module, output_stride: int, multi_grid: tuple[int, ...] = (1, 2, 4)) -> nn.Module:
    """Give a torchvision Bottleneck ResNet the strides and dilations of CAC's DeepLab ResNet.

    CAC's ``models/modeling/backbone/resnet.py``: output stride 16 = strides (1, 2, 2, 1),
    dilations (1, 1, 1, 2); 8 = strides (1, 2, 1, 1), dilations (1, 1, 2, 4). Every block of a
    stage takes the stage's dilation (torchvision keeps the previous rate in a stage's first
    block), and ``layer4`` is a multi-grid unit: block i is dilated by ``multi_grid[i] * rate``.
    Weights keep their shapes; only conv strides, dilations and paddings change.
    """
    if output_stride not in (8, 16):
        raise CheckpointError(f"CAC's DeepLab ResNet has output stride 8 or 16, not {output_stride}")
    plan = {16: {"layer3": (2, 1), "layer4": (1, 2)}, 8: {"layer3": (1, 2), "layer4": (1, 4)}}[output_stride]
    for name, (stride, rate) in plan.items():
        layer = getattr(backbone, name)
        for i, blk in enumerate(layer):
            s = stride if i == 0 else 1
            d = rate * (multi_grid[i] if name == "layer4" else 1)
            blk.conv2.stride, blk.conv2.dilation, blk.conv2.padding = (s, s), (d, d), (d, d)
            if blk.downsample is not None:
                blk.downsample[0].stride = (s, s)
    return backbone


def cac_key_map(prefix: str = "") -> list[tuple[str, str]]:
    """(CAC name prefix, featviz name prefix) pairs that rename CAC's DeepLabv3+ tensors."""
    m = prefix
    pairs = [(f"{m}encoder.backbone.", "backbone.")]
    for k in range(4):  # aspp1 (1x1) and aspp2-4 (atrous 3x3): torchvision's ASPP.convs[0..3]
        pairs += [(f"{m}encoder.aspp.aspp{k + 1}.atrous_conv.", f"head.aspp.convs.{k}.0."),
                  (f"{m}encoder.aspp.aspp{k + 1}.bn.", f"head.aspp.convs.{k}.1.")]
    pairs += [(f"{m}encoder.aspp.global_avg_pool.1.", "head.aspp.convs.4.1."),
              (f"{m}encoder.aspp.global_avg_pool.2.", "head.aspp.convs.4.2."),
              (f"{m}encoder.aspp.conv1.", "head.aspp.project.0."), (f"{m}encoder.aspp.bn1.", "head.aspp.project.1."),
              (f"{m}encoder.decoder.conv1.", "head.low.0."), (f"{m}encoder.decoder.bn1.", "head.low.1."),
              (f"{m}encoder.decoder.last_conv.0.", "head.fuse.0.0."),
              (f"{m}encoder.decoder.last_conv.1.", "head.fuse.0.1."),
              (f"{m}encoder.decoder.last_conv.4.", "head.fuse.1.0."),
              (f"{m}encoder.decoder.last_conv.5.", "head.fuse.1.1."),
              (f"{m}classifier.1.", "head.classifier."),
              (f"{m}project.0.", "projector.0."), (f"{m}project.2.", "projector.2.")]
    return pairs


def _cac_segmenter(sd: dict[str, torch.Tensor], prefix: str, config: dict[str, Any], path: Path,
                   output_stride: int | None) -> Segmenter:
    from featviz.models.architectures import build_backbone

    pairs = cac_key_map(prefix)
    renamed, unclaimed = {}, []
    for k, v in sd.items():
        hit = next(((a, b) for a, b in pairs if k.startswith(a)), None)
        if hit is None:
            unclaimed.append(k)
        else:
            renamed[hit[1] + k[len(hit[0]):]] = v
    if unclaimed:
        raise CheckpointError(f"{path.name}: {len(unclaimed)} tensors are not part of CAC's DeepLabv3+ "
                              f"(e.g. {unclaimed[:3]}); is this a modified model?")
    mcfg = config.get("model") if isinstance(config.get("model"), dict) else {}
    n3 = len({k.split(".")[2] for k in renamed if k.startswith("backbone.layer3.")})
    depth = {6: 50, 23: 101}.get(n3)
    if depth is None or "backbone.layer1.0.conv3.weight" not in renamed:
        raise CheckpointError(f"{path.name}: CAC's DeepLabv3+ uses a Bottleneck ResNet-50 or -101; this backbone "
                              f"has {n3} blocks in layer3")
    os_ = int(output_stride or mcfg.get("output_stride") or 16)
    if os_ not in (8, 16):
        raise CheckpointError(f"output stride {os_}: CAC's DeepLab supports 8 or 16")
    with torch.device("meta"):  # no random init: every tensor comes from the file
        backbone = cac_dilate(build_backbone(f"resnet{depth}-os{os_}"), os_).train()
    w = renamed
    num_classes = int(w["head.classifier.weight"].shape[0])
    head = {"type": "deeplabv3plus", "in_ch": int(w["head.aspp.convs.0.0.weight"].shape[1]),
            "low_ch": int(w["head.low.0.weight"].shape[1]), "num_classes": num_classes,
            "dim": int(w["head.aspp.project.0.weight"].shape[0]), "low_dim": int(w["head.low.0.weight"].shape[0]),
            # CAC's aspp.py: dilations [1, 6, 12, 18] at output stride 16, [1, 12, 24, 36] at 8
            "rates": [6, 12, 18] if os_ == 16 else [12, 24, 36],
            "align_corners": True, "decoder_dropout": 0.5, "classifier_dropout": 0.1}
    proj = None
    if "projector.2.weight" in w:
        proj = {"type": "conv_mlp", "out": int(w["projector.2.weight"].shape[0]),
                "hidden": int(w["projector.0.weight"].shape[0])}
    dataset = str(config.get("dataset", "")).lower()
    names = VOC_CLASSES if num_classes == 21 and dataset in ("", "voc") else \
        CITYSCAPES_CLASSES if num_classes == 19 and dataset in ("", "cityscapes", "city") else None
    with torch.device("meta"):
        model = Segmenter(backbone, head, proj, names)
    missing, unexpected = _assign(model, renamed)
    if missing or unexpected:
        raise CheckpointError(f"{path.name} does not fit CAC's DeepLabv3+ (ResNet-{depth}): missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    semi = bool(mcfg.get("semi", proj is not None))
    tr = config.get("train_unsupervised") or config.get("train_supervised") or {}
    known = isinstance(tr, dict) and isinstance(tr.get("crop_size"), int) and isinstance(tr.get("base_size"), int)
    source = {"format": "cac", "path": str(path), "heads": ["head", *(["projector"] if proj else [])],
              "crop": {"crop_size": int(tr["crop_size"]), "base_size": int(tr["base_size"])} if known else None,
              "output_stride": os_, "dilation": "CAC multi-grid (1, 2, 4)", "state_dict_prefix": prefix}
    attach(model, ModelDescription(
        arch=describe(backbone).arch, kind="segmenter", head="head", num_classes=num_classes,
        class_names=tuple(model.class_names), normalization=IMAGENET,  # CAC's VOC/City loaders: ImageNet mean/std
        input_size=(320, 320), method="cac" if semi else "supervised_seg", source=source))
    return model


# ---------------------------------------------------------------- CAC loss
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
        f1, f2: (P, d) l2-normalised features of the same image pixels in two crops (f1 the anchors).
        conf1, conf2: (P,) max softmax probability per pixel in each crop.
        label1: (P,) pseudo labels of the anchors (negatives with the same label are left out).
        negatives, neg_labels: (M, d) sampled pixel features and their pseudo labels; used as
            given (CAC gathers them without gradient: pass ``gather_no_grad`` output).

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
        return dict(self.__dict__)


def overlap_pixels(maps: list[torch.Tensor], box: tuple[int, int, int, int], flip: bool,
                   stride: int = FEATURE_STRIDE) -> list[torch.Tensor]:
    """Flip each (..., h, w) map of one crop back and cut CAC's overlap ``[ul//8 : br//8]``, flattened
    to (n, ...) rows in row-major pixel order (``permute(1, 2, 0).view(-1, c)`` for features)."""
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
        z1, z2: (B, d, h, w) projected, normalised stride-8 features of crop sets 1 and 2.
        logits1, logits2: (B, K, h, w) the classifier on the same pooled features (detached).
        overlap1, overlap2: (B, 4) overlap boxes (top, left, bottom, right) in each crop.
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
        super().__init__()
        self.step_save = step_save
        self.register_buffer("features", torch.zeros(max(step_save, 0), size, dim))
        self.register_buffer("labels", torch.zeros(max(step_save, 0), size, dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def entries(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
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


# ---------------------------------------------------------------- data
class VOCFolder:
    """A VOC-layout folder: JPEGImages/, SegmentationClass/ (PNG, 255 = ignore), ImageSets/Segmentation/*.txt."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not (self.root / "JPEGImages").is_dir():
            raise DataError(f"{str(self.root)!r} is not a VOC-layout folder: expected JPEGImages/, "
                            "SegmentationClass/ and ImageSets/Segmentation/{train,val,unlabeled}.txt")
        classes = self.root / "classes.txt"
        self.class_names = [c.strip() for c in classes.read_text().splitlines() if c.strip()] \
            if classes.exists() else None

    def ids(self, split: str) -> list[str]:
        f = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if f.exists():
            return [line.split()[0] for line in f.read_text().splitlines() if line.strip()]
        if split == "train":  # no lists: every image is a training image
            return sorted(p.stem for p in (self.root / "JPEGImages").glob("*.jpg"))
        return []

    def image_path(self, i: str) -> Path:
        return self.root / "JPEGImages" / f"{i}.jpg"

    def image(self, i: str) -> Image.Image:
        return load_image(self.image_path(i))

    def mask_path(self, i: str) -> Path:
        return self.root / "SegmentationClass" / f"{i}.png"

    def mask(self, i: str) -> np.ndarray:
        p = self.mask_path(i)
        if not p.exists():
            raise DataError(f"image {i!r} has no mask {str(p)!r}")
        return np.asarray(Image.open(p), dtype=np.uint8)


class SegDataset(torch.utils.data.Dataset):
    """Labelled crops (+ a CAC pair of an unlabelled image), seeded by (seed, epoch, index).

    Labelled: CAC's ``base_dataset._augmentation`` (long side 0.5-2.0x base, pad, crop, flip; no
    photometric change). Unlabelled: CAC's ``PairVOCDataset`` pair (long side 0.8-2.0x base, two
    overlapping crops, independent flips), each crop with its own low-level augmentation draw.
    """

    def __init__(self, voc: VOCFolder, labelled: list[str], unlabelled: list[str], *, crop_size: int,
                 iou_bound: tuple[float, float], seed: int, base_size: int):
        self.voc, self.labelled, self.unlabelled = voc, labelled, unlabelled
        self.crop_size, self.iou_bound, self.seed, self.base_size, self.epoch = crop_size, iou_bound, seed, base_size, 0
        self._norm = (np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labelled)

    def _tensor(self, arr: np.ndarray) -> torch.Tensor:
        x = (arr.astype(np.float32) / 255.0 - self._norm[0]) / self._norm[1]
        return torch.from_numpy(x.transpose(2, 0, 1).copy())

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from featviz.data.cac_crops import LowLevelAugment, cac_pair, labelled_crop

        rng = np.random.default_rng([self.seed, self.epoch, i])
        lid = self.labelled[i]
        lab = labelled_crop(self.voc.image(lid), self.voc.mask(lid), rng, base_size=self.base_size,
                            crop_size=self.crop_size)
        item = {"image": self._tensor(lab.image), "mask": torch.from_numpy(lab.mask.astype(np.int64))}
        if self.unlabelled:
            uid = self.unlabelled[int(rng.integers(len(self.unlabelled)))]
            u = cac_pair(self.voc.image(uid), None, rng, base_size=self.base_size, crop_size=self.crop_size,
                         iou_bound=self.iou_bound)
            aug = LowLevelAugment(rng)  # CAC's train_transform, drawn once per crop
            item.update(u1=self._tensor(aug(u.crop1)), u2=self._tensor(aug(u.crop2)),
                        ov1=torch.tensor(u.pair.overlap1), ov2=torch.tensor(u.pair.overlap2),
                        flip=torch.tensor(u.pair.flip))
        return item


# ---------------------------------------------------------------- training task
class SegTask:
    """``supervised_seg`` (cross-entropy on labelled crops) or ``cac`` (+ CAC's unsupervised loss).

    Driven by ``featviz.train.loop`` through ``loss``, ``after_step``, ``evaluate``, ``export``, ``model``,
    ``dataset``, ``collate``, ``n`` and ``last_parts``. CAC's settings come from the config's
    ``weight_unsup``, ``temp``, ``pos_thresh``, ``selected_num``, ``step_save`` and
    ``epoch_start_unsup`` (``featviz train --step-save/--epoch-start-unsup``; CAC's defaults
    for a config without them).
    """

    def __init__(self, cfg, info):
        from featviz.models.architectures import build_backbone

        self.cfg, self.info = cfg, info
        voc = VOCFolder(cfg.data)
        train_ids, val_ids = voc.ids("train"), voc.ids("val")
        if cfg.limit:
            train_ids = train_ids[:cfg.limit]
        missing = [i for i in train_ids if not voc.mask_path(i).exists()]
        if missing:
            raise DataError(f"{len(missing)} of {len(train_ids)} training images in {str(voc.root)!r} have no mask "
                            f"in SegmentationClass/ (e.g. {missing[0]}.png); {cfg.method} needs labelled images "
                            "-- list unlabelled ones in ImageSets/Segmentation/unlabeled.txt")
        unlabelled = voc.ids("unlabeled") if cfg.method == "cac" else []
        if cfg.method == "cac" and not unlabelled:
            raise DataError(f"cac needs unlabelled images: {str(voc.root)!r} has no "
                            "ImageSets/Segmentation/unlabeled.txt (or it is empty)")
        if cfg.batch_size < 2:
            raise DataError("segmentation needs --batch-size >= 2 (BatchNorm in the ASPP pooling branch)")
        if len(train_ids) < cfg.batch_size:
            raise DataError(f"{str(voc.root)!r} has {len(train_ids)} labelled training images, fewer than one "
                            f"batch of {cfg.batch_size}; lower --batch-size")
        if cfg.batch_size % info.world_size:
            raise DataError(f"--batch-size {cfg.batch_size} must divide evenly over {info.world_size} processes")
        if cfg.image_size % FEATURE_STRIDE:
            raise DataError(f"--image-size {cfg.image_size} must be a multiple of {FEATURE_STRIDE} (CAC's feature "
                            "stride: crop offsets and overlap boxes live on that grid)")
        names = voc.class_names
        if names is None:
            top = max(int(m[m != IGNORE_INDEX].max(initial=0)) for m in (voc.mask(i) for i in train_ids))
            names = [str(c) for c in range(top + 1)]
        self.class_names, self.voc, self.val_ids = names, voc, val_ids
        backbone = build_backbone(cfg.arch, seed=cfg.seed).train()
        if not hasattr(backbone, "layer4"):
            from featviz.errors import ArchitectureError

            raise ArchitectureError(f"segmentation needs a torchvision ResNet, got {cfg.arch!r}; "
                                    "use e.g. resnet18_w16-os8 (CPU) or resnet50-os16")
        spec = head_spec(backbone, len(names), cfg.image_size)
        proj = {"type": "conv_mlp", "out": min(128, spec["dim"])} if cfg.method == "cac" else None
        self.model = Segmenter(backbone, spec, proj, names)
        self.base_size = max(cfg.image_size, int(round(cfg.image_size * 400 / 320)))  # CAC: base 400 for crop 320
        self.dataset = SegDataset(voc, train_ids, unlabelled, crop_size=cfg.image_size, iou_bound=cfg.iou_bound,
                                  seed=cfg.seed, base_size=self.base_size)
        self.collate = torch.utils.data.default_collate
        self.n = len(train_ids)
        self.last_parts: dict[str, float] = {}
        self.settings = CACSettings.from_config(cfg) if cfg.method == "cac" else None
        if self.settings is not None:
            cells = (cfg.batch_size // info.world_size) * (cfg.image_size // FEATURE_STRIDE) ** 2
            if self.settings.selected_num > cells:
                log.warning("--selected-num %d is more than the %d stride-8 pixels of a crop set on this process "
                            "(CAC's np.random.choice would fail); sampling all %d", self.settings.selected_num,
                            cells, cells)
            per_step = 2 * min(self.settings.selected_num, cells) * info.world_size
            # the bank lives on the model (saved in state.pt for --resume, never exported)
            self.model.cac_bank = NegativeBank(self.settings.step_save, per_step, proj["out"])

    def _unsup_active(self) -> bool:
        return self.dataset.epoch >= self.settings.epoch_start_unsup

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool):
        def put(t):
            t = t.to(device)
            return t.contiguous(memory_format=torch.channels_last) if channels_last else t

        x = put(batch["image"])
        target = batch["mask"].to(device)
        seg = _module(model)
        if self.cfg.method != "cac" or not self._unsup_active():
            logits = model(x)
            sup = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)
            if self.cfg.method == "cac":  # CAC's warm-up (epoch < epoch_start_unsup): supervised only
                seg.cac_bank.steps += 1
                if isinstance(model, nn.parallel.DistributedDataParallel):
                    # DDP without find_unused_parameters needs every parameter in the graph
                    sup = sup + 0.0 * sum(p.sum() for p in seg.projector.parameters())
                self.last_parts = {"loss_sup": float(sup.detach()), "loss_unsup": 0.0}
            else:
                self.last_parts = {"loss_sup": float(sup.detach())}
            return sup
        logits, s1, s2 = model(x, put(batch["u1"]), put(batch["u2"]))  # one DDP forward, three passes
        sup = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)
        bank = seg.cac_bank
        rng = np.random.default_rng([self.cfg.seed, int(bank.steps), self.info.rank])
        unsup, parts = cac_unsupervised_loss(s1["z"].float(), s2["z"].float(), s1["logits"], s2["logits"],
                                             batch["ov1"], batch["ov2"], batch["flip"], self.settings, rng,
                                             bank.entries())
        bank.push(*parts["negatives"])
        bank.steps += 1
        self.last_parts = {"loss_sup": float(sup.detach()), "loss_unsup": float(unsup.detach()),
                           "loss_unsup_1": float(parts["loss1"].detach()),
                           "loss_unsup_2": float(parts["loss2"].detach())}
        return sup + unsup

    def after_step(self, step: int, total: int) -> None:
        pass

    def embeddings(self):
        return None

    @torch.no_grad()
    def evaluate(self, device: torch.device) -> dict[str, float]:
        """Mean IoU over classes present in the ``val`` list (full images)."""
        if not self.val_ids:
            return {}
        seg = self.model
        was = seg.training
        seg.eval()
        c = len(self.class_names)
        conf = torch.zeros(c, c, dtype=torch.long)
        norm = (torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None])
        for i in self.val_ids:
            img = np.asarray(self.voc.image(i), np.float32) / 255.0
            x = ((torch.from_numpy(img.transpose(2, 0, 1)) - norm[0]) / norm[1])[None].to(device)
            pred = seg(x).argmax(1)[0].cpu()
            gt = torch.from_numpy(self.voc.mask(i).astype(np.int64))
            ok = gt != IGNORE_INDEX
            conf += torch.bincount(gt[ok] * c + pred[ok], minlength=c * c).reshape(c, c)
        seg.train(was)
        inter = conf.diag().float()
        union = conf.sum(0) + conf.sum(1) - conf.diag()
        present = union > 0
        return {"miou": float((inter[present] / union[present]).mean()), **self.last_parts}

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        seg = self.model
        tensors = {f"backbone.{k}": v for k, v in seg.backbone.state_dict().items()}
        tensors.update({f"head.{k}": v for k, v in seg.head.state_dict().items()})
        heads: dict[str, Any] = {"head": seg.head_spec}
        if seg.projector is not None:
            tensors.update({f"projector.{k}": v for k, v in seg.projector.state_dict().items()})
            heads["projector"] = seg.projector_spec
        hparams: dict[str, Any] = {"iou_bound": list(self.cfg.iou_bound)}
        if self.settings is not None:
            hparams.update(self.settings.to_dict())
        meta = {"arch": describe(seg.backbone).arch.to_dict(),
                "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
                "source_format": "featviz", "method": self.cfg.method, "heads": heads,
                "num_classes": seg.num_classes, "class_names": seg.class_names,
                "crop": {"crop_size": int(self.cfg.image_size), "base_size": int(self.base_size)},
                "hparams": hparams}
        return tensors, meta


def _module(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
