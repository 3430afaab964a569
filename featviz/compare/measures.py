"""How alike two representations of the same inputs are, on arrays (numpy only; torch tensors accepted).

Every measure takes ``x`` (N, D1) and ``y`` (N, D2): the same N inputs, row for row.

- ``cka``: linear CKA (Kornblith et al., ICML 2019), ``feature_space_linear_cka`` of their colab:
  features centred, ``‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)``; ``debiased=True`` is its unbiased-HSIC form.
- ``hsic_unbiased``: the unbiased HSIC estimator of Song et al. (JMLR 2012, eq. 5) on Gram matrices,
  as platonic-rep's ``hsic_unbiased`` computes it.
- ``cka_minibatch`` and ``MinibatchCKA``: Nguyen, Raghu & Kornblith (ICLR 2021), CKA from minibatches,
  ``mean_k HSIC1(X_k, Y_k) / sqrt(mean_k HSIC1(X_k, X_k) · mean_k HSIC1(Y_k, Y_k))`` with HSIC1 the
  unbiased estimator on each minibatch's linear Gram matrices; ``MinibatchCKA`` accumulates every
  pair of many layers at once, so a training loop or a stream over a dataset never holds more than
  one minibatch.
- ``mutual_knn`` and ``cknna``: platonic-rep's ``metrics.py`` (Huh et al., ICML 2024): the mean
  overlap of the ``k`` nearest neighbours (inner product, self excluded) in ``x`` and in ``y``; and
  CKA restricted to the pairs that are neighbours in both (unbiased HSIC). Both are computed
  exactly with a blocked neighbour search and sparse sums, never an N × N matrix, so they scale to
  50k rows. platonic-rep L2-normalises features before measuring (``measure_alignment.py``):
  ``normalize=True`` does the same (off by default here, so the functions equal ``metrics.py``).
- ``svcca``: SVCCA (Raghu et al., NeurIPS 2017) as google/svcca's tutorial: each side centred per
  neuron, reduced by SVD to the directions that keep ``variance`` (the paper's 99 %) or ``dims``
  of them, then the mean canonical correlation of the two reductions (``cca_core.get_cca_similarity``'s
  ``cca_coef1``, computed here by QR instead of ``np.linalg.pinv`` of the covariances).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from featviz.errors import DataError

BLOCK_ROWS = 512


def as_array(x: Any, *, what: str = "features") -> np.ndarray:
    """``x`` (a numpy array, a torch tensor on any device, or a nested list) as a 2-D float array.

    float64 stays float64; every other dtype becomes float32.

    Raises:
        DataError: not 2-D, empty, or with NaN/Inf.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor: no torch import needed here
        x = (
            x.detach().float().cpu().numpy()
            if str(getattr(x, "dtype", "")) in ("torch.bfloat16", "torch.float16")
            else x.detach().cpu().numpy()
        )
    a = np.asarray(x)
    if a.dtype != np.float64:
        a = a.astype(np.float32)
    if a.ndim != 2:
        raise DataError(f"{what} must be (N, D), got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise DataError(f"{what} are empty (shape {a.shape})")
    if not np.isfinite(a).all():
        raise DataError(f"{what} contain NaN or Inf")
    return a


def _pair(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_array(x, what="x"), as_array(y, what="y")
    if len(a) != len(b):
        raise DataError(f"x has {len(a)} rows but y has {len(b)}; both must hold the same inputs, row for row")
    return a, b


def l2_rows(x: np.ndarray) -> np.ndarray:
    """Rows divided by ``max(‖row‖, 1e-12)`` (``torch.nn.functional.normalize``), a new array."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12).astype(x.dtype)


# ------------------------------------------------------------------ CKA
def cka(x: Any, y: Any, *, debiased: bool = False) -> float:
    """Linear CKA of ``x`` and ``y`` (Kornblith et al. 2019, their ``feature_space_linear_cka``).

    Args:
        x: (N, D1) features.
        y: (N, D2) features of the same N inputs.
        debiased: Use the unbiased HSIC estimator (the colab's ``debiased=True``).

    Returns:
        CKA in [0, 1] (the debiased form can be slightly negative).
    """
    a, b = _pair(x, y)
    a = a.astype(np.float64) - a.mean(0, dtype=np.float64)
    b = b.astype(np.float64) - b.mean(0, dtype=np.float64)
    xy = np.linalg.norm(a.T @ b) ** 2
    xx = np.linalg.norm(a.T @ a)
    yy = np.linalg.norm(b.T @ b)
    if debiased:
        n = len(a)
        if n < 4:
            raise DataError(f"debiased CKA needs at least 4 rows, got {n}")
        ra, rb = np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b)
        na, nb = ra.sum(), rb.sum()

        def fix(dot: float, r1: np.ndarray, r2: np.ndarray, n1: float, n2: float) -> float:
            return dot - n / (n - 2.0) * r1 @ r2 + n1 * n2 / ((n - 1) * (n - 2))

        xy = fix(xy, ra, rb, na, nb)
        xx = np.sqrt(fix(xx**2, ra, ra, na, na))
        yy = np.sqrt(fix(yy**2, rb, rb, nb, nb))
    den = xx * yy
    return float(xy / den) if den > 0 else 0.0


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741 - the paper's names
    """The unbiased HSIC estimator of Song et al. (2012, eq. 5) of two (n, n) Gram matrices, n ≥ 4."""
    k, l = np.array(k, np.float64), np.array(l, np.float64)  # noqa: E741
    n = k.shape[0]
    if n < 4:
        raise DataError(f"the unbiased HSIC needs at least 4 rows, got {n}")
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    value = (k * l.T).sum() + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2 * (k.sum(0) @ l.sum(1)) / (n - 2)
    return float(value / (n * (n - 3)))


class MinibatchCKA:
    """Minibatch linear CKA of every pair of many layers (Nguyen et al. 2021), one minibatch at a time.

    ``update`` takes the features of all layers on one minibatch (the same rows for every layer) and
    adds the unbiased HSIC of every pair; ``matrix`` is CKA from their means. Memory: one (L, n, n)
    float64 stack of Gram matrices per minibatch.

    Example::

        acc = MinibatchCKA()
        for x in loader:
            acc.update([layer_a(x), layer_b(x), layer_c(x)])
        acc.matrix()          # (3, 3) CKA
    """

    def __init__(self) -> None:
        self.sums: np.ndarray | None = None
        self.batches = 0
        self.rows = 0
        self.skipped_batches = 0

    def update(self, features: Sequence[Any]) -> None:
        """Add one minibatch: ``features[l]`` is layer ``l``'s (n, D_l) features of the same n inputs.

        A minibatch of fewer than 4 rows has no unbiased HSIC and is skipped (counted in
        ``skipped_batches``).

        Raises:
            DataError: the layers disagree on n, or the number of layers changed.
        """
        feats = [as_array(f, what=f"layer {i}'s features") for i, f in enumerate(features)]
        n = len(feats[0])
        if any(len(f) != n for f in feats):
            raise DataError(f"every layer must hold the same rows of a minibatch; got {[len(f) for f in feats]}")
        if self.sums is not None and len(feats) != len(self.sums):
            raise DataError(f"this accumulator holds {len(self.sums)} layers; got {len(feats)}")
        if n < 4:
            self.skipped_batches += 1
            return
        grams = np.stack([f.astype(np.float64) @ f.T.astype(np.float64) for f in feats])  # (L, n, n)
        idx = np.arange(n)
        grams[:, idx, idx] = 0.0
        flat = grams.reshape(len(feats), -1)
        rows = grams.sum(2)  # (L, n); the Gram matrices are symmetric: row sums = column sums
        total = rows.sum(1)
        hsic = flat @ flat.T + np.outer(total, total) / ((n - 1) * (n - 2)) - 2.0 * (rows @ rows.T) / (n - 2)
        hsic /= n * (n - 3)
        self.sums = hsic if self.sums is None else self.sums + hsic
        self.batches += 1
        self.rows += n

    def hsic(self) -> np.ndarray:
        """The (L, L) mean unbiased HSIC over the minibatches so far.

        Raises:
            DataError: no minibatch of at least 4 rows was added.
        """
        if self.sums is None:
            raise DataError("minibatch CKA needs at least one minibatch of 4 or more rows")
        return self.sums / self.batches

    def matrix(self) -> np.ndarray:
        """The (L, L) CKA: mean HSIC over the square root of the product of the diagonal terms."""
        h = self.hsic()
        d = np.sqrt(np.clip(np.diag(h), 0.0, None))
        den = np.outer(d, d)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(den > 0, h / np.where(den > 0, den, 1.0), 0.0)
        return out


def cka_minibatch(x: Any, y: Any, *, batch_size: int = 256) -> float:
    """Minibatch linear CKA (Nguyen et al. 2021) of ``x`` and ``y`` over consecutive minibatches.

    The rows are taken ``batch_size`` at a time in the order given (shuffle first for random
    minibatches); a last minibatch of fewer than 4 rows is left out.
    """
    a, b = _pair(x, y)
    acc = MinibatchCKA()
    for i in range(0, len(a), batch_size):
        acc.update([a[i : i + batch_size], b[i : i + batch_size]])
    return float(acc.matrix()[0, 1])


# ------------------------------------------------------------------ nearest neighbours
def knn_indices(x: np.ndarray, k: int, *, block_rows: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest inner products of each row with the other rows (itself excluded), in blocks.

    Returns:
        (indices (N, k) int64, inner products (N, k)), most similar first.

    Raises:
        DataError: ``k`` is not in 1 … N-1.
    """
    n = len(x)
    if not 1 <= k <= n - 1:
        raise DataError(f"k={k} neighbours needs 1 ≤ k ≤ N-1 = {n - 1}")
    idx = np.empty((n, k), np.int64)
    val = np.empty((n, k), x.dtype)
    for i0 in range(0, n, block_rows):
        s = x[i0 : i0 + block_rows] @ x.T
        r = np.arange(len(s))
        s[r, i0 + r] = -np.inf
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        v = np.take_along_axis(s, part, 1)
        order = np.argsort(-v, axis=1, kind="stable")
        idx[i0 : i0 + len(s)] = np.take_along_axis(part, order, 1)
        val[i0 : i0 + len(s)] = np.take_along_axis(v, order, 1)
    return idx, val


class Neighbours:
    """One representation's ``k`` nearest neighbours (``knn_indices``), for any number of comparisons.

    ``mutual_knn`` and ``cknna`` of a pair only need the neighbour lists and their inner products, so
    a layer's lists are found once and compared with every other layer's in O(N k).
    """

    def __init__(self, x: Any, k: int, *, normalize: bool = False, block_rows: int = BLOCK_ROWS) -> None:
        a = as_array(x)
        if normalize:
            a = l2_rows(a)
        self.n, self.k = len(a), int(k)
        self.index, self.value = knn_indices(a, self.k, block_rows=block_rows)
        self.keys = (np.arange(self.n)[:, None] * self.n + self.index).ravel()  # row-major (i, j) codes
        order = np.argsort(self.keys)
        self.sorted_keys, self.sorted_values = self.keys[order], self.value.ravel()[order].astype(np.float64)


def _check_same(a: Neighbours, b: Neighbours) -> None:
    if a.n != b.n or a.k != b.k:
        raise DataError(f"neighbour lists differ in size: N={a.n}, k={a.k} against N={b.n}, k={b.k}")


def mutual_knn_of(a: Neighbours, b: Neighbours) -> float:
    """Mutual k-NN alignment of two neighbour lists: mean over rows of |kNN_a ∩ kNN_b| / k."""
    _check_same(a, b)
    return float(np.isin(a.keys, b.keys, assume_unique=True).sum() / (a.n * a.k))


def _sparse_hsic(keys: np.ndarray, kv: np.ndarray, lv: np.ndarray, n: int) -> float:
    """platonic-rep's ``hsic_unbiased(mask * K, mask * L)`` for a sparse mask.

    ``keys`` are the (i, j) codes of the mask's entries (sorted, off the diagonal), ``kv``/``lv``
    the values of K and L there.
    """
    if n < 4:
        raise DataError(f"CKNNA needs at least 4 rows, got {n}")
    if not len(keys):
        return 0.0
    i, j = keys // n, keys % n
    trans = j * n + i  # (j, i): its value in L where the mask holds it, else 0
    pos = np.searchsorted(keys, trans)
    pos = np.minimum(pos, len(keys) - 1)
    both = keys[pos] == trans
    tr = float((kv[both] * lv[pos[both]]).sum())  # sum(K~ * L~^T)
    col_k = np.bincount(j, weights=kv, minlength=n)  # column sums of K~
    row_l = np.bincount(i, weights=lv, minlength=n)  # row sums of L~
    value = tr + kv.sum() * lv.sum() / ((n - 1) * (n - 2)) - 2 * (col_k @ row_l) / (n - 2)
    return value / (n * (n - 3))


def _similarity(a: Neighbours, b: Neighbours) -> float:
    """platonic-rep's ``similarity(K, L, topk)`` (unbiased): HSIC of K and L on the shared neighbours."""
    keys, ia, ib = np.intersect1d(a.sorted_keys, b.sorted_keys, assume_unique=True, return_indices=True)
    return _sparse_hsic(keys, a.sorted_values[ia], b.sorted_values[ib], a.n)


def cknna_of(a: Neighbours, b: Neighbours, *, self_a: float | None = None, self_b: float | None = None) -> float:
    """CKNNA of two neighbour lists (platonic-rep, unbiased): ``sim(K, L) / (sqrt(sim(K, K) sim(L, L)) + 1e-6)``.

    ``self_a``/``self_b`` are ``sim(K, K)``/``sim(L, L)`` when known (``cknna_self``).
    """
    _check_same(a, b)
    if a.k < 2:
        raise DataError("CKNNA requires k >= 2")
    kk = cknna_self(a) if self_a is None else self_a
    ll = cknna_self(b) if self_b is None else self_b
    return float(_similarity(a, b) / (np.sqrt(kk * ll) + 1e-6))


def cknna_self(a: Neighbours) -> float:
    """``sim(K, K)`` of one neighbour list (the normaliser of CKNNA)."""
    return _similarity(a, a)


def mutual_knn(x: Any, y: Any, k: int = 10, *, normalize: bool = False) -> float:
    """Mutual k-NN alignment (platonic-rep ``mutual_knn``): mean over rows of |kNN_x ∩ kNN_y| / k.

    Neighbours by inner product, each row's own excluded; ``normalize`` L2-normalises rows first
    (what platonic-rep's ``measure_alignment`` does before calling it).
    """
    a, b = _pair(x, y)
    return mutual_knn_of(Neighbours(a, k, normalize=normalize), Neighbours(b, k, normalize=normalize))


def cknna(x: Any, y: Any, k: int = 10, *, normalize: bool = False) -> float:
    """CKNNA (platonic-rep ``cknna``, unbiased, distance-aware): CKA on the pairs that are k-NN in both."""
    a, b = _pair(x, y)
    if k < 2:
        raise DataError("CKNNA requires k >= 2")
    return cknna_of(Neighbours(a, k, normalize=normalize), Neighbours(b, k, normalize=normalize))


# ------------------------------------------------------------------ SVCCA
def sv_reduce(x: Any, *, dims: int | None = None, variance: float = 0.99) -> np.ndarray:
    """(N, k): ``x`` centred and projected on its top ``k`` singular directions (google/svcca's ``svacts``, transposed).

    ``k`` is ``dims``, or the fewest directions whose squared singular values reach ``variance`` of
    the total. Computed from the (D, D) scatter matrix, so its cost does not grow with N².
    """
    a = as_array(x)
    c = a.astype(np.float64) - a.mean(0, dtype=np.float64)
    w, v = np.linalg.eigh(c.T @ c)  # s² and the right singular vectors, ascending
    w, v = np.clip(w[::-1], 0.0, None), v[:, ::-1]
    if dims is None:
        energy = np.cumsum(w) / max(float(w.sum()), 1e-300)
        dims = int(np.searchsorted(energy, variance - 1e-12) + 1)
    rank = int((w > w[0] * 1e-20).sum()) if w[0] > 0 else 1
    return c @ v[:, : max(1, min(int(dims), rank))]


def canonical_correlations(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The canonical correlations of (N, p) and (N, q) data, largest first (min(p, q) of them)."""
    qa, _ = np.linalg.qr(x - x.mean(0))
    qb, _ = np.linalg.qr(y - y.mean(0))
    return np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), 0.0, 1.0)


def svcca(x: Any, y: Any, *, dims: int | None = None, variance: float = 0.99) -> float:
    """SVCCA (Raghu et al. 2017): mean canonical correlation of the two SVD-reduced representations.

    Args:
        x: (N, D1) features.
        y: (N, D2) features of the same inputs.
        dims: Singular directions kept on each side (google/svcca's tutorial keeps 20 or 50).
        variance: Without ``dims``: keep the fewest directions that explain this share of the
            variance (the paper's 0.99).
    """
    a, b = _pair(x, y)
    if not 0 < variance <= 1:
        raise DataError(f"variance must be in (0, 1], got {variance}")
    ra, rb = sv_reduce(a, dims=dims, variance=variance), sv_reduce(b, dims=dims, variance=variance)
    if max(ra.shape[1], rb.shape[1]) >= len(a):
        raise DataError(
            f"SVCCA keeps {max(ra.shape[1], rb.shape[1])} directions of {len(a)} rows; it needs more "
            "rows than directions (pass fewer dims, or more inputs)"
        )
    return float(canonical_correlations(ra, rb).mean())


def pairwise(fn: Any, xs: Sequence[Any], ys: Iterable[Any] | None = None, **kwargs: Any) -> np.ndarray:
    """``fn(x, y, **kwargs)`` for every pair of ``xs`` (× ``ys``; default ``xs``, symmetric) as a matrix."""
    xs = list(xs)
    same = ys is None
    ys = xs if same else list(ys)
    out = np.zeros((len(xs), len(ys)))
    for i, a in enumerate(xs):
        for j, b in enumerate(ys):
            if same and j < i:
                out[i, j] = out[j, i]
            else:
                out[i, j] = fn(a, b, **kwargs)
    return out
