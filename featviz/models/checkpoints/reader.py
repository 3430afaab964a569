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
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise read_error(path, e) from None
    if size == 0:
        raise CheckpointError(f"{str(path)!r} is empty (0 bytes); the download or save did not finish")
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


def read_error(path: Path, e: OSError) -> CheckpointError:
    """A failure to read ``path`` itself (no permission, gone, a folder), named as such, never "corrupt"."""
    import errno

    if e.errno in (errno.EACCES, errno.EPERM):
        return CheckpointError(f"cannot read {str(path)!r}: permission denied; check its permissions (ls -l) "
                               "or copy it somewhere you can read it")
    if e.errno == errno.ENOENT:
        return CheckpointError(f"checkpoint {str(path)!r} does not exist (it was removed while featviz read it)")
    if e.errno == errno.EISDIR:
        return CheckpointError(f"{str(path)!r} is a folder; expected a checkpoint file")
    return CheckpointError(f"cannot read {str(path)!r}: {e.strerror or e}; check the disk and the file")


@dataclass
class Checkpoint:
    """A checkpoint read into memory: its top-level object and, for safetensors, metadata."""

    path: Path
    obj: Any
    container: str  # "safetensors" | "zip" | "legacy"
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def featviz_meta(self) -> dict[str, Any] | None:
        """The parsed ``featviz`` metadata entry of a featviz file's header; None for any other file.

        Raises:
            CheckpointError: the entry is not a JSON object of the expected fields (``parse_featviz_meta``).
        """
        return parse_featviz_meta(self.metadata.get(FEATVIZ_META_KEY), self.path)


_META_TYPES: dict[str, tuple[type, ...]] = {
    "version": (int,), "arch": (dict,), "normalization": (dict,), "method": (str, type(None)),
    "heads": (dict,), "class_names": (list,), "num_classes": (int,), "training": (dict,), "hparams": (dict,),
    "source_format": (str,), "source_file": (str, type(None)), "featviz_random_weights": (bool,),
}
MAX_META_CHARS = 10_000_000
"""The largest ``featviz`` metadata entry read (a header holds a few kB; more is not featviz's)."""


def parse_featviz_meta(raw: Any, path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``featviz`` metadata entry of a safetensors header, checked before anything trusts it.

    It must be a JSON object; its known fields must have their types (``arch``: an object with
    string ``family`` and ``name``; ``normalization``: ``mean``/``std`` lists of finite numbers;
    ``input_size``: N or [H, W]). What the values mean (an architecture featviz knows, a usable
    size) is checked where they are used.

    Returns:
        The metadata dict; None when there is no entry.

    Raises:
        CheckpointError: not JSON, not an object, or a field of the wrong type; the message names the
            file, the field, what was expected and what to do.
    """
    if raw is None or raw == "":
        return None
    name = Path(path).name
    fix = "it was not written by featviz, or was edited or damaged; convert the original checkpoint again"

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{name!r}: its 'featviz' metadata {what}; {fix}")

    if not isinstance(raw, str) or len(raw) > MAX_META_CHARS:
        raise bad(f"is not a JSON text of at most {MAX_META_CHARS:,} characters")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise bad(f"is not valid JSON ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(meta, dict):
        raise bad(f"must be a JSON object, found {type(meta).__name__} {raw[:40]!r}")
    for key, types in _META_TYPES.items():
        if key in meta and not isinstance(meta[key], types) or isinstance(meta.get(key), bool) and bool not in types:
            raise bad(f"field {key!r} is {type(meta[key]).__name__} {str(meta[key])[:40]!r}; expected "
                      + " or ".join("null" if t is type(None) else t.__name__ for t in types))
    arch = meta.get("arch")
    if arch is not None and not (isinstance(arch.get("family"), str) and isinstance(arch.get("name"), str)
                                 and isinstance(arch.get("kwargs", {}), dict)):
        raise bad(f"field 'arch' is {str(arch)[:60]!r}; expected an object with string 'family' and 'name'")
    norm = meta.get("normalization")
    if norm is not None and not (all(_numbers(norm.get(k)) for k in ("mean", "std")) and min(norm["std"]) > 0):
        raise bad(f"field 'normalization' is {str(norm)[:60]!r}; expected 'mean' and 'std' lists of finite "
                  "numbers (std > 0)")
    return meta


def _numbers(v: Any) -> bool:
    import math

    return (isinstance(v, list) and 0 < len(v) <= 4
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v))


_KEPT: dict[tuple[Any, ...], Checkpoint] = {}
"""At most one checkpoint read with ``keep=True``, handed to the next read of the same file (once)."""


def _kept_key(path: Path, trust: bool) -> tuple[Any, ...] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (os.path.realpath(path), st.st_mtime_ns, st.st_size, trust)


def read_checkpoint(path: str | os.PathLike, *, trust: bool = False, keep: bool = False) -> Checkpoint:
    """Read a checkpoint without running code: safetensors, or ``torch.load(weights_only=True)``.

    A file is read (unpickled) once per load: a read with ``keep`` (a look before the load, e.g. "is it
    a segmenter?") is handed to the next read of the same unchanged file, which takes it.

    Args:
        path: The file.
        trust: Use ``weights_only=False`` (arbitrary pickles). Only for files the user trusts;
            this is never an automatic fallback.
        keep: Keep what was read for the next read of this file (the one load that follows).

    Raises:
        CheckpointError: unreadable or corrupt file (see ``sniff``).
        UnsafeCheckpointError: the pickle needs globals outside the allow-list; they are named.
    """
    path = Path(path)
    key = _kept_key(path, trust)
    if key is not None and key in _KEPT:
        ck = _KEPT.pop(key)
        if keep:
            _KEPT[key] = ck
        return ck
    _KEPT.clear()
    ck = _read(path, trust)
    if keep and key is not None:
        _KEPT[key] = ck
    return ck


def _read(path: Path, trust: bool) -> Checkpoint:
    kind = sniff(path)
    if kind == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            tensors = {}
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
        except OSError as e:
            raise read_error(path, e) from None
        except SafetensorError as e:
            raise CheckpointError(f"{str(path)!r} is a damaged .safetensors file ({e}); download it again") from None
        return Checkpoint(path, tensors, kind, meta)
    if trust:
        log.warning("loading %s with weights_only=False (--trust-checkpoint): this runs any code the pickle "
                    "contains; use it only for files you trust", path.name)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except (PermissionError, IsADirectoryError, FileNotFoundError) as e:
            raise read_error(path, e) from None
        except Exception as e:  # noqa: BLE001 - any unpickling failure means an unreadable file
            raise CheckpointError(f"cannot read {str(path)!r} even with --trust-checkpoint: {e}") from None
        return Checkpoint(path, obj, kind)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (PermissionError, IsADirectoryError, FileNotFoundError) as e:  # the file, not its content
        raise read_error(path, e) from None
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
