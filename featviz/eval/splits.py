"""Train/val feature splits for frozen-feature evaluation (``featviz knn`` and ``featviz probe``).

Three sources, one result (``Splits``):

- two embeddings files (``--train A.npz --val B.npz``): numpy only, no torch; class indices are
  matched by class name when both files carry names (two folders embedded apart number their
  classes apart);
- a checkpoint and two labelled image folders (``--train-images``, ``--val-images``): the images
  are embedded with the model in eval mode, so BatchNorm layers use their running statistics
  (lightly #1824: kNN numbers that were measured in train mode did not reproduce);
- one labelled set (``--images digits`` or a folder with class subfolders) split into train and
  val by a fixed stratified split (``val_fraction``, ``seed``). ``digits`` without a model gives
  its raw 8×8 pixels (64 values in 0..16), the classic baseline.

The protocol (where features came from, eval mode, image size, split) is returned with the data
so every result can state it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featviz.errors import DataError
from featviz.io.progress import Progress

log = logging.getLogger(__name__)

VAL_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass
class Split:
    """Features and labels of one side (train or val)."""

    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        """The number of rows."""
        return len(self.labels)


@dataclass
class Splits:
    """Both sides, the shared class names, and how the features were made."""

    train: Split
    val: Split
    class_names: list[str]
    protocol: dict[str, Any]
    model: dict[str, Any] | None = None  # the model description (featviz.models.description), if a model was used

    @property
    def dim(self) -> int:
        """The feature width."""
        return int(self.train.features.shape[1])

    @property
    def num_classes(self) -> int:
        """Classes named or seen in either side."""
        return max(
            len(self.class_names), int(max(self.train.labels.max(), self.val.labels.max())) + 1
        )


def load_splits(
    *,
    train: str | os.PathLike | None = None,
    val: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    arch: str | None = None,
    train_images: str | os.PathLike | None = None,
    val_images: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    image_size: int | None = None,
    center_crop: bool | None = None,
    val_fraction: float = VAL_FRACTION,
    seed: int = SPLIT_SEED,
    batch_size: int = 64,
    device: str = "auto",
    load_kwargs: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> Splits:
    """Train and val features from whichever source the arguments name (see the module docstring).

    Images go through ``featviz.data.images.eval_transform`` at ``image_size`` with ``center_crop``
    (None: on for a square N, off for H×W); the protocol's ``resize`` says what was done.

    Raises:
        DataError: no source or two sources, a missing file, unlabelled images, mismatched widths.
    """
    given = {
        "--train/--val": train is not None or val is not None,
        "--train-images/--val-images": train_images is not None or val_images is not None,
        "--images": images is not None,
    }
    chosen = [k for k, v in given.items() if v]
    if len(chosen) != 1:
        why = "none was given" if not chosen else f"got {' and '.join(chosen)}"
        raise DataError(
            "give exactly one input: --train A.npz --val B.npz, or --checkpoint C "
            "--train-images DIR --val-images DIR, or --images digits|DIR (a fixed stratified "
            f"split); {why}"
        )
    if chosen[0] == "--train/--val":
        if train is None or val is None:
            raise DataError(
                f"--train and --val go together; {'--val' if val is None else '--train'} is missing"
            )
        if checkpoint is not None or arch is not None:
            raise DataError(
                "--train/--val read features that are already computed; drop --checkpoint/--arch, "
                "or embed images with --train-images/--val-images"
            )
        return _from_npz(Path(train), Path(val))
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if chosen[0] == "--train-images/--val-images":
        if train_images is None or val_images is None:
            raise DataError(
                "--train-images and --val-images go together; "
                f"{'--val-images' if val_images is None else '--train-images'} is missing"
            )
        if checkpoint is None and arch is None:
            raise DataError(
                "--train-images/--val-images need a model: --checkpoint C (or --arch A for "
                "random weights)"
            )
        same_source(train_images, val_images, "--train-images and --val-images")
        return _from_folders(
            train_images,
            val_images,
            checkpoint=checkpoint,
            arch=arch,
            image_size=image_size,
            center_crop=center_crop,
            batch_size=batch_size,
            device=device,
            load_kwargs=load_kwargs,
            progress=progress,
        )
    return _from_one_set(
        images,
        checkpoint=checkpoint,
        arch=arch,
        image_size=image_size,
        center_crop=center_crop,
        val_fraction=val_fraction,
        seed=seed,
        batch_size=batch_size,
        device=device,
        load_kwargs=load_kwargs,
        progress=progress,
    )


# ------------------------------------------------------------------ embeddings files
def same_source(train: str | os.PathLike, val: str | os.PathLike, what: str) -> bool:
    """Whether train and val are one file or folder; a warning says what that makes the score.

    The features are then scored on the rows they were fitted on (``what``: the options, e.g.
    ``--train and --val``), which measures memorisation, not generalisation.
    """
    a, b = Path(train), Path(val)
    same = a.exists() and b.exists() and os.path.samefile(a, b)  # a missing file is said by its reader
    if same:
        log.warning("%s are the same %s (%s): the score is measured on the training rows themselves, so it says "
                    "how well they are memorised, not how well they generalise; give a held-out val set, or "
                    "--images with a stratified split", what, "folder" if a.is_dir() else "file", a)
    return same


def _from_npz(train: Path, val: Path) -> Splits:
    from featviz.io.artifacts import Embeddings

    same_source(train, val, "--train and --val")
    tr, va = Embeddings.load(train), Embeddings.load(val)
    if tr.d != va.d:
        raise DataError(
            f"{train.name} has {tr.d}-d features but {val.name} has {va.d}-d; both must come "
            "from the same model and layer"
        )
    for name, e in ((train, tr), (val, va)):
        if (e.labels < 0).any():
            raise DataError(
                f"{int((e.labels < 0).sum())} of {e.n} rows of {str(name)!r} have no label (-1); "
                "embed labelled images (class subfolders or --labels CSV)"
            )
        if e.is_pixels:
            log.warning(
                "%s holds pixel embeddings; every pixel is treated as one sample", name.name
            )
    names, va_labels = _align_classes(tr.class_names, va.class_names, va.labels)
    protocol = {
        "features": "embeddings files",
        "train_file": str(train),
        "val_file": str(val),
        "train_manifest": _short_manifest(tr.manifest),
        "val_manifest": _short_manifest(va.manifest),
    }
    return Splits(
        Split(tr.features, tr.labels, list(tr.ids)),
        Split(va.features, va_labels, list(va.ids)),
        names,
        protocol,
    )


def _short_manifest(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in ("command", "arguments", "model", "image_size", "resize", "layer") if k in m}


def _align_classes(
    train_names: list[str], val_names: list[str], val_labels: np.ndarray
) -> tuple[list[str], np.ndarray]:
    """Renumber val labels into the train numbering by class name (when both sides have names)."""
    if not train_names or not val_names or list(train_names) == list(val_names):
        return list(train_names or val_names), val_labels
    index = {n: i for i, n in enumerate(train_names)}
    names = list(train_names)
    unseen = [n for n in val_names if n not in index]
    for n in unseen:
        index[n] = len(names)
        names.append(n)
    if unseen:
        log.warning(
            "val classes %s have no training rows; their images can never be predicted correctly",
            ", ".join(unseen[:5]) + (" …" if len(unseen) > 5 else ""),
        )
    lut = np.array([index[n] for n in val_names], np.int64)
    return names, lut[val_labels]


# ------------------------------------------------------------------ images through a model
def _from_folders(
    train_images,
    val_images,
    *,
    checkpoint,
    arch,
    image_size,
    center_crop,
    batch_size,
    device,
    load_kwargs,
    progress,
) -> Splits:
    from featviz.data.images import labelled_images

    tr, va = labelled_images(train_images), labelled_images(val_images)
    for name, s in (("--train-images", tr), ("--val-images", va)):
        if (s.labels < 0).any():
            raise DataError(
                f"{name} {str(train_images if name.startswith('--train') else val_images)!r} has "
                f"{int((s.labels < 0).sum())} images outside class subfolders; put each class in "
                "its own subfolder (DIR/<class>/*.jpg)"
            )
    model, report, info = _model(checkpoint, arch, load_kwargs)
    f_tr = _embed(model, tr.items, (image_size, center_crop), batch_size, device, progress, "train")
    f_va = _embed(model, va.items, (image_size, center_crop), batch_size, device, progress, "val")
    names, va_labels = _align_classes(tr.class_names, va.class_names, va.labels)
    protocol = {
        **info,
        "train_images": str(train_images),
        "val_images": str(val_images),
        "image_size": _size_of(model, image_size),
        "resize": _resize_of(model, image_size, center_crop),
    }
    return Splits(
        Split(f_tr, tr.labels, list(tr.ids)),
        Split(f_va, va_labels, list(va.ids)),
        names,
        protocol,
        report,
    )


def _from_one_set(
    images,
    *,
    checkpoint,
    arch,
    image_size,
    center_crop,
    val_fraction,
    seed,
    batch_size,
    device,
    load_kwargs,
    progress,
) -> Splits:
    from sklearn.model_selection import train_test_split

    from featviz.data.images import is_builtin

    raw = checkpoint is None and arch is None and is_builtin(images)
    if raw:
        from sklearn.datasets import load_digits

        d = load_digits()
        feats, labels, names = (
            d.data.astype(np.float32),
            d.target.astype(np.int64),
            [str(i) for i in range(10)],
        )
        ids = [f"digits/{i}" for i in range(len(labels))]
        info: dict[str, Any] = {
            "features": "raw pixels (scikit-learn digits, 8x8 values 0..16; no model given)"
        }
        report = None
    else:
        from featviz.data.images import labelled_images

        if checkpoint is None and arch is None:
            raise DataError(
                f"--images {str(images)!r} needs a model: --checkpoint C (or --arch A for random "
                "weights); only `--images digits` has a model-free raw-pixel mode"
            )
        model, report, info = _model(checkpoint, arch, load_kwargs)
        s = labelled_images(images, image_size=_size_of(model, image_size)[0])  # digits: at that size
        if (s.labels < 0).any():
            raise DataError(
                f"--images {str(images)!r} has {int((s.labels < 0).sum())} images outside class "
                "subfolders; put each class in its own subfolder (DIR/<class>/*.jpg)"
            )
        labels, names, ids = s.labels, s.class_names, list(s.ids)
        feats = _embed(model, s.items, (image_size, center_crop), batch_size, device, progress, "images")
        info["image_size"] = _size_of(model, image_size)
        info["resize"] = _resize_of(model, image_size, center_crop)
    single = [
        names[c] if c < len(names) else str(c) for c in np.flatnonzero(np.bincount(labels) == 1)
    ]
    if single:
        raise DataError(
            f"a stratified split needs at least 2 images per class; {', '.join(single[:5])} "
            f"{'has' if len(single) == 1 else 'have'} only 1"
        )
    idx = np.arange(len(labels))
    try:
        tr, va = train_test_split(idx, test_size=val_fraction, stratify=labels, random_state=seed)
    except ValueError as e:
        raise DataError(
            f"cannot split {len(labels)} images of {len(names)} classes with --val-fraction "
            f"{val_fraction}: {e}"
        ) from None
    tr, va = np.sort(tr), np.sort(va)
    info.update(
        {
            "images": str(images),
            "split": {
                "kind": "stratified",
                "val_fraction": val_fraction,
                "seed": seed,
                "rule": "sklearn.model_selection.train_test_split",
            },
        }
    )
    return Splits(
        Split(feats[tr], labels[tr], [ids[i] for i in tr]),
        Split(feats[va], labels[va], [ids[i] for i in va]),
        list(names),
        info,
        report,
    )


def _model(checkpoint, arch, load_kwargs) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The model in eval mode, its description as a dict, and the protocol lines that say how it is used.

    The loader logs its warnings.
    """
    from featviz.models.loader import load_model

    model, desc = load_model(checkpoint, arch=arch, **(load_kwargs or {}))
    model.eval()
    n_bn = sum(1 for m in model.modules() if "BatchNorm" in type(m).__name__)
    info = {
        "features": "pooled backbone output (the model's forward)",
        "model": desc.name,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "batchnorm": (
            f"eval mode: {n_bn} BatchNorm layers use their running statistics"
            if n_bn
            else "the model has no BatchNorm layers"
        ),
        "mode": "eval",
    }
    return model, desc.to_dict(), info


def _size_of(model, image_size) -> list[int]:
    from featviz.models.features import input_size

    return list(input_size(model, image_size))


def _resize_of(model, image_size, center_crop) -> str:
    from featviz.data.images import resize_rule

    return resize_rule(_size_of(model, image_size), center_crop)


def _embed(model, items, size_crop, batch_size, device, progress, what: str) -> np.ndarray:
    from featviz.distributed import resolve_device
    from featviz.eval.embed import embed_images

    wrap = (
        None
        if progress is None
        else (lambda it: progress(it, total=len(it), description=f"embedding {what}"))
    )
    out = embed_images(
        model,
        items,
        image_size=size_crop[0],
        center_crop=size_crop[1],
        batch_size=batch_size,
        device=resolve_device(device),
        strict=True,
        progress=wrap,
    )
    return out.features
