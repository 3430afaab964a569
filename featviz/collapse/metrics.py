"""Collapse and representation-quality metrics for embedding matrices (numpy only, no torch).

Every metric works on an ``(N, D)`` array (numpy, a ``np.memmap`` or a torch tensor, which is
converted with ``.detach().float().cpu().numpy()``). The definitions follow the papers; see
``docs/metrics.md``. No single number catches every collapse (per-channel std misses a
sign-symmetric rank-1 collapse; RankMe penalises a mean offset), so ``collapse_report`` computes
them together in one pass over the rows:

* ``std_l2``: mean over channels of the std of l2-normalised rows, next to its ideal 1/√d
  (SimSiam, Chen & He 2021), and ``collapse_level = max(0, 1 - √d·std_l2)``.
* ``alignment`` (α=2) and ``uniformity`` (t=2), Wang & Isola 2020, on l2-normalised rows.
* ``rankme``: exp-entropy of the singular values of the *uncentred* Z, ε=1e-7
  (Garrido et al. 2023).
* ``effective_rank``: exp-entropy of the eigenvalues of the *centred* covariance
  (Roy & Vetterli 2007 applied to the covariance spectrum, as in RankMe's PCA variant).
* ``alpha_req``: power-law decay exponent of the covariance eigenspectrum with its R²
  (Agrawal et al. 2022; weighted log-log fit after Stringer et al. 2019).
* spectra: singular values of Z and eigenvalues of cov(Z) and cov(normalize(Z))
  (Jing et al. 2022), for the log-scale plot.

Large inputs are streamed in row chunks: per-chunk float64 Gram matrices (D×D) give every
spectral metric, so memory stays O(chunk·D + D²) even for a 1M-row memmap. Uniformity is exact
(blocked GEMM over pairs, using ‖x−y‖² = 2 − 2xᵀy) up to ``uniformity_exact_max`` rows and
estimated from random pairs above, with a 95 % confidence interval.
"""


from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featviz.collapse.lidar import LIDAR_DELTA, LIDAR_EPS, lidar  # noqa: F401 (re-exported: LiDAR is a metric)
from featviz.collapse.linalg import eigh_desc, entropy_rank
from featviz.errors import DataError

log = logging.getLogger(__name__)

RANKME_EPS = 1e-7  # Garrido et al. 2023, Eq. 1
NORM_EPS = 1e-12  # torch.nn.functional.normalize's eps: a zero row stays zero
UNIFORMITY_EXACT_MAX = 20_000  # exact pairs up to this many rows (≈2·10^8 pairs, a few s on 2 cores)
UNIFORMITY_PAIRS = 1_000_000  # random pairs above it
ALPHA_RANGE = (11, 101)  # ranks i (1-based), lo <= i < hi: reptrix get_powerlaw / fastssl fit 0-based 10..99
_CHUNK_ELEMS = 1 << 22  # 4M values per streamed chunk: 32 MB in float64
_BLOCK = 2048  # uniformity block edge: a 2048×2048 float32 tile is 16 MB

DEFINITIONS: dict[str, str] = {
    "std_l2": "mean_j std_i(z_i/‖z_i‖)_j (unbiased std over rows; SimSiam, Chen & He 2021)",
    "std_l2_ideal": "1/√d: std_l2 of an isotropic Gaussian",
    "collapse_level": "max(0, 1 − √d·std_l2) (lightly's SimSiam tutorial); 0 healthy, 1 collapsed",
    "alignment": "E‖x̂−ŷ‖₂^α over positive pairs of l2-normalised rows, α=2 (Wang & Isola 2020)",
    "uniformity": "log E_{i<j} exp(−t‖x̂_i−x̂_j‖²), t=2, l2-normalised rows (Wang & Isola 2020)",
    "rankme": "exp(−Σ p_k log p_k), p_k = σ_k(Z)/‖σ(Z)‖₁ + ε, Z uncentred, ε=1e-7 (Garrido et al. 2023)",
    "effective_rank": "exp(−Σ p_k log p_k), p_k = λ_k/Σλ, λ = eigenvalues of the centred covariance of Z "
                      "(Roy & Vetterli 2007); 0 when Z has no variance",
    "alpha_req": "α of λ_i ∝ i^−α fitted on log λ vs log i (weights 1/i) over ranks alpha_req_range "
                 "of the centred covariance (Agrawal et al. 2022)",
    "lidar": "exp-entropy of the eigenvalues of Σ_w^−½ Σ_b Σ_w^−½, classes = the views of one image, δ=1e-4, "
             "ε=1e-8 (Thilak et al. 2024); with two views per image (EMB + --positives, training pairs)",
    "spectrum": "singular values of uncentred Z; eigenvalues of cov(Z) and of cov(normalize(Z)) (Jing et al. 2022)",
}


# ------------------------------------------------------------------ input handling
def as_array(z: Any, *, what: str = "embeddings") -> np.ndarray:
    """Return ``z`` as a 2-D float numpy array without copying memmaps or float arrays.

    Torch tensors are converted with ``.detach().float().cpu().numpy()`` (torch is never
    imported here). float64 input stays float64; other dtypes become float32.

    Raises:
        DataError: ``z`` is not 2-D.
    """
    if hasattr(z, "detach") and hasattr(z, "cpu"):  # a torch tensor, duck-typed
        z = z.detach()
        z = (z if str(z.dtype) == "torch.float64" else z.float()).cpu().numpy()
    if not isinstance(z, np.ndarray):
        z = np.asarray(z)
    if z.dtype not in (np.float32, np.float64):
        z = z.astype(np.float32)
    if z.ndim != 2:
        raise DataError(f"{what} must be a 2-D (N, D) array, got shape {tuple(z.shape)}; "
                        "pool or flatten per-sample features first")
    return z


def load_matrix(path: str | os.PathLike, *, what: str = "embeddings") -> np.ndarray:
    """Read ``features`` from a featviz ``.npz``, a shard folder, or a raw ``.npy`` matrix (memory-mapped).

    A shard folder of one shard, like a ``.npy``, stays memory-mapped; several shards are read into
    one array (the metrics' SVD and covariance need every row at once).

    Raises:
        ArtifactError: missing file, unknown extension or malformed content.
    """
    from featviz.errors import ArtifactError
    from featviz.io.artifacts import Embeddings, check_array_file, check_npy
    from featviz.io.shards import is_sharded

    path = Path(path)
    if is_sharded(path):  # memory-mapped shards: the metrics read every row once, as one (N, D) array
        return as_array(Embeddings.load(path).features, what=what)
    if path.is_dir():
        raise ArtifactError(f"{str(path)!r} is a folder; expected an .npz from `featviz embed`, a folder from "
                            "`featviz embed --shard-size`, or an (N, D) .npy")
    if path.suffix == ".npz":
        return Embeddings.load(path).features
    if path.suffix == ".npy":
        if not path.is_file():
            raise ArtifactError(f"{what} file {str(path)!r} does not exist")
        check_array_file(path, "npy", expected=f"an (N, D) .npy matrix of {what}")
        check_npy(path)
        try:
            return as_array(np.load(path, mmap_mode="r", allow_pickle=False), what=what)
        except ValueError as e:
            raise ArtifactError(f"{str(path)!r} is not a readable .npy matrix ({e})") from None
    raise ArtifactError(f"{what} must be an .npz from `featviz embed` or an (N, D) .npy, got {path.name!r}")


def _check_shape(n: int, d: int, what: str = "embeddings") -> None:
    if d < 2:
        raise DataError(f"{what} have D={d} channel; collapse metrics need D ≥ 2 "
                        "(std of l2-normalised 1-D rows is meaningless and ranks are ≤ 1)")
    if n < 2:
        raise DataError(f"{what} have N={n} row; collapse metrics need at least 2 rows")


def _chunk_rows(d: int) -> int:
    return max(1, _CHUNK_ELEMS // max(d, 1))


def _normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by max(‖row‖₂, 1e-12) (same as torch's F.normalize), in x's dtype."""
    nrm = np.sqrt(np.einsum("ij,ij->i", x, x))
    return x / np.maximum(nrm, NORM_EPS).astype(x.dtype)[:, None]


# ------------------------------------------------------------------ streamed moments
@dataclass
class Moments:
    """Streamed first and second moments of Z and of normalize(Z) (float64).

    Gram matrices are accumulated around a shift (the first kept row) so that a constant or
    strongly offset Z keeps its tiny covariance exactly; the uncentred Gram is rebuilt
    algebraically: ZᵀZ = G_s + a sᵀ + s aᵀ + n s sᵀ with a = Σ(z − s).

    The Gram of Z is float64 throughout (RankMe needs tiny singular values right). The Gram of
    normalize(Z) only feeds the spectrum plot, so its chunk products run in float32 (3× faster;
    eigenvalues below ~1e-6 of the largest are rounding noise); std_l2 uses float64 column sums.
    """

    n: int
    d: int
    shift: np.ndarray
    a: np.ndarray
    gram: np.ndarray
    shift_n: np.ndarray
    a_n: np.ndarray
    gram_n: np.ndarray
    ss_n: np.ndarray | None = None
    align_sum: float = 0.0
    n_pairs: int = 0

    def uncentred_gram(self) -> np.ndarray:
        """ZᵀZ of the kept rows (float64), rebuilt from the shifted Gram matrix."""
        s, a = self.shift, self.a
        return self.gram + np.outer(a, s) + np.outer(s, a) + self.n * np.outer(s, s)

    def std_l2(self) -> float:
        """Mean over channels of the unbiased std of normalize(Z), from float64 column sums."""
        var = (self.ss_n - self.a_n**2 / self.n) / (self.n - 1)
        return float(np.sqrt(np.clip(var, 0, None)).mean())

    def covariance(self, normalized: bool = False) -> np.ndarray:
        """The unbiased (D, D) covariance of Z, or of normalize(Z) when ``normalized``."""
        g, a = (self.gram_n, self.a_n) if normalized else (self.gram, self.a)
        return (g - np.outer(a, a) / self.n) / (self.n - 1)


def stream_moments(z: np.ndarray, z2: np.ndarray | None = None, *, alpha: float = 2.0,
                   drop_nonfinite: bool = False, progress: Callable[[Iterable], Iterable] | None = None,
                   ) -> tuple[Moments, np.ndarray]:
    """One pass over row chunks: Gram matrices of Z and normalize(Z), sums, and alignment.

    Args:
        z: (N, D) anchors.
        z2: (N, D) positives paired row by row with ``z`` (for alignment), or None.
        alpha: alignment exponent.
        drop_nonfinite: drop rows (pairs) with NaN/Inf instead of raising.
        progress: optional wrapper for the chunk loop (e.g. a progress bar).

    Returns:
        (moments, keep) where ``keep`` is the boolean mask of rows used.

    Raises:
        DataError: bad shapes, NaN/Inf rows without ``drop_nonfinite``, or fewer than 2 usable rows.
    """
    n, d = z.shape
    _check_shape(n, d)
    if z2 is not None and z2.shape != z.shape:
        raise DataError(f"positives have shape {tuple(z2.shape)} but anchors have {tuple(z.shape)}; "
                        "row i of the positives must be the second view of row i of the anchors")
    keep = np.ones(n, dtype=bool)
    step = _chunk_rows(d)
    starts: Iterable[int] = range(0, n, step)
    if progress is not None:
        starts = progress(starts)
    m: Moments | None = None
    # chunk buffers are allocated once: fresh 32 MB temporaries per chunk cost page faults
    buf = np.empty((min(step, n), d))
    nbuf = np.empty_like(buf)
    nbuf32 = np.empty(buf.shape, np.float32)
    ybuf = None if z2 is None else np.empty_like(buf)
    for s in starts:
        rows = min(step, n - s)
        x, xn = buf[:rows], nbuf[:rows]
        x[...] = z[s:s + rows]  # float64 copy of the chunk
        sq = np.einsum("ij,ij->i", x, x)  # NaN/Inf anywhere in a row makes its norm non-finite
        ok = np.isfinite(sq)
        y = None
        if ybuf is not None:
            y = ybuf[:rows]
            y[...] = z2[s:s + rows]
            ysq = np.einsum("ij,ij->i", y, y)
            ok &= np.isfinite(ysq)
        keep[s:s + rows] = ok
        if not ok.all():
            if not drop_nonfinite:
                continue  # keep counting; refused after the pass with the full count
            x, xn, sq = x[ok], xn[:int(ok.sum())], sq[ok]
            if y is not None:
                y, ysq = y[ok], ysq[ok]
        if not len(x):
            continue
        np.divide(x, np.maximum(np.sqrt(sq), NORM_EPS)[:, None], out=xn)
        if m is None:
            m = Moments(0, d, x[0].copy(), np.zeros(d), np.zeros((d, d)),
                        xn[0].copy(), np.zeros(d), np.zeros((d, d)), np.zeros(d))
        if y is not None:
            y /= np.maximum(np.sqrt(ysq), NORM_EPS)[:, None]
            y -= xn
            m.align_sum += float(np.sum(np.sqrt(np.einsum("ij,ij->i", y, y)) ** alpha))
            m.n_pairs += len(x)
        x -= m.shift  # in place: the chunk is not needed unshifted any more
        m.a += x.sum(axis=0)
        m.gram += x.T @ x  # numpy dispatches a.T @ a to SYRK (half the FLOPs)
        xn -= m.shift_n
        m.a_n += xn.sum(axis=0)
        m.ss_n += np.einsum("ij,ij->j", xn, xn)
        x32 = nbuf32[:len(xn)]
        x32[...] = xn
        m.gram_n += x32.T @ x32
        m.n += len(x)
    bad = int(n - keep.sum())
    if bad and not drop_nonfinite:
        raise DataError(f"{bad} of {n} rows{' (or their positives)' if z2 is not None else ''} contain "
                        "NaN or Inf; fix the model/inputs, or pass --drop-nonfinite to drop them")
    if m is None or m.n < 2:
        raise DataError(f"only {0 if m is None else m.n} of {n} rows are finite; "
                        "collapse metrics need at least 2 (the model probably diverged)")
    return m, keep


# ------------------------------------------------------------------ spectral metrics
def _spectra_direct(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """σ(Z), eig cov(Z), eig cov(normalize Z) from the N×N Gram matrices (for N < D; float64).

    ZZᵀ has the same non-zero eigenvalues as ZᵀZ and is much smaller for a batch of a wide
    projector (512 × 2048: a 512² eigenproblem instead of 2048²).
    """
    n = len(x)
    xn = _normalize(x)
    xc, xnc = x - x.mean(axis=0), xn - xn.mean(axis=0)
    sv = np.sqrt(eigh_desc(x @ x.T))
    lam = eigh_desc(xc @ xc.T)[: n - 1] / (n - 1)
    lam_n = eigh_desc(xnc @ xnc.T)[: n - 1] / (n - 1)
    return sv, lam, lam_n


def rankme_from_singular_values(sv: np.ndarray, eps: float = RANKME_EPS) -> float:
    """RankMe = exp(−Σ p log p), p_k = σ_k/‖σ‖₁ + ε (Garrido et al. 2023)."""
    total = float(sv.sum())
    if total <= 0:
        return 1.0  # all-zero Z: one (degenerate) direction at most
    return entropy_rank(sv / total + eps)


def effective_rank_from_eigenvalues(lam: np.ndarray) -> float:
    """exp-entropy of eigenvalues normalised to sum 1; 0 when there is no variance at all."""
    total = float(lam.sum())
    return 0.0 if total <= 0 else entropy_rank(lam / total)


def alpha_req_from_eigenvalues(lam: np.ndarray, fit_range: tuple[int, int] = ALPHA_RANGE,
                               ) -> tuple[float | None, float | None, tuple[int, int]]:
    """Fit log λ_i = −α log i + b over ranks ``lo <= i < hi`` (1-based), weights 1/i.

    Returns:
        (alpha, r2, (lo, hi) actually used); alpha and r2 are None when fewer than 5
        eigenvalues above the float64 noise floor (1e-12·λ_1) fall in the range (D too small,
        or a collapsed spectrum).
    """
    lo, hi = int(fit_range[0]), int(min(fit_range[1], len(lam) + 1))
    ranks = np.arange(max(lo, 1), hi)
    vals = lam[ranks - 1] if len(ranks) else np.array([])
    good = vals > 1e-12 * lam[0] if len(lam) and lam[0] > 0 else np.zeros(len(vals), bool)  # above float64 noise
    if good.sum() < 5:
        return None, None, (lo, hi)
    x, y, w = np.log(ranks[good]), np.log(vals[good]), 1.0 / ranks[good]
    design = np.stack([-x, np.ones_like(x)], axis=1)
    coef = np.linalg.solve(design.T @ (design * w[:, None]), (design * w[:, None]).T @ y)
    pred = design @ coef
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - pred) ** 2)) / ss_tot if ss_tot > 0 else 1.0
    return float(coef[0]), r2, (lo, hi)


# ------------------------------------------------------------------ uniformity
@dataclass
class Uniformity:
    """Uniformity log E exp(−t‖x̂−ŷ‖²); exact, or estimated from ``pairs`` random pairs with a 95 % CI."""

    value: float
    exact: bool
    pairs: int
    ci95: tuple[float, float] | None = None


def _normalized_rows(z: np.ndarray, rows: np.ndarray | None, dtype) -> np.ndarray:
    out = np.empty((len(z) if rows is None else len(rows), z.shape[1]), dtype=dtype)
    step = _chunk_rows(z.shape[1])
    for s in range(0, len(out), step):
        src = z[s:s + step] if rows is None else z[rows[s:s + step]]
        out[s:s + step] = _normalize(np.asarray(src, dtype=dtype))
    return out


def uniformity_exact(z: Any, t: float = 2.0, *, block: int = _BLOCK) -> float:
    """Exact uniformity over all N(N−1)/2 pairs, by blocks, in O(N·D + block²) memory.

    Rows are l2-normalised first. Since ‖x̂−ŷ‖² = 2 − 2x̂ᵀŷ, each pair term is
    e^{−2t}·exp(2t·x̂ᵀŷ): every block of pairs is one GEMM (rows pre-scaled by √(2t)) plus one
    in-place exp and a sum; e^{−2t} is applied once at the end. Only blocks on or above the
    diagonal are computed (symmetry). float32 input is computed in float32 with per-block sums
    accumulated in float64; float64 input in float64.
    """
    z = as_array(z)
    n, d = z.shape
    _check_shape(n, d)
    x = _normalized_rows(z, None, z.dtype)
    x *= math.sqrt(2.0 * t)
    total = 0.0
    for i in range(0, n, block):
        xi = x[i:i + block]
        for j in range(i, n, block):
            g = xi @ x[j:j + block].T
            np.exp(g, out=g)
            if i == j:  # the diagonal block holds each pair twice plus the (i, i) terms
                total += (float(g.sum()) - float(np.trace(g, dtype=np.float64))) / 2
            else:
                total += float(g.sum())
    return math.log(total / (n * (n - 1) / 2)) - 2.0 * t


def uniformity_sampled(z: Any, t: float = 2.0, *, pairs: int = UNIFORMITY_PAIRS, seed: int = 0,
                       rows: np.ndarray | None = None) -> Uniformity:
    """Uniformity from ``pairs`` uniformly random distinct pairs, with a 95 % CI.

    Each term exp(−t‖x̂−ŷ‖²) lies in [e^{−4t}, 1], so the pair mean has a CLT interval
    m ± 1.96·s/√M; the reported CI is its log.

    Args:
        z: (N, D) rows (numpy, memmap or torch tensor); they are l2-normalised here.
        t: the temperature.
        pairs: how many random pairs.
        seed: seed of the pair sampler.
        rows: indices of usable rows (e.g. the finite ones); all rows when None.
    """
    z = as_array(z)
    idx = np.arange(len(z)) if rows is None else np.asarray(rows)
    n = len(idx)
    _check_shape(n, z.shape[1])
    rng = np.random.default_rng(seed)
    s1 = s2 = 0.0
    step = 16384
    for s in range(0, pairs, step):
        m = min(step, pairs - s)
        i = rng.integers(0, n, m)
        j = rng.integers(0, n - 1, m)
        j += j >= i  # uniform over ordered distinct pairs = uniform over unordered pairs
        a, b = np.asarray(z[idx[i]]), np.asarray(z[idx[j]])
        # cos = aᵀb/(‖a‖‖b‖) without normalised copies; ‖â−b̂‖² = 2 − 2cos
        cos = np.einsum("ij,ij->i", a, b) / np.maximum(
            np.sqrt(np.einsum("ij,ij->i", a, a) * np.einsum("ij,ij->i", b, b)), NORM_EPS)
        e = np.exp(-t * np.maximum(2.0 - 2.0 * cos.astype(np.float64), 0.0))
        s1 += float(e.sum())
        s2 += float((e * e).sum())
    mean = s1 / pairs
    sd = math.sqrt(max(s2 / pairs - mean * mean, 0.0) * pairs / max(pairs - 1, 1))
    half = 1.96 * sd / math.sqrt(pairs)
    floor = math.exp(-4 * t)  # no term is smaller, so neither is the mean
    lo, hi = max(mean - half, floor), min(mean + half, 1.0)
    return Uniformity(math.log(mean), False, pairs, (math.log(lo), math.log(hi)))


def uniformity(z: Any, t: float = 2.0, *, exact_max: int = UNIFORMITY_EXACT_MAX,
               pairs: int = UNIFORMITY_PAIRS, seed: int = 0, rows: np.ndarray | None = None) -> Uniformity:
    """Uniformity (Wang & Isola 2020): exact up to ``exact_max`` rows, sampled (with CI) above."""
    z = as_array(z)
    n = len(z) if rows is None else len(rows)
    if n <= exact_max:
        src = z if rows is None or len(rows) == len(z) else z[rows]
        return Uniformity(uniformity_exact(src, t), True, n * (n - 1) // 2)
    return uniformity_sampled(z, t, pairs=pairs, seed=seed, rows=rows)


# ------------------------------------------------------------------ single metrics
def std_l2(z: Any) -> float:
    """SimSiam's collapse indicator: mean over channels of the std of l2-normalised rows.

    ``mean_j std_i(z_i/‖z_i‖)_j`` with the unbiased std (as ``torch.std``); an isotropic
    Gaussian gives ≈1/√d, complete collapse gives 0 (Chen & He, CVPR 2021, §4.1).
    """
    m, _ = stream_moments(as_array(z))
    return m.std_l2()


def alignment(x: Any, y: Any, alpha: float = 2.0) -> float:
    """Alignment E‖x̂−ŷ‖₂^α over positive pairs (rows of x and y), l2-normalised (Wang & Isola 2020)."""
    m, _ = stream_moments(as_array(x), as_array(y, what="positives"), alpha=alpha)
    return m.align_sum / m.n_pairs


def singular_values(z: Any) -> np.ndarray:
    """Singular values of the uncentred Z (descending, min(N, D) of them), via the float64 Gram."""
    z = as_array(z)
    m, _ = stream_moments(z)
    return np.sqrt(eigh_desc(m.uncentred_gram()))[: min(m.n, m.d)]


def rankme(z: Any, eps: float = RANKME_EPS) -> float:
    """RankMe (Garrido et al., ICML 2023): exp-entropy of σ(Z)/‖σ(Z)‖₁ + ε, Z uncentred."""
    return rankme_from_singular_values(singular_values(z), eps)


def effective_rank(z: Any) -> float:
    """Effective rank (Roy & Vetterli 2007) of the centred covariance spectrum of Z."""
    m, _ = stream_moments(as_array(z))
    return effective_rank_from_eigenvalues(eigh_desc(m.covariance()))


def alpha_req(z: Any, fit_range: tuple[int, int] = ALPHA_RANGE) -> tuple[float | None, float | None]:
    """α-ReQ (Agrawal et al., NeurIPS 2022): power-law decay α of the covariance spectrum, and R²."""
    m, _ = stream_moments(as_array(z))
    a, r2, _ = alpha_req_from_eigenvalues(eigh_desc(m.covariance()), fit_range)
    return a, r2


# ------------------------------------------------------------------ the report
@dataclass
class CollapseReport:
    """All collapse metrics of one embedding matrix (see ``DEFINITIONS`` and docs/metrics.md)."""

    n: int
    d: int
    std_l2: float
    std_l2_ideal: float
    collapse_level: float
    alignment: float | None
    uniformity: float
    uniformity_exact: bool
    uniformity_pairs: int
    uniformity_ci95: tuple[float, float] | None
    rankme: float
    effective_rank: float
    alpha_req: float | None
    alpha_req_r2: float | None
    alpha_req_range: tuple[int, int]
    n_nonfinite: int = 0
    alignment_alpha: float = 2.0
    uniformity_t: float = 2.0
    rankme_eps: float = RANKME_EPS
    lidar: float | None = None
    lidar_views: int | None = None
    singular_values: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    cov_eigenvalues: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    normalized_cov_eigenvalues: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def rank_bound(self) -> int:
        """min(N, D): the largest rank Z can have."""
        return min(self.n, self.d)

    def complete_collapse(self, std_fraction: float = 0.3) -> bool:
        """Complete collapse: std_l2 below ``std_fraction``/√d (the outputs are nearly constant)."""
        return bool(self.std_l2 < std_fraction * self.std_l2_ideal)

    def dimensional_collapse(self, rank_fraction: float = 0.1) -> bool:
        """Dimensional collapse: RankMe below ``rank_fraction``·min(N, D), or effective rank below 1.5."""
        return bool(self.rankme < rank_fraction * self.rank_bound or self.effective_rank < 1.5)

    def flags(self, std_fraction: float = 0.3, rank_fraction: float = 0.1) -> list[str]:
        """Collapse warnings, one line each (empty: no collapse flagged).

        Complete collapse: std_l2 below ``std_fraction``/√d. Dimensional collapse: RankMe below
        ``rank_fraction``·min(N, D), or effective rank below 1.5.
        """
        out = []
        if self.complete_collapse(std_fraction):
            out.append(f"std_l2 {self.std_l2:.4g} < {std_fraction:g} × 1/√d ({self.std_l2_ideal:.4g}): "
                       "outputs are (nearly) constant or concentrated")
        if self.dimensional_collapse(rank_fraction):
            out.append(f"dimensional collapse: RankMe {self.rankme:.3g} and effective rank "
                       f"{self.effective_rank:.3g} of at most {self.rank_bound}")
        return out

    def to_dict(self, *, spectra: bool = False) -> dict[str, Any]:
        """JSON-able scalars (and, with ``spectra``, the three spectra as lists)."""
        d = asdict(self)
        for k in ("singular_values", "cov_eigenvalues", "normalized_cov_eigenvalues"):
            arr = d.pop(k)
            if spectra:
                d[k] = [float(v) for v in arr]
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


def collapse_report(z: Any, z2: Any = None, *, drop_nonfinite: bool = False,
                    uniformity_exact_max: int = UNIFORMITY_EXACT_MAX, uniformity_pairs: int = UNIFORMITY_PAIRS,
                    alpha: float = 2.0, t: float = 2.0, alpha_range: tuple[int, int] = ALPHA_RANGE,
                    seed: int = 0, progress: Callable[[Iterable], Iterable] | None = None) -> CollapseReport:
    """Every collapse metric of ``z`` (N, D) in one streamed pass, plus uniformity.

    Args:
        z: anchors (numpy, memmap or torch tensor).
        z2: positives, row i paired with row i of ``z``; alignment and LiDAR (two views per image)
            are None without them.
        drop_nonfinite: drop rows with NaN/Inf (counted in ``n_nonfinite``) instead of raising.
        uniformity_exact_max: exact uniformity up to this many rows, sampled above.
        uniformity_pairs: number of random pairs for the sampled estimate.
        alpha: alignment exponent.
        t: uniformity temperature.
        alpha_range: 1-based rank range [lo, hi) of the α-ReQ fit.
        seed: seed of the pair sampler.
        progress: optional wrapper for the streaming loop.

    Raises:
        DataError: D < 2, N < 2, mismatched positives, or NaN/Inf rows without ``drop_nonfinite``.
    """
    z = as_array(z)
    z2 = None if z2 is None else as_array(z2, what="positives")
    m, keep = stream_moments(z, z2, alpha=alpha, drop_nonfinite=drop_nonfinite, progress=progress)
    rank = min(m.n - 1, m.d)  # a covariance of N rows has rank ≤ N − 1: the rest is exactly zero
    if m.n < m.d:  # a training batch of a wide projector: an SVD of the N×D rows beats eigh of D×D
        sv, lam, lam_n = _spectra_direct(np.asarray(z[keep], dtype=np.float64))
    else:
        sv = np.sqrt(eigh_desc(m.uncentred_gram()))[: min(m.n, m.d)]
        lam = eigh_desc(m.covariance())[:rank]
        lam_n = eigh_desc(m.covariance(normalized=True))[:rank]
    std = m.std_l2()
    ideal = 1.0 / math.sqrt(m.d)
    rows = None if keep.all() else np.flatnonzero(keep)
    uni = uniformity(z, t, exact_max=uniformity_exact_max, pairs=uniformity_pairs, seed=seed, rows=rows)
    a, r2, used = alpha_req_from_eigenvalues(lam, alpha_range)
    return CollapseReport(
        n=m.n, d=m.d, std_l2=std, std_l2_ideal=ideal, collapse_level=max(0.0, 1.0 - std / ideal),
        alignment=(m.align_sum / m.n_pairs) if m.n_pairs else None,
        uniformity=uni.value, uniformity_exact=uni.exact, uniformity_pairs=uni.pairs,
        uniformity_ci95=uni.ci95, rankme=rankme_from_singular_values(sv),
        effective_rank=effective_rank_from_eigenvalues(lam),
        alpha_req=a, alpha_req_r2=r2, alpha_req_range=used, n_nonfinite=int((~keep).sum()),
        alignment_alpha=alpha, uniformity_t=t, singular_values=sv, cov_eigenvalues=lam,
        normalized_cov_eigenvalues=lam_n, lidar=None if z2 is None else lidar([z, z2], rows=np.flatnonzero(keep)),
        lidar_views=None if z2 is None else 2,
    )


def file_reports(path: str | os.PathLike, positives: str | os.PathLike | None = None, *, seed: int = 0,
                 progress=None, **report_kwargs: Any) -> dict[str, CollapseReport]:
    """``{file stem: CollapseReport}`` of an embeddings file (``.npz``/``.npy``).

    Alignment comes from ``positives`` (row i pairs with row i) when given; ``report_kwargs`` go to
    ``collapse_report``.
    """
    z2 = None if positives is None else load_matrix(positives, what="positives")
    return {Path(path).stem: collapse_report(load_matrix(path), z2, seed=seed, progress=progress, **report_kwargs)}
