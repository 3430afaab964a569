"""Layouts of the ViT-era SSL repositories.

MoCo v3 (ResNet or ViT), DINO, iBOT, I-JEPA, MSN, DINOv2 and MAE.
"""

from __future__ import annotations

import math
from typing import Any

from featviz.models.architectures import mlp_ratio
from featviz.models.checkpoints.layouts import (
    _PROJECTOR,
    _finish,
    _has,
    _imagenet,
    _inner,
    _is_sd,
    _key_choice,
    _opt_module,
    _vit_names,
    register_layout,
)
from featviz.models.checkpoints.reader import Checkpoint
from featviz.models.description import ArchSpec


@register_layout("moco_v3", "MoCo v3 (facebookresearch/moco-v3): 'base_encoder', ResNet or ViT")
class _MoCoV3:
    @staticmethod
    def detect(ck):
        sd = _inner(ck, "state_dict")
        return _has(sd, "module.base_encoder.", "base_encoder.")

    @staticmethod
    def extract(ck, opts):
        sd = _inner(ck, "state_dict")
        p, m = _opt_module(sd, "base_encoder.")
        ex = _finish(ck, sd, "state_dict", p, opts, drop=(f"{m}momentum_encoder.", f"{m}predictor."),
                     drop_inside=_PROJECTOR, source="MoCo v3", normalization=_imagenet("MoCo v3"), method="moco_v3")
        if "cls_token" in ex.state_dict:
            ex.num_heads = 12  # MoCo v3's vit_small and vit_base both use 12 heads (moco-v3 vits.py)
            ex.warnings.append("MoCo v3 ViTs use 12 attention heads (its ViT-S differs from DeiT's 6); "
                               "using 12; override with --num-heads")
        return ex


def _teacher_student(ck: Checkpoint) -> bool:
    return isinstance(ck.obj, dict) and _is_sd(ck.obj.get("teacher")) and _is_sd(ck.obj.get("student"))


_DINO_HEADS = {"vit_tiny": 3, "vit_small": 6, "vit_base": 12, "vit_large": 16}


@register_layout("dino", "DINO full checkpoint (facebookresearch/dino): 'teacher'/'student'")
class _DINO:
    @staticmethod
    def detect(ck):
        return _teacher_student(ck) and "ibot_loss" not in ck.obj

    @staticmethod
    def extract(ck, opts):
        key = _key_choice(opts, ("teacher", "student"), "teacher", "DINO")
        sd = ck.obj[key]
        p, m = _opt_module(sd, "backbone.")
        ex = _finish(ck, sd, key, p, opts, drop=(f"{m}head.",), source=f"DINO ({key})",
                     normalization=_imagenet("DINO"), method="dino")
        arch = getattr(ck.obj.get("args"), "arch", None)
        if arch and str(arch).startswith(("vit_", "deit_")):  # DINO's own ViTs: 3/6/12 heads, like timm
            ex.num_heads = _DINO_HEADS.get(str(arch).replace("deit_", "vit_"))
        if key == "student":
            ex.warnings.append("using the DINO student; DINO evaluates the teacher (the default)")
        return ex


@register_layout("ibot", "iBOT (bytedance/ibot): full checkpoint 'teacher'/'student', or backbone file {'state_dict'}")
class _IBOT:
    @staticmethod
    def detect(ck):
        obj = ck.obj
        if _teacher_student(ck):
            return "ibot_loss" in obj
        return isinstance(obj, dict) and set(obj) == {"state_dict"} and _vit_names(_inner(ck, "state_dict")) \
            and "cls_token" in obj["state_dict"]

    @staticmethod
    def extract(ck, opts):
        if not _teacher_student(ck):  # checkpoint_teacher.pth / checkpoint_student.pth: the backbone alone
            return _finish(ck, ck.obj["state_dict"], "state_dict", "", opts, drop_inside=("masked_embed",),
                           source="iBOT backbone", normalization=_imagenet("iBOT"), method="ibot")
        key = _key_choice(opts, ("teacher", "student"), "teacher", "iBOT")
        sd = ck.obj[key]
        p, m = _opt_module(sd, "backbone.")
        ex = _finish(ck, sd, key, p, opts, drop=(f"{m}head.",), drop_inside=("masked_embed",),
                     source=f"iBOT ({key})", normalization=_imagenet("iBOT"), method="ibot")
        arch = getattr(ck.obj.get("args"), "arch", None)
        if arch and str(arch).startswith(("vit_", "deit_")):  # iBOT's ViTs: 3/6/12/16 heads (vision_transformer.py)
            ex.num_heads = _DINO_HEADS.get(str(arch).replace("deit_", "vit_"))
        if key == "student":
            ex.warnings.append("using the iBOT student; iBOT evaluates the teacher (the default)")
        return ex


def _jepa_like(ck: Checkpoint, extra: str) -> bool:
    obj = ck.obj
    return isinstance(obj, dict) and _is_sd(obj.get("encoder")) and _is_sd(obj.get("target_encoder")) and extra in obj


@register_layout("ijepa", "I-JEPA (facebookresearch/ijepa): 'target_encoder' (default) / 'encoder' + 'predictor'")
class _IJEPA:
    @staticmethod
    def detect(ck):
        return _jepa_like(ck, "predictor")

    @staticmethod
    def extract(ck, opts):
        key = _key_choice(opts, ("target_encoder", "encoder"), "target_encoder", "I-JEPA")
        sd = ck.obj[key]
        p, _ = _opt_module(sd, "")
        ex = _finish(ck, sd, key, p, opts, source=f"I-JEPA ({key})", normalization=_imagenet("I-JEPA"),
                     method="ijepa")
        if key == "encoder":
            ex.warnings.append("using the I-JEPA context encoder; I-JEPA's frozen evaluation "
                               "(facebookresearch/jepa evals) uses the target encoder (the default)")
        return ex


@register_layout("msn", "MSN (facebookresearch/msn): 'target_encoder' (default) / 'encoder' + 'prototypes'")
class _MSN:
    @staticmethod
    def detect(ck):
        return _jepa_like(ck, "prototypes")

    @staticmethod
    def extract(ck, opts):
        key = _key_choice(opts, ("target_encoder", "encoder"), "target_encoder", "MSN")
        sd = ck.obj[key]
        p, _ = _opt_module(sd, "")
        ex = _finish(ck, sd, key, p, opts, drop_inside=("fc.", "pred."), source=f"MSN ({key})",
                     normalization=_imagenet("MSN"), method="msn")
        if key == "encoder":
            ex.warnings.append("using the MSN anchor encoder; MSN's linear evaluation uses the target encoder "
                               "(the default)")
        return ex


def _dinov2_sd(sd: dict | None) -> bool:
    return _vit_names(sd) and "mask_token" in sd and "cls_token" in sd


_DINOV2_SIZES = {384: ("small", 6), 768: ("base", 12), 1024: ("large", 16), 1536: ("giant", 24)}


@register_layout("dinov2", "DINOv2 hub backbone (facebookresearch/dinov2 dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth)")
class _DINOv2:
    @staticmethod
    def detect(ck):
        return _is_sd(ck.obj) and _dinov2_sd(ck.obj)

    @staticmethod
    def extract(ck, opts):
        from timm.models.vision_transformer import checkpoint_filter_fn

        # timm's own filter maps the hub names (it recognises them by mask_token, which it drops)
        ex = _finish(ck, ck.obj, None, "", opts, source="DINOv2", normalization=_imagenet("DINOv2"),
                     method="dinov2", input_size=(224, 224),
                     convert=lambda sd, model: checkpoint_filter_fn(dict(sd), model))
        ex.dropped["mask_token"] = 1
        sd = ex.state_dict
        proj = sd["patch_embed.proj.weight"]
        dim, patch = int(proj.shape[0]), int(proj.shape[-1])
        reg = int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0
        grid = int(sd["pos_embed"].shape[1]) - 1  # DINOv2 gives the class token a position, never registers
        side = math.isqrt(grid)
        swiglu = "blocks.0.mlp.w12.weight" in sd
        hidden = int(sd["blocks.0.mlp.w12.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0])
        kwargs: dict[str, Any] = {
            "embed_dim": dim, "depth": len({k.split(".")[1] for k in sd if k.startswith("blocks.")}),
            "patch_size": patch, "img_size": side * patch, "mlp_ratio": mlp_ratio(hidden, dim), "qkv_bias": True,
            "class_token": True, "reg_tokens": reg, "no_embed_class": bool(reg), "global_pool": "token",
        }
        if "blocks.0.ls1.gamma" in sd:
            kwargs["init_values"] = 1.0  # LayerScale; the values come from the file
        if swiglu:
            kwargs["mlp"] = "swiglu"
        size, heads = _DINOV2_SIZES.get(dim, (None, None))
        reg_name = f"_reg{reg}" if reg else ""
        name = f"vit_{size}_patch{patch}{reg_name}_dinov2" if size and side * patch == 518 else \
            f"vit_d{dim}_patch{patch}_{side * patch}{reg_name}_dinov2"
        ex.arch, ex.arch_source, ex.num_heads = ArchSpec("vit", name, kwargs), "the DINOv2 layout (shapes)", heads
        return ex


def _mae_sd(sd: dict | None) -> bool:
    return _vit_names(sd) and (_has(sd, "decoder_") or "mask_token" in sd or "fc_norm.weight" in sd)


_MAE_KEYS = {"model", "optimizer", "epoch", "scaler", "args"}  # mae util/misc.py save_model


def _mae_container(ck: Checkpoint) -> dict | None:
    obj = ck.obj
    if isinstance(obj, dict) and _is_sd(obj.get("model")) and set(obj) <= _MAE_KEYS:
        return obj["model"]
    return None


@register_layout("mae", "MAE (facebookresearch/mae): {'model'}: pre-training (decoder_*, mask_token dropped) or "
                 "fine-tuned (fc_norm + head)")
class _MAE:
    @staticmethod
    def detect(ck):
        return _mae_sd(_mae_container(ck))

    @staticmethod
    def extract(ck, opts):
        sd = _mae_container(ck)
        ex = _finish(ck, sd, "model", "", opts, drop_inside=("decoder_", "mask_token"), source="MAE",
                     normalization=_imagenet("MAE"), keeps_classifier=True, method="mae")
        if "fc_norm.weight" in sd:
            ex.warnings.append("a fine-tuned MAE (fc_norm + head): pooled features are the fc_norm'ed average of "
                               "the patch tokens, as MAE's global_pool does")
        return ex
