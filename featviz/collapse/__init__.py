"""Collapse and representation-quality diagnostics, one module per concern (torch-free here).

* ``metrics``: the metrics on ``(N, D)`` arrays and ``CollapseReport`` (numpy only);
* ``monitor``: ``CollapseMonitor`` for training loops (``featviz.integrations.lightning`` wraps it for
  Lightning), and ``watch``
  (following a run live, with alarms);
* ``twoview``: two augmented views of images through a model, the input of the metrics (torch,
  imported on first access);
* ``plots``: spectra, metric curves and run comparisons (matplotlib, imported inside functions).

The public names of ``metrics``, ``monitor`` and ``plots`` are importable from here
(``from featviz.collapse import collapse_report, CollapseMonitor``).
"""

from __future__ import annotations

import importlib
from typing import Any

from featviz.collapse.metrics import (
    ALPHA_RANGE,
    DEFINITIONS,
    LIDAR_DELTA,
    LIDAR_EPS,
    NORM_EPS,
    RANKME_EPS,
    UNIFORMITY_EXACT_MAX,
    UNIFORMITY_PAIRS,
    CollapseReport,
    Moments,
    Uniformity,
    alignment,
    alpha_req,
    alpha_req_from_eigenvalues,
    as_array,
    collapse_report,
    effective_rank,
    effective_rank_from_eigenvalues,
    file_reports,
    lidar,
    load_matrix,
    rankme,
    rankme_from_singular_values,
    singular_values,
    std_l2,
    stream_moments,
    uniformity,
    uniformity_exact,
    uniformity_sampled,
)
from featviz.collapse.monitor import (
    STOP_REASONS,
    CollapseMonitor,
    CollapseWatcher,
    FollowResult,
    JsonlTail,
    WatchResult,
    append_jsonl,
    follow_run,
    watch,
)
from featviz.collapse.plots import (
    CURVE_PANELS,
    plot_curves,
    plot_run_comparison,
    plot_spectrum,
    write_report,
)

__all__ = [
    "ALPHA_RANGE", "CURVE_PANELS", "DEFINITIONS", "NORM_EPS", "RANKME_EPS", "UNIFORMITY_EXACT_MAX",
    "UNIFORMITY_PAIRS", "STOP_REASONS", "CollapseMonitor", "CollapseReport", "CollapseWatcher", "FollowResult",
    "JsonlTail", "Moments",
    "Uniformity", "WatchResult", "alignment", "alpha_req", "alpha_req_from_eigenvalues", "append_jsonl",
    "as_array", "collapse_report", "effective_rank", "effective_rank_from_eigenvalues", "file_reports", "follow_run",
    "lidar", "LIDAR_DELTA", "LIDAR_EPS",
    "load_matrix",
    "plot_curves", "plot_run_comparison", "plot_spectrum", "rankme", "rankme_from_singular_values",
    "singular_values", "std_l2", "stream_moments", "uniformity", "uniformity_exact",
    "uniformity_sampled", "watch", "write_report",
]


def __getattr__(name: str) -> Any:
    # PEP 562: the torch-using submodule loads on first access only
    if name == "twoview":
        return importlib.import_module("featviz.collapse.twoview")
    if name == "CollapseCallback":
        raise AttributeError("featviz.collapse.CollapseCallback is now featviz.integrations.lightning.FeatvizMonitor "
                             "(collapse metrics, RankMe, LiDAR and an online kNN; docs/monitor.md)")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
