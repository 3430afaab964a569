"""Sharded embeddings: a folder of memory-mappable ``.npy`` shards and one manifest (numpy only, no torch).

``featviz embed --shard-size S --out E`` writes, as it goes::

    E/manifest.json               the run: settings (and their SHA-256), shards finished so far, complete or not
    E/shard-00000.features.npy    (n_0, D) float32
    E/shard-00000.labels.npy      (n_0,) int64, -1 = unknown
    E/shard-00000.ids.npy         (n_0,) str
    E/shard-00000.json            the shard's record (rows, inputs covered, skipped, SHA-256 of each file), written last
    E/.featviz-output.json        the ownership marker (``featviz.io.outputs``)

Shard ``k`` holds the inputs ``[k*S, (k+1)*S)`` of the listing (those that could be decoded), so the
concatenated shards equal the single ``.npz`` of the same run. A shard counts as finished only when its
record exists and every file still has the recorded SHA-256: a killed run resumes at the next
unfinished shard, and a damaged or partial shard is written again.

Reading (``read_shards``) maps every shard with ``np.load(mmap_mode="r")``; the features are one
``ShardedArray``, a row-concatenating view that reads only the rows it is indexed with.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featviz.errors import ArtifactError
from featviz.io.outputs import atomic_path, sha256, write_json

FORMAT = "featviz-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = ("features", "labels", "ids")
"""The arrays every shard holds, one ``.npy`` file each."""


def shard_stem(k: int) -> str:
    """The file stem of shard ``k``: ``shard-00000``."""
    return f"shard-{k:05d}"


def shard_files(k: int) -> list[str]:
    """The file names of shard ``k``: its arrays and its record (written last)."""
    return [f"{shard_stem(k)}.{a}.npy" for a in ARRAYS] + [f"{shard_stem(k)}.json"]


def settings_sha256(settings: dict[str, Any]) -> str:
    """The SHA-256 of a run's settings (canonical JSON): a resume must present the same one."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing or not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a shard folder, or None when ``folder`` is not one."""
    folder = Path(folder)
    data = read_json(folder / MANIFEST) if folder.is_dir() else None
    return data if data is not None and data.get("format") == FORMAT else None


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder of sharded embeddings written by ``featviz embed --shard-size``."""
    return read_manifest(path) is not None


# ------------------------------------------------------------------ writing
def write_shard(folder: Path, k: int, arrays: dict[str, np.ndarray], record: dict[str, Any]) -> dict[str, Any]:
    """Write shard ``k``'s arrays (each atomically), then its record; return the record.

    The record, written last, is what makes the shard count as finished: a run killed part-way
    leaves either no record or one whose files are all in place.
    """
    files = {}
    for name in ARRAYS:
        path = folder / f"{shard_stem(k)}.{name}.npy"
        with atomic_path(path, force=True) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arrays[name], allow_pickle=False)
        files[name] = {"file": path.name, "sha256": sha256(path)}
    record = {**record, "shard": k, "rows": int(len(arrays["labels"])), "files": files}
    write_json(folder / f"{shard_stem(k)}.json", record)
    return record


def shard_problem(
    folder: Path, k: int, record: dict[str, Any] | None, settings_hash: str, *, verify: bool = True
) -> str | None:
    """Why shard ``k`` is not finished (no record, other settings, a file missing or changed), or None."""
    if record is None:
        return "no record"
    if record.get("settings_sha256") != settings_hash:
        return "written with other settings"
    files = record.get("files")
    if not isinstance(files, dict) or set(files) != set(ARRAYS):
        return "its record is damaged"
    for name, entry in files.items():
        path = folder / f"{shard_stem(k)}.{name}.npy"
        if not path.is_file():
            return f"{path.name} is missing"
        if verify and sha256(path) != entry.get("sha256"):
            return f"{path.name} differs from what was written (damaged or partial)"
    return None


def finished_shards(folder: Path, n_shards: int, settings_hash: str) -> tuple[dict[int, dict], dict[int, str]]:
    """The shards of ``folder`` that are finished (their records), and why others that were started are not."""
    done: dict[int, dict] = {}
    broken: dict[int, str] = {}
    for k in range(n_shards):
        record = read_json(folder / f"{shard_stem(k)}.json")
        started = record is not None or any((folder / f).exists() for f in shard_files(k)[:-1])
        problem = shard_problem(folder, k, record, settings_hash)
        if problem is None:
            done[k] = record
        elif started:
            broken[k] = problem
    return done, broken


# ------------------------------------------------------------------ reading
class ShardedArray:
    """Several ``(n_k, ...)`` arrays (memory maps) seen as one ``(N, ...)`` array, read only where indexed.

    ``a[rows]`` (an int, a slice, an index or boolean array, optionally with column keys) reads just
    those rows and returns a NumPy array; ``np.asarray(a)`` reads everything (one copy); ``parts``
    gives the shards themselves for chunked passes.
    """

    def __init__(self, parts: Sequence[np.ndarray]):
        if not parts:
            raise ArtifactError("a sharded array needs at least one shard")
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.offsets[-1]), *self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype

    @property
    def ndim(self) -> int:
        """The number of dimensions."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """The number of elements."""
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """The bytes the whole array would take in memory."""
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, shards={len(self.parts)})"

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, dtype or self.dtype)
        for p, start, stop in zip(self.parts, self.offsets[:-1], self.offsets[1:], strict=True):
            out[start:stop] = p
        return out

    def __iter__(self) -> Iterator[np.ndarray]:
        for p in self.parts:
            yield from p

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        n = len(self)
        if isinstance(rows, (int, np.integer)):
            i = int(rows) + n if rows < 0 else int(rows)
            if not 0 <= i < n:
                raise IndexError(f"index {int(rows)} is out of bounds for {n} rows")
            part = int(np.searchsorted(self.offsets, i, side="right")) - 1
            return np.asarray(self.parts[part][(i - self.offsets[part], *rest)])
        if isinstance(rows, slice):
            idx = np.arange(*rows.indices(n))
        else:
            idx = np.asarray(rows)
            if idx.dtype == bool:
                if idx.shape != (n,):
                    raise IndexError(f"a boolean index must have {n} entries, got {idx.shape}")
                idx = np.flatnonzero(idx)
            idx = idx.astype(np.int64).reshape(-1)
            if len(idx) and (idx.min() < -n or idx.max() >= n):
                raise IndexError(f"index out of bounds for {n} rows")
            idx = np.where(idx < 0, idx + n, idx)
        out = self._take(idx)
        return out[(slice(None), *rest)] if rest else out

    def _take(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        for part in np.unique(which):
            sel = which == part
            local = idx[sel] - self.offsets[part]
            if len(local) and (np.diff(local) == 1).all():  # a contiguous run: one slice, no fancy indexing
                out[sel] = self.parts[part][local[0] : local[-1] + 1]
            else:
                out[sel] = self.parts[part][local]
        return out


def _open_npy(path: Path, rows: int, where: str) -> np.ndarray:
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise ArtifactError(
            f"{where}: {path.name} is missing; run the same `featviz embed` again to write it"
        ) from None
    except (ValueError, OSError) as e:  # a truncated file: mmap length greater than the file
        raise ArtifactError(
            f"{where}: {path.name} is damaged or partial ({str(e)[:80]}); run the same "
            "`featviz embed` again to rewrite it"
        ) from None
    if a.dtype.kind in "cOV" or a.dtype.hasobject:
        raise ArtifactError(f"{where}: {path.name} holds dtype {a.dtype.str}; featviz reads numbers and text only")
    if len(a) != rows:
        raise ArtifactError(
            f"{where}: {path.name} has {len(a)} rows, its record says {rows}; the shard is damaged: "
            "run the same `featviz embed` again to rewrite it"
        )
    return a


def read_shards(path: str | os.PathLike) -> dict[str, Any]:
    """A finished shard folder's arrays: ``features`` mapped (no copy), ``labels`` and ``ids`` read.

    Returns:
        ``features`` (a ``ShardedArray``, or the one shard's memory map), ``labels``, ``ids``,
        ``class_names`` and the ``manifest``.

    Raises:
        ArtifactError: not a shard folder, an unfinished run, or a shard missing, truncated or of the
            wrong shape.
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    where = str(folder)
    if manifest is None:
        raise ArtifactError(
            f"{where!r} is a folder without a sharded-embeddings {MANIFEST}; expected an .npz or a "
            "folder from `featviz embed --shard-size`"
        )
    shards = manifest.get("shards") or []
    if not manifest.get("complete"):
        raise ArtifactError(
            f"{where!r} holds an unfinished `featviz embed` ({len(shards)} of "
            f"{manifest.get('n_shards', '?')} shards written); run the same command again to finish "
            "it"
        )
    feats, labels, ids = [], [], []
    for record in shards:
        rows = int(record["rows"])
        if rows == 0:
            continue
        stem = shard_stem(int(record["shard"]))
        f = _open_npy(folder / f"{stem}.features.npy", rows, where)
        if f.ndim != 2 or (feats and f.shape[1] != feats[0].shape[1]):
            raise ArtifactError(f"{where}: {stem}.features.npy is {f.shape}; every shard must be (n, D) with one D")
        feats.append(f)
        labels.append(np.asarray(_open_npy(folder / f"{stem}.labels.npy", rows, where), np.int64))
        ids.append(np.asarray(_open_npy(folder / f"{stem}.ids.npy", rows, where)).astype(str))
    if not feats:
        raise ArtifactError(f"{where!r} has no rows; embed at least one image")
    return {
        "features": feats[0] if len(feats) == 1 else ShardedArray(feats),
        "labels": np.concatenate(labels),
        "ids": np.concatenate(ids),
        "class_names": [str(c) for c in manifest.get("class_names", [])],
        "manifest": manifest,
    }
