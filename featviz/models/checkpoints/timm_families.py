"""The timm families whose weights say which model they are: DINOv3 (Eva), ConvNeXt, SigLIP (MAP ViTs).

``infer_timm_family`` reads a state dict in timm's names and returns the timm architecture that
builds it exactly (``timm:vit_small_patch16_dinov3``, ``timm:convnext_tiny``, ...) with the keyword
arguments its shapes need; ``dinov3_spec`` is the one rule that names a DINOv3 ViT, shared with the
layout of Meta's raw files (``foundation_layouts``). What a built model's description says of its
library, pooling and positions is ``featviz.models.facts.model_traits``.

Heavy imports (torch, timm) stay inside the functions; this module is imported by
``featviz.models.architectures``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from featviz.errors import ArchitectureError

log = logging.getLogger(__name__)

# DINOv3 ViTs (facebookresearch/dinov3 hub/backbones.py; timm eva.py): (width, SwiGLU) -> (timm size, depth, heads)
_DINOV3 = {
    (384, False): ("small", 12, 6),
    (384, True): ("small_plus", 12, 6),
    (768, False): ("base", 12, 12),
    (1024, False): ("large", 24, 16),
    (1280, True): ("huge_plus", 32, 20),
    (4096, True): ("7b", 40, 32),
}
_TIMM_VIT_MLP_RATIO = 4.0


def dinov3_candidates() -> str:
    """The timm DINOv3 ViT names, for errors."""
    return ", ".join(f"timm:vit_{size}_patch16_dinov3[_qkvb]" for size, _, _ in _DINOV3.values())


def dinov3_spec(*, dim: int, depth: int, qkv_bias: bool, swiglu: bool, registers: int, mlp_hidden: int | None,
                num_heads: int | None, patch: int = 16) -> tuple[Any, list[str]]:
    """The timm DINOv3 ViT (``vit_<size>_patch16_dinov3[_qkvb]``) of these shapes, pooled by the normed class token.

    The standard size of the width names the model; shapes that differ from it (a depth, a head
    count, an MLP width, the register count) become keyword arguments, so any DINOv3-shaped ViT is
    rebuilt exactly. ``global_pool='token'``: DINOv3's embedding is the normed class token (timm's
    default for these models is the average of the patch tokens).

    Returns:
        ``(ArchSpec, warnings)``.

    Raises:
        ArchitectureError: a width and MLP that fit no DINOv3 model, or a head count that cannot be known.
    """
    from featviz.models.description import ArchSpec

    known = _DINOV3.get((dim, swiglu))
    if known is None and (swiglu or num_heads is None):
        raise ArchitectureError(
            f"DINOv3-style ViT weights of width {dim}{' with a SwiGLU MLP' if swiglu else ''} fit no timm DINOv3 "
            f"model and their head count is not in the file; pass --arch with one of {dinov3_candidates()}")
    if patch != 16:
        raise ArchitectureError(f"DINOv3-style ViT with {patch}px patches: every DINOv3 model uses 16; pass --arch")
    size, std_depth, std_heads = known or ("small", 12, 6)  # another width: the S recipe, resized
    warnings: list[str] = []
    heads = num_heads or std_heads
    name = f"timm:vit_{size}_patch16_dinov3{'_qkvb' if qkv_bias and size != '7b' else ''}"
    kwargs: dict[str, Any] = {"global_pool": "token"}
    if known is None:
        kwargs["embed_dim"] = dim
    if depth != std_depth:
        kwargs["depth"] = depth
    if heads != std_heads:
        kwargs["num_heads"] = heads
    if registers != 4:
        kwargs["num_reg_tokens"] = registers
    if not swiglu and mlp_hidden is not None and mlp_hidden != int(dim * _TIMM_VIT_MLP_RATIO):
        kwargs["mlp_ratio"] = mlp_hidden / dim
    if qkv_bias and size == "7b":
        kwargs["qkv_bias"] = True
    return ArchSpec("timm", name, kwargs), warnings


def _count(sd: dict, prefix: str) -> int:
    idx = {k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)}
    return len([i for i in idx if i.isdigit()])


def _details(family: str, **kw: Any) -> dict[str, Any]:
    return {"family": family, **kw}


def _infer_dinov3(sd: dict) -> Any:
    dim = int(sd["patch_embed.proj.weight"].shape[0])
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    swiglu = "blocks.0.mlp.fc1_g.weight" in sd
    hidden = None if swiglu else int(sd["blocks.0.mlp.fc1.weight"].shape[0])
    depth = _count(sd, "blocks.")
    reg = int(sd["reg_token"].shape[1])
    spec, _ = dinov3_spec(dim=dim, depth=depth, qkv_bias="blocks.0.attn.q_bias" in sd, swiglu=swiglu,
                          registers=reg, mlp_hidden=hidden, num_heads=None, patch=patch)
    details = _details("DINOv3 ViT (timm Eva)", embed_dim=dim, depth=depth, patch_size=patch,
                       prefix_tokens=1 + reg, position_embedding="rope", feature_dim=dim)
    return spec, details, ()


_CONVNEXT = {  # timm names: (depths, dims)
    "convnext_atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "convnext_femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "convnext_pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "convnext_nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnext_xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}


def _infer_convnext(sd: dict) -> Any:
    depths = tuple(_count(sd, f"stages.{i}.blocks.") for i in range(4))
    dims = tuple(int(sd[f"stages.{i}.blocks.0.conv_dw.weight"].shape[0]) for i in range(4) if depths[i])
    if len(dims) != 4:
        raise ArchitectureError(f"ConvNeXt-like weights with blocks per stage {depths}: featviz expects 4 stages; "
                                "pass --arch timm:NAME")
    grn = "stages.0.blocks.0.mlp.grn.weight" in sd
    conv_mlp = sd["stages.0.blocks.0.mlp.fc1.weight"].ndim == 4
    ls = "stages.0.blocks.0.gamma" in sd
    base = "convnextv2" if grn else "convnext"
    name = next((n.replace("convnext", base) for n, v in _CONVNEXT.items() if v == (depths, dims)), None)
    kwargs: dict[str, Any] = {}
    if name is None:
        name = f"{base}_tiny"
        kwargs.update(depths=list(depths), dims=list(dims))
    from featviz.models.description import ArchSpec

    atto_like = (depths, dims) in [v for n, v in _CONVNEXT.items() if n in ("convnext_atto", "convnext_femto",
                                                                            "convnext_pico", "convnext_nano")]
    if conv_mlp != (atto_like and not grn):
        kwargs["conv_mlp"] = conv_mlp
    if not grn and not ls:
        kwargs["ls_init_value"] = None
    if "head.norm.weight" not in sd and "norm_pre.weight" in sd:
        kwargs["head_norm_first"] = True
    details = _details("ConvNeXt (timm)", depths=list(depths), dims=list(dims), feature_dim=dims[-1])
    return ArchSpec("timm", f"timm:{name}", kwargs), details, ()


_SIGLIP_WIDTHS = {768: ("base", 12, 12), 1024: ("large", 24, 16), 1152: ("so400m", 27, 16), 1536: ("giantopt", 40, 16)}


def _infer_siglip(sd: dict) -> Any:
    from featviz.models.description import ArchSpec

    dim = int(sd["patch_embed.proj.weight"].shape[0])
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    grid = int(sd["pos_embed"].shape[1])
    side = math.isqrt(grid)
    if side * side != grid:
        raise ArchitectureError(f"SigLIP-like ViT weights with {grid} positions (not a square grid); pass --arch")
    depth = _count(sd, "blocks.")
    size, std_depth, std_heads = _SIGLIP_WIDTHS.get(dim, ("base", 12, None))
    if std_heads is None:
        raise ArchitectureError(f"SigLIP-like ViT weights (MAP head, no class token) of width {dim}: the head count "
                                "is not in the weights and fits no timm SigLIP model; pass --arch timm:NAME "
                                "(e.g. timm:vit_base_patch16_siglip_224)")
    img = side * patch
    import timm

    name = f"vit_{size}_patch{patch}_siglip_{img}"
    kwargs: dict[str, Any] = {}
    if not timm.is_model(name):
        name = f"vit_{size}_patch16_siglip_224"
        kwargs.update(patch_size=patch, img_size=img)
    if depth != std_depth:
        kwargs["depth"] = depth
    if dim != {"base": 768}.get(size, dim):
        kwargs["embed_dim"] = dim
    hidden = int(sd["blocks.0.mlp.fc1.weight"].shape[0])
    if size == "base" and hidden != 4 * dim:
        kwargs["mlp_ratio"] = hidden / dim
    details = _details("SigLIP ViT (timm, MAP head)", embed_dim=dim, depth=depth, patch_size=patch, img_size=img,
                       prefix_tokens=0, feature_dim=dim)
    return ArchSpec("timm", f"timm:{name}", kwargs), details, ()


# Perception Encoder (timm eva.py vit_pe_*): (width, patch) -> name; lang/spatial also by layer scale (gamma_1)
_PE_CORE = {(192, 16): "tiny_patch16_384", (384, 16): "small_patch16_384", (768, 16): "base_patch16_224",
            (1024, 14): "large_patch14_336", (1536, 14): "gigantic_patch14_448"}
_PE_DENSE = {(192, 16, False): ("spatial_tiny_patch16_512",), (384, 16, False): ("spatial_small_patch16_512",),
             (768, 16, False): ("spatial_base_patch16_512",), (1024, 14, False): ("spatial_large_patch14_448",),
             (1024, 14, True): ("lang_large_patch14_448",),
             (1536, 14, True): ("lang_gigantic_patch14_448", "spatial_gigantic_patch14_448")}
# EVA-02 (timm eva.py eva02_*): (width, patch) -> size; MIM (fc_norm, average) or CLIP (attn.norm, class token)
_EVA02_MIM = {(192, 14): "tiny", (384, 14): "small", (768, 14): "base", (1024, 14): "large"}
_EVA02_CLIP = {(768, 16): "eva02_base_patch16_clip_224", (1024, 14): "eva02_large_patch14_clip_224"}


def _meta_shapes(name: str, **kwargs: Any) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of timm's ``name`` (built on the meta device: no memory, no weights), without its head."""
    import timm
    import torch

    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _fit_eva(name: str, sd: dict, family: str, grid_rule: str | None) -> tuple[dict[str, Any], list[str]]:
    """The kwargs that make timm's Eva ``name`` take exactly these tensors (depth, size, MLP width).

    ``grid_rule``: how the model's RoPE reference grid follows a position grid other than the
    named model's ('native': PE's configs set it to the native grid; None: EVA-02's stays 16x16).
    """
    want = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("head.")}
    std = _meta_shapes(name)
    kwargs: dict[str, Any] = {}
    warnings: list[str] = []
    depth = _count(sd, "blocks.")
    if depth != _count(std, "blocks."):
        kwargs["depth"] = depth
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    prefix = int("cls_token" in sd)
    grid = int(sd["pos_embed"].shape[1]) - prefix
    side = math.isqrt(grid)
    std_side = math.isqrt(std["pos_embed"][1] - prefix)
    if side * side != grid:
        raise ArchitectureError(f"{family} weights with {grid} positions (not a square grid) fit no timm model; "
                                f"pass --arch timm:NAME")
    if side != std_side:
        kwargs["img_size"] = side * patch
        if grid_rule == "native":
            kwargs["ref_feat_shape"] = (side, side)
            warnings.append(f"position grid {side}x{side}, not {name}'s {std_side}x{std_side}: RoPE reference grid "
                            f"set to {side}x{side} (PE's configs use the native grid), not {std_side}x{std_side}")
    got = _meta_shapes(name, **kwargs)
    fc1 = next((k for k in ("blocks.0.mlp.fc1_g.weight", "blocks.0.mlp.fc1.weight") if k in want), None)
    if fc1 and got.get(fc1) != want[fc1] and fc1.endswith("fc1.weight") and "fc1_g" not in fc1:
        kwargs["mlp_ratio"] = want[fc1][0] / want[fc1][1] / (2 if "gigantic" not in name and "eva02" in name else 1)
        got = _meta_shapes(name, **kwargs)
    if got != want:
        bad = sorted(set(got) ^ set(want)) or sorted(k for k in got if got[k] != want[k])
        raise ArchitectureError(f"{family} weights do not fit timm's {name} ({', '.join(bad[:3])} differ); "
                                f"pass --arch timm:NAME")
    for w in warnings:  # an assumption: logged, and listed in the report's not_inferable
        log.warning("%s", w)
    return kwargs, warnings


def _infer_pe(sd: dict) -> Any:
    from featviz.models.description import ArchSpec

    dim = int(sd["patch_embed.proj.weight"].shape[0])
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    core = "attn_pool.latent" in sd
    ls = "blocks.0.gamma_1" in sd
    names = (_PE_CORE.get((dim, patch)),) if core else _PE_DENSE.get((dim, patch, ls))
    kind = "core (attention pool)" if core else "lang/spatial (no pool head, no final norm)"
    if not names or names[0] is None:
        known = [f"timm:vit_pe_core_{n}" for n in _PE_CORE.values()] if core else \
            [f"timm:vit_pe_{n}" for ns in _PE_DENSE.values() for n in ns]
        raise ArchitectureError(f"Perception Encoder {kind} weights of width {dim}, patch {patch}"
                                f"{', layer scale' if ls else ''}: the head count is not in the file and fits no "
                                f"timm PE model; pass --arch with one of {', '.join(known)}")
    depth = _count(sd, "blocks.")
    cands = [f"vit_pe_{'core_' if core else ''}{n}" for n in names]
    name = cands[0]
    if len(cands) > 1:  # lang and spatial G/14 are the same network (they differ in depth only)
        name = next((c for c in cands if _count(_meta_shapes(c), "blocks.") == depth), cands[0])
    kwargs, warnings = _fit_eva(name, sd, "Perception Encoder", "native")
    details = _details(f"Perception Encoder {kind.split(' ')[0]} (timm Eva)", embed_dim=dim, depth=depth,
                       patch_size=patch, prefix_tokens=int("cls_token" in sd), position_embedding="learned + rope",
                       feature_dim=dim, rope="from timm's vit_pe_* configs (not in the weights)")
    if len(cands) > 1:
        details["same_network_as"] = ", ".join(f"timm:{c}" for c in cands if c != name)
    return ArchSpec("timm", f"timm:{name}", kwargs), details, tuple(warnings)


def _infer_eva02(sd: dict) -> Any:
    from featviz.models.description import ArchSpec

    dim = int(sd["patch_embed.proj.weight"].shape[0])
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    clip = "blocks.0.attn.norm.weight" in sd and "fc_norm.weight" not in sd
    grid = math.isqrt(int(sd["pos_embed"].shape[1]) - 1)
    if clip:
        name = _EVA02_CLIP.get((dim, patch))
        if name and grid * patch == 336 and name.endswith("_224"):
            name = name.replace("_224", "_336") if _has_model(name.replace("_224", "_336")) else name
        known = list(_EVA02_CLIP.values())
    else:
        size = _EVA02_MIM.get((dim, patch))
        name = None
        if size:
            sized = f"eva02_{size}_patch14_{grid * patch}"
            name = sized if _has_model(sized) else f"eva02_{size}_patch14_224"
        known = [f"eva02_{s}_patch14_224" for s in _EVA02_MIM.values()]
    if name is None:
        raise ArchitectureError(f"EVA-02 weights ({'CLIP' if clip else 'MIM'} layout) of width {dim}, patch {patch}: "
                                "the head count is not in the file and fits no timm EVA-02 model; pass --arch with "
                                f"one of {', '.join('timm:' + k for k in known)}")
    kwargs, warnings = _fit_eva(name, sd, "EVA-02", None)
    details = _details(f"EVA-02 {'CLIP' if clip else 'MIM'} (timm Eva)", embed_dim=dim, depth=_count(sd, "blocks."),
                       patch_size=patch, prefix_tokens=1, position_embedding="learned + rope", feature_dim=dim,
                       rope="from timm's eva02_* configs (not in the weights)")
    return ArchSpec("timm", f"timm:{name}", kwargs), details, tuple(warnings)


def _has_model(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


def _eva_family(sd: dict) -> str | None:
    """'pe', 'eva02', 'eva' (EVA-01 style, RoPE unknown) or None, from timm Eva key signatures.

    Signatures checked against every registered timm ViT/Eva model (timm 1.0.31): PE is the only
    one with ``norm_pre``, a learned ``pos_embed``, no patch-embedding bias and a fused qkv bias,
    and either an attention pool (core) or no final norm at all (lang/spatial); EVA-02 the only one
    with a SwiGLU MLP (``fc1_g``/``fc1_x``, or a fused ``fc1`` twice ``fc2``'s width) behind
    ``q_bias``/``v_bias`` or separate ``q_proj``/``k_proj``/``v_proj``, and no layer scale.
    """
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd or "reg_token" in sd:
        return None
    fused = "blocks.0.attn.qkv.weight" in sd
    if fused and "norm_pre.weight" in sd and "patch_embed.proj.bias" not in sd and "blocks.0.attn.qkv.bias" in sd \
            and "fc_norm.weight" not in sd and ("attn_pool.latent" in sd) == ("norm.weight" in sd) \
            and "blocks.0.mlp.fc1.weight" in sd:
        return "pe"
    eva_attn = (fused and "blocks.0.attn.q_bias" in sd) or "blocks.0.attn.q_proj.weight" in sd
    if not eva_attn or "blocks.0.gamma_1" in sd or "cls_token" not in sd:
        return None
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    swiglu = "blocks.0.mlp.fc1_g.weight" in sd or (fc1 is not None and fc2 is not None
                                                   and fc1.shape[0] == 2 * fc2.shape[1])
    return "eva02" if swiglu else "eva"


def infer_timm_family(sd: dict) -> Any:
    """The timm architecture of a state dict in timm's names, for the families keys determine; None otherwise.

    DINOv3 ViTs (Eva: ``reg_token``, ``gamma_1``, no ``pos_embed``: RoPE), ConvNeXt (``stem.0``,
    ``stages.N.blocks.M.conv_dw``), SigLIP ViTs (a MAP head ``attn_pool.latent`` and no class
    token), Perception Encoder core/lang/spatial and EVA-02 (``_eva_family``: key signatures no
    other timm model has; RoPE and its grid from their timm configs). Returns
    ``(ArchSpec, details, not_inferable)`` (``featviz.models.architectures.Inferred``'s fields).

    Raises:
        ArchitectureError: the family is clear but no timm model of it fits; names ``--arch`` candidates.
    """
    vit = "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd
    if vit and "reg_token" in sd and "blocks.0.gamma_1" in sd and "pos_embed" not in sd:
        return _infer_dinov3(sd)
    if "stem.0.weight" in sd and "stages.0.blocks.0.conv_dw.weight" in sd:
        return _infer_convnext(sd)
    eva = _eva_family(sd)
    if eva == "pe":
        return _infer_pe(sd)
    if eva == "eva02":
        return _infer_eva02(sd)
    if vit and "attn_pool.latent" in sd and "cls_token" not in sd and "pos_embed" in sd \
            and "blocks.0.mlp.fc1.weight" in sd and "blocks.0.gamma_1" not in sd:
        return _infer_siglip(sd)
    if eva == "eva" or (vit and "blocks.0.gamma_1" in sd):
        raise ArchitectureError(
            "timm Eva weights (q_bias/v_bias or gamma_1, a plain MLP): EVA-01 (no RoPE) and other Eva models "
            "(EVA-02-CLIP-E's post-norm, RoPE ViTs) have these same keys, and RoPE is not in the weights; pass "
            "--arch timm:NAME, e.g. timm:eva_giant_patch14_224, timm:eva02_enormous_patch14_clip_224, "
            "timm:vit_small_patch16_rope_224")
    return None
