"""LiDAR (Thilak et al., ICLR 2024): the effective rank of an LDA matrix whose classes are images.

Every image ``x`` is seen through Q augmented views; the views of one image form a surrogate
class. With ``e`` the embedding, μ_x the mean of the views of ``x`` and μ the mean of the μ_x:

* Σ_b = E_x[(μ_x − μ)(μ_x − μ)ᵀ]   (between images)
* Σ_w = E_x E_{x̃|x}[(e(x̃) − μ_x)(e(x̃) − μ_x)ᵀ] + δ·I   (within an image's views)
* Σ_lidar = Σ_w^{−1/2} Σ_b Σ_w^{−1/2}, eigenvalues λ
* LiDAR = exp(−Σ_i p_i log p_i), p_i = λ_i/‖λ‖₁ + ε

The expectations are sample means (``estimator="paper"``). ``estimator="stable-pretraining"`` is
that library's ``callbacks/lidar.py``: it divides by N − 1 and N·(Q − 1) instead, and puts ε before
the normalisation, p_i = (λ_i + ε)/Σ(λ_i + ε). δ = 1e-4 and
ε = 1e-8 are stable-pretraining's defaults; reptrix's ``get_lidar`` sums instead of averaging and
uses δ = 1e-6, ε = 1e-7 (pass them to reproduce it).

The rows are streamed in chunks (memory O(chunk·Q·D + D²)), so a long ``(N, Q, D)`` memmap works.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from featviz.collapse.linalg import eigh_desc, eigh_one_thread, entropy_rank
from featviz.errors import DataError

LIDAR_DELTA = 1e-4  # δ added to Σ_w (stable-pretraining's default)
LIDAR_EPS = 1e-8  # ε added to the normalised eigenvalues
ESTIMATORS = ("paper", "stable-pretraining")
_CHUNK_ELEMS = 1 << 22


def _numpy(z: Any) -> np.ndarray:
    if hasattr(z, "detach") and hasattr(z, "cpu"):  # a torch tensor, duck-typed (no torch import here)
        z = z.detach()
        z = (z if str(z.dtype) == "torch.float64" else z.float()).cpu().numpy()
    return z if isinstance(z, np.ndarray) else np.asarray(z, dtype=np.float32)


def stack_views(views: Any) -> np.ndarray | list[np.ndarray]:
    """``views`` as an (N, Q, D) array, or a list of Q (N, D) arrays (row i of each: a view of image i).

    Raises:
        DataError: not (N, Q, D) with Q ≥ 2, or views of different shapes.
    """
    if isinstance(views, (list, tuple)):
        arrs = [_numpy(v) for v in views]
        shapes = {a.shape for a in arrs}
        if len(arrs) < 2 or len(shapes) != 1 or arrs[0].ndim != 2:
            raise DataError(
                f"LiDAR needs Q ≥ 2 views of the same (N, D) shape, got shapes {[tuple(a.shape) for a in arrs]}"
            )
        return arrs
    arr = _numpy(views)
    if arr.ndim != 3 or arr.shape[1] < 2:
        raise DataError(f"LiDAR needs an (N, Q, D) array of Q ≥ 2 views per image, got shape {tuple(arr.shape)}")
    return arr


def lidar_matrices(
    views: Any, *, delta: float = LIDAR_DELTA, estimator: str = "paper", rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(Σ_b, Σ_w) of ``views`` (float64, δ·I included in Σ_w); see the module docstring.

    Args:
        views: an (N, Q, D) array or a list of Q (N, D) arrays.
        delta: δ added to the diagonal of Σ_w.
        estimator: "paper" (sample means) or "stable-pretraining" (N − 1 and N·(Q − 1)).
        rows: indices of the images to use (e.g. the finite ones); all when None.

    Raises:
        DataError: bad shapes, an unknown estimator, fewer than 2 images, or NaN/Inf in the used rows.
    """
    if estimator not in ESTIMATORS:
        raise DataError(f"LiDAR estimator must be one of {ESTIMATORS}, got {estimator!r}")
    v = stack_views(views)
    listed = isinstance(v, list)
    n_all, q, d = (len(v[0]), len(v), v[0].shape[1]) if listed else v.shape
    idx = np.arange(n_all) if rows is None else np.asarray(rows)
    n = len(idx)
    if n < 2:
        raise DataError(f"LiDAR needs at least 2 images (surrogate classes), got {n}")
    step = max(1, _CHUNK_ELEMS // max(q * d, 1))
    s_mu, g_mu, g_w = np.zeros(d), np.zeros((d, d)), np.zeros((d, d))
    shift = None
    for s in range(0, n, step):
        sel = idx[s : s + step]
        x = (
            np.stack([np.asarray(a[sel], np.float64) for a in v], axis=1) if listed else np.asarray(v[sel], np.float64)
        )  # (c, Q, D)
        if not np.isfinite(x).all():
            raise DataError("LiDAR: the views contain NaN or Inf; fix the model/inputs (or drop those images)")
        mu = x.mean(axis=1)
        dev = (x - mu[:, None, :]).reshape(-1, d)
        g_w += dev.T @ dev
        if shift is None:
            shift = mu[0].copy()  # around one image's mean, so a large common offset loses no precision
        mu -= shift
        s_mu += mu.sum(axis=0)
        g_mu += mu.T @ mu
    unbiased = estimator == "stable-pretraining"
    sigma_b = (g_mu - np.outer(s_mu, s_mu) / n) / (n - 1 if unbiased else n)
    sigma_w = g_w / (n * (q - 1) if unbiased else n * q) + delta * np.eye(d)
    return sigma_b, sigma_w


def lidar_eigenvalues(sigma_b: np.ndarray, sigma_w: np.ndarray) -> np.ndarray:
    """Eigenvalues of Σ_w^{−1/2} Σ_b Σ_w^{−1/2}, descending (Σ_w^{−1/2} from Σ_w's eigendecomposition)."""
    w, vec = eigh_one_thread((sigma_w + sigma_w.T) / 2, vectors=True)
    inv_sqrt = (vec / np.sqrt(np.maximum(w, np.finfo(np.float64).tiny))) @ vec.T
    return eigh_desc(inv_sqrt @ sigma_b @ inv_sqrt)


def lidar(
    views: Any | Sequence[Any],
    *,
    delta: float = LIDAR_DELTA,
    eps: float = LIDAR_EPS,
    estimator: str = "paper",
    rows: np.ndarray | None = None,
) -> float:
    """LiDAR of Q augmented views per image (Thilak et al., ICLR 2024; definitions in the module docstring).

    Args:
        views: an (N, Q, D) array, or a list of Q (N, D) arrays whose row i are views of image i
            (numpy, memmaps or torch tensors).
        delta: δ added to Σ_w.
        eps: ε added to the normalised eigenvalues.
        estimator: "paper" (sample means; p_i = λ_i/‖λ‖₁ + ε) or "stable-pretraining" (N − 1,
            N·(Q − 1); p_i = (λ_i + ε)/Σ(λ_i + ε)).
        rows: indices of the images to use; all when None.

    Returns:
        LiDAR, between 1 and min(N − 1, D) (plus the ε terms).
    """
    lam = lidar_eigenvalues(*lidar_matrices(views, delta=delta, estimator=estimator, rows=rows))
    if estimator != "paper":
        return entropy_rank((lam + eps) / float((lam + eps).sum()))
    total = float(lam.sum())
    if total <= 0:
        return 1.0  # every image has the same mean: one (degenerate) direction at most
    return entropy_rank(lam / total + eps)
