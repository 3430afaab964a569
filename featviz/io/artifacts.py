"""The files stages exchange: embeddings ``.npz`` plus its manifest (numpy only, no torch).

An embeddings file holds ``features`` (N, D) float32, ``labels`` (N,) int64 (-1 = unknown),
``class_names``, ``ids`` and, for pixel embeddings, ``image_index`` (N,) and ``yx`` (N, 2).
It is written with ``allow_pickle=False`` and carries its own manifest as a JSON string under
``manifest``; the same content is written beside it, named after it (``e.npz`` ->
``e.manifest.json``), so two embeddings in one folder keep their own manifests.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featviz.errors import ArtifactError, DataError
from featviz.io.outputs import atomic_path, check_output, manifest_path, to_jsonable, write_json

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
        self.features = np.asarray(self.features, dtype=np.float32)
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
        """Read an embeddings ``.npz`` written by ``save`` (or any npz with ``features``).

        Raises:
            ArtifactError: missing file, not an npz, or without a (N, D) ``features`` array.
        """
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"embeddings file {str(path)!r} does not exist; create it with `featviz embed`")
        check_array_file(path, "npz", expected="an embeddings .npz from `featviz embed`")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{str(path)!r} is not a readable .npz file ({e})") from None
        if "features" not in data:
            raise ArtifactError(f"{str(path)!r} has no 'features' array (found: {sorted(data)}); "
                                "expected an embeddings file from `featviz embed`")
        manifest = {}
        if "manifest" in data:
            try:
                manifest = json.loads(str(data["manifest"]))
            except json.JSONDecodeError:
                manifest = {}
        return cls(
            features=data["features"], labels=data.get("labels"),
            class_names=list(data.get("class_names", [])), ids=data.get("ids"),
            image_index=data.get("image_index"), yx=data.get("yx"), manifest=manifest,
        )


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
    with open(path, "rb") as f:
        head = f.read(512)
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
    check_output(manifest_path(path), force=force, folder=False)
    return path


def check_finite(features: np.ndarray, *, what: str = "features", drop: bool = False) -> np.ndarray:
    """Return a boolean mask of finite rows; raise unless ``drop`` when some are not.

    Raises:
        DataError: NaN/Inf rows exist and ``drop`` is False.
    """
    ok = np.isfinite(features).all(axis=1)
    bad = int((~ok).sum())
    if bad and not drop:
        raise DataError(f"{bad} of {len(features)} {what} rows contain NaN or Inf; "
                        "fix the model/inputs, or pass --drop-nonfinite to drop them")
    return ok
