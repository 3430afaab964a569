"""Whole semantic segmenters: DeepLabv3+ models, their description and their checkpoints.

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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from featviz.errors import CheckpointError
from featviz.models.description import IMAGENET, ModelDescription, Normalization, attach, describe

FEATURE_STRIDE = 8  # CAC's pixel features: decoder output avg-pooled from stride 4 to 8

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
        """ASPP on ``in_ch``-channel deep features, a ``low_ch``-channel skip, ``num_classes`` logits."""
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
        """The segmenter of ``backbone`` with the head (and CAC projector) ``head_spec`` describes.

        Raises:
            ArchitectureError: ``backbone`` is not a torchvision ResNet.
        """
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
        """Stride-8 pixel features as CAC contrasts them.

        ``decoder``: the 256-d decoder output avg-pooled by 2 (the classifier's input);
        ``projector``: its l2-normalised projection (CAC models only).
        """
        if which not in ("decoder", "projector"):
            raise ValueError(f"which must be 'decoder' or 'projector', got {which!r}")
        f = self.to_stride8(self.decoder_features(x))
        return self.project(f) if which == "projector" else f

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input size (CAC's eval and labelled-branch path).

        The classifier on the stride-4 decoder features, upsampled bilinearly.
        """
        out = self.head.classify(self.decoder_features(x))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=self.head.align_corners)

    def forward(self, x: torch.Tensor, u1: torch.Tensor | None = None, u2: torch.Tensor | None = None):
        """Logits (N, C, H, W); with unlabelled crop sets ``u1``, ``u2`` also one dict per set.

        Each dict holds ``z`` (projected, normalised stride-8 features) and ``logits`` (the
        classifier on the pooled features, computed without gradient: CAC detaches them into
        pseudo labels and confidences).
        """
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

    Reads only the safetensors header; a pickle is read as the load reads it (``read_checkpoint``:
    ``weights_only=True``, or with ``trust`` ``weights_only=False``, only for files you trust) and
    kept for the load that follows, so the file is unpickled once. A file that cannot be read gives
    None; the real load then reports why.
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
    from featviz.models.checkpoints import read_checkpoint

    try:  # kept for the load that follows, so the file is unpickled once
        obj = read_checkpoint(path, trust=trust, keep=True).obj
    except CheckpointError:  # unreadable here: the real load reports why
        return None
    sd = _state_dict_of(obj)
    return "cac" if sd is not None and _cac_module_prefix(sd) is not None else None


def load_segmenter(path: str | os.PathLike, *, trust: bool = False, output_stride: int | None = None,
                   class_names: list[str] | None = None) -> Segmenter:
    """Rebuild a whole ``Segmenter`` (eval mode) from a featviz or a CAC DeepLabv3+ checkpoint.

    The checkpoint is featviz's segmentation format or one of CAC's official DeepLabv3+ files.

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
    from featviz.models.checkpoints import featviz_metadata, read_checkpoint

    # featviz's format (the header says so) is read by its one reader; anything else as a checkpoint
    ck = None if featviz_metadata(path) is not None else read_checkpoint(path, trust=trust)
    if ck is None or ck.featviz_meta is not None:  # the latter: a featviz file under another suffix
        model = _featviz_segmenter(Path(path))
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


def _featviz_segmenter(path: Path) -> Segmenter:
    """A whole ``Segmenter`` from a featviz segmentation checkpoint, read with ``read_featviz``."""
    from featviz.models.architectures import ArchSpec, build_backbone
    from featviz.models.checkpoints import read_featviz

    tensors, meta = read_featviz(path)
    heads = meta.get("heads") or {}
    if "head" not in heads:
        raise CheckpointError(f"{path.name} holds no segmentation head (method {meta.get('method')!r}); "
                              "expected a checkpoint from `featviz train --method supervised_seg|cac`")
    with torch.device("meta"):  # no random init: every tensor comes from the file
        backbone = build_backbone(ArchSpec.from_dict(meta["arch"])).train()
        model = Segmenter(backbone, heads["head"], heads.get("projector"), meta.get("class_names"))
    missing, unexpected = _assign(model, tensors)
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
    """Load ``sd`` into a model built on the meta device (float tensors as float32).

    Returns the (missing, unexpected) keys; anything left on the meta device counts as missing.
    """
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

