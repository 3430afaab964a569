"""What `featviz collapse` draws on the console: the metrics table and the live watch table.

The library (``featviz.collapse``) returns data, ``CollapseReport``s and the watcher's records with
their trends and alarms; these functions turn them into rich tables. rich and featviz.collapse are
imported inside the functions, so that importing this module costs nothing at ``--help``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

    from featviz.collapse import CollapseReport, CollapseWatcher


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def report_table(reports: dict[str, CollapseReport], *, std_fraction: float = 0.3, title: str | None = None,
                 definitions: bool = True) -> Table:
    """The metrics of one or more outputs as a rich table.

    Args:
        reports: ``{output name: CollapseReport}`` (backbone, projector, pixels …), one column each.
        std_fraction: std_l2 below this × 1/√d is drawn red (complete collapse), else green.
        title: the table's title.
        definitions: add a column with each metric's definition (it needs a wide console).

    Returns:
        A ``rich.table.Table``, one row per metric.
    """
    from rich.table import Table

    from featviz.collapse import DEFINITIONS

    table = Table(title=title, box=None, header_style="bold")
    table.add_column("metric")
    for name in reports:
        table.add_column(name, justify="right")
    if definitions:
        table.add_column("definition", style="dim", overflow="fold")
    rows = [("n", "rows used"), ("d", "channels"), ("std_l2", DEFINITIONS["std_l2"]),
            ("std_l2_ideal", DEFINITIONS["std_l2_ideal"]), ("collapse_level", DEFINITIONS["collapse_level"]),
            ("rankme", DEFINITIONS["rankme"]), ("effective_rank", DEFINITIONS["effective_rank"]),
            ("alpha_req", "power-law decay of cov(Z) eigenvalues, ranks [lo, hi), weights 1/i (Agrawal et al. 2022)"),
            ("alpha_req_r2", "R² of that log-log fit"), ("alignment", DEFINITIONS["alignment"]),
            ("lidar", DEFINITIONS["lidar"]),
            ("uniformity", DEFINITIONS["uniformity"]), ("uniformity_ci95", "95 % CI when sampled (exact: -)")]
    for key, definition in rows:
        vals = []
        for r in reports.values():
            v = getattr(r, key)
            if key == "uniformity_ci95" and v is not None:
                v = f"[{v[0]:.4g}, {v[1]:.4g}] ({r.uniformity_pairs:,} pairs)"
            elif key == "alpha_req" and v is not None:
                v = f"{v:.3g} [{r.alpha_req_range[0]}, {r.alpha_req_range[1]})"
            elif key == "std_l2":
                style = "red" if v < std_fraction * r.std_l2_ideal else "green"
                v = f"[{style}]{v:.4g}[/] ({100 * v / r.std_l2_ideal:.0f}% of ideal)"
            vals.append(_fmt(v))
        table.add_row(key, *vals, *([definition] if definitions else []))
    return table


def watch_table(watcher: CollapseWatcher, rows: int = 15, title: str | None = None) -> Table:
    """The last ``rows`` records of a watched run as a rich table, with trends and alarms.

    Args:
        watcher: the run's ``CollapseWatcher`` (its records, ``trend`` and each record's alarms).
        rows: how many of the latest records to show.
        title: the table's title.

    Returns:
        A ``rich.table.Table``: one row per record, a status column naming its alarms (or ok).
    """
    from rich.table import Table

    table = Table(title=title, box=None, header_style="bold")
    cols = [("step", "step"), ("epoch", "epoch"), ("split", "on"), ("loss", "loss"),
            ("std_l2", "std_l2 (% of 1/√d)"), ("rankme", "RankMe"), ("effective_rank", "eff. rank"),
            ("uniformity", "uniformity"), ("alignment", "alignment"), ("lidar", "LiDAR"), ("knn_acc", "kNN acc")]
    present = [(k, h) for k, h in cols if any(k in r for r in watcher.records)] or cols[:1]
    for _, h in present:
        table.add_column(h, justify="right")
    table.add_column("status")
    n = len(watcher.records)
    for i in range(max(0, n - rows), n):
        r = watcher.records[i]
        cells = []
        for k, _ in present:
            v = r.get(k)
            if k == "split":
                cells.append({"train_batch": "batch", "held_out": "held-out"}.get(v, v or ""))
            elif k == "std_l2" and isinstance(v, (int, float)) and r.get("std_l2_ideal"):
                cells.append(f"{v:.4f} ({100 * v / r['std_l2_ideal']:.0f}%) {watcher.trend(k, i)}")
            elif isinstance(v, float):
                arrow = watcher.trend(k, i) if k in ("rankme", "effective_rank", "loss") else ""
                cells.append(f"{v:.4g} {arrow}".strip())
            else:
                cells.append("" if v is None else str(v))
        status = ", ".join(r.get("_alarms", [])) or "ok"
        table.add_row(*cells, f"[red]{status}[/]" if status != "ok" else "[green]ok[/]")
    return table


WATCH_KEYS = ("epoch", "loss", "std_l2", "rankme", "effective_rank", "uniformity", "alignment", "lidar", "knn_acc")


def watch_line(watcher: CollapseWatcher, i: int) -> str:
    """Record ``i`` of a watched run as one plain line (piped output, logs): ``key=value`` pairs and its status.

    Args:
        watcher: the run's ``CollapseWatcher``.
        i: the record's index in ``watcher.records``.

    Returns:
        e.g. ``step 44  held-out  n=359  loss=-0.61  std_l2=0.0494 (56%)  rankme=2.97 …  status=ok``.
    """
    from featviz.collapse.records import record_kind

    r = watcher.records[i]
    if r.get("event"):
        path = f"  path={r['path']}" if isinstance(r.get("path"), str) else ""
        return f"step {r.get('step')}  event={r['event']}{path}"
    parts = [f"step {r.get('step')}", record_kind(r)] + ([f"n={r['n']}"] if r.get("n") else [])
    for k in WATCH_KEYS:
        v = r.get(k)
        if v is None or isinstance(v, (list, dict)):
            continue
        if k == "std_l2" and isinstance(v, (int, float)) and r.get("std_l2_ideal"):
            parts.append(f"std_l2={v:.4g} ({100 * v / r['std_l2_ideal']:.0f}%)")
        else:
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    parts.append("status=" + (",".join(r.get("_alarms", [])) or "ok"))
    return "  ".join(parts)
