"""Exact nearest neighbours for 2-D maps: the search behind featviz's t-SNE and UMAP affinities.

``NeighborSearch`` finds each point's true nearest neighbours in the features as given: for wide
features, candidates from an exact search in ``PCA_DIM`` principal components, re-ranked by the
full-dimensional distance (``rerank``). ``_knn_index_class`` plugs it into openTSNE, ``_umap_knn``
into umap-learn's ``precomputed_knn``. No torch here; scikit-learn and openTSNE are imported inside
functions.
"""

from __future__ import annotations

import functools

import numpy as np

from featviz.errors import DataError

PCA_DIM = 50  # the space neighbour candidates are searched in (the neighbours themselves are exact)
CANDIDATES = 3  # candidates per neighbour, re-ranked by the full-dimensional distance
EXACT_KNN_MAX = 150_000  # above this Annoy's N log N wins over brute force's N^2 (for the candidates)


class NeighborSearch:
    """Each point's k nearest neighbours by the Euclidean (or cosine) distance of the full features.

    Wide features (D > ``pca_dim``): candidates are found by an exact search in the first
    ``pca_dim`` principal components (``CANDIDATES`` x k of them; Annoy instead above
    ``EXACT_KNN_MAX`` points), then re-ranked by the exact distance in the full feature space.
    Measured on the benchmark's features (256-d): at 20k, 99.6 % of the true 90 nearest
    neighbours for the CPU time of a brute-force search in 256-d (5.6 vs 5.8 s); at 100k, 98.4 %
    for 75 s of CPU (openTSNE's default Annoy index on the raw features: 75 % for 78 s). Taking
    the 90 nearest in PCA-50 space alone, as featviz did before, keeps only 77 % of them, and the
    maps' 10-NN class accuracy shows it (0.579 vs 0.623 at 20k; see docs/tsne.md). Narrow
    features are searched exactly as they are.

    ``query`` finds the neighbours of new rows among the fitted ones (for ``transform``).
    """

    def __init__(self, x: np.ndarray, *, metric: str = "euclidean", pca_dim: int | None = PCA_DIM, seed: int = 0,
                 n_jobs: int = 1):
        """Index ``x`` (N, D) for ``metric`` (euclidean or cosine); PCA to ``pca_dim`` when wider."""
        if metric not in ("euclidean", "cosine"):
            raise DataError(f"featviz's neighbour search supports euclidean and cosine, got {metric!r}; "
                            "pass neighbors='exact' (or 'annoy') to use openTSNE's own")
        self.metric, self.seed, self.n_jobs = metric, seed, n_jobs
        self.x = self._prep(x)
        self.pca = None
        self.z = self.x
        if pca_dim is not None and self.x.shape[1] > pca_dim and len(self.x) > pca_dim:
            from sklearn.decomposition import PCA

            self.pca = PCA(n_components=pca_dim, random_state=seed)
            self.z = np.ascontiguousarray(self.pca.fit_transform(self.x), np.float32)
        self._nn = None

    def _prep(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if self.metric == "cosine":  # cosine ranking = Euclidean ranking of unit vectors
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    def _dist(self, d: np.ndarray) -> np.ndarray:
        return d * d / 2.0 if self.metric == "cosine" else d  # |a-b|^2 = 2 (1 - cos) for unit vectors

    @property
    def refined(self) -> bool:
        """Whether candidates come from the PCA space and are re-ranked (wide features)."""
        return self.pca is not None

    def _candidates(self, zq: np.ndarray | None, m: int) -> np.ndarray:
        """``m`` nearest fitted rows in the search space, for ``zq`` (None: the fitted rows, self excluded)."""
        n = len(self.z)
        if n <= EXACT_KNN_MAX:
            from sklearn.neighbors import NearestNeighbors

            if self._nn is None:
                self._nn = NearestNeighbors(n_jobs=self.n_jobs).fit(self.z)
            if zq is None:
                return self._nn.kneighbors(n_neighbors=m, return_distance=False)
            return self._nn.kneighbors(zq, n_neighbors=m, return_distance=False)
        from openTSNE.nearest_neighbors import Annoy

        if self._nn is None:
            self._nn = Annoy(self.z, m, metric="euclidean", n_jobs=self.n_jobs, random_state=self.seed)
            idx, _ = self._nn.build()
            if zq is None:
                return idx
        return self._nn.query(zq, m)[0]

    def neighbors(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, distances) of every fitted row's ``k`` nearest others, nearest first."""
        k = min(k, len(self.x) - 1)
        if not self.refined:
            m = k
        else:
            m = min(len(self.x) - 1, CANDIDATES * k)
        cand = self._candidates(None, m)
        idx, dist = rerank(self.x, self.x, cand, k)
        return idx, self._dist(dist)

    def query(self, x_new: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, distances) of the ``k`` nearest fitted rows of each new row."""
        q = self._prep(x_new)
        zq = q if self.pca is None else np.ascontiguousarray(self.pca.transform(q), np.float32)
        k = min(k, len(self.x))
        m = k if not self.refined else min(len(self.x), CANDIDATES * k)
        idx, dist = rerank(q, self.x, self._candidates(zq, m), k)
        return idx, self._dist(dist)


def rerank(query: np.ndarray, ref: np.ndarray, candidates: np.ndarray, k: int,
           block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest of each query row's ``candidates`` (rows of ``ref``) by exact Euclidean distance.

    Returns:
        (indices, distances), (Q, k) each, nearest first.
    """
    q = np.asarray(query, np.float32)
    r = np.asarray(ref, np.float32)
    sq_r = np.einsum("ij,ij->i", r, r)
    idx = np.empty((len(q), k), np.int64)
    dist = np.empty((len(q), k), np.float64)
    for s in range(0, len(q), block):
        c = np.asarray(candidates[s:s + block])
        qb = q[s:s + block]
        d2 = sq_r[c] - 2.0 * np.einsum("bd,bmd->bm", qb, r[c]) + np.einsum("ij,ij->i", qb, qb)[:, None]
        part = np.argpartition(d2, k - 1, axis=1)[:, :k] if k < c.shape[1] else np.broadcast_to(
            np.arange(k), (len(c), k))
        dp = np.take_along_axis(d2, part, 1)
        order = np.argsort(dp, axis=1, kind="stable")
        idx[s:s + block] = np.take_along_axis(np.take_along_axis(c, part, 1), order, 1)
        dist[s:s + block] = np.sqrt(np.maximum(np.take_along_axis(dp, order, 1), 0.0))
    return idx, dist


@functools.cache
def _knn_index_class():
    """The class of openTSNE's extension point for neighbour search, backed by ``NeighborSearch``."""
    from openTSNE.nearest_neighbors import KNNIndex

    class FeaturevizKNN(KNNIndex):
        VALID_METRICS = ["euclidean", "cosine"]

        def __init__(self, search: NeighborSearch, k: int):
            super().__init__(search.x, k, metric=search.metric, n_jobs=search.n_jobs, random_state=search.seed)
            self.search = search

        def build(self):
            return self.search.neighbors(self.k)

        def query(self, query, k):
            return self.search.query(query, k)

    return FeaturevizKNN


def _umap_knn(search: NeighborSearch, k: int) -> tuple[np.ndarray, np.ndarray, None]:
    """UMAP's ``precomputed_knn``: each row's ``k`` nearest rows with itself first (distance 0)."""
    idx, dist = search.neighbors(k - 1)
    n = len(idx)
    return (np.concatenate([np.arange(n)[:, None], idx], 1),
            np.concatenate([np.zeros((n, 1)), dist], 1).astype(np.float32), None)
