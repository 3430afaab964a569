"""Cosine 20-NN accuracy of `featviz embed` features: l2-normalised, 5-fold, majority vote.

The protocol of issue 16's done-when: scikit-learn ``KNeighborsClassifier(n_neighbors=20,
metric="cosine")`` (uniform votes) scored by ``cross_val_score(..., cv=5)`` (stratified folds in
file order, no shuffling) on l2-normalised features. A random-init ResNet embedded this way
scores 0.873 on digits at 32 px.

    python benchmarks/digits_knn.py E.npz [E2.npz ...] [--k 20] [--folds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def knn_cv_accuracy(features: np.ndarray, labels: np.ndarray, *, k: int = 20, folds: int = 5) -> float:
    """Mean ``folds``-fold accuracy of a cosine ``k``-NN majority vote on l2-normalised features."""
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine")
    return float(cross_val_score(clf, x, labels, cv=folds).mean())


def npz_accuracy(path: str | Path, *, k: int = 20, folds: int = 5) -> float:
    """``knn_cv_accuracy`` of the features and labels in a `featviz embed` file."""
    with np.load(path, allow_pickle=False) as d:
        return knn_cv_accuracy(d["features"], d["labels"], k=k, folds=folds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("npz", nargs="+", type=Path)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = {str(p): npz_accuracy(p, k=args.k, folds=args.folds) for p in args.npz}
    if args.json:
        print(json.dumps(res, indent=2))
        return
    for p, acc in res.items():
        print(f"{acc:.4f}  {p}")


if __name__ == "__main__":
    main()
