"""Monitors any training loop can call: an online kNN on a held-out split, and measuring without side effects.

``OnlineKnn`` scores a model's features on a held-out labelled split with DINO's weighted kNN,
``featviz.eval.knn.weighted_knn``, the rule of ``featviz knn``: on the same features both give the
same accuracy. Its protocol (``OnlineKnn.protocol``) is written next to the metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from featviz.errors import DataError

KNN_K = 20  # DINO eval_knn's k
KNN_T = 0.07  # DINO eval_knn's temperature


def _numpy(v: Any) -> np.ndarray:
    return v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)


@dataclass
class OnlineKnn:
    """DINO's weighted kNN of a model's features on a held-out labelled split.

    The bank (labelled training images) and the queries (held-out images) are fixed tensors in
    the model's input format; ``evaluate`` embeds both with ``features`` in eval mode and no
    gradient, in batches of ``batch_size``, and scores the queries against the bank:
    l2-normalised features, cosine similarity, the ``k`` nearest bank images vote with weight
    exp(cos / t), top-1 accuracy (``featviz.eval.knn.weighted_knn``).

    Args:
        bank: (N, …) input tensors of the bank.
        bank_labels: (N,) class indices.
        queries: (M, …) input tensors of the held-out queries.
        query_labels: (M,) class indices.
        k: neighbours (DINO: 20).
        t: vote temperature (DINO: 0.07).
        batch_size: images per forward.
    """

    bank: torch.Tensor
    bank_labels: Any
    queries: torch.Tensor
    query_labels: Any
    k: int = KNN_K
    t: float = KNN_T
    batch_size: int = 256
    last: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        """Check the split: labels for every image, and enough bank images for k."""
        self.bank_labels = _numpy(self.bank_labels).astype(np.int64)
        self.query_labels = _numpy(self.query_labels).astype(np.int64)
        if len(self.bank_labels) != len(self.bank) or len(self.query_labels) != len(self.queries):
            raise DataError(
                f"OnlineKnn: {len(self.bank)} bank images with {len(self.bank_labels)} labels, "
                f"{len(self.queries)} queries with {len(self.query_labels)} labels; give one label each"
            )
        if self.k > len(self.bank):
            raise DataError(f"OnlineKnn: k={self.k} is more than the {len(self.bank)} bank images; lower k")

    @torch.no_grad()
    def embed(
        self, features: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device | str = "cpu"
    ) -> np.ndarray:
        """``features`` of ``x`` in batches, flattened to (N, D) float32 numpy."""
        out = [
            features(x[i : i + self.batch_size].to(device)).flatten(1).float().cpu()
            for i in range(0, len(x), self.batch_size)
        ]
        return torch.cat(out).numpy()

    def evaluate(
        self, features: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str = "cpu"
    ) -> dict[str, float]:
        """``{"knn_acc": top-1}`` of the queries against the bank (keeps the features in ``last``).

        The caller puts the model in eval mode (``FeatvizMonitor`` does, and restores it).
        """
        from featviz.eval.knn import weighted_knn

        bank_f, query_f = self.embed(features, self.bank, device), self.embed(features, self.queries, device)
        self.last = (bank_f, query_f)
        score = weighted_knn(bank_f, self.bank_labels, query_f, self.query_labels, ks=[self.k], temperature=self.t)[0]
        return {"knn_acc": score.top1, "knn_top5": score.top5}

    def protocol(self) -> dict[str, Any]:
        """What ``knn_acc`` means, as written beside the metrics."""
        return {
            "rule": "DINO eval_knn.knn_classifier (featviz.eval.knn.weighted_knn, as `featviz knn`)",
            "k": self.k,
            "t": self.t,
            "similarity": "cosine (L2-normalised features)",
            "weights": "exp(similarity / t)",
            "n_bank": len(self.bank),
            "n_queries": len(self.queries),
            "mode": "eval (BatchNorm running statistics), no gradient",
            "batch_size": self.batch_size,
        }


@contextlib.contextmanager
def frozen_batchnorm(module: nn.Module) -> Iterator[None]:
    """Run ``module`` (e.g. in train mode, to measure it as it trains) and leave its BatchNorm buffers as they were.

    A forward pass in train mode moves BatchNorm's running mean and variance; an extra pass only
    to measure the embeddings must not change training, so every buffer of every BatchNorm layer
    is copied before and put back after.
    """
    saved = [
        (b, b.detach().clone())
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)
        for b in m.buffers()
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
