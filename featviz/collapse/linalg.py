"""The small linear-algebra rules every spectral metric shares (numpy only).

``eigh_desc`` (eigenvalues of a symmetric PSD matrix, descending, on one BLAS thread) and
``entropy_rank`` (exp of the Shannon entropy of a distribution): RankMe, the effective rank and
LiDAR are all ``entropy_rank`` of a spectrum from ``eigh_desc``.
"""

from __future__ import annotations

import numpy as np


def entropy_rank(p: np.ndarray) -> float:
    """exp(−Σ p log p) over the positive entries of ``p``."""
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def eigh_desc(mat: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix, descending, negatives (rounding) clipped to 0.

    LAPACK's eigensolver is made of many small BLAS-2 steps; with a threaded BLAS each step
    synchronises its threads, which on a busy machine made a 512² problem take 10 s instead of
    0.1 s. One BLAS thread is as fast when idle and immune to that.
    """
    return np.clip(eigh_one_thread((mat + mat.T) / 2)[0][::-1], 0.0, None)


def eigh_one_thread(mat: np.ndarray, vectors: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """``np.linalg.eigh`` (or ``eigvalsh``) of a symmetric matrix on one BLAS thread: (ascending values, vectors)."""
    try:
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency, pure Python
    except ImportError:  # pragma: no cover
        return np.linalg.eigh(mat) if vectors else (np.linalg.eigvalsh(mat), None)
    with threadpool_limits(1, user_api="blas"):
        return np.linalg.eigh(mat) if vectors else (np.linalg.eigvalsh(mat), None)
