"""How faithful a 2-D map is to its input: the numbers every ``featviz tsne`` map states (``map_quality``).

All three are evaluated on one seeded sample of query points (``QUALITY_SAMPLE``, 5,000), so
their cost stays modest at a million points:

- ``knn_recall@10``: the fraction of each query point's 10 nearest neighbours in the input that
  are among its 10 nearest neighbours in the map (Kobak & Berens 2019's "KNN"; neighbours searched
  among all points);
- ``knn_accuracy@10``: leave-one-out 10-NN class accuracy in the map (majority vote of the 10
  nearest other labelled points, ties to the smallest label), when the points have labels;
- ``trustworthiness@10``: scikit-learn's ``sklearn.manifold.trustworthiness`` (Venna & Kaski 2001)
  of the sample alone, i.e. its neighbours searched within the sample in both spaces.

No torch here; scikit-learn is imported inside functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

QUALITY_K = 10
QUALITY_SAMPLE = 5000


def quality_sample(n: int, size: int | None = QUALITY_SAMPLE, seed: int = 0) -> np.ndarray:
    """Sorted row indices of a seeded random sample of ``size`` of ``n`` rows (all when None or >= n)."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _others(space: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) indices of each query row's ``k`` nearest other rows of ``space`` (itself excluded)."""
    from sklearn.neighbors import NearestNeighbors

    idx = NearestNeighbors(n_neighbors=k + 1).fit(space).kneighbors(space[queries], return_distance=False)
    keep = idx != queries[:, None]
    keep[keep.all(axis=1), -1] = False  # itself not found among k + 1 (duplicates): drop the farthest
    return idx[keep].reshape(len(queries), k)


def leave_one_out_knn_accuracy(coords: np.ndarray, labels: np.ndarray, k: int = 10, *,
                               queries: np.ndarray | None = None) -> float:
    """Leave-one-out k-NN class accuracy in a space (majority vote of the k nearest others).

    ``queries``: the rows evaluated (default all); their neighbours are searched among all rows.
    """
    q = np.arange(len(coords)) if queries is None else np.asarray(queries)
    votes = labels[_others(np.asarray(coords), q, k)]
    pred = np.array([np.bincount(v - v.min()).argmax() + v.min() for v in votes])
    return float((pred == labels[q]).mean())


def knn_recall(high: np.ndarray, low: np.ndarray, k: int = 10, *, n_eval: int | None = QUALITY_SAMPLE,
               seed: int = 0, queries: np.ndarray | None = None) -> float:
    """Fraction of each point's k high-dimensional neighbours kept among its k map neighbours.

    Kobak & Berens' "KNN" quality; evaluated on ``queries``, or ``n_eval`` random query points
    (all when None).
    """
    q = quality_sample(len(high), n_eval, seed) if queries is None else np.asarray(queries)
    ih, il = _others(np.asarray(high), q, k), _others(np.asarray(low), q, k)
    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ih, il, strict=True)]))


def sample_trustworthiness(high: np.ndarray, low: np.ndarray, k: int = 10, *,
                           queries: np.ndarray | None = None) -> float | None:
    """scikit-learn's trustworthiness of the ``queries`` rows alone (None when too few for ``k``)."""
    from sklearn.manifold import trustworthiness

    q = np.arange(len(high)) if queries is None else np.asarray(queries)
    if k >= len(q) / 2:  # scikit-learn's own limit
        return None
    return float(trustworthiness(np.asarray(high)[q], np.asarray(low)[q], n_neighbors=k))


def map_quality(features: np.ndarray, coords: np.ndarray, labels: np.ndarray | None = None, *,
                k: int = QUALITY_K, sample: int | None = QUALITY_SAMPLE, seed: int = 0) -> dict[str, Any]:
    """The map's quality against its input, on one seeded sample of query points.

    Args:
        features: (N, D) the input the map was made from.
        coords: (N, 2) the map.
        labels: (N,) classes, -1 = unknown; the class accuracy uses the labelled points (None when
            fewer than k + 1 of them, or no labels).
        k: the neighbours compared.
        sample: query points (all when None or N is smaller).
        seed: the sample's seed.

    Returns:
        ``{"knn_recall@k", "knn_accuracy@k", "trustworthiness@k", "k", "sample", "seed"}``; a measure
        that N is too small for is None.
    """
    x, c = np.asarray(features, np.float32), np.asarray(coords, np.float32)
    n = len(x)
    q = quality_sample(n, sample, seed)
    out: dict[str, Any] = {f"knn_recall@{k}": None, f"knn_accuracy@{k}": None, f"trustworthiness@{k}": None,
                           "k": k, "sample": int(len(q)), "seed": seed}
    if n <= k:
        return out
    out[f"knn_recall@{k}"] = knn_recall(x, c, k, queries=q)
    out[f"trustworthiness@{k}"] = sample_trustworthiness(x, c, k, queries=q)
    if labels is not None:
        labels = np.asarray(labels)
        known = np.flatnonzero(labels >= 0)
        if len(known) > k:
            lq = quality_sample(len(known), sample, seed)
            out[f"knn_accuracy@{k}"] = leave_one_out_knn_accuracy(c[known], labels[known], k, queries=lq)
            out["labelled"] = int(len(known))
    return out
