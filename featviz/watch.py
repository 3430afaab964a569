"""Follow a training run's collapse metrics while it is written (torch-free).

A run folder holds ``metrics.jsonl`` (one JSON object per line, as written by
``featviz.collapse.CollapseMonitor`` and ``featviz train``), or checkpoints that appear one by
one. ``watch`` polls it, hands every new record to ``CollapseWatcher`` (trend and alarms) and
reports events to a callback (the CLI draws a live table and curve plots from them).

When does it stop?

* the run writes a final ``{"event": "done"}`` line (``CollapseMonitor.close()``), or a file
  named ``DONE`` appears in the run folder;
* a record reaches ``until_step``;
* nothing new arrives for ``max_wait`` seconds (also while the folder does not exist yet);
* an alarm fires and ``stop_on_alarm`` is set (``--fail-on-collapse``).

Alarms: std_l2 below ``std_fraction``/√d (complete collapse), RankMe below
``(1 − rankme_drop)`` × its peak so far (a sharp rank drop), and non-finite outputs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featviz.errors import FeatvizError

log = logging.getLogger(__name__)

CHECKPOINT_EXTS = (".safetensors", ".pth", ".pt", ".ckpt", ".tar")
DONE_FILE = "DONE"


class JsonlTail:
    """Read complete new lines of a growing JSONL file (a partial last line waits for its newline)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.offset = 0
        self.bad_lines = 0

    def read(self) -> list[dict[str, Any]]:
        """New records since the last call; malformed lines are skipped with a warning."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:  # truncated or replaced: start over
            log.warning("%s shrank (%d < %d bytes); reading it again from the start", self.path, size, self.offset)
            self.offset = 0
        if size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        out = []
        for line in chunk[:end].splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                self.bad_lines += 1
                log.warning("%s: skipping a malformed line: %.80r", self.path.name, line)
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


@dataclass
class CollapseWatcher:
    """Trend and alarm state over a stream of metric records.

    Args:
        std_fraction: alarm when std_l2 < std_fraction × 1/√d.
        rankme_drop: alarm when RankMe < (1 − rankme_drop) × its peak so far.
    """

    std_fraction: float = 0.3
    rankme_drop: float = 0.5
    records: list[dict[str, Any]] = field(default_factory=list)
    alarms: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    _peak: tuple[float, Any] | None = None
    _active: set[str] = field(default_factory=set)

    def add(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        """Record one line; return the alarms that start with it (a kind fires again only after recovering)."""
        if rec.get("event") == "done":
            self.done = True
            return []
        self.records.append(rec)
        step = rec.get("step")
        current: dict[str, str] = {}
        if rec.get("error") or (rec.get("n_nonfinite") or 0) > 0:
            current["nonfinite"] = rec.get("error") or f"{rec['n_nonfinite']} embeddings with NaN/Inf"
        std, d = rec.get("std_l2"), rec.get("d")
        ideal = rec.get("std_l2_ideal") or (1 / math.sqrt(d) if d else None)
        if isinstance(std, (int, float)) and ideal and std < self.std_fraction * ideal:
            current["std_l2"] = (f"std_l2 {std:.4g} < {self.std_fraction:g} × 1/√d = {self.std_fraction * ideal:.4g} "
                                 "(outputs collapsing to a point)")
        rk = rec.get("rankme")
        if isinstance(rk, (int, float)):
            if self._peak and rk < (1 - self.rankme_drop) * self._peak[0]:
                current["rankme"] = (f"RankMe fell to {rk:.3g} from its peak {self._peak[0]:.3g} at step {self._peak[1]} "
                                     "(dimensional collapse)")
            if self._peak is None or rk > self._peak[0]:
                self._peak = (rk, step)
        new = [{"step": step, "kind": k, "message": m} for k, m in current.items() if k not in self._active]
        self._active = set(current)
        rec["_alarms"] = sorted(current)
        self.alarms += new
        return new

    def trend(self, key: str, i: int | None = None) -> str:
        """↑, ↓ or → comparing record ``i`` (default: the last) with the one before it measured the
        same way (same ``split``: training batch or held-out; change > 2 %)."""
        i = len(self.records) - 1 if i is None else i
        if i < 1 or i >= len(self.records):
            return ""
        split = self.records[i].get("split")
        prev = next((r for r in reversed(self.records[:i]) if r.get("split") == split), None)
        if prev is None:
            return ""
        a, b = prev.get(key), self.records[i].get(key)
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            return ""
        if abs(b - a) <= 0.02 * max(abs(a), 1e-12):
            return "→"
        return "↑" if b > a else "↓"

    def to_rich(self, rows: int = 15, title: str | None = None):
        """A rich Table of the last ``rows`` records with trends and alarms."""
        from rich.table import Table

        table = Table(title=title, box=None, header_style="bold")
        cols = [("step", "step"), ("epoch", "epoch"), ("split", "on"), ("loss", "loss"), ("std_l2", "std_l2 (% of 1/√d)"),
                ("rankme", "RankMe"), ("effective_rank", "eff. rank"), ("uniformity", "uniformity"),
                ("alignment", "alignment"), ("knn_acc", "kNN acc")]
        present = [(k, h) for k, h in cols if any(k in r for r in self.records)] or cols[:1]
        for _, h in present:
            table.add_column(h, justify="right")
        table.add_column("status")
        n = len(self.records)
        for i in range(max(0, n - rows), n):
            r = self.records[i]
            cells = []
            for k, _ in present:
                v = r.get(k)
                if k == "split":
                    cells.append({"train_batch": "batch", "held_out": "held-out"}.get(v, v or ""))
                elif k == "std_l2" and isinstance(v, (int, float)) and r.get("std_l2_ideal"):
                    cells.append(f"{v:.4f} ({100 * v / r['std_l2_ideal']:.0f}%) {self.trend(k, i)}")
                elif isinstance(v, float):
                    cells.append(f"{v:.4g} {self.trend(k, i) if k in ('rankme', 'effective_rank', 'loss') else ''}".strip())
                else:
                    cells.append("" if v is None else str(v))
            status = ", ".join(r.get("_alarms", [])) or "ok"
            table.add_row(*cells, f"[red]{status}[/]" if status != "ok" else "[green]ok[/]")
        return table


@dataclass
class WatchResult:
    """How a watch ended."""

    reason: str  # "done" | "until_step" | "max_wait" | "alarm"
    records: int
    alarms: list[dict[str, Any]]


def _checkpoints(run_dir: Path) -> list[Path]:
    files = [p for p in run_dir.iterdir() if p.is_file() and p.name.endswith(CHECKPOINT_EXTS)]
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))


def _step_of(path: Path, fallback: int) -> int:
    nums = re.findall(r"\d+", path.stem)
    return int(nums[-1]) if nums else fallback


def watch(run_dir: str | os.PathLike, *, watcher: CollapseWatcher | None = None, filename: str = "metrics.jsonl",
          interval: float = 2.0, max_wait: float | None = None, until_step: int | None = None,
          stop_on_alarm: bool = False, checkpoint_metrics: Callable[[Path], dict[str, Any]] | None = None,
          on_event: Callable[[str, dict[str, Any]], None] | None = None,
          sleep: Callable[[float], None] = time.sleep) -> WatchResult:
    """Poll ``run_dir`` until the run is done (see the module docstring for the stop rules).

    Args:
        run_dir: the training run's folder; it may not exist yet.
        watcher: trend/alarm state (a default one when None).
        filename: the metrics file inside ``run_dir``.
        interval: seconds between polls.
        max_wait: stop after this many seconds with nothing new (None: never).
        until_step: stop once a record's step reaches this.
        stop_on_alarm: stop at the first alarm.
        checkpoint_metrics: when given and ``run_dir`` has no metrics file, every new checkpoint
            (once its size stops changing) is turned into a record by this function.
        on_event: ``on_event(kind, info)`` with kind "waiting", "records" (info: records,
            alarms) or "stopped" (info: reason).

    Returns:
        A ``WatchResult``.
    """
    run_dir = Path(run_dir)
    watcher = watcher or CollapseWatcher()
    emit = on_event or (lambda kind, info: None)
    tail = JsonlTail(run_dir / filename)
    seen: dict[Path, tuple[int, float]] = {}
    done_ckpts: set[Path] = set()
    last_new = time.monotonic()
    waiting_said = ""

    def finish(reason: str) -> WatchResult:
        emit("stopped", {"reason": reason})
        return WatchResult(reason, len(watcher.records), watcher.alarms)

    while True:
        new: list[dict[str, Any]] = []
        pending = False  # checkpoints seen but not measured yet
        if not run_dir.is_dir():
            msg = f"waiting for {run_dir} to appear"
        elif tail.path.exists() or checkpoint_metrics is None:
            new = tail.read()
            msg = f"waiting for {tail.path}" if not tail.path.exists() else ""
            if not tail.path.exists() and checkpoint_metrics is None and _checkpoints(run_dir):
                msg += " (checkpoints are there: pass --images DIR to compute metrics from them)"
        else:
            msg = f"waiting for checkpoints in {run_dir}"
            for ck in _checkpoints(run_dir):
                if ck in done_ckpts:
                    continue
                pending = True
                st = ck.stat()
                sig = (st.st_size, st.st_mtime)
                if seen.get(ck) != sig:  # still being written, or just appeared: look again next poll
                    seen[ck] = sig
                    continue
                done_ckpts.add(ck)
                try:
                    rec = {"step": _step_of(ck, len(done_ckpts) - 1), "checkpoint": ck.name, **checkpoint_metrics(ck)}
                except FeatvizError as e:  # one unreadable checkpoint must not end the watch
                    log.warning("skipping %s: %s", ck.name, e)
                    continue
                new.append(rec)
        if msg and msg != waiting_said and not new:
            emit("waiting", {"message": msg})
            waiting_said = msg
        if new:
            last_new = time.monotonic()
            waiting_said = ""
            fired = [a for r in new for a in watcher.add(r)]
            emit("records", {"records": new, "alarms": fired})
            if fired and stop_on_alarm:
                return finish("alarm")
            if until_step is not None and any(isinstance(r.get("step"), int) and r["step"] >= until_step
                                              for r in new):
                return finish("until_step")
        if watcher.done or ((run_dir / DONE_FILE).exists() and not new and not pending):
            # a DONE file may land before the last lines are read: read once more first
            rest = tail.read() if run_dir.is_dir() else []
            fired = [a for r in rest for a in watcher.add(r)]
            if rest:
                emit("records", {"records": rest, "alarms": fired})
            if fired and stop_on_alarm:
                return finish("alarm")
            return finish("done")
        if max_wait is not None and time.monotonic() - last_new > max_wait:
            return finish("max_wait")
        sleep(interval)
