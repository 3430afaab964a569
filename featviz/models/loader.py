"""The one way every command gets its model: ``load_model``.

A checkpoint gives its encoder (``head=False``), or its encoder with the classifier it carries,
or the whole featviz segmenter (``head=True``); without a checkpoint an architecture is built
with seeded random weights (the "random init" baseline). The model always comes back in eval
mode with its ``ModelDescription`` attached, and the description is returned beside it.
Every warning of the load has been logged at WARNING (one line each, so every command shows it
on stderr) and is kept in ``description.warnings`` for the manifests.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from featviz.errors import ArchitectureError, CheckpointError
from featviz.models.description import ArchSpec, ModelDescription, describe

log = logging.getLogger(__name__)


class LoadedModel(NamedTuple):
    """A model in eval mode and its description (also attached: ``describe(model)``)."""

    model: nn.Module
    description: ModelDescription


def _is_segmenter_checkpoint(checkpoint: str | os.PathLike, trust: bool) -> bool:
    """Whether a checkpoint holds a whole segmenter.

    A featviz segmentation checkpoint (``featviz train --method supervised_seg|cac``, its metadata
    lists a ``head``) or CAC's official DeepLabv3+ file (``featviz.models.segmenter.segmenter_layout``:
    header or key names only).
    """
    from featviz.models.segmenter import segmenter_layout

    return segmenter_layout(checkpoint, trust=trust) is not None


def _pretrained_folder(checkpoint: str | os.PathLike) -> tuple[Path, str | None] | None:
    """The Hugging Face folder a checkpoint names, and the ``hf:`` name it came from; None for a plain file.

    An ``hf:ORG/NAME[@REV]`` (or ``hf-hub:``) name resolves from the local cache only
    (``featviz.models.hub``); a folder with a ``config.json``, or a ``model.safetensors`` /
    ``pytorch_model.bin`` with one beside it, is a ``save_pretrained`` folder (transformers or timm).
    """
    from featviz.models import hub
    from featviz.models.hf_models import WEIGHT_FILES

    origin = str(checkpoint) if hub.is_hub_name(checkpoint) else None
    path = hub.resolve(checkpoint) if origin else Path(checkpoint)
    if path.is_dir() and (path / "config.json").is_file():
        return path, origin
    if path.is_file() and path.name in WEIGHT_FILES and (path.parent / "config.json").is_file():
        return path.parent, origin
    if origin:
        raise CheckpointError(f"{origin}: the cached snapshot {path} has no config.json (neither a transformers nor "
                              "a timm folder); pass one of its weight files to --checkpoint")
    return None


def _load_folder(folder: Path, origin: str | None, *, arch: str | ArchSpec | None, num_heads: int | None,
                 trust: bool, head: bool) -> nn.Module:
    """The model of a transformers or timm ``save_pretrained`` folder."""
    from featviz.models import hf_models

    cfg = hf_models.read_config(folder)
    if hf_models.is_timm_config(cfg):
        return hf_models.load_timm_folder(folder, arch=arch, num_heads=num_heads, trust=trust, head=head,
                                          origin=origin)
    if arch is not None:
        log.warning("%s: --arch %s ignored: a transformers folder's config.json names its architecture", folder,
                    arch if isinstance(arch, str) else arch.name)
    return hf_models.load_transformers_folder(folder, origin=origin)


def load_model(checkpoint: str | os.PathLike | None = None, *, arch: str | ArchSpec | None = None,
               format: str = "auto", num_heads: int | None = None, checkpoint_key: str | None = None,
               trust: bool = False, seed: int = 0, head: bool = False) -> LoadedModel:
    """Load a checkpoint, or build ``arch`` with seeded random weights.

    Args:
        checkpoint: Any supported checkpoint file (see ``featviz.models.checkpoints.FORMATS``); None for
            random weights.
        arch: Architecture name or spec: required without a checkpoint, optional with one
            (inferred from metadata or shapes).
        format: A checkpoint layout name, or "auto" to detect it.
        num_heads: ViT attention heads (a head count changes no weight shape).
        checkpoint_key: Which network of a multi-network file (DINO/iBOT teacher|student,
            I-JEPA/MSN target_encoder|encoder).
        trust: Allow arbitrary pickles (``weights_only=False``); never automatic.
        seed: Seed of the random initialisation (no checkpoint).
        head: Keep what the checkpoint has beyond the encoder: its linear classifier (timm ``fc``,
            ``classifier``, ``head``, ``head.fc``; torchvision ``fc``), or a whole segmenter (featviz's,
            or CAC's official DeepLabv3+; with ``format="auto"``).

    Returns:
        ``LoadedModel(model, description)``.

    Raises:
        ArchitectureError: neither ``checkpoint`` nor ``arch`` is given, or the architecture does not fit.
        CheckpointError: the checkpoint cannot be read or does not fit its layout.
    """
    if checkpoint is not None:
        folder = _pretrained_folder(checkpoint) if format == "auto" or str(checkpoint).startswith("hf") else None
        if folder is not None:
            model = _load_folder(*folder, arch=arch, num_heads=num_heads, trust=trust, head=head)
            return LoadedModel(model.eval(), describe(model))
        if head and format == "auto" and _is_segmenter_checkpoint(checkpoint, trust):  # pixel logits, not the encoder
            from featviz.models.segmenter import load_segmenter

            model = load_segmenter(checkpoint, trust=trust)
        else:
            from featviz.models.checkpoints import load_backbone

            model, _ = load_backbone(checkpoint, arch=arch, format=format, num_heads=num_heads,
                                     checkpoint_key=checkpoint_key, trust=trust, keep_classifier=head)
        return LoadedModel(model.eval(), describe(model))
    if not arch:
        raise ArchitectureError("give --checkpoint, or --arch for a randomly initialised model")
    from featviz.models.architectures import build_backbone

    model = build_backbone(arch, num_heads=num_heads, seed=seed)
    return LoadedModel(model, describe(model))


def inspect_checkpoint(checkpoint: str | os.PathLike, *, arch: str | ArchSpec | None = None, format: str = "auto",
                       num_heads: int | None = None, checkpoint_key: str | None = None,
                       trust: bool = False) -> dict[str, Any]:
    """What ``featviz inspect`` shows of a checkpoint, as one JSON-able dict.

    A whole segmenter (featviz's, or CAC's official DeepLabv3+; with ``format="auto"``) is described
    as the segmenter it is (``kind: "segmenter"``, its layout, backbone, strides, head widths,
    classes: ``featviz.models.segmenter.describe_segmenter``): it loads whole, nothing is dropped. Any
    other checkpoint gives its encoder's load report (``featviz.models.checkpoints.LoadReport``: layout,
    prefix, what was dropped, architecture, normalisation, tensors).

    Raises:
        CheckpointError, ArchitectureError: the file cannot be read or does not fit its layout.
    """
    if format == "auto" and _pretrained_folder(checkpoint) is None and _is_segmenter_checkpoint(checkpoint, trust):
        from featviz.models.segmenter import describe_segmenter, load_segmenter

        model = load_segmenter(checkpoint, trust=trust)
        desc = describe(model)
        return {"path": str(checkpoint), "format": (desc.source or {}).get("format"), **describe_segmenter(model),
                "normalization": desc.normalization.to_dict() if desc.normalization else None,
                "warnings": list(desc.warnings) + _nonfinite_warning(model, checkpoint)}
    model, desc = load_model(checkpoint, arch=arch, format=format, num_heads=num_heads, checkpoint_key=checkpoint_key,
                             trust=trust)
    from featviz.models.facts import model_facts

    info = {**desc.source, "model": model_facts(model)}  # the load report, and what matters about the model
    info["warnings"] = list(info.get("warnings") or []) + _nonfinite_warning(model, checkpoint)
    return info


def _nonfinite_warning(model: nn.Module, checkpoint: str | os.PathLike) -> list[str]:
    """A warning (logged, and returned for the report) when weights hold NaN or Inf: the file loads, but is broken."""
    bad = total = 0
    names = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point():
            n = int((~torch.isfinite(t)).sum())
            total += t.numel()
            if n:
                bad += n
                names.append(name)
    if not bad:
        return []
    msg = (f"{Path(checkpoint).name}: {bad:,} of {total:,} weights are NaN or Inf (in {len(names)} tensors, e.g. "
           f"{', '.join(names[:3])}); the file loads, but its features will be NaN (a diverged run?)")
    log.warning("%s", msg)
    return [msg]
