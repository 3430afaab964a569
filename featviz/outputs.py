"""Writing outputs without losing anything: atomic files, --force checks, manifests (torch-free)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from featviz.errors import OutputExistsError

SCHEMA_VERSION = 1


def check_writable(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Refuse to overwrite an existing output unless ``force``; create the parent folder.

    Raises:
        OutputExistsError: ``path`` exists (and is not an empty folder) and ``force`` is False.
    """
    path = Path(path)
    if path.exists() and not force and not (path.is_dir() and not any(path.iterdir())):
        raise OutputExistsError(f"output {str(path)!r} already exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the real suffix, so writers that pick a format by extension
    (matplotlib, numpy) behave. On any exception the temporary file is removed and the
    existing ``path`` (if any) is left untouched.
    """
    path = check_writable(path, force=force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    mode = 0o666 & ~_umask()  # mkstemp makes 0600; outputs get the usual permissions
    os.chmod(tmp, mode)
    try:
        yield tmp
        os.chmod(tmp, mode)  # again: some writers (safetensors) replace the file they are given
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` as a whole if the block succeeds."""
    path = check_writable(path, force=force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str, *, force: bool = True) -> Path:
    """Write ``text`` atomically and return the path."""
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, paths and tuples into plain JSON values."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, torch tensors
        return obj.tolist()
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    return obj


def write_json(path: str | os.PathLike, obj: Any, *, force: bool = True) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return write_text(path, json.dumps(to_jsonable(obj), indent=2) + "\n", force=force)


def versions() -> dict[str, str]:
    """Versions of featviz, Python and the heavy libraries already imported."""
    from featviz import __version__

    out = {"featviz": __version__, "python": platform.python_version()}
    for mod in ("numpy", "torch", "torchvision", "timm", "openTSNE", "sklearn", "pytorch_grad_cam"):
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, "__version__"):
            out[mod] = str(m.__version__)
    return out


def manifest(command: str, arguments: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The common manifest: schema version, command, arguments, versions, plus ``extra``."""
    return to_jsonable(
        {"schema_version": SCHEMA_VERSION, "command": command, "arguments": arguments,
         "versions": versions(), **extra}
    )
