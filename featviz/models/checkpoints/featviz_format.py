"""featviz's own checkpoint format: safetensors plus a JSON ``featviz`` metadata entry."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from featviz.errors import CheckpointError
from featviz.io.outputs import atomic_path
from featviz.models.checkpoints.layouts import SELF_DESCRIBED, _finish, register_layout
from featviz.models.checkpoints.reader import FEATVIZ_META_KEY, read_checkpoint, sniff
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
