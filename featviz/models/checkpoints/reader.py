"""Read a checkpoint file without running code: sniff its first bytes, then load it safely.

``sniff`` refuses what is not a weights file (a web page, a git-lfs pointer, a truncated zip,
TorchScript, a plain pickle, text) with one message that says what to do; ``read_checkpoint``
reads safetensors, or ``torch.load(..., weights_only=True)`` with the small allow-list of
``allowed_globals``, and names any global outside it (``UnsafeCheckpointError``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from featviz.errors import CheckpointError, UnsafeCheckpointError

log = logging.getLogger(__package__)  # "featviz.models.checkpoints", the logger of the package

FEATVIZ_META_KEY = "featviz"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


# ------------------------------------------------------------------ 1. reading
def allowed_globals() -> list[Any]:
    """The allow-list of featviz's weights-only unpickler (``torch.serialization.safe_globals``).

    Harmless globals official checkpoints pickle: argparse.Namespace (DINO, timm) and the numpy
    scalar/dtype of CAC's ``monitor_best`` (numpy 1 and 2 module names).
    """
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
        """The parsed ``featviz`` metadata entry of a featviz file's header; None for any other file."""
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
