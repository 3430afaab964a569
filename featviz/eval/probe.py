"""A linear probe on frozen features: standardised features, multinomial logistic regression.

The protocol (the L-BFGS logistic-regression probe of CLIP and of the DINOv2 paper's linear
evaluations, in scikit-learn):

1. hold out ``selection_fraction`` of the training rows (stratified, fixed ``seed``);
2. for each ``C`` of the grid, fit ``StandardScaler`` + ``LogisticRegression(C)`` on the rest and
   score top-1 on the held-out rows; the best ``C`` wins (ties: the smaller ``C``, i.e. the
   stronger regularisation);
3. refit with that ``C`` on all training rows and report top-1 and top-5 on the val set.

The val set never influences the choice of ``C``. This is not DINO's ``eval_linear.py`` (SGD on
augmented crops for 100 epochs): it needs only the features, and it is deterministic.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featviz.errors import DataError, OptionError
from featviz.io.progress import Progress

log = logging.getLogger(__name__)


C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
SELECTION_FRACTION = 0.2
MAX_ITER = 1000


@dataclass(frozen=True)
class ProbeResult:
    """The probe's val accuracy, the chosen ``C`` and the selection scores of the grid."""

    top1: float
    top5: float
    C: float
    grid: tuple[tuple[float, float], ...]  # (C, held-out top-1)
    n_fit: int
    n_select: int
    converged: bool

    def to_dict(self) -> dict[str, Any]:
        """The JSON result: accuracies, chosen ``C``, the grid, the selection split, convergence."""
        return {
            "top1": self.top1,
            "top5": self.top5,
            "C": self.C,
            "grid": [{"C": c, "selection_top1": a} for c, a in self.grid],
            "selection": {"n_fit": self.n_fit, "n_held_out": self.n_select},
            "converged": self.converged,
        }


def _pipeline(c: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))


def _fit(c: float, x: np.ndarray, y: np.ndarray, max_iter: int) -> tuple[Any, bool]:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model = _pipeline(c, max_iter).fit(x, y)
    return model, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def topk_hits(proba: np.ndarray, classes: np.ndarray, targets: np.ndarray, k: int = 5) -> tuple[int, int]:
    """(top-1 hits, top-``min(k, C)`` hits) from class probabilities; ties ranked by class order."""
    ranked = classes[np.argsort(-proba, axis=1, kind="stable")[:, : min(k, proba.shape[1])]]
    hit = ranked == targets[:, None]
    return int(hit[:, 0].sum()), int(hit.any(axis=1).sum())


def check_fraction(value: float, option: str) -> float:
    """``value`` if it is a share strictly between 0 and 1.

    Raises:
        OptionError: it is not (a usage error).
    """
    if not (isinstance(value, (int, float)) and 0 < value < 1):
        raise OptionError(f"{option} {value!r}: expected a share strictly between 0 and 1, e.g. 0.2")
    return float(value)


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    *,
    cs: Sequence[float] = C_GRID,
    selection_fraction: float = SELECTION_FRACTION,
    seed: int = 0,
    max_iter: int = MAX_ITER,
    progress: Progress | None = None,
) -> ProbeResult:
    """Choose ``C`` on a held-out part of the training set, refit on all of it, score val.

    Args:
        train_features: (N, D) frozen training features.
        train_labels: (N,) their class indices ≥ 0.
        val_features: (M, D) frozen validation features.
        val_labels: (M,) their class indices ≥ 0.
        cs: the grid of inverse regularisation strengths.
        selection_fraction: share of the training rows held out to choose ``C``.
        seed: seed of that stratified split.
        max_iter: L-BFGS iterations per fit.
        progress: wraps the loop over the grid (a progress bar).

    Raises:
        DataError: bad shapes/labels, a class with a single training row, an empty grid.
    """
    from sklearn.model_selection import train_test_split

    from featviz.eval.knn import check_features

    check_fraction(selection_fraction, "--selection-fraction")
    ytr = np.asarray(train_labels, np.int64)
    yva = np.asarray(val_labels, np.int64)
    xtr, xva = np.asarray(train_features, np.float32), np.asarray(val_features, np.float32)
    check_features(xtr, ytr, xva, yva, what="a probe")
    cs = sorted({float(c) for c in cs})
    if not cs or min(cs) <= 0:
        raise DataError(f"the C grid must hold positive values, got {cs}")
    if len(np.unique(ytr)) < 2:
        raise DataError("a probe needs at least 2 classes in the training set")
    counts = np.bincount(ytr)
    if (counts[counts > 0] < 2).any():
        raise DataError(
            f"{int(((counts > 0) & (counts < 2)).sum())} classes have a single training row; "
            "choosing C on a stratified split needs at least 2 per class"
        )
    try:
        fit_i, sel_i = train_test_split(
            np.arange(len(ytr)), test_size=selection_fraction, stratify=ytr, random_state=seed
        )
    except ValueError:  # scikit-learn's wording names its own arguments (test_size); say it in featviz's
        n_cls = len(np.unique(ytr))
        raise DataError(
            f"cannot hold out {selection_fraction:g} of {len(ytr)} training rows for choosing C: a stratified "
            f"split needs at least one row of each of the {n_cls} classes on both sides; "
            "use a --selection-fraction nearer 0.5 or more training rows"
        ) from None
    grid: list[tuple[float, float]] = []
    converged = True
    for c in progress(cs, total=len(cs)) if progress is not None else cs:
        model, ok = _fit(c, xtr[fit_i], ytr[fit_i], max_iter)
        converged &= ok
        grid.append((c, float((model.predict(xtr[sel_i]) == ytr[sel_i]).mean())))
    best = max(grid, key=lambda g: (g[1], -g[0]))[0]
    model, ok = _fit(best, xtr, ytr, max_iter)
    if not (ok and converged):
        log.warning(
            "L-BFGS stopped at max_iter=%d before converging for some C; the probe may sit "
            "slightly below its optimum (raise --max-iter)",
            max_iter,
        )
    h1, h5 = topk_hits(model.predict_proba(xva), model.classes_, yva)
    return ProbeResult(h1 / len(yva), h5 / len(yva), best, tuple(grid), len(fit_i), len(sel_i), ok and converged)


def run_probe(
    *,
    cs: Sequence[float] = C_GRID,
    selection_fraction: float = SELECTION_FRACTION,
    seed: int = 0,
    max_iter: int = MAX_ITER,
    out: str | os.PathLike | None = None,
    force: bool = False,
    arguments: dict[str, Any] | None = None,
    progress: Progress | None = None,
    **sources: Any,
) -> dict[str, Any]:
    """Everything ``featviz probe`` does: read or embed the two splits, probe, report.

    ``sources`` are ``featviz.eval.splits.load_splits`` arguments, as for ``featviz knn``.

    Returns:
        ``{"top1", "top5", "C", …}`` (fractions) plus the grid, sizes and protocol.

    Raises:
        DataError: see ``load_splits`` and ``linear_probe``.
        OutputExistsError: ``out`` exists and ``force`` is False.
    """
    from featviz.eval.splits import load_splits
    from featviz.io.outputs import check_writable, manifest, write_json

    if out is not None:
        if Path(out).suffix != ".json":
            raise DataError(f"--out must end in .json, got {str(out)!r}")
        check_writable(out, force=force)
    splits = load_splits(progress=progress, seed=seed, **sources)  # the --images split: the same seed
    t0 = time.perf_counter()
    wrap = None if progress is None else (lambda it, total=None: progress(it, total=total, description="probe: C grid"))
    res = linear_probe(
        splits.train.features,
        splits.train.labels,
        splits.val.features,
        splits.val.labels,
        cs=cs,
        selection_fraction=selection_fraction,
        seed=seed,
        max_iter=max_iter,
        progress=wrap,
    )
    result = {
        **res.to_dict(),
        "n_train": len(splits.train),
        "n_val": len(splits.val),
        "dim": splits.dim,
        "num_classes": splits.num_classes,
        "protocol": {
            **splits.protocol,
            "probe": "StandardScaler + LogisticRegression (L-BFGS, multinomial)",
            "selection": f"C with the best top-1 on {selection_fraction:g} of the training rows "
            f"held out (stratified, seed {seed}), then refit on all training rows",
            "max_iter": max_iter,
        },
        "model": splits.model,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if out is not None:
        write_json(out, {**result, "manifest": manifest("probe", arguments or {})}, force=True)
    return result
