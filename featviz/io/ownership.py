"""Which files are featviz's: the output marker, the hashes it records, companions (torch-free).

A folder featviz writes carries ``.featviz-output.json`` (``MARKER``) listing each file it wrote with
its SHA-256. ``owned`` says which listed files ``--force`` may remove: a regular file reached without
following a link, inside the folder once real paths are resolved, unchanged since featviz wrote it.
``featviz.io.outputs`` applies these rules; docs/outputs.md states them.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MARKER = ".featviz-output.json"
"""The marker file of a folder featviz wrote: which command, and every file it wrote there."""
LEGACY_MARKERS = (".featviz-demo",)
"""Markers of earlier featviz versions (a demo folder): the folder is featviz's, its file list unknown."""
TMP_DIR_PREFIX = ".featviz-tmp-"
"""The prefix of the hidden temporary folder a run writes inside an existing output folder."""


def folder_state(path: str | os.PathLike) -> str:
    """``"empty"``, ``"featviz"`` (it holds featviz's marker) or ``"foreign"`` (anything else).

    Hidden temporary folders of killed featviz runs do not count as content.
    """
    path = Path(path)
    if (path / MARKER).is_file() or any((path / m).is_file() for m in LEGACY_MARKERS):
        return "featviz"
    if any(not is_featviz_tmp(p.name) for p in path.iterdir()):
        return "foreign"
    return "empty"


def read_marker(path: str | os.PathLike) -> dict[str, Any]:
    """The marker of a featviz folder (``{}`` when it has none or it is unreadable)."""
    try:
        data = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_featviz_tmp(name: str) -> bool:
    """``name`` is a hidden temporary folder of a featviz run (not the user's content)."""
    return name.startswith(TMP_DIR_PREFIX)


def companion_of(path: Path, name: str) -> bool:
    """``path`` is a manifest featviz wrote for the output named ``name`` (a JSON object naming it)."""
    try:
        if not path.is_file() or path.stat().st_size > 50_000_000:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("output") == name


def sha256(path: Path) -> str:
    """The SHA-256 of a file's content, in hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def files_under(folder: Path) -> list[str]:
    """Every file (and link) under ``folder``, relative, but the marker."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.name != MARKER)


def write_marker(folder: Path, command: str | None, files: Iterable[str],
                 hashes: dict[str, str] | None = None) -> None:
    """Write ``folder``'s marker: the command, and each file featviz wrote with its SHA-256 (``hashes``)."""
    from featviz.version import __version__

    files = sorted(set(files))
    hashes = hashes or {}
    data = {"featviz": __version__, "command": command, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files, "sha256": {f: hashes[f] for f in files if f in hashes},
            "note": "written by featviz: --force replaces the files listed here (if unchanged: same SHA-256) "
                    "and keeps every other file"}
    tmp = folder / f".{MARKER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MARKER)


def listed(folder: Path) -> set[str]:
    """The files a folder's marker says featviz wrote (only plain relative paths inside it).

    A folder with only an earlier version's marker (a demo folder, whose marker said the next demo
    replaces it) counts as featviz's throughout.
    """
    if not (folder / MARKER).is_file() and any((folder / m).is_file() for m in LEGACY_MARKERS):
        return {f for f in files_under(folder) if not is_featviz_tmp(f.split("/")[0])}
    files = read_marker(folder).get("files", [])
    out = set()
    for f in files if isinstance(files, list) else []:
        p = Path(str(f))
        if isinstance(f, str) and p.parts and not p.is_absolute() and ".." not in p.parts:
            out.add(p.as_posix())
    return out


def recorded_hashes(folder: Path) -> dict[str, str]:
    """The SHA-256 the marker records for each file (``{}`` for an earlier version's marker)."""
    h = read_marker(folder).get("sha256", {})
    return {str(k): v for k, v in h.items() if isinstance(v, str)} if isinstance(h, dict) else {}


def owned(folder: str | os.PathLike) -> tuple[set[str], list[str]]:
    """The files of ``folder`` that ``--force`` may remove, and the listed ones it must keep.

    A listed file is featviz's only if it is a regular file reached without following any symbolic
    link, inside ``folder`` once real paths are resolved, and (when the marker records one) with its
    recorded SHA-256: so a hostile marker (``link/precious.txt`` through a link to elsewhere,
    ``../x``, absolute paths) or a file the user has changed since is never removed.

    Returns:
        ``(owned, kept)``: relative paths featviz may replace, and listed paths it keeps (with why).
    """
    folder = Path(folder)
    real_root = os.path.realpath(folder)
    hashes = recorded_hashes(folder)
    mine, kept = set(), []
    for rel in sorted(listed(folder)):
        target, why = folder, ""
        for part in Path(rel).parts:
            target = target / part
            if target.is_symlink():
                why = "a symbolic link"
                break
        if not why and not (target.exists() or target.is_symlink()):
            continue  # gone already: nothing to remove
        if not why and not stat.S_ISREG(target.lstat().st_mode):
            why = "not a regular file"
        if not why and os.path.commonpath([real_root, os.path.realpath(target)]) != real_root:
            why = "outside the output folder"
        if not why and rel in hashes and sha256(target) != hashes[rel]:
            why = "changed since featviz wrote it"
        if why:
            kept.append(f"{rel} ({why})")
        else:
            mine.add(rel)
    return mine, kept
