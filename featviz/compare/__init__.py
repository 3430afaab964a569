"""How two models (or two layers) differ: CKA, mutual k-NN, CKNNA and SVCCA, layer by layer.

The measures on arrays need only numpy (``featviz.compare.measures``) and are exported here
lazily, so ``import featviz.compare`` imports no torch::

    from featviz.compare import cka, mutual_knn, cknna, svcca, MinibatchCKA
    cka(x, y)                     # x (N, D1), y (N, D2): numpy arrays or torch tensors

``featviz.compare.stream`` runs a model's layers over images (torch); ``featviz.compare.run`` is the
``featviz compare`` command.
"""

from __future__ import annotations

from typing import Any

_MEASURES = (
    "cka",
    "cka_minibatch",
    "hsic_unbiased",
    "MinibatchCKA",
    "mutual_knn",
    "cknna",
    "svcca",
    "Neighbours",
    "knn_indices",
)

__all__ = list(_MEASURES)


def __getattr__(name: str) -> Any:
    """The measures of ``featviz.compare.measures``, imported on first use."""
    if name in _MEASURES:
        from featviz.compare import measures

        return getattr(measures, name)
    raise AttributeError(f"module 'featviz.compare' has no attribute {name!r}")
