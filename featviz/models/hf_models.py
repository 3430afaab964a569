"""Hugging Face transformers vision models, shaped the way featviz's feature core expects.

A ``save_pretrained`` folder (``config.json`` + ``model.safetensors``, or that ``model.safetensors``
with a ``config.json`` beside it) of ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``DINOv3ViTModel``,
``ViTMAEModel``, ``IJepaModel``, ``ViTModel``, ``SiglipVisionModel``, ``Siglip2VisionModel``,
``CLIPVisionModel`` or ``DINOv3ConvNextModel`` (``HFConvNextBackbone``: its stages) (also the whole
``CLIPModel``/``SiglipModel``/``Siglip2Model`` and the ``...ForImageClassification``/``ViTMAEForPreTraining``
files, whose vision encoder is read) is built
by transformers itself, from local files only, never with ``trust_remote_code`` (a config with an
``auto_map`` is refused). ``HFVisionBackbone`` then gives it the timm-like face of
``featviz.models.features``: ``patch_embed.patch_size``, ``num_prefix_tokens`` (class + registers),
``blocks.N`` (the model's own encoder layers, whose outputs are ``[prefix..., patches row-major]``),
``norm`` (the final layernorm), and ``forward(x)`` giving the family's pooled embedding:

- DINOv2 / DINOv2 with registers / DINOv3: the normed class token (``pooler_output``);
- ViTMAE: the normed class token, with masking off (``mask_ratio`` 0 and identity ``noise``: every
  patch, in order);
- I-JEPA: the average of the normed patch tokens (it has no class token);
- ViT (Web-DINO, Web-MAE): the normed class token (not the tanh ``pooler``);
- SigLIP / SigLIP2: the attention-pool (MAP) head, or the average of the normed tokens without one;
- CLIP: the class token after ``post_layernorm`` (``pooler_output``);
- DINOv3 ConvNeXt: the global average pool, normed (``pooler_output``).

``attention_maps(x, block)`` returns the model's own attention probabilities (RoPE, q/k norms and
separate q/k/v projections all applied by transformers' eager attention).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featviz.errors import CheckpointError, MissingDependencyError
from featviz.models.description import IMAGENET, ArchSpec, ModelDescription, Normalization, attach

log = logging.getLogger(__name__)

SIGLIP = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "SigLIP's mean/std 0.5")
CLIP = Normalization((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), "CLIP's mean/std")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
CLS_NORMED = "class token, normed"
CONVNEXT = "DINOv3ConvNextModel"


@dataclass(frozen=True)
class Family:
    """How featviz reads one transformers vision class.

    Attributes:
        norm: The attribute of the final layernorm over every token (None: the model norms only its
            pooled token, so ``norm`` is an identity and the default layer is the last block).
        pooling: What ``forward`` returns, in words.
        position_embedding: How the model encodes positions.
        normalization: The family's default mean/std, when the folder has no ``preprocessor_config.json``.
        class_token: Whether token 0 is a class token.
        interpolate: The forward takes ``interpolate_pos_encoding``.
    """

    norm: str | None
    pooling: str
    position_embedding: str
    normalization: Normalization
    class_token: bool = True
    interpolate: bool = True


FAMILIES: dict[str, Family] = {
    "Dinov2Model": Family("layernorm", CLS_NORMED, "learned (interpolated)", IMAGENET, interpolate=False),
    "Dinov2WithRegistersModel": Family("layernorm", CLS_NORMED, "learned (interpolated)", IMAGENET,
                                       interpolate=False),
    "DINOv3ViTModel": Family("norm", CLS_NORMED, "rope", IMAGENET, interpolate=False),
    "ViTMAEModel": Family("layernorm", CLS_NORMED + " (no masking)", "sin-cos (fixed, interpolated)", IMAGENET),
    "IJepaModel": Family("layernorm", "average of patch tokens, normed", "learned (interpolated)", IMAGENET,
                         class_token=False),
    "ViTModel": Family("layernorm", CLS_NORMED, "learned (interpolated)", IMAGENET),
    "SiglipVisionModel": Family("post_layernorm", "attention pool (MAP head)", "learned (interpolated)", SIGLIP,
                                class_token=False),
    "Siglip2VisionModel": Family("post_layernorm", "attention pool (MAP head)", "learned (resized per image)",
                                 SIGLIP, class_token=False, interpolate=False),
    "CLIPVisionModel": Family(None, "class token, post-layernorm", "learned (interpolated)", CLIP),
}
# a file of a larger model whose vision encoder featviz reads
VISION_OF = {"CLIPModel": "CLIPVisionModel", "SiglipModel": "SiglipVisionModel", "Siglip2Model": "Siglip2VisionModel"}
HEAD_SUFFIXES = ("ForImageClassification", "ForPreTraining", "ForMaskedImageModeling")


def transformers_module() -> Any:
    """The ``transformers`` package.

    Raises:
        MissingDependencyError: it is not installed.
    """
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("this is a Hugging Face transformers folder: install the extra with "
                                     "`pip install 'featviz[hf]'`") from None
    return transformers


class PatchGrid:
    """What the feature core reads of a ViT's patch embedding: its patch size, and that any multiple works."""

    strict_img_size = False

    def __init__(self, patch: int | tuple[int, int]):
        self.patch_size = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))

    def __repr__(self) -> str:
        return f"PatchGrid(patch_size={self.patch_size})"


def _encoder_layers(hf: nn.Module, depth: int) -> nn.ModuleList:
    """The model's ``nn.ModuleList`` of ``depth`` transformer layers."""
    for _, mod in hf.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == depth:
            return mod
    raise CheckpointError(f"{type(hf).__name__}: no list of {depth} encoder layers found; featviz cannot read it")


class HFVisionBackbone(nn.Module):
    """A transformers vision model with the timm-like face featviz's feature core reads.

    ``blocks`` is registered before the model itself, so ``named_modules`` lists the encoder layers
    as ``blocks.0`` ... ``blocks.N-1`` (and ``norm`` the final layernorm); every layer still runs
    inside the transformers model's own forward.

    Args:
        hf: The transformers vision model (``Dinov2Model``, ``SiglipVisionModel``, ...).
        family: How to read it (``FAMILIES``).
    """

    def __init__(self, hf: nn.Module, family: Family):
        super().__init__()
        cfg = hf.config
        self.family = family
        self.blocks = _encoder_layers(hf, int(cfg.num_hidden_layers))
        inner = getattr(hf, "vision_model", hf)
        self.norm = getattr(inner, family.norm) if family.norm else nn.Identity()
        self.hf = hf
        for layer in self.blocks:  # CAM's default layer, blocks.N.norm1, under the names every family uses
            first = next((getattr(layer, a) for a in ("norm1", "layernorm_before", "layer_norm1")
                          if isinstance(getattr(layer, a, None), nn.Module)), None)
            if first is not None and not hasattr(layer, "norm1"):
                object.__setattr__(layer, "norm1", first)  # an alias: not a second registered child
        self.patch_embed = PatchGrid(cfg.patch_size)
        self.num_reg_tokens = int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.num_prefix_tokens = int(family.class_token) + self.num_reg_tokens
        self.num_features = self.embed_dim = int(cfg.hidden_size)
        if family.class_token:  # the feature core counts class tokens from this attribute
            self.cls_token = torch.zeros(0)

    def run(self, x: torch.Tensor, **kwargs: Any) -> Any:
        """The transformers model's own output for images ``x`` (N, 3, H, W), with every patch and no masking."""
        name = type(self.hf).__name__
        if name == "Siglip2VisionModel":
            p = self.patch_embed.patch_size[0]
            n, c, h, w = x.shape
            gh, gw = h // p, w // p
            patches = x.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, p * p * c)
            shapes = torch.tensor([[gh, gw]] * n, dtype=torch.long, device=x.device)
            mask = torch.ones(n, gh * gw, dtype=torch.long, device=x.device)
            return self.hf(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes, **kwargs)
        if name == "ViTMAEModel":  # identity noise: argsort keeps every patch in order (mask_ratio is 0)
            p = self.patch_embed.patch_size
            count = (x.shape[-2] // p[0]) * (x.shape[-1] // p[1])
            kwargs["noise"] = torch.arange(count, dtype=x.dtype, device=x.device).expand(x.shape[0], count)
        if self.family.interpolate:
            kwargs["interpolate_pos_encoding"] = True
        return self.hf(pixel_values=x, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The family's pooled embedding (N, D) of images ``x`` (N, 3, H, W)."""
        out = self.run(x)
        name = type(self.hf).__name__
        if name in ("IJepaModel",) or (name.startswith("Siglip") and out.pooler_output is None):
            return out.last_hidden_state.mean(dim=1)
        if name in ("ViTMAEModel", "ViTModel"):
            return out.last_hidden_state[:, 0]
        return out.pooler_output

    def attention_maps(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """Block ``block``'s attention probabilities (N, heads, T, T), as the model itself computes them.

        transformers' eager attention is switched on for the call (fused kernels return no
        probabilities), so RoPE, q/k norms and separate q/k/v projections are the model's own.
        """
        hf = self.hf
        before = hf.config._attn_implementation
        if before != "eager":
            hf.set_attn_implementation("eager")
        try:
            out = self.run(x, output_attentions=True)
        finally:
            if before != "eager":
                hf.set_attn_implementation(before)
        return out.attentions[block]


class HFConvNextBackbone(nn.Module):
    """transformers' ``DINOv3ConvNextModel`` as a CNN the feature core reads.

    ``stages.0`` ... ``stages.3`` are its own stages ((N, C, H, W) maps; the last is the default
    layer, through ``feature_info``), and ``forward`` gives its ``pooler_output``: the global average
    pool, normed by the final layernorm.

    Args:
        hf: The ``DINOv3ConvNextModel``.
    """

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.stages = hf.model.stages
        self.hf = hf
        sizes = list(hf.config.hidden_sizes)
        self.num_features = int(sizes[-1])
        self.feature_info = [{"module": f"stages.{i}", "num_chs": int(c), "reduction": 4 * 2 ** i}
                             for i, c in enumerate(sizes)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled, normed embedding (N, D) of images ``x`` (N, 3, H, W)."""
        return self.hf(pixel_values=x).pooler_output


# ------------------------------------------------------------------ folders
def read_config(folder: Path) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict.

    Raises:
        CheckpointError: no readable ``config.json``.
    """
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: expected a readable config.json ({e}); point --checkpoint at the "
                              "folder save_pretrained wrote") from None


def is_transformers_config(cfg: dict[str, Any]) -> bool:
    """Whether a ``config.json`` is a transformers model's (it names ``architectures`` or a ``model_type``)."""
    return bool(cfg.get("architectures") or cfg.get("model_type")) and "architecture" not in cfg


def model_class(cfg: dict[str, Any], folder: Path) -> str:
    """The transformers vision class featviz builds for a config (``Dinov2Model``, ``CLIPVisionModel``, ...).

    Raises:
        CheckpointError: a config with custom code (``auto_map``), or a class featviz does not read.
    """
    if cfg.get("auto_map"):
        raise CheckpointError(f"{folder}: config.json names custom code (auto_map); featviz never runs code from a "
                              "checkpoint (no trust_remote_code): load it with its own library")
    for arch in cfg.get("architectures") or []:
        name = VISION_OF.get(arch, arch)
        for suffix in HEAD_SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)] + "Model"
        name = {"DINOv3ViTModel": "DINOv3ViTModel", "Dinov2WithRegistersModel": "Dinov2WithRegistersModel"}.get(
            name, name)
        if name in FAMILIES or name == CONVNEXT:
            return name
    raise CheckpointError(f"{folder}: config.json names {cfg.get('architectures') or cfg.get('model_type')}; featviz "
                          f"reads {', '.join([*FAMILIES, CONVNEXT])} folders")


def _preprocessor_normalization(folder: Path) -> Normalization | None:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        pre = json.loads(path.read_text())
        return Normalization(tuple(float(v) for v in pre["image_mean"]), tuple(float(v) for v in pre["image_std"]),
                             "preprocessor_config.json")
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s: preprocessor_config.json has no readable image_mean/image_std; using the family's default",
                    folder)
        return None


def _native_size(cfg: Any) -> tuple[int, int]:
    size = getattr(cfg, "image_size", None)
    if size is None and getattr(cfg, "num_patches", None):  # SigLIP2 NaFlex: a square of num_patches
        side = int(round(int(cfg.num_patches) ** 0.5)) * int(cfg.patch_size)
        return side, side
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[-1])
    return (int(size), int(size)) if size else (224, 224)


def load_transformers_folder(folder: str | os.PathLike, *, origin: str | None = None) -> nn.Module:
    """Build the vision model a transformers ``save_pretrained`` folder holds, with its description.

    Args:
        folder: The folder with ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``).
        origin: What the user named (an ``hf:`` name), recorded in the load report.

    Returns:
        An ``HFVisionBackbone`` in eval mode, its ``ModelDescription`` attached.

    Raises:
        MissingDependencyError: transformers is not installed.
        CheckpointError: custom code, an unsupported class, no weights, or weights that do not fit.
    """
    from featviz.models.checkpoints import LoadReport

    folder = Path(folder)
    raw = read_config(folder)
    name = model_class(raw, folder)
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise CheckpointError(f"{folder}: config.json but no weights (expected one of {', '.join(WEIGHT_FILES)})")
    tf = transformers_module()
    cls = getattr(tf, name)
    family = FAMILIES.get(name) or Family(None, "global average pool, then norm", "", IMAGENET)
    config = cls.config_class.from_pretrained(folder, local_files_only=True)
    warnings: list[str] = []
    if name == "ViTMAEModel" and config.mask_ratio:
        warnings.append(f"ViTMAE's mask_ratio {config.mask_ratio} set to 0: features of every patch, in order")
        config.mask_ratio = 0.0
    bars = tf.utils.logging.is_progress_bar_enabled()
    tf.utils.logging.disable_progress_bar()  # one bar per load would bury featviz's own output
    try:
        hf, info = cls.from_pretrained(folder, config=config, local_files_only=True, trust_remote_code=False,
                                       output_loading_info=True)
    finally:
        if bars:
            tf.utils.logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or []]
    if missing or mismatched:
        raise CheckpointError(f"{folder}: the weights do not fit {name}: {len(missing)} tensors missing "
                              f"({', '.join(missing[:3])}), {len(mismatched)} of another shape; check the folder")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        warnings.append(f"{len(unexpected)} tensors outside the vision encoder not loaded "
                        f"({', '.join(unexpected[:3])})")
    model = (HFConvNextBackbone(hf) if name == CONVNEXT else HFVisionBackbone(hf, family)).eval()
    norm = _preprocessor_normalization(folder)
    if norm is None:
        norm = Normalization(family.normalization.mean, family.normalization.std,
                             f"{family.normalization.source} (the family's default: no preprocessor_config.json)")
    pooling = family.pooling
    if name.startswith("Siglip") and not getattr(config, "vision_use_head", True):
        pooling = "average of tokens, normed (no MAP head)"
    size = _native_size(config)
    if name == CONVNEXT:
        details: dict[str, Any] = {"hidden_sizes": list(config.hidden_sizes), "depths": list(config.depths)}
    else:
        details = {"hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
                   "heads": config.num_attention_heads, "patch_size": config.patch_size,
                   "prefix_tokens": model.num_prefix_tokens, "register_tokens": model.num_reg_tokens}
    spec = ArchSpec("transformers", f"hf:{name}", details)
    tensors = sum(1 for _ in hf.state_dict())
    report = LoadReport(
        path=str(origin or folder), format="transformers", format_title=f"Hugging Face transformers folder ({name})",
        container_key=None, prefix="", dropped={"outside the vision encoder": len(unexpected)} if unexpected else {},
        arch=spec.to_dict(), arch_details={**details, "library": "transformers", "pooling": pooling,
                                           "position_embedding": family.position_embedding},
        arch_source="config.json", not_inferable=[], normalization=norm.to_dict(), loaded=tensors, missing=[],
        unexpected=unexpected, tensors_in_file=tensors + len(unexpected), warnings=warnings, input_size=list(size))
    source = {**report.to_dict(), "folder": str(folder), "model_class": name}
    attach(model, ModelDescription(arch=spec, normalization=norm, input_size=size, source=source,
                                   warnings=tuple(warnings), library="transformers", pooling=pooling,
                                   position_embedding=family.position_embedding or None))
    for w in warnings:
        log.warning("%s: %s", folder.name, w)
    return model


# ------------------------------------------------------------------ timm's Hugging Face folders
def is_timm_config(cfg: dict[str, Any]) -> bool:
    """Whether a ``config.json`` is timm's (``architecture`` and usually ``pretrained_cfg``)."""
    return isinstance(cfg.get("architecture"), str)


class _DropAssumedNormalization(logging.Filter):
    """Drops the loader's "normalisation not recorded" warning when the folder's config records it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "normalisation not recorded" not in record.getMessage()


def load_timm_folder(folder: str | os.PathLike, *, arch: Any = None, num_heads: int | None = None,
                     trust: bool = False, head: bool = False, origin: str | None = None) -> nn.Module:
    """Build the timm model of a timm Hugging Face folder (``config.json`` with ``architecture``, and its weights).

    The weights go through featviz's timm path (``load_backbone`` with ``timm:<architecture>``, every
    tensor checked); mean/std and the native size come from the config's ``pretrained_cfg``.

    Raises:
        CheckpointError: no weights in the folder, or weights that do not fit the architecture.
    """
    from featviz.models.checkpoints import load_backbone
    from featviz.models.description import describe

    folder = Path(folder)
    cfg = read_config(folder)
    weights = next((folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: timm config.json but no model.safetensors or pytorch_model.bin beside it")
    # model_args: what the export recorded to rebuild it; featviz sets the classes and dynamic size itself
    args = {k: v for k, v in (cfg.get("model_args") or {}).items()
            if k not in ("num_classes", "dynamic_img_size", "pretrained")}
    spec = arch or ArchSpec("timm", "timm:" + cfg["architecture"], args)
    pre = cfg.get("pretrained_cfg") or {}
    quiet = _DropAssumedNormalization() if pre.get("mean") and pre.get("std") else None
    checkpoints_log = logging.getLogger("featviz.models.checkpoints")
    if quiet:  # the folder's pretrained_cfg records it: the file-level assumption is not the one used
        checkpoints_log.addFilter(quiet)
    try:
        model, _ = load_backbone(weights, arch=spec, num_heads=num_heads, trust=trust, keep_classifier=head)
    finally:
        if quiet:
            checkpoints_log.removeFilter(quiet)
    desc = describe(model)
    changes: dict[str, Any] = {"library": "timm"}
    if pre.get("mean") and pre.get("std"):
        changes["normalization"] = Normalization(tuple(float(v) for v in pre["mean"]),
                                                 tuple(float(v) for v in pre["std"]), "config.json pretrained_cfg")
    if pre.get("input_size"):
        changes["input_size"] = (int(pre["input_size"][-2]), int(pre["input_size"][-1]))
    warnings = tuple(w for w in desc.warnings if not w.startswith("normalisation not recorded")
                     or "normalization" not in changes)
    source = {**(desc.source or {}), "path": str(origin or folder), "folder": str(folder),
              "format_title": f"timm Hugging Face folder ({cfg['architecture']})", "warnings": list(warnings)}
    if "normalization" in changes:
        source["normalization"] = changes["normalization"].to_dict()
    if "input_size" in changes:
        source["input_size"] = list(changes["input_size"])
    return attach(model, desc.with_changes(source=source, warnings=warnings, **changes))
