"""Layouts of the ResNet-era SSL repositories.

MoCo v1/v2, SimSiam, Barlow Twins, VICReg, SwAV, solo-learn, lightly, SimCLR v1 (converted) and
CAC's segmentation backbone.
"""

from __future__ import annotations

import json

from featviz.errors import CheckpointError
from featviz.models.architectures import infer_arch
from featviz.models.checkpoints.layouts import (
    _PROJECTOR,
    _finish,
    _has,
    _imagenet,
    _inner,
    _is_sd,
    _opt_module,
    _torchvision_names,
    register_layout,
)
from featviz.models.checkpoints.reader import Checkpoint
from featviz.models.description import NO_NORMALIZATION, ArchSpec


@register_layout("moco", "MoCo v1/v2 (facebookresearch/moco): online encoder 'encoder_q'")
class _MoCo:
    @staticmethod
    def detect(ck):
        sd = _inner(ck, "state_dict")
        return _has(sd, "module.encoder_q.", "encoder_q.")

    @staticmethod
    def extract(ck, opts):
        sd = _inner(ck, "state_dict")
        p, m = _opt_module(sd, "encoder_q.")
        return _finish(ck, sd, "state_dict", p, opts, drop=(f"{m}encoder_k.", f"{m}queue_ptr", f"{m}queue"),
                       drop_inside=_PROJECTOR, source="MoCo v1/v2", normalization=_imagenet("MoCo"), method="moco")


@register_layout("simsiam", "SimSiam (facebookresearch/simsiam): 'encoder' + 'predictor'")
class _SimSiam:
    @staticmethod
    def detect(ck):
        sd = _inner(ck, "state_dict")
        return _has(sd, "module.encoder.conv1.", "encoder.conv1.") and _has(sd, "module.predictor.", "predictor.")

    @staticmethod
    def extract(ck, opts):
        sd = _inner(ck, "state_dict")
        p, m = _opt_module(sd, "encoder.")
        return _finish(ck, sd, "state_dict", p, opts, drop=(f"{m}predictor.",), drop_inside=_PROJECTOR,
                       source="SimSiam", normalization=_imagenet("SimSiam"), method="simsiam")


def _full_model(ck: Checkpoint) -> dict | None:
    obj = ck.obj
    if isinstance(obj, dict) and "model" in obj and "epoch" in obj and _is_sd(obj.get("model")):
        return obj["model"]
    return None


@register_layout("barlow_twins", "Barlow Twins full checkpoint (facebookresearch/barlowtwins checkpoint.pth)")
class _Barlow:
    @staticmethod
    def detect(ck):
        sd = _full_model(ck)
        return _has(sd, "module.backbone.") and _has(sd, "module.bn.")

    @staticmethod
    def extract(ck, opts):
        return _finish(ck, _full_model(ck), "model", "module.backbone.", opts,
                       drop=("module.projector.", "module.bn."), drop_inside=_PROJECTOR, source="Barlow Twins",
                       normalization=_imagenet("Barlow Twins"), method="barlow_twins")


@register_layout("vicreg", "VICReg full checkpoint (facebookresearch/vicreg *_fullckpt.pth)")
class _VICReg:
    @staticmethod
    def detect(ck):
        sd = _full_model(ck)
        return _has(sd, "module.backbone.") and _has(sd, "module.projector.") and not _has(sd, "module.bn.")

    @staticmethod
    def extract(ck, opts):
        return _finish(ck, _full_model(ck), "model", "module.backbone.", opts,
                       drop=("module.projector.",), drop_inside=_PROJECTOR, source="VICReg",
                       normalization=_imagenet("VICReg"), method="vicreg")


@register_layout("swav", "SwAV / DeepCluster-v2 / SeLa-v2 (facebookresearch/swav): bare state_dict with 'module.'")
class _SwAV:
    @staticmethod
    def detect(ck):
        return _is_sd(ck.obj) and "module.conv1.weight" in ck.obj and all(k.startswith("module.") for k in ck.obj)

    @staticmethod
    def extract(ck, opts):
        return _finish(ck, ck.obj, None, "module.", opts,
                       drop_inside=(*_PROJECTOR, "projection_head.", "prototypes."), source="SwAV",
                       normalization=_imagenet("SwAV"), method="swav")


_LIGHTNING_KEYS = ("pytorch-lightning_version", "global_step", "loops")
_LIGHTLY_HEADS = ("projection_head.", "prediction_head.", "online_classifier.", "backbone_momentum.",
                  "student_backbone.", "student_projection_head.", "student_head.", "teacher_backbone.",
                  "teacher_projection_head.", "teacher_head.", "projection_head_momentum.")
_SOLO_HEADS = ("classifier.", "projector.", "predictor.", "prototypes.", "head.", "momentum_backbone.",
               "momentum_projector.", "momentum_classifier.", "momentum_head.", "momentum_predictor.")


def _lightning_sd(ck: Checkpoint) -> dict | None:
    obj = ck.obj
    if isinstance(obj, dict) and any(k in obj for k in _LIGHTNING_KEYS):
        return _inner(ck, "state_dict")
    return None


@register_layout("solo_learn", "solo-learn Lightning .ckpt (vturrisi/solo-learn): 'backbone'")
class _Solo:
    @staticmethod
    def detect(ck):
        sd = _lightning_sd(ck)
        return (_has(sd, "backbone.", "encoder.") and not _has(sd, *_LIGHTLY_HEADS)
                and not _has(sd, "backbone.0.", "backbone.vit."))

    @staticmethod
    def extract(ck, opts):
        sd = _lightning_sd(ck)
        p = "backbone." if _has(sd, "backbone.") else "encoder."  # older solo-learn: 'encoder.'
        ex = _finish(ck, sd, "state_dict", p, opts, drop=_SOLO_HEADS, drop_inside=_PROJECTOR, source="solo-learn",
                     normalization=_imagenet("solo-learn"))
        args_json = ck.path.parent / "args.json"
        if args_json.is_file():
            try:
                method = json.loads(args_json.read_text()).get("method")
            except (OSError, json.JSONDecodeError):
                method = None
            ex.method = method
            if method == "mocov3" and "cls_token" in ex.state_dict:
                ex.num_heads = 12
                ex.warnings.append("solo-learn mocov3 ViTs use 12 heads (from args.json)")
        return ex


_SEQ_NAMES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


@register_layout("lightly", "lightly (lightly-ai/lightly): 'backbone' (benchmarks, incl. nn.Sequential numeric keys)")
class _Lightly:
    @staticmethod
    def detect(ck):
        sd = _lightning_sd(ck) or _inner(ck, "state_dict") or _inner(ck, "resnet18_parameters")
        return _has(sd, "backbone.") and (_has(sd, *_LIGHTLY_HEADS) or _has(sd, "backbone.0.", "backbone.vit."))

    @staticmethod
    def extract(ck, opts):
        key = "resnet18_parameters" if _inner(ck, "resnet18_parameters") else "state_dict"
        sd = _inner(ck, key)
        p = "backbone.vit." if _has(sd, "backbone.vit.") else "backbone."
        drop = (*_LIGHTLY_HEADS, "backbone.mask_token")
        ex = _finish(ck, sd, key, p, opts, drop=drop, drop_inside=_PROJECTOR, source="lightly",
                     normalization=_imagenet("lightly"))
        if any(k.split(".", 1)[0].isdigit() for k in ex.state_dict):  # nn.Sequential(*resnet.children()[:-1])
            renamed = {}
            for k, v in ex.state_dict.items():
                i, rest = k.split(".", 1)
                if i not in _SEQ_NAMES:
                    raise CheckpointError(f"{ck.path.name}: numeric backbone key {k!r} is not a torchvision "
                                          "ResNet child (0,1,4-7); this lightly model is not supported")
                renamed[f"{_SEQ_NAMES[i]}.{rest}"] = v
            ex.state_dict = renamed
            ex.warnings.append("mapped lightly's nn.Sequential indices to torchvision names (0→conv1, 4..7→layer1..4)")
        return ex


@register_layout("simclr_v1", "SimCLR v1 converted from TF (tonylins/simclr-converter): {'state_dict'} only")
class _SimCLR:
    @staticmethod
    def detect(ck):
        return isinstance(ck.obj, dict) and set(ck.obj) == {"state_dict"} and _torchvision_names(ck.obj["state_dict"])

    @staticmethod
    def extract(ck, opts):
        ex = _finish(ck, ck.obj["state_dict"], "state_dict", "", opts, source="SimCLR v1 (converted)",
                     normalization=NO_NORMALIZATION, keeps_classifier=True, method="simclr")
        if any(k.startswith("fc.") for k in ck.obj["state_dict"]):
            ex.warnings.append("its fc is a supervised ImageNet head from the TF release, not SSL")
        return ex


@register_layout("cac", "CAC (dvlab-research/Context-Aware-Consistency): DeepLabv3+ 'encoder.backbone'")
class _CAC:
    @staticmethod
    def detect(ck):
        sd = _inner(ck, "state_dict")
        return _has(sd, "module.encoder.backbone.", "encoder.backbone.")

    @staticmethod
    def extract(ck, opts):
        sd = _inner(ck, "state_dict")
        p, m = _opt_module(sd, "encoder.backbone.")
        ex = _finish(ck, sd, "state_dict", p, opts,
                     drop=(f"{m}encoder.aspp.", f"{m}encoder.decoder.", f"{m}encoder.", f"{m}classifier.",
                           f"{m}project."), drop_inside=_PROJECTOR, source="CAC", normalization=_imagenet("CAC"),
                     method="cac")
        cfg = ck.obj.get("config") if isinstance(ck.obj.get("config"), dict) else {}
        model_cfg = cfg.get("model", {}) if isinstance(cfg.get("model"), dict) else {}
        os_ = model_cfg.get("output_stride") or model_cfg.get("out_stride")
        if model_cfg.get("supervised") and not model_cfg.get("semi"):
            ex.method = "supervised_seg"  # CAC's supervised-only baseline (no projector)
        ex.warnings.append(
            "CAC's encoder is a segmentation backbone (its code builds output stride 16 with a multi-grid "
            "(1, 2, 4) layer4); as an encoder featviz loads its weights into a "
            f"{'torchvision-dilated (output stride ' + str(os_) + ')' if os_ else 'standard'} ResNet"
            + ("" if os_ else "; pass --arch resnetNN-os16 (or -os8) to dilate it")
            + "; the whole segmenter, with CAC's dilation, ASPP, decoder, classifier and projector, is "
            "featviz.models.segmenter.load_segmenter (used by tsne --figure cac)")
        if os_ in (8, 16):
            inf = infer_arch(ex.state_dict)
            ex.arch = ArchSpec("resnet", f"{inf.spec.name}-os{os_}")
        return ex
