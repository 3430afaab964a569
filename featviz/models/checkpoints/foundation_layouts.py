"""Layouts of the foundation models researchers probe in 2026 that timm builds exactly.

DINOv3 ViTs and ConvNeXts in Meta's raw layout (facebookresearch/dinov3 ``dinov3_*_pretrain_*.pth``),
open_clip checkpoints (the image tower of a whole CLIP state dict), and Franca (valeoai/Franca:
``{'teacher': ...}`` with blocks stored in chunks). Each converts with timm's own checkpoint
filter where timm has one (``timm.models.eva``, ``timm.models.convnext``,
``timm.models.vision_transformer``), so one feature core serves them all. DINOv3 files in timm's
own names, timm ConvNeXts and SigLIP ViTs are read by the generic ``timm`` layout; their
architecture comes from ``featviz.models.checkpoints.timm_families``.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch

from featviz.errors import CheckpointError, shorten
from featviz.models.checkpoints.layouts import (
    REPOSITORY,
    Extracted,
    _finish,
    _imagenet,
    _is_sd,
    _vit_names,
    register_layout,
)
from featviz.models.checkpoints.reader import Checkpoint
from featviz.models.checkpoints.timm_families import _CONVNEXT, dinov3_spec
from featviz.models.description import ArchSpec, Normalization

REFINES = REPOSITORY + 5
"""Specificity of a repository layout whose files also match an older repository's predicate (DINOv3's raw
ViT keys are DINOv2's plus storage tokens and RoPE; Franca's file is DINO's ``teacher`` with chunked blocks)."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DINOV3_SAT_MEAN = (0.430, 0.411, 0.296)
DINOV3_SAT_STD = (0.213, 0.156, 0.143)
_ROPE_BASE = 100.0  # DINOv3's RopePositionEmbedding(base=100) in every released ViT


# ------------------------------------------------------------------ DINOv3, Meta's raw files
def _dinov3_vit_sd(sd: Any) -> bool:
    return _is_sd(sd) and _vit_names(sd) and "storage_tokens" in sd and "cls_token" in sd


def _dinov3_norm(ck: Checkpoint) -> Normalization:
    if "sat493m" in ck.path.name.lower():
        return Normalization(DINOV3_SAT_MEAN, DINOV3_SAT_STD,
                             "DINOv3's satellite mean/std (the file name says sat493m: SAT-493M weights)")
    return _imagenet("DINOv3 (LVD-1689M weights)")


def _effective_qkv_bias(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A DINOv3 qkv bias times its ``bias_mask`` (LinearKMaskedBias: the key bias is masked to 0)."""
    bias = sd[name]
    mask = sd.get(name.replace(".bias", ".bias_mask"))
    if mask is None:
        return bias
    if not torch.isfinite(mask).all():
        raise CheckpointError(f"{name.replace('.bias', '.bias_mask')} holds NaN (DINOv3 initialises it so): the file "
                              "was saved before its weights were initialised; use a released DINOv3 checkpoint")
    return bias * mask.to(bias.dtype)


@register_layout("dinov3", "DINOv3 ViT in Meta's layout (facebookresearch/dinov3 dinov3_vit{s,s+,b,l,h+,7b}16_pretrain_"
                 "{lvd1689m,sat493m}-<hash>.pth), converted by timm's eva.checkpoint_filter_fn", specificity=REFINES)
class _DINOv3:
    @staticmethod
    def detect(ck):
        return _dinov3_vit_sd(ck.obj)

    @staticmethod
    def extract(ck, opts):
        from timm.models.eva import checkpoint_filter_fn

        sd = dict(ck.obj)
        if any(k.startswith("cls_norm.") for k in sd):
            raise CheckpointError(f"{ck.path.name}: a DINOv3 ViT with a separate class-token norm (cls_norm, "
                                  "untie_cls_and_patch_norms): timm's DINOv3 model normalises every token with one "
                                  "norm, so its embedding would differ; featviz does not load it")
        qkv_bias = "blocks.0.attn.qkv.bias" in sd
        for k in [k for k in sd if k.endswith("attn.qkv.bias")]:
            sd[k] = _effective_qkv_bias(sd, k)
        periods = sd.get("rope_embed.periods")
        dim = int(sd["patch_embed.proj.weight"].shape[0])
        heads = None
        if periods is not None:
            head_dim = 4 * int(periods.numel())
            heads = dim // head_dim
            n = int(periods.numel())
            want = _ROPE_BASE ** (2 * torch.arange(n, dtype=torch.float64) / (2 * n))
            if not torch.allclose(periods.double(), want, rtol=1e-3):
                raise CheckpointError(f"{ck.path.name}: rope_embed.periods are not DINOv3's (base {_ROPE_BASE:g}); "
                                      "timm's DINOv3 RoPE would place patches differently; featviz does not load it")
        swiglu = "blocks.0.mlp.w1.weight" in sd
        spec, warnings = dinov3_spec(
            dim=dim, depth=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}), qkv_bias=qkv_bias,
            swiglu=swiglu, registers=int(sd["storage_tokens"].shape[1]),
            mlp_hidden=None if swiglu else int(sd["blocks.0.mlp.fc1.weight"].shape[0]), num_heads=heads,
            patch=int(sd["patch_embed.proj.weight"].shape[-1]))
        if heads is None:
            warnings.append(f"no rope_embed.periods in the file: {spec.kwargs.get('num_heads', 'the standard')} "
                            "heads assumed for this DINOv3 width")
        body = {k: v for k, v in sd.items() if not (k in ("mask_token", "rope_embed.periods") or k.endswith(
            ".bias_mask") or k.startswith(("local_cls_norm.", "projectors.")))}
        dropped = dict(Counter("blocks.N.attn.qkv.bias_mask (applied to qkv.bias)" if k.endswith(".bias_mask")
                               else "rope_embed.periods (timm recomputes them: base 100)" if k.startswith("rope_embed.")
                               else k.split(".")[0] for k in sd if k not in body))

        def convert(tensors: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
            return checkpoint_filter_fn(dict(tensors), model)  # storage_tokens marks Meta's names

        return Extracted(body, None, "", dropped, arch=spec, arch_source="the DINOv3 layout (shapes, RoPE periods)",
                         normalization=_dinov3_norm(ck), warnings=warnings, source="DINOv3 (Meta)", convert=convert,
                         input_size=(224, 224), method="dinov3")


def _dinov3_convnext_sd(sd: Any) -> bool:
    return _is_sd(sd) and "downsample_layers.0.0.weight" in sd and "stages.0.0.dwconv.weight" in sd


def convnext_spec(depths: tuple[int, ...], dims: tuple[int, ...]) -> ArchSpec:
    """The timm ConvNeXt (``timm:convnext_<size>``) of these stages; other shapes as keyword arguments."""
    name = next((n for n, v in _CONVNEXT.items() if v == (depths, dims)), None)
    if name is not None and name in ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large",
                                     "convnext_xlarge"):
        return ArchSpec("timm", f"timm:{name}")
    return ArchSpec("timm", "timm:convnext_tiny", {"depths": list(depths), "dims": list(dims)})


@register_layout("dinov3_convnext", "DINOv3 ConvNeXt in Meta's layout (dinov3_convnext_{tiny,small,base,large}_"
                 "pretrain_lvd1689m-<hash>.pth), converted by timm's convnext.checkpoint_filter_fn")
class _DINOv3ConvNeXt:
    @staticmethod
    def detect(ck):
        return _dinov3_convnext_sd(ck.obj)

    @staticmethod
    def extract(ck, opts):
        from timm.models.convnext import checkpoint_filter_fn

        sd = ck.obj
        count = lambda i: len({k.split(".")[2] for k in sd if k.startswith(f"stages.{i}.")})  # noqa: E731
        depths = tuple(count(i) for i in range(4))
        dims = tuple(int(sd[f"stages.{i}.0.dwconv.weight"].shape[0]) for i in range(4))
        ex = _finish(ck, sd, None, "", opts, drop=("projectors.", "norms."), source="DINOv3 ConvNeXt (Meta)",
                     normalization=_imagenet("DINOv3 (LVD-1689M weights)"), method="dinov3",
                     convert=lambda t, model: checkpoint_filter_fn(dict(t), model), input_size=(224, 224))
        ex.arch, ex.arch_source = convnext_spec(depths, dims), "the DINOv3 ConvNeXt layout (shapes)"
        return ex


# ------------------------------------------------------------------ open_clip
def _clip_sd(ck: Checkpoint) -> dict[str, torch.Tensor] | None:
    obj = ck.obj
    sd = obj if _is_sd(obj) else obj.get("state_dict") if isinstance(obj, dict) and _is_sd(obj.get("state_dict")) \
        else None
    if sd is None:
        return None
    if all(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if "visual.conv1.weight" in sd or any(k.startswith("visual.trunk.") for k in sd):
        return sd
    return None


@register_layout("open_clip", "open_clip / OpenAI CLIP checkpoint (the whole CLIP: visual.* native ViT towers or "
                 "visual.trunk.* timm towers; open_clip_pytorch_model.bin, open_clip_model.safetensors): "
                 "the image tower")
class _OpenCLIP:
    @staticmethod
    def detect(ck):
        return _clip_sd(ck) is not None

    @staticmethod
    def extract(ck, opts):
        sd = _clip_sd(ck)
        key = "state_dict" if not _is_sd(ck.obj) else None
        text = sorted({k.split(".")[0] for k in sd if not k.startswith("visual.")})
        dropped = {f"{t} (text tower)" if t != "logit_scale" else t: sum(1 for k in sd if k.split(".")[0] == t)
                   for t in text}
        visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
        if "visual.trunk.blocks.0.norm1.weight" in visual or "visual.trunk.stem.0.weight" in visual:
            return _timm_tower(ck, visual, key, dropped)
        if any(k.startswith("visual.trunk.") for k in visual):
            raise CheckpointError(f"{ck.path.name}: an open_clip timm tower featviz cannot name from its keys "
                                  f"({shorten(sorted(visual), 3)}); pass --arch timm:NAME --format timm after "
                                  "stripping 'visual.trunk.'")
        if "visual.layer1.0.conv1.weight" in visual or "visual.attnpool.c_proj.weight" in visual:
            raise CheckpointError(f"{ck.path.name}: a CLIP ModifiedResNet image tower (RN50-style, attention pool); "
                                  "featviz loads CLIP ViT towers only")
        if any(k.startswith("visual.attn_pool") for k in visual):
            raise CheckpointError(f"{ck.path.name}: a CLIP tower with an attentional pool (CoCa / PE); featviz loads "
                                  "plain CLIP ViT towers from open_clip files; use timm's weights of that model")
        return _native_tower(ck, visual, key, dropped)


def _native_tower(ck: Checkpoint, visual: dict, key: str | None, dropped: dict[str, int]) -> Extracted:
    from timm.models.vision_transformer import checkpoint_filter_fn

    conv = visual["visual.conv1.weight"]
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    tokens = int(visual["visual.positional_embedding"].shape[0])
    side = int(round((tokens - 1) ** 0.5))
    if side * side != tokens - 1:
        raise CheckpointError(f"{ck.path.name}: {tokens} CLIP positions are not a class token plus a square grid")
    depth = len({k.split(".")[3] for k in visual if k.startswith("visual.transformer.resblocks.")})
    hidden = int(visual["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    heads = max(1, width // 64)
    quick = any(s in ck.path.name.lower() for s in ("openai", "quickgelu"))
    kwargs: dict[str, Any] = {"embed_dim": width, "depth": depth, "num_heads": heads, "patch_size": patch,
                              "img_size": side * patch, "mlp_ratio": hidden / width, "global_pool": "token"}
    warnings = [f"{heads} attention heads assumed (open_clip's head width 64: width {width} / 64); a head count "
                "changes no weight shape",
                "activation: " + ("QuickGELU (the file name says openai/quickgelu)" if quick else
                                  "GELU (open_clip's default; OpenAI's CLIP weights use QuickGELU: name the file "
                                  "*openai* or *quickgelu* to choose it)")]
    if "visual.proj" in visual:
        kwargs["projection"] = int(visual["visual.proj"].shape[1])
    name = "timm:vit_base_patch16_clip_quickgelu_224" if quick else "timm:vit_base_patch16_clip_224"
    ex = _finish(ck, visual, key, "", {}, source="open_clip (image tower)",
                 normalization=Normalization(CLIP_MEAN, CLIP_STD, "CLIP's mean/std (open_clip / OpenAI)"),
                 convert=lambda t, model: checkpoint_filter_fn(dict(t), model), input_size=(side * patch,) * 2,
                 method="clip")
    ex.dropped.update(dropped)
    ex.arch, ex.arch_source, ex.warnings = ArchSpec("timm", name, kwargs), "the open_clip layout (shapes)", warnings
    return ex


def _timm_tower(ck: Checkpoint, visual: dict, key: str | None, dropped: dict[str, int]) -> Extracted:
    from featviz.models.architectures import infer_arch

    trunk = {k.removeprefix("visual.trunk."): v for k, v in visual.items() if k.startswith("visual.trunk.")}
    head = {k: v for k, v in visual.items() if not k.startswith("visual.trunk.")}
    spec = infer_arch(trunk).spec
    if spec.family != "timm":
        raise CheckpointError(f"{ck.path.name}: an open_clip timm tower whose model its keys do not name; pass "
                              "--arch timm:NAME --format timm after stripping 'visual.trunk.'")
    warnings = []
    if set(head) == {"visual.head.proj.weight"} and "attn_pool.latent" not in trunk:
        spec = ArchSpec(spec.family, spec.name, {**spec.kwargs, "projection": int(head["visual.head.proj.weight"]
                                                                                    .shape[0])})
        fc = "head.fc" if "head.norm.weight" in trunk else "head"  # ConvNeXt's classifier sits after its head norm
        trunk[f"{fc}.weight"] = head["visual.head.proj.weight"]
        trunk[f"{fc}.bias"] = torch.zeros(int(head["visual.head.proj.weight"].shape[0]))  # open_clip's proj: no bias
    elif head:
        dropped["visual.head. (projection)"] = len(head)
        warnings.append("the open_clip tower's projection (visual.head.*) is dropped: embeddings are the trunk's")
    ex = Extracted(trunk, key, "visual.trunk.", dropped, arch=spec, arch_source="the open_clip layout (timm tower "
                   "keys)", normalization=None, warnings=warnings, source="open_clip (timm image tower)",
                   method="clip")
    return ex


# ------------------------------------------------------------------ Franca
_CHUNK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


def _franca_teacher(ck: Checkpoint) -> dict | None:
    obj = ck.obj
    if not (isinstance(obj, dict) and _is_sd(obj.get("teacher"))):
        return None
    sd = obj["teacher"]
    return sd if any(re.match(r"^(module\.)?backbone\.blocks\.\d+\.\d+\.", k) for k in sd) else None


@register_layout("franca", "Franca (valeoai/Franca franca_vit{b,l,g}14): {'teacher'} / backbone. (module. optional), "
                 "blocks stored in chunks; DINOv2 architecture", specificity=REFINES)
class _Franca:
    @staticmethod
    def detect(ck):
        return _franca_teacher(ck) is not None

    @staticmethod
    def extract(ck, opts):
        from featviz.models.checkpoints.vit_layouts import _DINOv2

        sd = _franca_teacher(ck)
        m = "module." if any(k.startswith("module.backbone.") for k in sd) else ""
        ex = _finish(ck, sd, "teacher", f"{m}backbone.", opts, drop=(f"{m}dino_head.", f"{m}ibot_head.", f"{m}head."))
        flat = {_CHUNK.sub(r"blocks.\2.", k): v for k, v in ex.state_dict.items()}  # blocks.<chunk>.<i> -> blocks.<i>
        if len(flat) != len(ex.state_dict):
            raise CheckpointError(f"{ck.path.name}: Franca's chunked blocks overlap once flattened; not a Franca file")
        inner = _DINOv2.extract(Checkpoint(ck.path, flat, ck.container), opts)
        inner.container_key, inner.prefix = "teacher", f"{m}backbone."
        inner.dropped = {**ex.dropped, **inner.dropped}
        inner.source, inner.method, inner.normalization = "Franca (teacher)", "franca", _imagenet("Franca")
        inner.arch_source = "the Franca layout (DINOv2 shapes)"
        return inner
