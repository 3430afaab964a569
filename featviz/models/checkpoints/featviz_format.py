"""featviz's own checkpoint format: safetensors plus a JSON ``featviz`` metadata entry.

This module is the one place that writes and reads featviz files; every other module (the
training loop, the segmenter, collapse's heads) goes through it:

- ``save_featviz(path, tensors, meta)`` writes one, atomically;
- ``read_featviz(path) -> (tensors, meta)`` reads one in full (safely, through ``read_checkpoint``)
  and refuses any other file;
- ``featviz_metadata(path) -> meta | None`` reads only the header, to tell a featviz file (and what
  it holds) without loading its tensors;
- ``load_backbone`` reads the encoder of one through the ``featviz`` layout below, which is the
  most specific layout (``SELF_DESCRIBED``).

The file: tensors ``backbone.<name>`` (the encoder, as the built architecture names them) plus
optional heads under their own prefix (``projector.``, ``predictor.``, a segmenter's ``head.``);
the metadata (``FEATVIZ_META_KEY``) is a JSON object with ``version`` (1) and, as the writer
knows them, ``arch`` (``ArchSpec.to_dict``), ``normalization``, ``method``, ``input_size``,
``source_format`` / ``source_file`` (``featviz convert``), ``heads`` (the specs that rebuild each
head), and training records (``training``, a segmenter's ``num_classes``, ``class_names``, ``crop``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from featviz.errors import CheckpointError, OutputError
from featviz.io.outputs import atomic_path
from featviz.models.checkpoints.layouts import SELF_DESCRIBED, _finish, register_layout
from featviz.models.checkpoints.reader import FEATVIZ_META_KEY, parse_featviz_meta, read_checkpoint, sniff
from featviz.models.description import ArchSpec, Normalization


@register_layout("featviz", "featviz's own .safetensors (featviz convert / featviz train)", specificity=SELF_DESCRIBED)
class _Featviz:
    @staticmethod
    def detect(ck):
        return ck.container == "safetensors" and ck.featviz_meta is not None

    @staticmethod
    def extract(ck, opts):
        meta = ck.featviz_meta or {}
        heads = tuple(sorted({k.split(".", 1)[0] + "." for k in ck.obj if not k.startswith("backbone.")}))
        arch = _meta_arch(meta, ck.path)  # checked before anything is built from it
        size = _meta_input_size(meta, ck.path)
        ex = _finish(ck, ck.obj, None, "backbone.", opts, drop=heads,
                     source=f"featviz ({meta.get('source_format', '?')})", method=meta.get("method"))
        if arch is not None:
            ex.arch = arch
        if meta.get("normalization"):
            ex.normalization = Normalization.from_dict(meta["normalization"], "featviz checkpoint metadata")
        if size is not None:  # the size it was trained at (`featviz train` writes it): embed at that size
            ex.input_size = size
        return ex


ARCH_FAMILIES = ("resnet", "vit", "timm", "transformers")
"""The architecture families an ``ArchSpec`` in featviz metadata may name."""


def _meta_arch(meta: dict[str, Any], path: Path) -> ArchSpec | None:
    """The metadata's ``arch``, if featviz can build it (``parse_arch`` agrees with its family).

    Raises:
        CheckpointError: an architecture featviz does not know, named as the checkpoint's.
    """
    from featviz.errors import FeatvizError
    from featviz.models.architectures import parse_arch

    if not meta.get("arch"):
        return None
    spec = ArchSpec.from_dict(meta["arch"])
    if spec.family not in ARCH_FAMILIES:
        raise CheckpointError(f"{path.name!r}: its featviz metadata names the architecture family {spec.family!r}; "
                              f"featviz builds {', '.join(ARCH_FAMILIES)}; pass --arch with the right name")
    if spec.family == "resnet":  # built from its name (the others by timm/transformers, which name what they lack)
        try:
            known = parse_arch(spec.name)
        except FeatvizError as e:
            raise CheckpointError(f"{path.name!r}: its featviz metadata names the architecture {spec.name!r}, which "
                                  f"featviz cannot build ({e}); pass --arch with the right name") from None
        if known.family != spec.family:
            raise CheckpointError(f"{path.name!r}: its featviz metadata says {spec.name!r} is a {spec.family!r} "
                                  f"model, but that name is a {known.family!r} one; pass --arch with the right name")
    return spec


def _meta_input_size(meta: dict[str, Any], path: Path) -> tuple[int, int] | None:
    """The metadata's ``input_size`` as (H, W): N or [H, W] of whole pixels within the feature core's limits.

    Raises:
        CheckpointError: anything else, named as the checkpoint's (not the user's ``--image-size``).
    """
    from featviz.models.features import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE

    if "input_size" not in meta or meta["input_size"] is None:
        return None
    size = meta["input_size"]
    hw = [size, size] if isinstance(size, int) else size
    if (isinstance(hw, list) and len(hw) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in hw)
            and all(MIN_IMAGE_SIDE <= v <= MAX_IMAGE_SIDE for v in hw)):
        return int(hw[0]), int(hw[1])
    raise CheckpointError(f"{path.name!r}: the checkpoint's input_size (in its featviz metadata) is "
                          f"{str(size)[:40]!r}; expected N or [H, W] between {MIN_IMAGE_SIDE} and {MAX_IMAGE_SIDE} "
                          "px; pass --image-size to choose the size yourself")


def save_featviz(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *,
                 force: bool = False) -> Path:
    """Write featviz's own checkpoint: safetensors + a JSON ``featviz`` metadata entry, atomically.

    Args:
        path: The ``.safetensors`` file to write.
        tensors: ``backbone.<name>`` plus optional heads (``projector.``, ``predictor.``, ``head.``);
            copied to contiguous CPU tensors.
        meta: The metadata (JSON-able); ``version`` 1 is added unless given.
        force: Overwrite an existing file.

    Returns:
        ``path``.

    Raises:
        ValueError: no ``backbone.*`` tensor.
    """
    from safetensors.torch import save_file

    if not any(k.startswith("backbone.") for k in tensors):
        raise ValueError("featviz checkpoints need 'backbone.*' tensors")
    meta = {"version": 1, **meta}
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    from safetensors import SafetensorError

    with atomic_path(path, force=force) as tmp:
        try:
            save_file(clean, str(tmp), metadata={FEATVIZ_META_KEY: json.dumps(meta)})
        except SafetensorError as e:  # safetensors wraps the OS error in its own, as text
            full = "No space left" in str(e) or "os error 28" in str(e)
            raise OutputError(f"cannot write {str(path)!r}: "
                              + ("no space left on device (the disk or your quota is full); free some space or "
                                 "write elsewhere" if full else f"{str(e).splitlines()[0][:120]}")) from None
    return Path(path)


def featviz_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``featviz`` metadata of a ``.safetensors`` file, reading only its header.

    Returns:
        The metadata dict; None for any other file (another suffix, no featviz entry, unreadable:
        the real load reports why).
    """
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
    return parse_featviz_meta(raw, path)


def read_featviz(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a featviz ``.safetensors`` file in full.

    Returns:
        ``(tensors, metadata)``: every tensor by its name (``backbone.*`` and heads) and the
        ``featviz`` metadata dict.

    Raises:
        CheckpointError: not a featviz file (or unreadable, see ``read_checkpoint``).
    """
    ck = read_checkpoint(path)
    if ck.featviz_meta is None:
        raise CheckpointError(f"{Path(path).name} is not a featviz checkpoint (no 'featviz' metadata); "
                              "make one with `featviz convert` or `featviz train`")
    return ck.obj, ck.featviz_meta
