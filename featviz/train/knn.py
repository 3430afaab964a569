"""The kNN monitor of ``featviz train``.

Its protocol is public: ``checkpoint_knn`` recomputes a logged accuracy from the exported
checkpoint alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from featviz.errors import DataError
from featviz.train.config import TrainConfig

KNN_T = 0.07  # DINO eval_knn.py's temperature
KNN_BANK_MAX, KNN_QUERIES_MAX = 5000, 2000
EVAL_BATCH = 256


def held_out_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (train, held-out) indices of the kNN monitor.

    A seeded permutation, the first ``round(n * val_fraction)`` held out; nothing is held out
    without labels (or with one class).
    """
    labels = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val = int(round(len(labels) * val_fraction)) if (labels >= 0).all() and len(set(labels.tolist())) > 1 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def knn_sets(train_idx: np.ndarray, val_idx: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The bank (training images) and queries (held-out images) the monitor embeds.

    The first 5000 / 2000 of each, fewer for large images (features cached within ~400 MB).
    """
    cap = max(300, int(4e8 // (3 * image_size ** 2 * 4)))
    return train_idx[:min(KNN_BANK_MAX, cap * 2 // 3)], val_idx[:min(KNN_QUERIES_MAX, cap // 3)]


def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, t: float = KNN_T) -> float:
    """Weighted kNN top-1 accuracy on cosine similarity: ``featviz.eval.knn.weighted_knn`` (DINO ``eval_knn``).

    The one rule ``featviz knn`` and ``FeatvizMonitor`` use: features l2-normalised, the ``k`` most
    similar bank images vote with weights exp(sim / t), ties go to the lower class.
    """
    from featviz.eval.knn import weighted_knn

    as_np = lambda v: v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)  # noqa: E731
    train_y, test_y = as_np(train_y).astype(np.int64), as_np(test_y).astype(np.int64)
    score = weighted_knn(as_np(train_f), train_y, as_np(test_f), test_y, ks=[min(k, len(train_y))], temperature=t)[0]
    return score.top1


def knn_protocol(cfg: TrainConfig, n_bank: int, n_queries: int) -> dict[str, Any]:
    """The kNN monitor's protocol, as stored in metrics lines and checkpoints."""
    return {"k": cfg.knn_k, "t": KNN_T, "vote": "weighted exp(cos/t)", "features": "backbone, l2-normalised",
            "split": {"val_fraction": cfg.val_fraction, "seed": cfg.seed, "limit": cfg.limit},
            "n_bank": n_bank, "n_queries": n_queries, "image_size": cfg.image_size,
            "transform": "featviz.data.images.eval_transform", "batchnorm": "eval mode, the checkpoint's statistics "
            + ("(PreciseBN: re-estimated on training images)" if cfg.precise_bn else "(running averages)"),
            "batch_size": EVAL_BATCH}


def checkpoint_knn(checkpoint: str | Path, *, device: str = "cpu") -> dict[str, Any]:
    """Recompute the kNN accuracy a run logged, from its exported checkpoint alone.

    Reads the protocol from the checkpoint's metadata (``training.knn``), loads the backbone
    with ``featviz.models.loader.load_model`` (eval mode, the checkpoint's BatchNorm statistics), embeds
    the bank and the queries with ``featviz.eval.embed.embed_images`` and scores them with
    ``knn_accuracy``.

    Returns:
        ``{"knn_acc": ..., "logged": ..., "protocol": ...}``.

    Raises:
        DataError: the checkpoint was not written by ``featviz train`` with a kNN monitor.
    """
    from featviz.data import images as data
    from featviz.eval.embed import embed_images
    from featviz.models.checkpoints import read_featviz
    from featviz.models.loader import load_model

    _, meta = read_featviz(checkpoint)
    training = meta.get("training") or {}
    proto, cfg = training.get("knn"), training.get("config") or {}
    if not proto or "knn_acc" not in training:
        raise DataError(f"{str(checkpoint)!r} has no kNN protocol in its metadata; expected a checkpoint "
                        "of `featviz train` on labelled images")
    imgs = data.labelled_images(cfg["data"], image_size=proto["image_size"])
    n = proto["split"]["limit"] or len(imgs)
    labels = np.asarray(imgs.labels[:n])
    train_idx, val_idx = held_out_split(labels, proto["split"]["val_fraction"], proto["split"]["seed"])
    bank, queries = train_idx[:proto["n_bank"]], val_idx[:proto["n_queries"]]
    idx = np.concatenate([bank, queries])
    model = load_model(checkpoint).model
    f = embed_images(model, [imgs.items[i] for i in idx], image_size=proto["image_size"],
                     batch_size=proto["batch_size"], device=device, strict=True)
    x = torch.from_numpy(f.features)
    acc = knn_accuracy(x[:len(bank)], labels[bank], x[len(bank):], labels[queries], proto["k"], proto["t"])
    return {"knn_acc": acc, "logged": training["knn_acc"], "protocol": proto}

