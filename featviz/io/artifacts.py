"""The files stages exchange: embeddings ``.npz`` plus its manifest (numpy only, no torch).

An embeddings file holds ``features`` (N, D) float32, ``labels`` (N,) int64 (-1 = unknown),
``class_names``, ``ids`` and, for pixel embeddings, ``image_index`` (N,) and ``yx`` (N, 2).
It is written with ``allow_pickle=False`` and carries its own manifest as a JSON string under
``manifest``; the same content is written beside it, named after it (``e.npz`` ->
``e.manifest.json``), so two embeddings in one folder keep their own manifests.

A folder written by ``featviz embed --shard-size`` loads the same way (``featviz.io.shards``): its
features stay memory-mapped (a ``ShardedArray``), and only the rows a reader indexes are read.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featviz.errors import ArtifactError, DataError
from featviz.io.outputs import atomic_path, check_companion, check_output, manifest_path, to_jsonable, write_json
from featviz.io.shards import ShardedArray, is_sharded, read_shards

REQUIRED = ("features", "labels")


@dataclass
class Embeddings:
    """Image or pixel embeddings with their labels.

    Attributes:
        features: (N, D) float32.
        labels: (N,) int64; -1 means unknown.
        class_names: names for label values 0..C-1 (may be empty).
        ids: (N,) str, e.g. image paths.
        image_index: (N,) int64 for pixel embeddings: which image each pixel came from.
        yx: (N, 2) int64 for pixel embeddings: the pixel's (y, x) in its image/mask.
        manifest: provenance (versions, arguments, checkpoint load report, seed).
    """

    features: np.ndarray
    labels: np.ndarray
    class_names: list[str] = field(default_factory=list)
    ids: np.ndarray | None = None
    image_index: np.ndarray | None = None
    yx: np.ndarray | None = None
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Coerce the arrays (float32 features, int64 labels, str ids) and check their shapes."""
        if not (isinstance(self.features, ShardedArray) and self.features.dtype == np.float32):
            self.features = np.asarray(self.features, dtype=np.float32)  # a float32 memory map stays one
        if self.features.ndim != 2:
            raise ArtifactError(f"features must be (N, D), got shape {self.features.shape}")
        n = len(self.features)
        self.labels = np.full(n, -1, np.int64) if self.labels is None else np.asarray(self.labels, np.int64)
        if self.labels.shape != (n,):
            raise ArtifactError(f"labels must be ({n},) to match features, got {self.labels.shape}")
        if self.ids is None:
            self.ids = np.array([str(i) for i in range(n)])
        self.ids = np.asarray(self.ids).astype(str)
        self.class_names = [str(c) for c in self.class_names]

    @property
    def n(self) -> int:
        """The number of rows."""
        return int(self.features.shape[0])

    @property
    def d(self) -> int:
        """The feature width."""
        return int(self.features.shape[1])

    @property
    def is_pixels(self) -> bool:
        """Whether the rows are pixels (with ``image_index`` and ``yx``) rather than images."""
        return self.image_index is not None

    def label_names(self) -> list[str]:
        """Name per label value present, falling back to the number itself."""
        return [self.class_names[i] if 0 <= i < len(self.class_names) else str(i)
                for i in range(int(self.labels.max(initial=-1)) + 1)]

    def subset(self, idx: np.ndarray) -> Embeddings:
        """Rows ``idx`` as a new Embeddings (same class names and manifest)."""
        return Embeddings(
            self.features[idx], self.labels[idx], self.class_names, self.ids[idx],
            None if self.image_index is None else self.image_index[idx],
            None if self.yx is None else self.yx[idx], dict(self.manifest),
        )

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write ``path`` (.npz, allow_pickle=False) and ``<stem>.manifest.json`` beside it, atomically."""
        path = check_save(path, force=force)
        manifest = to_jsonable({**self.manifest, "output": path.name, "n": self.n, "d": self.d})
        arrays: dict[str, np.ndarray] = {
            "features": self.features, "labels": self.labels,
            "class_names": np.array(self.class_names, dtype=str), "ids": self.ids,
            "manifest": np.array(json.dumps(manifest)),
        }
        if self.image_index is not None:
            arrays["image_index"] = np.asarray(self.image_index, np.int64)
            arrays["yx"] = np.asarray(self.yx, np.int64).reshape(-1, 2)
        with atomic_path(path, force=True) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        write_json(manifest_path(path), manifest, force=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Embeddings:
        """Read an embeddings ``.npz`` written by ``save`` (or any npz with ``features``), or a shard folder.

        A folder from ``featviz embed --shard-size`` is memory-mapped, not read (``featviz.io.shards``).

        Raises:
            ArtifactError: missing file, not an npz, or without a (N, D) ``features`` array; an
                unfinished or damaged shard folder.
        """
        path = Path(path)
        if is_sharded(path):
            data = read_shards(path)
            return cls(features=data["features"], labels=data["labels"], class_names=data["class_names"],
                       ids=data["ids"], manifest=data["manifest"])
        if path.is_dir():
            raise ArtifactError(f"{str(path)!r} is a folder without a sharded-embeddings manifest.json; expected an "
                                "embeddings .npz from `featviz embed`, or a folder from `featviz embed --shard-size`")
        if not path.is_file():
            raise ArtifactError(f"embeddings file {str(path)!r} does not exist; create it with `featviz embed`")
        check_array_file(path, "npz", expected="an embeddings .npz from `featviz embed`")
        data = read_npz(path)
        if "features" not in data:
            raise ArtifactError(f"{str(path)!r} has no 'features' array (found: {sorted(data)}); "
                                "expected an embeddings file from `featviz embed`")
        manifest: Any = {}
        if "manifest" in data:
            try:
                manifest = json.loads(str(data["manifest"]))
            except (ValueError, RecursionError):
                manifest = {}
        features = data["features"]
        if features.dtype.kind not in "fiu":
            raise ArtifactError(f"{str(path)!r}: 'features' holds {_dtype_words(features.dtype)}; expected real "
                                "numbers (float32), as `featviz embed` writes")
        if features.ndim != 2:
            raise ArtifactError(f"{str(path)!r}: 'features' must be (N, D), got shape {features.shape}")
        if len(features) == 0:
            raise ArtifactError(f"{str(path)!r} has no rows ('features' is {features.shape}); embed at least "
                                "one image")
        class_names = [str(c) for c in np.asarray(data.get("class_names", [])).reshape(-1)]
        labels, class_names = _labels(path, data.get("labels"), class_names, len(features))
        return cls(
            features=features, labels=labels, class_names=class_names, ids=data.get("ids"),
            image_index=data.get("image_index"), yx=data.get("yx"),
            manifest=manifest if isinstance(manifest, dict) else {},
        )


def _labels(path: Path, labels: np.ndarray | None, class_names: list[str],
            n: int) -> tuple[np.ndarray | None, list[str]]:
    """An embeddings file's labels as class indices (-1 = unknown), and its class names.

    Text labels (``"cat"``) become indices into ``class_names`` (extended by any name it lacks, in
    sorted order); whole-number floats become ints.

    Raises:
        ArtifactError: labels that are neither class indices nor names, or of the wrong length.
    """
    if labels is None:
        return None, class_names
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ArtifactError(f"{str(path)!r}: 'labels' must be ({n},), one per 'features' row; got {labels.shape}")
    if labels.dtype.kind in "US":
        text = labels.astype(str)
        names = list(class_names) + sorted(set(text.tolist()) - set(class_names))
        index = {c: i for i, c in enumerate(names)}
        return np.array([index[t] for t in text.tolist()], np.int64), names
    if labels.dtype.kind == "f":
        if not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
            raise ArtifactError(f"{str(path)!r}: 'labels' holds fractions, NaN or Inf; expected class indices "
                                "(whole numbers, -1 = unknown) or class names")
        return labels.astype(np.int64), class_names
    if labels.dtype.kind not in "iub":
        raise ArtifactError(f"{str(path)!r}: 'labels' holds {_dtype_words(labels.dtype)}; expected class indices "
                            "(whole numbers, -1 = unknown) or class names")
    return labels.astype(np.int64), class_names


def _dtype_words(dtype: np.dtype) -> str:
    words = {"c": "complex numbers", "O": "Python objects", "U": "text", "S": "bytes", "V": "structured records",
             "b": "booleans", "M": "dates", "m": "time spans"}
    return f"{words.get(dtype.kind, 'values')} (dtype {dtype.str})"


MAX_ARRAY_MB_ENV = "FEATVIZ_MAX_ARRAY_MB"
"""The environment variable that sets the memory budget of one array file (MB), e.g. to read a larger one."""


def memory_budget() -> int:
    """The most bytes featviz reads from one ``.npz``/``.npy`` file: half the machine's memory.

    ``FEATVIZ_MAX_ARRAY_MB`` overrides it. Files are checked against it (their headers and zip
    directory) before anything is read, so a hostile header or a zip bomb is refused, not allocated.
    """
    env = os.environ.get(MAX_ARRAY_MB_ENV, "").strip()
    if env:
        try:
            return max(1, int(float(env) * 2**20))
        except ValueError:
            raise ArtifactError(f"{MAX_ARRAY_MB_ENV}={env!r}: expected a number of megabytes") from None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # not POSIX
        return 8 * 2**30


def _budget_error(path: Path, what: str, nbytes: int, budget: int) -> ArtifactError:
    return ArtifactError(f"{str(path)!r}: {what} would take {_size(nbytes)} of memory, above featviz's memory budget "
                         f"of {_size(budget)} (half this machine's memory; set {MAX_ARRAY_MB_ENV} to change it); "
                         "a damaged or hostile file, or one too large for this machine")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def npy_header(f: Any, path: Path, member: str = "") -> tuple[tuple[int, ...], np.dtype]:
    """The (shape, dtype) a ``.npy`` stream declares, read from its header only.

    Raises:
        ArtifactError: no valid header, or a dtype featviz does not read (complex, objects, records).
    """
    where = f"{str(path)!r}" + (f" (member {member!r})" if member else "")
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    except Exception as e:  # noqa: BLE001 - NumPy's header parser on hostile text raises many kinds (TokenError…)
        if isinstance(e, PermissionError):
            raise read_error(path, e) from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:80]
        raise ArtifactError(f"{where} is not a readable .npy array (its header is damaged: {first}); "
                            "write the file again") from None
    if dtype.kind in "cOV" or dtype.hasobject:
        raise ArtifactError(f"{where} holds {_dtype_words(dtype)}; featviz reads real numbers, text labels and "
                            "names only (complex values would be cast to real, objects need pickle)")
    return tuple(int(s) for s in shape), dtype


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``, checked before it is read (``allow_pickle=False``).

    The zip directory and each member's ``.npy`` header are read first: the arrays' declared sizes
    and the members' uncompressed sizes must fit ``memory_budget()`` (a header declaring 10⁶×10⁶, or a
    small zip of gigabytes of zeros, is refused before anything is allocated), and complex, object or
    record arrays are refused.

    Raises:
        ArtifactError: not a readable zip of ``.npy`` arrays, above the budget, or a refused dtype.
    """
    path = Path(path)
    budget = memory_budget()
    try:
        with zipfile.ZipFile(path) as z:
            total = 0
            for info in z.infolist():
                if info.file_size > budget:
                    raise _budget_error(path, f"member {info.filename!r} ({_size(info.compress_size)} compressed)",
                                        info.file_size, budget)
                with z.open(info) as f:  # NumPy reads any member that starts like a .npy, whatever its name
                    if f.read(6) != b"\x93NUMPY":
                        if info.filename.endswith(".npy"):
                            raise ArtifactError(f"{str(path)!r}: member {info.filename!r} is not a .npy array (it "
                                                "lacks NumPy's header); the file is damaged: write it again")
                        continue
                with z.open(info) as f:
                    shape, dtype = npy_header(f, path, info.filename)
                nbytes = _nbytes(shape, dtype)
                total += max(nbytes, info.file_size)
                if nbytes > budget or total > budget:
                    what = f"{info.filename.removesuffix('.npy')!r} {shape} {dtype}"
                    raise _budget_error(path, what, max(nbytes, total), budget)
    except zipfile.BadZipFile as e:
        raise ArtifactError(f"{str(path)!r} is a truncated or damaged .npz ({e}); write it again") from None
    except OSError as e:
        raise read_error(path, e) from None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return {k: v for k, v in arrays.items() if isinstance(v, np.ndarray)}  # not other files in the zip
    except OSError as e:
        raise read_error(path, e) from None
    except Exception as e:  # noqa: BLE001 - the members were checked; what NumPy still refuses is a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        raise ArtifactError(f"{str(path)!r} is not a readable .npz file ({first}); write it again") from None


def check_npy(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype]:
    """The (shape, dtype) of a ``.npy`` file, checked against ``memory_budget()`` before it is read.

    Raises:
        ArtifactError: a damaged header, a refused dtype, or above the budget.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            shape, dtype = npy_header(f, path)
    except OSError as e:
        raise read_error(path, e) from None
    budget = memory_budget()
    if _nbytes(shape, dtype) > budget:
        raise _budget_error(path, f"its array {shape} {dtype}", _nbytes(shape, dtype), budget)
    return shape, dtype


def read_error(path: Path, e: OSError) -> ArtifactError:
    """A failure to read ``path`` itself (no permission, gone), named as such, never "not readable"."""
    import errno

    if e.errno in (errno.EACCES, errno.EPERM):
        return ArtifactError(f"cannot read {str(path)!r}: permission denied; check its permissions (ls -l)")
    return ArtifactError(f"cannot read {str(path)!r}: {e.strerror or e}")


_MAGIC = {"npz": (b"PK\x03\x04", b"PK\x05\x06"), "npy": (b"\x93NUMPY",)}


def check_array_file(path: str | os.PathLike, kind: str, *, expected: str) -> None:
    """Check a file's first bytes before NumPy reads it, so a wrong file gets a name, not NumPy's guess.

    (NumPy calls anything that is neither a zip nor a .npy "pickled (object) data".)

    Args:
        path: The file.
        kind: ``"npz"`` or ``"npy"``.
        expected: What the caller wants, for the message.

    Raises:
        ArtifactError: the file is not of ``kind``; the message says what it looks like.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise read_error(path, e) from None
    if head.startswith(_MAGIC[kind]):
        return
    raise ArtifactError(f"{str(path)!r} is not a NumPy .{kind} file: it looks like {_looks_like(head)}; "
                        f"expected {expected}")


def _looks_like(head: bytes) -> str:
    signatures = [
        (b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
        (b"RIFF", "a RIFF (WebP/WAV) file"), (b"%PDF", "a PDF document"), (b"\x80", "a Python pickle"),
        (b"\x93NUMPY", "a NumPy .npy array (not an .npz archive)"), (b"PK\x03\x04", "a zip archive"),
        (b"\x1f\x8b", "a gzip file"),
    ]
    for magic, name in signatures:
        if head.startswith(magic):
            return name
    if not head:
        return "an empty file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"binary data starting with {head[:8]!r}"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"a text file (starting {first!r})"


def check_save(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Check, before any work, that embeddings can be saved at ``path`` (and its manifest beside it).

    Raises:
        ArtifactError: ``path`` does not end in .npz.
        OutputError, OutputExistsError: see ``featviz.io.outputs.check_output``.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ArtifactError(f"embeddings are saved as .npz, got {path.name!r}; use a name ending in .npz")
    check_output(path, force=force, folder=False)
    check_companion(manifest_path(path), path, force=force)
    return path


def check_finite(features: np.ndarray, *, what: str = "features", drop: bool = False) -> np.ndarray:
    """Return a boolean mask of finite rows; raise unless ``drop`` when some are not.

    Raises:
        DataError: NaN/Inf rows exist and ``drop`` is False.
    """
    parts = features.parts if isinstance(features, ShardedArray) else [features]  # shard by shard: no copy
    ok = np.concatenate([np.isfinite(p).all(axis=1) for p in parts])
    bad = int((~ok).sum())
    if bad and not drop:
        raise DataError(f"{bad} of {len(features)} {what} rows contain NaN or Inf; "
                        "fix the model/inputs, or pass --drop-nonfinite to drop them")
    return ok
