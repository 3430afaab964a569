"""Exact nearest neighbours for 2-D maps: the search behind featviz's t-SNE and UMAP affinities.

``NeighborSearch`` finds each point's true nearest neighbours in the features as given: for wide
features, candidates from an exact search in ``PCA_DIM`` principal components, re-ranked by the
full-dimensional distance (``rerank``). ``_knn_index_class`` plugs it into openTSNE, ``_umap_knn``
into umap-learn's ``precomputed_knn``; ``backends.torchdr_fit`` gives it to TorchDR on CPU. No torch
here; scikit-learn, FAISS and openTSNE are imported inside functions.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import numpy as np

from featviz.errors import DataError

log = logging.getLogger(__name__)

PCA_DIM = 50  # the space neighbour candidates are searched in (the neighbours themselves are exact)
CANDIDATES = 3  # candidates per neighbour, re-ranked by the full-dimensional distance
EXACT_KNN_MAX = 150_000  # above this an index's sub-quadratic search wins over brute force's N^2 (for the candidates)
IVF_LISTS_PER_SQRT_N = 4  # FAISS IVF: 4 sqrt(N) lists ...
IVF_PROBE_DIVISOR = 16  # ... 1 in 16 of them probed per query
"""Candidates above ``EXACT_KNN_MAX`` points come from a FAISS ``IndexIVFFlat`` in the PCA space (seeded
k-means, deterministic search) when FAISS is installed, else from openTSNE's Annoy index, with a warning.
Measured on the benchmark's features (256-d, 2 cores; share of the true 90 nearest neighbours among the
270 re-ranked candidates): at 200k, IVF probing 1 list in 32 found 89.8 % in 21 s, Annoy 88.0 % in 151 s;
at 1M, 1 in 32 found 93.5 % and 1 in 64 89.2 %, where an exact PCA-50 search would find 95.4 %."""


class NeighborSearch:
    """Each point's k nearest neighbours by the Euclidean (or cosine) distance of the full features.

    Wide features (D > ``pca_dim``): candidates are found by an exact search in the first
    ``pca_dim`` principal components (``CANDIDATES`` x k of them; above ``EXACT_KNN_MAX`` points from
    a FAISS IVF index, or Annoy where FAISS is not installed), then re-ranked by the exact distance in
    the full feature space.
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
        if _reduces(len(self.x), self.x.shape[1], pca_dim):
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

    def describe(self) -> str:
        """What the search does, for a map's ``info.neighbor_search``."""
        return describe(len(self.x), self.x.shape[1], self.z.shape[1] if self.refined else None)

    def _candidates(self, zq: np.ndarray | None, m: int) -> np.ndarray:
        """``m`` nearest fitted rows in the search space, for ``zq`` (None: the fitted rows, self excluded)."""
        engine = _engine(len(self.z))
        if engine == "exact":
            from sklearn.neighbors import NearestNeighbors

            if self._nn is None:
                self._nn = NearestNeighbors(n_jobs=self.n_jobs).fit(self.z)
            if zq is None:
                return self._nn.kneighbors(n_neighbors=m, return_distance=False)
            return self._nn.kneighbors(zq, n_neighbors=m, return_distance=False)
        if engine == "faiss":
            with _faiss_threads(self.n_jobs):
                if self._nn is None:
                    self._nn = _ivf_index(self.z, self.seed)
                if zq is None:
                    return _without_self(_ivf_search(self._nn, self.z, m + 1))
                return _ivf_search(self._nn, np.ascontiguousarray(zq, np.float32), m)
        from openTSNE.nearest_neighbors import Annoy

        if self._nn is None:
            log.warning("%d points: neighbour candidates from openTSNE's Annoy index, because FAISS is not "
                        "installed (pip install faiss-cpu: its IVF index is about 7x faster and finds more of the "
                        "true neighbours at this size)", len(self.z))
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


def _engine(n: int) -> str:
    """How the candidates among ``n`` points are found: ``exact`` (scikit-learn), ``faiss`` (IVF) or ``annoy``."""
    if n <= EXACT_KNN_MAX:
        return "exact"
    return "faiss" if _faiss_installed() else "annoy"


def _faiss_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("faiss") is not None


def _reduces(n: int, dim: int, pca_dim: int | None) -> bool:
    """Whether ``n`` points of width ``dim`` are searched in ``pca_dim`` principal components (wide features)."""
    return pca_dim is not None and dim > pca_dim and n > pca_dim


def describe(n: int, dim: int, pca_dim: int | None) -> str:
    """``NeighborSearch``'s method for ``n`` points of width ``dim`` (``pca_dim``: the candidates' space, if any)."""
    engine = _engine(n)
    how = {"exact": "", "annoy": " from Annoy (approximate)",
           "faiss": " from FAISS IVF (approximate: {} lists, {} probed)".format(*_ivf_lists(n))}[engine]
    if _reduces(n, dim, pca_dim):
        return f"candidates{how} in {pca_dim} PCA dims, re-ranked in all {dim}"
    return f"{'exact' if engine == 'exact' else how.strip().removeprefix('from ')} in all {dim} dims"


@contextlib.contextmanager
def _faiss_threads(n_jobs: int):
    """FAISS's OpenMP threads set to ``n_jobs`` inside, restored after."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, n_jobs))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def _ivf_lists(n: int) -> tuple[int, int]:
    """(lists, probed lists) of the IVF index for ``n`` points."""
    nlist = int(IVF_LISTS_PER_SQRT_N * np.sqrt(n))
    return nlist, max(1, nlist // IVF_PROBE_DIVISOR)


def _ivf_index(z: np.ndarray, seed: int):
    """A FAISS ``IndexIVFFlat`` over ``z``: k-means lists trained (seeded) on at most 64 points per list."""
    import faiss

    n, d = z.shape
    nlist, nprobe = _ivf_lists(n)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
    index.cp.seed = seed
    sample = np.random.default_rng(seed).choice(n, min(n, 64 * nlist), replace=False)
    index.train(np.ascontiguousarray(z[np.sort(sample)]))
    index.add(z)
    index.nprobe = nprobe
    return index


def _ivf_search(index, q: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` nearest indexed rows of each row of ``q``, every one a real row.

    Rows whose probed lists held fewer than ``m`` points (FAISS's -1) are searched again with twice the
    lists probed.
    """
    idx = index.search(q, m)[1]
    nprobe = index.nprobe
    while (short := np.flatnonzero((idx < 0).any(1))).size and index.nprobe < index.nlist:
        index.nprobe = min(index.nlist, 2 * index.nprobe)
        idx[short] = index.search(np.ascontiguousarray(q[short]), m)[1]
    index.nprobe = nprobe
    if (idx < 0).any():
        raise DataError(f"the neighbour search asked for {m} neighbours among {index.ntotal} points")
    return idx


def _without_self(cand: np.ndarray) -> np.ndarray:
    """A self-search's candidates (N, m + 1) without each row itself (or, where it is not among them, the last)."""
    own = cand == np.arange(len(cand))[:, None]
    own[~own.any(1), -1] = True
    return cand[~own].reshape(len(cand), cand.shape[1] - 1)


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
