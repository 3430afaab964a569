"""A t-SNE snapshot of a run's held-out split, written into the run folder during training.

``tsne_snapshot`` maps the held-out features with ``featviz.maps.projection.fit`` (openTSNE, seed
0: the rule of ``featviz tsne``), draws them coloured by class with ``scatter_panels`` into
``RUN/tsne/epoch_EEEE.png`` and appends an ``{"event": "snapshot", …}`` line to the run's
``metrics.jsonl``, which ``featviz collapse --watch`` names as it follows the run.
``FeatvizMonitor(tsne_every=K)`` calls it every K epochs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SNAPSHOT_DIR = "tsne"
"""The snapshots' folder inside the run folder."""


def snapshot_name(epoch: int) -> str:
    """The snapshot file of ``epoch`` (1-based: the epochs done), relative to the run folder."""
    return f"{SNAPSHOT_DIR}/epoch_{epoch:04d}.png"


def tsne_snapshot(features: Any, labels: Any, run_dir: str | os.PathLike, *, epoch: int, step: int,
                  class_names: Sequence[str] | None = None, metrics: str | None = "metrics.jsonl",
                  seed: int = 0, title: str | None = None) -> dict[str, Any]:
    """Map ``features`` to 2-D with t-SNE and save the plot as ``run_dir/tsne/epoch_EEEE.png``.

    Args:
        features: (N, D) held-out features (array or tensor), N ≥ 4.
        labels: (N,) class indices.
        run_dir: the run folder (``tsne/`` is made inside it; a snapshot of the same epoch is replaced).
        epoch: the epochs done (names the file).
        step: the optimizer step (the record's ``step``).
        class_names: legend names (default: the class indices).
        metrics: the metrics file in ``run_dir`` the event line is appended to (None: none).
        seed: t-SNE's seed.
        title: the plot's title (default: the epoch, step and N).

    Returns:
        The event record: ``event`` "snapshot", ``view`` "tsne", ``step``, ``epoch``, ``path``
        (relative to ``run_dir``), ``n``.

    Raises:
        DataError: fewer than 4 points or non-finite features.
    """
    from featviz.collapse.monitor import append_jsonl
    from featviz.maps.plotting import scatter_panels
    from featviz.maps.projection import TsneParams, fit

    x = features.detach().float().cpu().numpy() if hasattr(features, "detach") else np.asarray(features, np.float32)
    y = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    y = y.astype(np.int64)
    run_dir = Path(run_dir)
    coords = fit(x.reshape(len(x), -1), TsneParams(seed=seed, n_jobs=1))
    rel = snapshot_name(epoch)
    (run_dir / SNAPSHOT_DIR).mkdir(parents=True, exist_ok=True)
    names = list(class_names) if class_names else [str(i) for i in range(int(y.max(initial=-1)) + 1)]
    scatter_panels([(coords, y)], names, run_dir / rel, force=True,
                   titles=[title or f"held-out t-SNE, epoch {epoch} (step {step})"])
    record = {"event": "snapshot", "view": "tsne", "step": int(step), "epoch": int(epoch), "path": rel,
              "n": len(x)}
    if metrics:
        append_jsonl(run_dir / metrics, record)
    return record
