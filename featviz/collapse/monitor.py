"""Collapse metrics during training: write them, and follow them live; torch-free.

``CollapseMonitor`` (and the Lightning callback) writes them; ``watch`` and ``CollapseWatcher`` follow
them.

A run folder holds ``metrics.jsonl`` (one JSON object per line, as written by ``CollapseMonitor``
and ``featviz train``), or checkpoints that appear one by one. ``watch`` polls it, hands every new
record to ``CollapseWatcher`` (trend and alarms) and reports events to a callback (the CLI draws a
live table and curve plots from them).

When does a watch stop?

* the run writes a final ``{"event": "done"}`` line (``CollapseMonitor.close()``), or a file
  named ``DONE`` appears in the run folder;
* a record reaches ``until_step``;
* nothing new arrives for ``max_wait`` seconds (also while the folder does not exist yet);
* an alarm fires and ``stop_on_alarm`` is set (``--fail-on-collapse``).

Alarms (``CollapseWatcher``; the rules per kind of record are in its docstring and docs/collapse.md):
std_l2 below ``std_fraction``/√d (complete collapse); RankMe of held-out records below
``(1 − rankme_drop)`` × their peak, of training batches below ``rank_fraction`` × min(N, D); and
non-finite outputs.
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

from featviz.collapse.metrics import collapse_report
from featviz.collapse.records import RECORD_KINDS, JsonlTail, clean_record, record_kind  # noqa: F401
from featviz.errors import DataError, FeatvizError

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ training-loop monitor
def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line with a single write, then flush and fsync.

    The line is written by one ``os.write`` on an ``O_APPEND`` descriptor, so concurrent readers
    see either the whole line or nothing of it; readers must still ignore a last line without
    its newline (a crash mid-write).
    """
    from featviz.io.outputs import to_jsonable

    data = (json.dumps(to_jsonable(record), allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:  # os.write may be short on exotic filesystems; keep appending the rest
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


class CollapseMonitor:
    """Log collapse metrics from any training loop to ``out_dir/filename`` (JSON lines).

    Example::

        monitor = CollapseMonitor("runs/simsiam", every=50)
        for step, (x1, x2) in enumerate(loader):
            z1, z2 = model(x1), model(x2)
            ...
            monitor.update(z1, z2, step=step, loss=loss.item(), lr=sched.get_last_lr()[0])
        monitor.close()  # writes {"event": "done"}; `featviz collapse --watch` stops there

    Each line holds ``step``, ``time``, every scalar of ``CollapseReport.to_dict()`` and the
    ``extra`` keyword values. NaN/Inf rows never raise here (a diverging run must still be
    logged): they are dropped and counted in ``n_nonfinite``; if fewer than 2 rows are finite the
    line holds ``"error"`` and no metrics. Needs no Lightning.

    Args:
        out_dir: folder for the metrics file (created).
        every: log when ``step % every == 0`` (the call count stands in when ``step`` is None).
        filename: metrics file name.
        enabled: False turns every call into a no-op (e.g. on non-zero ranks of a DDP job).
        writer: also send every numeric value of a line to this TensorBoard ``SummaryWriter``
            (``add_scalar("collapse/<key>", value, step)``, e.g. ``collapse/rankme``); featviz
            flushes it on ``close`` but leaves closing it to you. Any object with ``add_scalar``
            works; ``featviz.eval.projector.summary_writer(dir)`` makes one.
        **report_kwargs: passed to ``collapse_report`` (e.g. ``uniformity_exact_max``).
    """

    def __init__(self, out_dir: str | os.PathLike, every: int = 1, filename: str = "metrics.jsonl",
                 *, enabled: bool = True, writer: Any = None, **report_kwargs: Any):
        """See the class docstring for the arguments."""
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.path = Path(out_dir) / filename
        self.every, self.enabled, self.report_kwargs, self.writer = every, enabled, report_kwargs, writer
        self.calls = 0
        self.last_step: int | None = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def update(self, z1: Any, z2: Any = None, step: int | None = None, **extra: Any) -> dict[str, Any] | None:
        """Compute metrics on ``z1`` (and alignment with ``z2``) and append one line.

        Returns:
            The record written, or None when skipped by ``every`` (or disabled).
        """
        count = self.calls
        self.calls += 1
        if not self.enabled or (step if step is not None else count) % self.every:
            return None
        record: dict[str, Any] = {"step": count if step is None else int(step), "time": round(time.time(), 3)}
        try:
            rep = collapse_report(z1, z2, drop_nonfinite=True, **self.report_kwargs)
            record.update(rep.to_dict())
        except DataError as e:  # e.g. every row NaN: log the failure instead of crashing training
            record["error"] = str(e)
        record.update({k: _scalar(v) for k, v in extra.items()})
        append_jsonl(self.path, record)
        self.last_step = record["step"]
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    self.writer.add_scalar(f"collapse/{key}", value, global_step=record["step"])
        return record

    def close(self, **extra: Any) -> None:
        """Append the ``{"event": "done"}`` marker that tells ``--watch`` the run ended."""
        if self.enabled:
            append_jsonl(self.path, {"event": "done", "step": self.last_step, "time": round(time.time(), 3),
                                     **{k: _scalar(v) for k, v in extra.items()}})
            if self.writer is not None and hasattr(self.writer, "flush"):
                self.writer.flush()

    def __enter__(self) -> CollapseMonitor:
        """The monitor itself: ``with CollapseMonitor(...) as m:`` closes it at the end."""
        return self

    def __exit__(self, *exc: Any) -> None:
        """Close the monitor (write the done marker), whether or not the block raised."""
        self.close()


def _scalar(v: Any) -> Any:
    """Turn 0-d tensors / numpy scalars into Python numbers (``loss=loss`` works)."""
    if hasattr(v, "detach"):
        v = v.detach().cpu()
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# ------------------------------------------------------------------ following a run
CHECKPOINT_EXTS = (".safetensors", ".pth", ".pt", ".ckpt", ".tar")
DONE_FILE = "DONE"
WATCH_COMMAND = "collapse --watch"  # the command its output folder's marker names (a restart resumes it)


@dataclass
class CollapseWatcher:
    """Trend and alarm state over a stream of metric records.

    The alarm rules (docs/collapse.md, "Alarms"), per kind of record (``record_kind``):

    * every record: std_l2 (and ``std_l2_predictor`` when logged) below ``std_fraction`` × 1/√d
      (complete collapse); non-finite outputs;
    * held-out records: RankMe below (1 − ``rankme_drop``) × its peak over the earlier held-out
      records of the same row count (a sharp drop of the rank of the same images);
    * training-batch records: RankMe below ``rank_fraction`` × min(N, D), the rule of
      ``CollapseReport.flags``. A batch's RankMe is noisy and falls early in every healthy run
      (32-row digits batches: 21.8 → 10.3 while kNN accuracy rises), so batches are never compared
      with a peak, and never with held-out records.

    Args:
        std_fraction: alarm when std_l2 < std_fraction × 1/√d.
        rankme_drop: held-out records: alarm when RankMe < (1 − rankme_drop) × its peak so far.
        rank_fraction: training batches: alarm when RankMe < rank_fraction × min(N, D).
    """

    std_fraction: float = 0.3
    rankme_drop: float = 0.5
    rank_fraction: float = 0.1
    records: list[dict[str, Any]] = field(default_factory=list)
    alarms: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    _peaks: dict[tuple[str, Any], tuple[float, Any]] = field(default_factory=dict)
    _active: dict[str, set[str]] = field(default_factory=dict)

    def add(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        """Record one line; return the alarms that start with it.

        An alarm is a dict: ``step``, ``kind`` (std_l2, std_l2_predictor, rankme, nonfinite),
        ``record`` (the record kind), ``n``, ``value`` and ``threshold`` (the two numbers compared),
        and ``message`` naming all of them. A kind of alarm fires again on the same kind of record
        only after it recovered.
        """
        if rec.get("event") == "done":
            self.done = True
            return []
        if rec.get("event"):  # diverged, box updates …: shown, never measured
            self.records.append(rec)
            return []
        self.records.append(rec)
        step, kind, n = rec.get("step"), record_kind(rec), rec.get("n")
        on = f"on {kind} records" + (f" ({n} rows)" if n else "")
        current: dict[str, tuple[str, Any, Any]] = {}
        if rec.get("error") or (rec.get("n_nonfinite") or 0) > 0:
            current["nonfinite"] = (rec.get("error") or f"{rec['n_nonfinite']} embeddings with NaN/Inf {on}",
                                    rec.get("n_nonfinite"), 0)
        d = rec.get("d")
        ideal = rec.get("std_l2_ideal") or (1 / math.sqrt(d) if d else None)
        for key in ("std_l2", "std_l2_predictor"):
            std = rec.get(key)
            if _number(std) and ideal and std < self.std_fraction * ideal:
                limit = self.std_fraction * ideal
                current[key] = (f"{key} {on} is {std:.4g} < {self.std_fraction:g} × 1/√d = {limit:.4g} "
                                "(outputs collapsing to a point)", std, limit)
        rk = rec.get("rankme")
        if _number(rk) and kind == "held-out":
            peak = self._peaks.get((kind, n))
            if peak and rk < (1 - self.rankme_drop) * peak[0]:
                limit = (1 - self.rankme_drop) * peak[0]
                current["rankme"] = (f"RankMe {on} fell to {rk:.3g} from its peak {peak[0]:.3g} at step {peak[1]} "
                                     f"(< {1 - self.rankme_drop:g} × peak = {limit:.3g}; dimensional collapse)",
                                     rk, limit)
            if peak is None or rk > peak[0]:
                self._peaks[(kind, n)] = (rk, step)
        elif _number(rk) and n and d:
            limit = self.rank_fraction * min(n, d)
            if rk < limit:
                current["rankme"] = (f"RankMe {on} is {rk:.3g} < {self.rank_fraction:g} × min(N, D) = {limit:.3g} "
                                     "(dimensional collapse)", rk, limit)
        active = self._active.setdefault(kind, set())
        new = [{"step": step, "kind": k, "record": kind, "n": n, "value": v, "threshold": t, "message": m}
               for k, (m, v, t) in current.items() if k not in active]
        self._active[kind] = set(current)
        rec["_alarms"] = sorted(current)
        self.alarms += new
        return new

    def trend(self, key: str, i: int | None = None) -> str:
        """↑, ↓ or → for ``key``: record ``i`` (default: the last) against the one before it.

        The one before is the last earlier record measured the same way (same ``split``: training
        batch or held-out); → when the change is within 2 %; "" when there is nothing to compare.
        """
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
          sleep: Callable[[float], None] = time.sleep, earlier: list[dict[str, Any]] | None = None) -> WatchResult:
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
        sleep: how to wait between polls (tests pass a fake clock).
        earlier: records an earlier watch computed from checkpoints (a restarted watch): they go
            to the watcher first (event "records" with ``earlier: True``), and their checkpoints
            are not measured again.

    Returns:
        A ``WatchResult``.
    """
    run_dir = Path(run_dir)
    watcher = watcher or CollapseWatcher()
    emit = on_event or (lambda kind, info: None)
    source = _RunSource(run_dir, filename, checkpoint_metrics)
    if earlier:
        source.measured.update(run_dir / r["checkpoint"] for r in earlier if isinstance(r.get("checkpoint"), str))
        fired = [a for r in earlier for a in watcher.add(r)]
        emit("records", {"records": earlier, "alarms": fired, "earlier": True})
        if fired and stop_on_alarm:
            emit("stopped", {"reason": "alarm"})
            return WatchResult("alarm", len(watcher.records), watcher.alarms)
    last_new = time.monotonic()
    waiting_said = ""

    def finish(reason: str) -> WatchResult:
        emit("stopped", {"reason": reason})
        return WatchResult(reason, len(watcher.records), watcher.alarms)

    while True:
        new, pending, msg = source.poll()
        if msg and msg != waiting_said and not new:
            emit("waiting", {"message": msg})
            waiting_said = msg
        if new:
            last_new, waiting_said = time.monotonic(), ""
            reason = _take(watcher, new, emit, stop_on_alarm=stop_on_alarm, until_step=until_step)
            if reason:
                return finish(reason)
        if watcher.done or (source.done_file() and not new and not pending):
            # a DONE file may land before the last lines are read: read once more first
            rest = source.read_rest()
            if rest and _take(watcher, rest, emit, stop_on_alarm=stop_on_alarm, until_step=None) == "alarm":
                return finish("alarm")
            return finish("done")
        if max_wait is not None and time.monotonic() - last_new > max_wait:
            return finish("max_wait")
        sleep(interval)


def _take(watcher: CollapseWatcher, records: list[dict[str, Any]], emit: Callable[[str, dict[str, Any]], None], *,
          stop_on_alarm: bool, until_step: int | None) -> str | None:
    """Hand new records to the watcher and report them; the reason to stop now, if any."""
    fired = [a for r in records for a in watcher.add(r)]
    emit("records", {"records": records, "alarms": fired})
    if fired and stop_on_alarm:
        return "alarm"
    if until_step is not None and any(isinstance(r.get("step"), int) and r["step"] >= until_step for r in records):
        return "until_step"
    return None


def check_run_dir(run_dir: Path) -> None:
    """``run_dir`` is a folder, or does not exist yet (a run that has not started): else refuse at once.

    Raises:
        DataError: it is a file (``metrics.jsonl`` itself, a checkpoint) or something else that is not a
            folder; waiting for it to become a run folder would never end.
    """
    if (run_dir.exists() or run_dir.is_symlink()) and not run_dir.is_dir():
        hint = f"; give its folder, {str(run_dir.parent)!r}" if run_dir.name == "metrics.jsonl" else ""
        raise DataError(f"--watch {str(run_dir)!r} is a file, not a run folder (featviz train -o RUN_DIR writes "
                        f"RUN_DIR/metrics.jsonl){hint}")


class _RunSource:
    """Where a watched run's records come from.

    Its metrics file, or (with ``checkpoint_metrics`` and no metrics file) its checkpoints, each
    measured once its size stops changing.
    """

    def __init__(self, run_dir: Path, filename: str, checkpoint_metrics: Callable[[Path], dict[str, Any]] | None):
        self.run_dir, self.checkpoint_metrics = run_dir, checkpoint_metrics
        self.tail = JsonlTail(run_dir / filename)
        self.seen: dict[Path, tuple[int, float]] = {}
        self.measured: set[Path] = set()

    def poll(self) -> tuple[list[dict[str, Any]], bool, str]:
        """New records, whether checkpoints still wait to be measured, and what is being waited for.

        Raises:
            DataError: the run folder is a file (or anything but a folder): there is nothing to wait for.
        """
        check_run_dir(self.run_dir)
        if not self.run_dir.is_dir():
            return [], False, f"waiting for {self.run_dir} to appear"
        if self.tail.path.exists() or self.checkpoint_metrics is None:
            msg = "" if self.tail.path.exists() else f"waiting for {self.tail.path}"
            if msg and self.checkpoint_metrics is None and _checkpoints(self.run_dir):
                msg += " (checkpoints are there: pass --images DIR to compute metrics from them)"
            return self.tail.read(), False, msg
        new, pending = self._checkpoint_records()
        return new, pending, f"waiting for checkpoints in {self.run_dir}"

    def _checkpoint_records(self) -> tuple[list[dict[str, Any]], bool]:
        new: list[dict[str, Any]] = []
        pending = False
        for ck in _checkpoints(self.run_dir):
            if ck in self.measured:
                continue
            pending = True
            st = ck.stat()
            sig = (st.st_size, st.st_mtime)
            if self.seen.get(ck) != sig:  # still being written, or just appeared: look again next poll
                self.seen[ck] = sig
                continue
            self.measured.add(ck)
            try:
                rec = {"step": _step_of(ck, len(self.measured) - 1), "checkpoint": ck.name, "split": "held_out",
                       **self.checkpoint_metrics(ck)}  # the same images every time: held-out records
            except FeatvizError as e:  # one unreadable checkpoint must not end the watch
                log.warning("skipping %s: %s", ck.name, e)
                continue
            new.append(rec)
        return new, pending

    def done_file(self) -> bool:
        return (self.run_dir / DONE_FILE).exists()

    def read_rest(self) -> list[dict[str, Any]]:
        return self.tail.read() if self.run_dir.is_dir() else []


@dataclass
class FollowResult:
    """How ``follow_run`` ended, and where its outputs are."""

    reason: str
    records: int
    alarms: list[dict[str, Any]]
    last: dict[str, Any]
    out_dir: Path
    snapshots: list[str] = field(default_factory=list)

    @property
    def curves(self) -> Path:
        """The curves plot, ``out_dir/curves.png``."""
        return self.out_dir / "curves.png"

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` summary: reason, records, alarms, last record, curves path, snapshots."""
        return {"reason": self.reason, "records": self.records, "alarms": self.alarms, "last": self.last,
                "curves": str(self.curves), "snapshots": self.snapshots}


def snapshot_path(run_dir: str | os.PathLike, rec: dict[str, Any]) -> Path | None:
    """The file a ``{"event": "snapshot"}`` record names (``featviz.maps.snapshot``), inside ``run_dir``; else None.

    The path is read from the run's own ``metrics.jsonl``: only a relative path that stays inside the
    run folder is named (the file is never opened here).
    """
    rel = rec.get("path")
    if rec.get("event") != "snapshot" or not isinstance(rel, str) or not rel or os.path.isabs(rel) \
            or ".." in Path(rel).parts:
        return None
    return Path(run_dir) / rel


STOP_REASONS = {"done": "the run finished", "until_step": "reached --until-step",
                "max_wait": "nothing new for --max-wait", "alarm": "collapse alarm"}


def follow_run(run_dir: str | os.PathLike, *, watcher: CollapseWatcher | None = None,
               out_dir: str | os.PathLike | None = None, force: bool = False, interval: float = 2.0,
               max_wait: float | None = None, until_step: int | None = None, stop_on_alarm: bool = False,
               checkpoint_metrics: Callable[[Path], dict[str, Any]] | None = None,
               on_event: Callable[[str, dict[str, Any]], None] | None = None, title: str | None = None,
               plot_every: float = 5.0) -> FollowResult:
    """``featviz collapse --watch``: follow a run, keep ``curves.png`` current, save what is computed.

    Wraps ``watch``: the curves are redrawn at most every ``plot_every`` seconds and once at the
    end, into ``out_dir`` (default ``RUN_DIR/collapse-watch``); records computed from checkpoints
    (``checkpoint_metrics``) are appended to ``out_dir/metrics.jsonl`` so they are not lost.
    ``on_event`` receives ``watch``'s events (for a live display).

    A restarted watch resumes its own output: when ``out_dir`` is a folder an earlier
    ``collapse --watch`` wrote (its marker says so, and lists the files this one writes), it is
    reused without ``force``; the curves are redrawn from the run's records, and the records it
    computed from checkpoints are read back (shown first, not measured again) and appended to.

    Raises:
        OutputExistsError: ``out_dir`` exists and ``force`` is False.
        DataError: no metrics appeared before ``max_wait``.
    """
    from featviz.collapse.plots import plot_curves
    from featviz.io.outputs import check_output, prepare_folder, read_marker

    run_dir = Path(run_dir)
    check_run_dir(run_dir)  # at once: a file never becomes a run folder
    out = Path(out_dir) if out_dir is not None else run_dir / "collapse-watch"
    files = ["curves.png"] + (["metrics.jsonl"] if checkpoint_metrics is not None else [])
    resume = not force and out.is_dir() and read_marker(out).get("command") == WATCH_COMMAND \
        and set(files) <= set(read_marker(out).get("files") or ())
    if not resume:
        check_output(out, force=force, folder=True)  # now; the folder is made when the first record arrives
    earlier = JsonlTail(out / "metrics.jsonl").read() if resume and checkpoint_metrics is not None else []
    watcher = watcher or CollapseWatcher()
    title = title or f"collapse watch: {run_dir}"
    last_plot = [0.0]
    prepared = [resume]

    def prepare() -> None:
        if not prepared[0]:
            prepare_folder(out, files, force=force, command=WATCH_COMMAND)
            prepared[0] = True

    def redraw(final: bool = False) -> None:
        if watcher.records and (final or time.monotonic() - last_plot[0] > plot_every):
            prepare()
            plot_curves(watcher.records, out / "curves.png", std_fraction=watcher.std_fraction, title=title)
            last_plot[0] = time.monotonic()

    def event(kind: str, info: dict[str, Any]) -> None:
        if kind == "records":
            if checkpoint_metrics is not None and not info.get("earlier"):  # keep what was computed from checkpoints
                prepare()
                for r in info["records"]:
                    append_jsonl(out / "metrics.jsonl", {k: v for k, v in r.items() if not k.startswith("_")})
        if on_event is not None:
            on_event(kind, info)
        if kind == "records":
            redraw()

    result = watch(run_dir, watcher=watcher, interval=interval, max_wait=max_wait, until_step=until_step,
                   stop_on_alarm=stop_on_alarm, checkpoint_metrics=checkpoint_metrics, on_event=event,
                   earlier=earlier)
    redraw(final=True)
    if not result.records:
        raise DataError(f"no metrics appeared in {run_dir} within --max-wait {max_wait:g} s; is the run writing "
                        "metrics.jsonl (CollapseMonitor / featviz train)?")
    last = {k: v for k, v in watcher.records[-1].items() if not k.startswith("_")}
    snaps = [str(p) for p in (snapshot_path(run_dir, r) for r in watcher.records) if p is not None]
    return FollowResult(result.reason, result.records, result.alarms, last, out, snaps)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
