"""Load a verified encoder: ``load_backbone`` and its ``LoadReport``; ``convert_checkpoint``.

``load_backbone`` reads the file (``reader``), detects its layout (``detection``), extracts the
encoder tensors, then builds the architecture (given, from metadata, or inferred from shapes),
checks every shape, loads, and returns the encoder plus a ``LoadReport``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featviz.errors import ArchitectureError, CheckpointError, CheckpointFormatError, FeatvizError, shorten
from featviz.io.outputs import check_output
from featviz.models.architectures import (
    build_backbone,
    classifier_name,
    default_input_size,
    default_normalization,
    infer_arch,
    model_traits,
    parse_arch,
    standard_num_heads,
)
from featviz.models.checkpoints.detection import _describe_keys, detect_format
from featviz.models.checkpoints.featviz_format import save_featviz
from featviz.models.checkpoints.layouts import FORMATS, Extracted
from featviz.models.checkpoints.reader import read_checkpoint
from featviz.models.description import ArchSpec, ModelDescription, attach

log = logging.getLogger(__package__)  # "featviz.models.checkpoints", the logger of the package


RANDOM_WEIGHTS_KEY = "featviz_random_weights"
"""A checkpoint's top-level key that says (``True``) its weights are a seeded random initialisation."""


def says_random_weights(ck: Any) -> bool:
    """Whether a checkpoint says its weights are random.

    ``{RANDOM_WEIGHTS_KEY: True}`` at its top level, or in featviz's metadata (``featviz convert`` keeps it).
    """
    meta = getattr(ck, "featviz_meta", None) if getattr(ck, "container", None) == "safetensors" else None
    return any(isinstance(d, dict) and d.get(RANDOM_WEIGHTS_KEY) is True for d in (ck.obj, meta))


@dataclass
class LoadReport:
    """What ``load_backbone`` did, for ``featviz inspect`` and every output manifest.

    Plain data: ``to_dict`` is what manifests record and ``featviz inspect --json`` prints;
    the CLI draws the table (``featviz.cli.checkpoint``). ``random_weights``: the file says its weights
    are a seeded random initialisation (``RANDOM_WEIGHTS_KEY``, e.g. the bundled ``moco_v2_tiny`` sample,
    made to show a layout), so every sheet of it says "RANDOM WEIGHTS (untrained)" as a random init's does.
    """

    path: str
    format: str
    format_title: str
    container_key: str | None
    prefix: str
    dropped: dict[str, int]
    arch: dict[str, Any]
    arch_details: dict[str, Any]
    arch_source: str
    not_inferable: list[str]
    normalization: dict[str, Any]
    loaded: int
    missing: list[str]
    unexpected: list[str]
    tensors_in_file: int
    warnings: list[str]
    classifier: dict[str, Any] | None = None
    method: str | None = None
    input_size: list[int] | None = None
    random_weights: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-able dict (its fields, in order)."""
        from dataclasses import asdict

        return asdict(self)


def _resolve_arch(ex: Extracted, arch: str | ArchSpec | None, num_heads: int | None):
    """Pick the architecture: user's --arch > the layout (metadata, conventions) > inferred from shapes.

    A ViT's head count changes no shape: --num-heads > the spec > the source's convention > the
    standard count for its width (with a warning naming --num-heads) > an error.
    """
    inferred = None
    try:
        inferred = infer_arch(ex.state_dict)
    except ArchitectureError:
        if arch is None and ex.arch is None:
            raise
    if arch is not None:
        spec = arch if isinstance(arch, ArchSpec) else parse_arch(arch, num_heads=num_heads)
        source = "--arch"
    elif ex.arch is not None:
        spec, source = ex.arch, ex.arch_source
    else:
        spec, source = inferred.spec, "inferred from weights"
    warnings: list[str] = []
    heads = num_heads or (spec.kwargs.get("num_heads") if source != "inferred from weights" else None) or ex.num_heads
    heads_from = "--num-heads" if num_heads else "the source's convention"
    if spec.family == "vit" and "embed_dim" in spec.kwargs and not heads:
        dim = spec.kwargs["embed_dim"]
        heads = standard_num_heads(dim)
        if heads is None:
            raise ArchitectureError(
                f"{spec.name}: a ViT's num_heads cannot be inferred from its weights (embed_dim {dim} fits no "
                "standard head count); pass --num-heads (MoCo v3 / solo-learn mocov3 ViT-S: 12; DINO/DeiT ViT-S: 6)")
        heads_from = "the standard count"
        warnings.append(f"{heads} attention heads assumed for embed dim {dim} (the standard DeiT/timm count, as "
                        "DINO, iBOT, MAE, I-JEPA, MSN use); a head count changes no weight shape: pass "
                        "--num-heads N if the checkpoint used another (MoCo v3's ViT-S uses 12)")
    if spec.family == "vit" and heads:
        spec = ArchSpec(spec.family, spec.name, {**spec.kwargs, "num_heads": heads})
    details = dict(inferred.details) if inferred else {}
    not_inf = [n for n in (inferred.not_inferable if inferred else ()) if not (n == "num_heads" and heads)]
    if spec.family == "vit" and heads and num_heads is None and "embed_dim" in spec.kwargs:
        details["num_heads"] = f"{heads} (from {heads_from})"
    return spec, source, details, not_inf, inferred, warnings


def _check_shapes(model: nn.Module, sd: dict[str, torch.Tensor], spec: ArchSpec, inferred) -> None:
    own = model.state_dict()
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if not bad:
        return
    k, theirs, ours = bad[0]
    hint = ""
    if inferred is not None and inferred.spec.name != spec.name:
        hint = f"; the checkpoint looks like {inferred.spec.name}: try --arch {inferred.spec.name}"
    if k == "conv1.weight" and theirs[-1] == 3 and ours[-1] == 7:
        hint += " (a CIFAR-style 3x3 stem, e.g. solo-learn CIFAR runs)"
    raise ArchitectureError(
        f"shape mismatch for {k!r}: checkpoint {theirs} vs {spec.name} {ours}"
        f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}{hint or '; check --arch'}")


Tensors = dict[str, torch.Tensor]


def _split_classifier(sd: Tensors, model: nn.Module) -> tuple[Tensors, Tensors, dict[str, Any] | None, dict[str, int]]:
    """Split the architecture's classifier (by its module name) off the encoder tensors.

    Returns (encoder tensors, classifier tensors, {"name", "num_classes"} or None, dropped): a
    head in the classifier's place that is not one linear layer (an SSL projector) is dropped.
    """
    name = classifier_name(model)
    if name is None:
        return sd, {}, None, {}
    head = {k: v for k, v in sd.items() if k.startswith(f"{name}.")}
    if not head:
        return sd, {}, None, {}
    rest = {k: v for k, v in sd.items() if k not in head}
    w = head.get(f"{name}.weight")
    if w is None or w.ndim != 2 or set(head) - {f"{name}.weight", f"{name}.bias"}:
        log.info("the checkpoint's %s is not a single linear classifier (an SSL projector); dropping it",
                 shorten(sorted(head), 3))
        return rest, {}, None, {f"{name}.": len(head)}
    return rest, head, {"name": name, "num_classes": int(w.shape[0])}, {}


def load_backbone(path: str | os.PathLike, arch: str | ArchSpec | None = None, format: str = "auto", *,
                  num_heads: int | None = None, checkpoint_key: str | None = None, trust: bool = False,
                  keep_classifier: bool = False) -> tuple[nn.Module, LoadReport]:
    """Load the encoder of any supported checkpoint, verified tensor by tensor.

    Every warning of the load (assumed normalisation or head count, EMA weights, the student, an
    undilated CAC backbone, ...) is logged at WARNING, one line each, and kept in the report and
    in the ``ModelDescription`` attached to the model (``featviz.models.description.describe``).

    Args:
        path: Checkpoint file.
        arch: Architecture name or spec; inferred from metadata or shapes when None.
        format: A registered layout name, or "auto" to detect it.
        num_heads: ViT attention heads (not inferable from weights).
        checkpoint_key: Which network of a multi-network file: DINO/iBOT "teacher" (default) or
            "student"; I-JEPA/MSN "target_encoder" (default) or "encoder".
        trust: Allow arbitrary pickles (``weights_only=False``); never automatic.
        keep_classifier: Keep a linear classifier when the file has one (timm ``fc``, ``classifier``,
            ``head``, ``head.fc``; torchvision ``fc``), so that ``forward`` returns logits.

    Returns:
        ``(model, report)``: the model in eval mode whose ``forward`` gives pooled features
        ``(N, D)`` (or logits with ``keep_classifier``), and its ``LoadReport``.

    Raises:
        CheckpointError: unreadable, unsafe, unknown/ambiguous layout, missing or unexpected keys.
        ArchitectureError: the architecture does not fit or cannot be inferred.
    """
    ck = read_checkpoint(path, trust=trust)
    fmt = detect_format(ck) if format == "auto" else FORMATS.get(format)
    forced_mismatch = format != "auto" and not fmt.detect(ck)
    try:
        ex = fmt.extract(ck, {"checkpoint_key": checkpoint_key, "keep_classifier": keep_classifier})
    except (KeyError, TypeError, AttributeError):
        # the adapter's own KeyError/AttributeError says nothing to a user: say what the layout expects
        raise CheckpointFormatError(f"{ck.path.name} does not fit --format {fmt.name} ({fmt.title}); found: "
                                    f"{_describe_keys(ck)}; drop --format to detect the layout") from None
    if forced_mismatch:
        log.warning("--format %s forced: %s does not look like that layout", format, ck.path.name)
    spec, source, details, not_inf, inferred, warnings = _resolve_arch(ex, arch, num_heads)
    warnings = [*ex.warnings, *warnings]
    with torch.device("meta"):  # shapes only: random init of a ResNet-50 costs more than reading it
        model = build_backbone(spec)
    sd = ex.convert(ex.state_dict, model) if ex.convert is not None else ex.state_dict
    dropped = dict(ex.dropped)
    classifier, head = None, {}
    if ex.keeps_classifier:
        sd, head, classifier, projector = _split_classifier(sd, model)
        dropped.update(projector)
    num_classes = 0
    if classifier is not None:
        classifier["loaded"] = keep_classifier
        if keep_classifier:
            num_classes = classifier["num_classes"]
            with torch.device("meta"):
                model = build_backbone(spec, num_classes=num_classes)
            sd = {**sd, **head}
    _check_shapes(model, sd, spec, inferred)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    tolerated = [k for k in missing if k.endswith("num_batches_tracked")]
    hard_missing = [k for k in missing if k not in tolerated]
    if hard_missing or unexpected:
        guess = f"; the weights look like {inferred.spec.name}" if inferred and inferred.spec.name != spec.name else ""
        raise CheckpointError(
            f"{ck.path.name} ({fmt.name}) does not fit {spec.name}: "
            + (f"{len(hard_missing)} encoder tensors missing ({shorten(hard_missing, 3)})" if hard_missing else "")
            + ("; " if hard_missing and unexpected else "")
            + (f"{len(unexpected)} unexpected ({shorten(unexpected, 3)})" if unexpected else "")
            + f"{guess}; check --arch, or --format if the layout was misdetected")
    model = _materialize(model, sd, spec, num_classes)
    norm = ex.normalization
    if norm is None:
        norm = default_normalization(spec)
        warnings.append(f"normalisation not recorded in the file; using {norm.source}: "
                        f"mean={list(norm.mean)}, std={list(norm.std)}")
    size = ex.input_size or default_input_size(spec, model)
    report = LoadReport(
        path=str(path), format=fmt.name, format_title=fmt.title, container_key=ex.container_key,
        prefix=ex.prefix, dropped=dropped, arch=spec.to_dict(), arch_details=details, arch_source=source,
        not_inferable=not_inf, normalization=norm.to_dict(), loaded=len(sd), missing=missing,
        unexpected=unexpected, tensors_in_file=_count_tensors(ck.obj), warnings=warnings, classifier=classifier,
        method=ex.method, input_size=list(size), random_weights=says_random_weights(ck))
    kind = "classifier" if num_classes else "backbone"
    attach(model, ModelDescription(
        arch=spec, kind=kind, head=classifier["name"] if num_classes else None, num_classes=num_classes or None,
        normalization=norm, input_size=size, method=ex.method, source=report.to_dict(), warnings=tuple(warnings),
        **model_traits(model, projection=bool(spec.kwargs.get("projection")))))
    for w in warnings:
        log.warning("%s: %s", ck.path.name, w)
    return model.eval(), report


def _materialize(meta_model: nn.Module, sd: dict[str, torch.Tensor], spec: ArchSpec, num_classes: int) -> nn.Module:
    """Put the checkpoint's tensors into a model built on the meta device.

    BatchNorm counters the file lacks (converted BYOL) become 0. Any other tensor left
    without data (a non-persistent buffer some timm models compute at init) means the model
    must be built for real, so it is, and loaded the ordinary way.
    """
    own = meta_model.state_dict()
    sd = {k: v.to(own[k].dtype) if k in own and v.dtype != own[k].dtype else v for k, v in sd.items()}  # fp16 files
    meta_model.load_state_dict(sd, strict=False, assign=True)
    left = [n for n, t in [*meta_model.named_parameters(), *meta_model.named_buffers()] if t.is_meta]
    if all(n.endswith("num_batches_tracked") for n in left):
        for n in left:
            parent, _, leaf = n.rpartition(".")
            meta_model.get_submodule(parent)._buffers[leaf] = torch.tensor(0, dtype=torch.long)
        return meta_model
    model = build_backbone(spec, num_classes=num_classes)
    model.load_state_dict(sd, strict=False)
    return model


def _count_tensors(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(_count_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tensors(v) for v in obj)
    return 0


def convert_checkpoint(path: str | os.PathLike, output: str | os.PathLike, *, force: bool = False,
                       **load_kwargs: Any) -> Path:
    """Load any supported checkpoint and write its encoder as featviz ``.safetensors``.

    The file carries the architecture, source format and normalisation, so ``inspect`` and
    ``load_backbone`` read it with no flags, and no pickle is ever involved again.
    """
    output = Path(output)
    if output.suffix != ".safetensors":
        raise FeatvizError(f"output must end in .safetensors, got {output.name!r}")
    check_output(output, force=force, folder=False)  # before the checkpoint is read
    model, report = load_backbone(path, **load_kwargs)
    sd = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    meta = {"arch": report.arch, "source_format": report.format, "source_file": Path(path).name,
            "normalization": report.normalization, "method": report.method, "input_size": report.input_size}
    if report.random_weights:  # the converted file still says its weights are random
        meta[RANDOM_WEIGHTS_KEY] = True
    return save_featviz(output, sd, meta, force=force)
