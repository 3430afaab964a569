"""DINO's weighted k-NN classifier on frozen features, in numpy (torch-free) and in bounded memory.

The rule is ``knn_classifier`` of DINO's ``eval_knn.py`` (Caron et al. 2021, after Wu et al. 2018):

1. features are L2-normalised (``x / max(‖x‖, 1e-12)``, as ``F.normalize``);
2. the similarity of a query to a training row is their dot product (cosine similarity);
3. the ``k`` most similar training rows vote for their class with weight ``exp(s / T)``;
4. the classes are ranked by their summed votes; top-1 is the first, top-5 the first
   ``min(5, k)`` (DINO's own cap: "top5 does not make sense if k < 5").

Ties between classes (equal votes, including classes that got no vote when fewer than five did)
are ranked by class index, as DINO's ``probs.sort(1, True)`` orders them on CPU for few classes. So
with 10 classes a query whose neighbours all share one class still "hits" top-5 when its true class
is among the four lowest-numbered others: read top-5 with few classes with that in mind.

Memory: queries are taken ``block_rows`` at a time and the training set ``block_cols`` rows at a
time; each block keeps only a running top-``max(k)`` per query, so the working memory is
``block_rows × (block_cols + 2·max(k))`` values whatever the sizes (1M × 100k included), and all
``k`` of a run share one pass over the data.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featviz.errors import DataError, OptionError
from featviz.io.progress import Progress

log = logging.getLogger(__name__)

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07
BLOCK_ROWS = 512
MAX_K = 1_000_000
"""The largest neighbour count ``--k`` takes (a bigger one is a typo, and capped by N anyway)."""
BLOCK_COLS = 16384


def parse_ks(value: str | int | Sequence[int]) -> tuple[int, ...]:
    """``"10,20,100,200"`` (or ints) as a tuple of distinct positive ints, in the order given.

    Raises:
        OptionError: an empty list, a non-integer or a value < 1 (a usage error).
    """
    if isinstance(value, int):
        items: list[Any] = [value]
    elif isinstance(value, str):
        items = [p.strip() for p in re.split(r"[,\s]+", value.strip()) if p.strip()]
    else:
        items = list(value)
    ks: list[int] = []
    for item in items:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            k = int(item)
        elif isinstance(item, str) and re.fullmatch(r"-?\d+", item):
            k = int(item)
        else:
            raise OptionError(
                f"--k expects comma-separated positive integers such as 10,20,100,200; "
                f"got {item!r} in {value!r}"
            )
        if not 1 <= k <= MAX_K:
            raise OptionError(f"--k values must be between 1 and {MAX_K:,}, got {k}")
        if k not in ks:
            ks.append(k)
    if not ks:
        raise OptionError(
            f"--k expects comma-separated positive integers such as 10,20,100,200; got {value!r}"
        )
    return tuple(ks)


@dataclass(frozen=True)
class KnnScore:
    """The accuracy of one (k, T) setting; ``correct_*`` are counts out of ``n_val``."""

    k: int
    temperature: float
    top1: float
    top5: float
    correct_top1: int
    correct_top5: int
    n_val: int

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` entry: ``{"k", "temperature", "top1", "top5"}`` (fractions)."""
        return {"k": self.k, "temperature": self.temperature, "top1": self.top1, "top5": self.top5}


def l2_normalize(x: np.ndarray, *, inplace: bool = False) -> np.ndarray:
    """Rows divided by ``max(‖row‖₂, 1e-12)`` as float32 (``torch.nn.functional.normalize``).

    With ``inplace`` a float32 C-contiguous ``x`` is overwritten instead of copied.
    """
    out = (
        x
        if inplace and x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable
        else np.array(x, dtype=np.float32, order="C")
    )
    for i in range(0, len(out), 65536):  # in slices: no full-size temporary
        part = out[i : i + 65536]
        part /= np.maximum(np.linalg.norm(part, axis=1, keepdims=True), np.float32(1e-12))
    return out


def check_features(
    train: np.ndarray,
    train_labels: np.ndarray,
    val: np.ndarray,
    val_labels: np.ndarray,
    *,
    what: str = "kNN",
) -> None:
    """Shapes, labels and finiteness that a k-NN (or probe) needs.

    Raises:
        DataError: not 2-D, mismatched lengths or widths, unlabelled rows, NaN/Inf.
    """
    for name, f, y in (("train", train, train_labels), ("val", val, val_labels)):
        if f.ndim != 2:
            raise DataError(f"{name} features must be (N, D), got shape {f.shape}")
        if len(f) == 0:
            raise DataError(f"the {name} set is empty")
        if y.shape != (len(f),):
            raise DataError(
                f"{name} labels have shape {y.shape}; expected ({len(f)},) to match the features"
            )
        if (y < 0).any():
            raise DataError(
                f"{int((y < 0).sum())} of {len(y)} {name} rows have no label (-1); {what} needs a "
                "label for every row (class subfolders, or a labels CSV, when embedding)"
            )
    if train.shape[1] != val.shape[1]:
        raise DataError(
            f"train features are {train.shape[1]}-d but val features are {val.shape[1]}-d; "
            "both must come from the same model and layer"
        )
    for name, f in (("train", train), ("val", val)):
        bad = ~np.isfinite(f).all(axis=1) if f.size < 50_000_000 else _nonfinite_rows(f)
        if bad.any():
            raise DataError(
                f"{int(bad.sum())} {name} rows contain NaN or Inf; fix or drop them "
                "(`featviz embed --drop-nonfinite`)"
            )


def _nonfinite_rows(f: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [~np.isfinite(f[i : i + 65536]).all(axis=1) for i in range(0, len(f), 65536)]
    )


def top_neighbours(
    queries: np.ndarray, bank: np.ndarray, k: int, *, block_cols: int = BLOCK_COLS
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest dot products of each query with the bank rows, sorted descending.

    The bank is scanned ``block_cols`` rows at a time; a running threshold (each query's current
    k-th best) lets almost every later block be skipped with one comparison per value.

    Returns:
        (similarities (R, k) float32, indices (R, k) int64), most similar first.
    """
    r = len(queries)
    best_v = np.full((r, k), -np.inf, np.float32)
    best_i = np.full((r, k), -1, np.int64)
    rows = np.arange(r)[:, None]
    for j0 in range(0, len(bank), block_cols):
        s = queries @ bank[j0 : j0 + block_cols].T  # (R, b)
        if j0 == 0:
            if s.shape[1] > k:
                part = np.argpartition(s, s.shape[1] - k, axis=1)[:, -k:]
                best_v, best_i = np.take_along_axis(s, part, 1), part.astype(np.int64)
            else:
                best_v[:, : s.shape[1]], best_i[:, : s.shape[1]] = s, np.arange(s.shape[1])
            continue
        thr = best_v.min(axis=1)
        hit_r, hit_c = np.nonzero(s > thr[:, None])
        if not len(hit_r):
            continue
        counts = np.bincount(hit_r, minlength=r)
        todo = np.flatnonzero(counts)
        slot = np.zeros(r, np.int64)
        slot[todo] = np.arange(len(todo))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pos = np.arange(len(hit_r)) - starts[hit_r]
        width = int(counts.max())
        cand_v = np.full((len(todo), k + width), -np.inf, np.float32)
        cand_i = np.full((len(todo), k + width), -1, np.int64)
        cand_v[:, :k], cand_i[:, :k] = best_v[todo], best_i[todo]
        cand_v[slot[hit_r], k + pos] = s[hit_r, hit_c]
        cand_i[slot[hit_r], k + pos] = hit_c + j0
        keep = np.argpartition(cand_v, width, axis=1)[:, width:]
        best_v[todo] = np.take_along_axis(cand_v, keep, 1)
        best_i[todo] = np.take_along_axis(cand_i, keep, 1)
    order = np.argsort(-best_v, axis=1, kind="stable")
    return best_v[rows, order], best_i[rows, order]


def class_votes(
    similarities: np.ndarray, neighbour_labels: np.ndarray, num_classes: int, temperature: float
) -> np.ndarray:
    """Summed ``exp(s / T)`` per class over the given neighbours: (R, C) float32."""
    weights = np.exp(similarities / np.float32(temperature), dtype=np.float32)
    votes = np.zeros((len(similarities), num_classes), np.float32)
    rows = np.arange(len(similarities))
    for j in range(
        similarities.shape[1]
    ):  # one neighbour rank at a time: rows never repeat within a column
        votes[rows, neighbour_labels[:, j]] += weights[:, j]
    return votes


def ranked_hits(votes: np.ndarray, targets: np.ndarray, k: int) -> tuple[int, int]:
    """(top-1 hits, top-``min(5, k)`` hits); ties ranked by class index."""
    n5 = min(5, k, votes.shape[1])
    ranked = np.argsort(-votes, axis=1, kind="stable")[:, :n5]
    hit = ranked == targets[:, None]
    return int(hit[:, 0].sum()), int(hit.any(axis=1).sum())


def weighted_knn(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    *,
    ks: Sequence[int] | str = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    normalize: bool = True,
    copy: bool = True,
    block_rows: int = BLOCK_ROWS,
    block_cols: int = BLOCK_COLS,
    progress: Progress | None = None,
) -> list[KnnScore]:
    """DINO's weighted k-NN accuracy of ``val`` against ``train``, for every ``k`` in one pass.

    Args:
        train_features: (N, D) training features (any float dtype).
        train_labels: (N,) their class indices ≥ 0.
        val_features: (M, D) query features.
        val_labels: (M,) their class indices ≥ 0.
        ks: neighbour counts; all share one similarity pass.
        temperature: T in the vote weight ``exp(s / T)``.
        num_classes: default ``max(label) + 1``.
        normalize: L2-normalise both sets first (DINO does); False if they already are.
        copy: False normalises float32 inputs in place, saving a copy of the training set.
        block_rows: query rows per block (memory: block_rows × block_cols).
        block_cols: training rows per block.
        progress: wraps the loop over query blocks (a progress bar).

    Returns:
        One ``KnnScore`` per ``k``, in the order given.

    Raises:
        DataError: bad shapes or labels, non-finite rows, ``k`` larger than the training set, T ≤ 0.
    """
    ks = parse_ks(ks)
    # a sharded bank (``featviz.io.shards.ShardedArray``) is read here, once: the copy normalised below
    train_features, val_features = np.asarray(train_features), np.asarray(val_features)
    train_labels = np.asarray(train_labels, np.int64)
    val_labels = np.asarray(val_labels, np.int64)
    check_features(np.asarray(train_features), train_labels, np.asarray(val_features), val_labels)
    if not temperature > 0:
        raise DataError(f"--temperature must be > 0, got {temperature}")
    kmax = max(ks)
    if kmax > len(train_features):
        raise DataError(
            f"k={kmax} is more than the {len(train_features)} training rows; use a smaller --k"
        )
    n_cls = int(num_classes or max(train_labels.max(), val_labels.max()) + 1)
    if normalize:
        train = l2_normalize(train_features, inplace=not copy)
        val = l2_normalize(val_features, inplace=not copy)
    else:
        train = np.ascontiguousarray(train_features, np.float32)
        val = np.ascontiguousarray(val_features, np.float32)
    hits = {k: [0, 0] for k in ks}
    starts = range(0, len(val), block_rows)
    for i0 in progress(starts, total=len(starts)) if progress is not None else starts:
        sims, idx = top_neighbours(val[i0 : i0 + block_rows], train, kmax, block_cols=block_cols)
        labels = train_labels[idx]
        targets = val_labels[i0 : i0 + block_rows]
        for k in ks:
            h1, h5 = ranked_hits(
                class_votes(sims[:, :k], labels[:, :k], n_cls, temperature), targets, k
            )
            hits[k][0] += h1
            hits[k][1] += h5
    m = len(val)
    return [
        KnnScore(k, float(temperature), hits[k][0] / m, hits[k][1] / m, hits[k][0], hits[k][1], m)
        for k in ks
    ]


def cap_ks(ks: Sequence[int], n_train: int) -> tuple[int, ...]:
    """``ks`` with every k above the ``n_train`` training rows replaced by ``n_train`` (a warning says so).

    DINO's default 10,20,100,200 assumes a large training set; on a small one the larger ks become
    "every training row" instead of failing after the features are computed.
    """
    over = [k for k in ks if k > n_train]
    if not over:
        return tuple(ks)
    capped = tuple(dict.fromkeys(min(k, n_train) for k in ks))
    log.warning("k=%s %s more than the %d training rows: scoring k=%s instead (pass a smaller --k to choose)",
                ",".join(map(str, over)), "is" if len(over) == 1 else "are", n_train,
                ",".join(map(str, capped)))
    return capped


# ------------------------------------------------------------------ the command
def run_knn(
    *,
    ks: Sequence[int] | str = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    out: str | os.PathLike | None = None,
    force: bool = False,
    arguments: dict[str, Any] | None = None,
    progress: Progress | None = None,
    **sources: Any,
) -> dict[str, Any]:
    """Everything ``featviz knn`` does: read or embed the two splits, score every ``k``, report.

    Args:
        ks: neighbour counts (see ``weighted_knn``).
        temperature: the vote temperature (see ``weighted_knn``).
        out: optional ``.json`` file for the result and its provenance (written atomically).
        force: overwrite ``out``.
        arguments: the command's arguments, for the provenance.
        progress: ``progress(iterable, total=…, description=…)``, a progress bar.
        **sources: ``featviz.eval.splits.load_splits`` arguments (``train``/``val``, ``checkpoint`` with
            ``train_images``/``val_images``, or ``images``).

    Returns:
        ``{"knn": [{"k", "temperature", "top1", "top5"}, …], "n_train", "n_val", …}`` (fractions),
        plus ``dim``, ``num_classes``, ``protocol`` and the ``model`` description (with its load report).

    Raises:
        DataError: see ``load_splits`` and ``weighted_knn``.
        OutputExistsError: ``out`` exists and ``force`` is False.
    """
    import time

    from featviz.eval.splits import load_splits
    from featviz.io.outputs import check_writable, manifest, write_json

    ks = parse_ks(ks)
    if not temperature > 0:
        raise DataError(f"--temperature must be > 0, got {temperature}")
    if out is not None:
        if Path(out).suffix != ".json":
            raise DataError(f"--out must end in .json, got {str(out)!r}")
        check_writable(out, force=force)
    splits = load_splits(progress=progress, **sources)
    ks = cap_ks(ks, len(splits.train))
    t0 = time.perf_counter()
    wrap = (
        None
        if progress is None
        else (lambda it, total=None: progress(it, total=total, description="k-NN"))
    )
    scores = weighted_knn(
        splits.train.features,
        splits.train.labels,
        splits.val.features,
        splits.val.labels,
        ks=ks,
        temperature=temperature,
        num_classes=splits.num_classes,
        copy=False,  # the splits are ours: normalise in place
        progress=wrap,
    )
    result = {
        "knn": [s.to_dict() for s in scores],
        "n_train": len(splits.train),
        "n_val": len(splits.val),
        "dim": splits.dim,
        "num_classes": splits.num_classes,
        "protocol": {
            **splits.protocol,
            "similarity": "cosine (L2-normalised features)",
            "weights": "exp(similarity / temperature)",
            "rule": "DINO eval_knn.knn_classifier",
        },
        "model": splits.model,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if out is not None:
        write_json(out, {**result, "manifest": manifest("knn", arguments or {})}, force=True)
    return result
