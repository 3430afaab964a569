"""Writing outputs without losing anything (torch-free).

Checks before work, atomic files and folders, manifests.

The rules every command follows:

* **Checked first.** ``check_output`` runs before any work: the output's parent must be a folder
  (or creatable below one) that can be written, and an existing output may only be replaced with
  ``--force``.
* **Atomic.** A file is written to a hidden temporary file beside it and renamed onto it
  (``atomic_path``); a folder is written to a hidden temporary folder and then installed
  (``atomic_dir``). A failed or killed run leaves the old output as it was; the hidden temporary
  files of a killed run are removed by the next write of the same output.
* **Only featviz's own files.** A folder featviz writes carries a marker, ``.featviz-output.json``,
  listing the files it wrote with the SHA-256 of each. ``--force`` replaces exactly those, and each
  only if it is still what featviz wrote: a regular file (never a symbolic link, never reached through
  one), inside the output folder once real paths are resolved, with the recorded hash (an entry of an
  earlier featviz version, without a hash, passes on the first two). Everything else is the user's
  and kept as it is: files featviz did not write (``thesis.tex``, ``sub/data.csv``), listed files the
  user changed, anything a hostile marker names outside the folder. A non-empty folder without the
  marker was not made by featviz and is refused, ``--force`` or not; so is a featviz folder that is
  itself a symbolic link. A new file that would land on a file featviz did not write is refused too,
  so nothing of the user's is ever overwritten.
* **Companions are featviz's only if they say so.** A file output's manifest (``e.npz`` ->
  ``e.manifest.json``) is replaced with ``--force`` only when it is a regular file whose JSON names
  that output (``"output": "e.npz"``, as featviz writes it); a file of the user's there is refused.
* **Failures named as such.** A full disk, a missing permission or a read-only file system is said
  so, naming the user's path (never a hidden temporary one); nothing partial is left.
* **Manifests are named after their output**: ``e.npz`` gets ``e.manifest.json`` (``manifest_path``);
  a folder output holds its ``manifest.json`` inside.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from featviz.errors import OutputError, OutputExistsError
from featviz.io.ownership import (  # noqa: F401 - MARKER, LEGACY_MARKERS, folder_state, read_marker: featviz.io.outputs API
    LEGACY_MARKERS,
    MARKER,
    TMP_DIR_PREFIX,
    companion_of,
    files_under,
    folder_state,
    is_featviz_tmp,
    listed,
    owned,
    read_marker,
    recorded_hashes,
    sha256,
    write_marker,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


# ------------------------------------------------------------------ checks
def check_output(path: str | os.PathLike, *, force: bool = False, folder: bool | None = None) -> Path:
    """Check, before any work, that ``path`` can be written; return it.

    Args:
        path: The output file or folder.
        force: An existing output may be replaced (for a folder: featviz's own files in it).
        folder: True for a folder output, False for a file, None to go by what exists.

    Raises:
        OutputError: a parent is a file, the folder it goes in cannot be written, the path is a file
            where a folder is expected (or the reverse), or the folder exists and was not written by
            featviz.
        OutputExistsError: the output exists and ``force`` is False.
    """
    path = Path(path)
    full = _absolute(path)
    if full.exists() or full.is_symlink():
        _check_existing(path, full, force=force, folder=folder)
    return check_place(path)


def check_place(path: str | os.PathLike) -> Path:
    """Check only where ``path`` goes; what is already there is not judged.

    No parent may be a file, and the folder it is written in (the output itself when it is an
    existing folder) must be writable.

    Raises:
        OutputError: a parent is a file, or the folder cannot be written.
    """
    path = Path(path)
    full = _absolute(path)
    if full.exists() or full.is_symlink():
        writes_in = full if full.is_dir() else full.parent
    else:
        writes_in = _nearest_existing(full.parent)
        if not writes_in.is_dir():
            raise OutputError(f"cannot write {str(path)!r}: {str(writes_in)!r} is a file, not a folder; "
                              "choose another output")
    if not os.access(writes_in, os.W_OK | os.X_OK):
        where = "the output folder" if writes_in == full else "folder"
        raise OutputError(f"cannot write {str(path)!r}: {where} {str(writes_in)!r} is not writable; "
                          "choose an output somewhere you can write (--out)")
    return path


def check_writable(path: str | os.PathLike, *, force: bool = False, folder: bool | None = None) -> Path:
    """``check_output``, then create the output's parent folder (the earlier API; prefer ``check_output``)."""
    path = check_output(path, force=force, folder=folder)
    _mkdir(_absolute(path).parent, path)
    return path


def _check_existing(path: Path, full: Path, *, force: bool, folder: bool | None) -> None:
    if full.is_dir():
        if folder is False:
            raise OutputError(f"output {str(path)!r} is a folder; a file name is expected here")
        state = folder_state(full)
        if state == "featviz" and full.is_symlink():
            raise OutputError(f"output folder {str(path)!r} is a symbolic link (to {os.path.realpath(full)!r}); "
                              "featviz never replaces files through a link: give the real folder")
        if state == "foreign":
            raise OutputError(
                f"output folder {str(path)!r} is not empty and was not written by featviz (it has no {MARKER}); "
                "--force only replaces featviz's own outputs, so choose a new or empty folder")
        if state == "featviz" and not force:
            raise OutputExistsError(f"output folder {str(path)!r} already exists; pass --force to replace "
                                    "featviz's files in it (other files are kept)")
    else:
        if folder:
            raise OutputError(f"output {str(path)!r} is a file; a folder is expected here")
        if not force:
            raise OutputExistsError(f"output {str(path)!r} already exists; pass --force to overwrite it")


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))  # normalises '.' and '..' without following links


def _nearest_existing(full: Path) -> Path:
    for p in (full, *full.parents):
        if p.exists():
            return p
    return Path(full.anchor)


def _mkdir(folder: Path, shown: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write {str(shown)!r}: cannot create folder {str(folder)!r} ({e.strerror})") from None


# ------------------------------------------------------------------ temporary files
def _live(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but belongs to someone else
        return True
    return True


def _tmp_file_re(name: str) -> re.Pattern[str]:
    stem, suffix = os.path.splitext(name)
    return re.compile(
        rf"\.{re.escape(name)}\.(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp{re.escape(suffix)}"  # this version's
        rf"|\.{re.escape(stem)}\.[a-z0-9_]{{8}}\.tmp{re.escape(suffix)}"  # earlier versions' (no pid)
        rf"|\.{re.escape(name)}\.(?P<dpid>\d+)-[A-Za-z0-9_]+\.tmp"  # a folder's temporary twin
        rf"|\.{re.escape(name)}\.old-(?P<opid>\d+)"  # an earlier version's swapped-out folder
    )


def remove_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the hidden temporary files that killed runs left for the output ``path``.

    A temporary name holds the writer's process id; one whose process is gone is stale. (Names of
    earlier featviz versions hold no id and are always stale.) Returns what was removed.
    """
    full = _absolute(Path(path))
    removed: list[Path] = []
    pattern = _tmp_file_re(full.name)
    candidates = [(p, pattern.fullmatch(p.name)) for p in _listdir(full.parent)]
    if full.is_dir():
        candidates += [(p, re.fullmatch(rf"{TMP_DIR_PREFIX}(?P<pid>\d+)-\w+", p.name)) for p in _listdir(full)]
    for p, m in candidates:
        if m is None:
            continue
        pid = next((m[g] for g in ("pid", "dpid", "opid") if g in m.re.groupindex and m[g]), None)
        if pid is not None and _live(int(pid)):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:
            continue
        removed.append(p)
    if removed:
        log.info("removed %d stale temporary file(s) of %s left by a killed run", len(removed), full.name)
    return removed


def _listdir(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
"""Errors that only a write can cause: said as such wherever they come from."""


def os_error_words(e: OSError) -> str:
    """What a failed file operation means for the user: a full disk and a missing permission named as such."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device (the disk or your quota is full); free some space or write elsewhere"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "Permission denied; choose an output somewhere you can write"
    if e.errno == errno.EROFS:
        return "read-only file system; choose an output on a writable disk"
    return (e.strerror or str(e)).rstrip(".")


def write_failure(path: str | os.PathLike, e: OSError) -> OutputError:
    """The one line for a failed write of ``path`` (the user's path, never a hidden temporary one)."""
    shown = e.filename and str(e.filename)
    hidden = not shown or shown == str(path) or ".tmp" in shown or TMP_DIR_PREFIX in shown
    return OutputError(f"cannot write {str(path)!r}: {os_error_words(e)}{'' if hidden else f' ({shown})'}")


@contextmanager
def _as_output_error(path: Path) -> Iterator[None]:
    """Turn a failed write (permissions changed, disk full) into one line."""
    try:
        yield
    except OSError as e:
        raise write_failure(path, e) from None


@contextmanager
def _writer_errors(path: Path, tmp: Path) -> Iterator[None]:
    """A writer's failure inside an atomic block: a full disk (or a write into ``tmp`` refused) named as such."""
    try:
        yield
    except OSError as e:
        if e.errno in WRITE_ERRNOS or (e.filename and str(tmp) in str(e.filename)):
            raise write_failure(path, e) from None
        raise


@contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the real suffix, so writers that pick a format by extension
    (matplotlib, numpy) behave. On any exception the temporary file is removed and the
    existing ``path`` (if any) is left untouched. Stale temporary files of ``path`` (a killed
    earlier write) are removed first.
    """
    path = Path(path)
    check_output(path, force=force, folder=False)
    full = _absolute(path)
    _mkdir(full.parent, path)
    remove_stale(full)
    with _as_output_error(path):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{full.name}.{os.getpid()}-", suffix=f".tmp{full.suffix}",
                                        dir=full.parent)
        os.close(fd)
    tmp = Path(tmp_name)
    mode = 0o666 & ~_umask()  # mkstemp makes 0600; outputs get the usual permissions
    try:
        os.chmod(tmp, mode)
        with _writer_errors(path, tmp):
            yield tmp
        with _as_output_error(path):
            os.chmod(tmp, mode)  # again: some writers (safetensors) replace the file they are given
            os.replace(tmp, full)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike, *, force: bool = False, command: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder whose files become the folder ``path`` if the block succeeds.

    A new ``path`` appears whole, by one rename. An existing one (empty, or featviz's with
    ``force``) gets featviz's files swapped: the files its marker lists are removed, the new ones
    moved in, and every other file is left where it is. The folder gets a marker listing what was
    written, so a later ``--force`` knows what it may replace.

    Raises:
        OutputError, OutputExistsError: see ``check_output``; also when a new file would overwrite
            a file featviz did not write.
    """
    path = Path(path)
    check_output(path, force=force, folder=True)
    full = _absolute(path)
    _mkdir(full.parent, path)
    remove_stale(full)
    exists = full.is_dir()
    with _as_output_error(path):
        if exists:  # the temporary folder goes inside, so '--out .' needs no writable parent
            tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_DIR_PREFIX}{os.getpid()}-", dir=full))
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f".{full.name}.{os.getpid()}-", suffix=".tmp", dir=full.parent))
        os.chmod(tmp, 0o777 & ~_umask())
    try:
        with _writer_errors(path, tmp):
            yield tmp
        with _as_output_error(path):
            files = files_under(tmp)
            if not exists:
                write_marker(tmp, command, files, {f: sha256(tmp / f) for f in files if (tmp / f).is_file()})
                _install_new(tmp, full, path)
            else:
                install_files(tmp, full, files, command=command, shown=path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_companion(path: str | os.PathLike, output: str | os.PathLike, *, force: bool = False) -> Path:
    """Check a file that goes with ``output`` (its manifest): it may be replaced only if it is featviz's.

    A companion is featviz's when it is a regular file (not a link) holding a JSON object whose
    ``output`` names ``output``'s file name, as featviz writes every manifest.

    Raises:
        OutputExistsError: it exists and ``force`` is False.
        OutputError: it exists and is not featviz's (a file of the user's, a link, a folder).
    """
    path, output = Path(path), Path(output)
    check_output(path, force=force, folder=False)
    full = _absolute(path)
    if full.is_symlink() or (full.exists() and not companion_of(full, output.name)):
        what = "a symbolic link" if full.is_symlink() else "not the manifest featviz wrote for it"
        raise OutputError(f"cannot write {str(output)!r}: {str(path)!r} exists and was not written by featviz "
                          f"({what}); --force replaces only featviz's own files, so move it away or choose "
                          "another output name")
    return path


def _install_new(tmp: Path, full: Path, shown: Path) -> None:
    """Rename the finished folder onto a new output; another run that got there first wins, said so."""
    try:
        os.replace(tmp, full)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise OutputError(f"cannot write {str(shown)!r}: another run wrote {str(shown)!r} at the same time and "
                              "finished first; this run's files were discarded and the other's kept; run again with "
                              "--force to replace them, or choose another output folder") from None
        raise


def install_files(src: Path, dst: Path, files: list[str], *, command: str | None = None,
                  shown: Path | None = None) -> None:
    """Move ``files`` (relative to ``src``) into the folder ``dst``, replacing featviz's earlier files.

    Files listed in ``dst``'s marker are removed first (a crash part-way leaves a marker that lists
    old and new files, so the next ``--force`` still knows them); nothing else in ``dst`` is touched.

    Raises:
        OutputError: a new file would land on (or under) a file featviz did not write.
    """
    shown = shown or dst
    old, refused = owned(dst)
    old_hashes = recorded_hashes(dst)
    clashes = [f for f in files if f not in old and (_blocked(dst, f))]
    if clashes:
        why = next((k for k in refused if k.split(" (")[0] == clashes[0]), "")
        why = f" ({why.split(' (', 1)[1]}" if why else ""
        raise OutputError(f"cannot write {str(shown)!r}: {str(dst / clashes[0])!r} exists and was not written by "
                          f"featviz{why}{f' (and {len(clashes) - 1} more)' if len(clashes) > 1 else ''}; move it "
                          "away or choose another output folder")
    if refused:
        log.warning("%s: kept %d file(s) its marker lists but featviz may not replace: %s", shown, len(refused),
                    ", ".join(refused[:5]))
    new_hashes = {f: sha256(src / f) for f in files if (src / f).is_file() and not (src / f).is_symlink()}
    write_marker(dst, command, old | set(files), {**old_hashes, **new_hashes})
    for f in sorted(old - set(files)):
        (dst / f).unlink(missing_ok=True)
    for f in files:
        target = dst / f
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src / f, target)
    _prune_empty(dst, old - set(files))
    kept = [f for f in files_under(dst) if f not in files and not is_featviz_tmp(f.split("/")[0])]
    if kept:
        log.info("kept %d file(s) in %s that featviz did not write: %s", len(kept), shown, ", ".join(kept[:5]))
    write_marker(dst, command, files, new_hashes)


def _blocked(dst: Path, rel: str) -> bool:
    """A user's file sits at ``rel`` or where one of its parent folders must go."""
    target = dst / rel
    if target.exists() or target.is_symlink():
        return True
    return any(p.exists() and not p.is_dir() for p in target.parents if p != dst and dst in p.parents)


def _prune_empty(root: Path, removed: Iterable[str]) -> None:
    dirs = {p for f in removed for p in (root / f).parents if p != root and root in p.parents}
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()  # only when empty
        except OSError:
            pass


def prepare_folder(path: str | os.PathLike, files: Iterable[str], *, force: bool = False,
                   command: str | None = None) -> Path:
    """A folder featviz fills over time (``collapse --watch``), made ready.

    It is checked, cleared of featviz's earlier files (with ``force``), and marked as holding
    ``files``. Write into it with ``atomic_path``.

    Raises:
        OutputError, OutputExistsError: see ``check_output``.
    """
    path = Path(path)
    check_output(path, force=force, folder=True)
    full = _absolute(path)
    _mkdir(full, path)
    remove_stale(full)
    with _as_output_error(path):
        old, _ = owned(full)
        clashes = [f for f in files if f not in old and _blocked(full, f)]
        if clashes:
            raise OutputError(f"cannot write {str(path)!r}: {str(full / clashes[0])!r} exists and was not written "
                              "by featviz; move it away or choose another output folder")
        for f in sorted(old):
            (full / f).unlink(missing_ok=True)
        _prune_empty(full, old)
        write_marker(full, command, files)
    return path


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


# ------------------------------------------------------------------ manifests
def manifest_path(output: str | os.PathLike) -> Path:
    """The manifest of a file output, named after it: ``run/e.npz`` -> ``run/e.manifest.json``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.manifest.json")


def read_manifest(output: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest beside a file output, or None when there is none.

    That is ``<stem>.manifest.json``, else the ``manifest.json`` of earlier featviz versions when it
    names this output.
    """
    output = Path(output)
    for candidate in (manifest_path(output), output.with_name("manifest.json")):
        try:
            data = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and (candidate.name != "manifest.json" or data.get("output") in (None, output.name)):
            return data
    return None


def versions() -> dict[str, str]:
    """Versions of featviz, Python and the heavy libraries already imported."""
    from featviz.version import __version__

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


def checkpoint_display_name(path: str | os.PathLike) -> str:
    """A checkpoint's display name: its file name without checkpoint suffixes (``x.pth.tar`` -> ``x``)."""
    name = Path(path).name
    while True:
        stem, dot, ext = name.rpartition(".")
        if not dot or ext.lower() not in ("tar", "pth", "pt", "ckpt", "safetensors", "bin", "pkl"):
            return name
        name = stem
