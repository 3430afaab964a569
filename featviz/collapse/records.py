"""The records of a run's ``metrics.jsonl``, as a watch reads them; torch-free.

``JsonlTail`` reads complete new lines of the growing file; ``clean_record`` makes each safe to
follow (a record from outside is not trusted: counts whole, text text, numbers numbers);
``record_kind`` says how it was measured (held-out or a training batch), which the alarm rules
keep apart.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class JsonlTail:
    """Read complete new lines of a growing JSONL file (a partial last line waits for its newline)."""

    def __init__(self, path: str | os.PathLike):
        """Follow ``path`` from its start (it may not exist yet)."""
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
            except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past Python's limit
                self.bad_lines += 1
                log.warning("%s: skipping a malformed line: %.80r", self.path.name, line)
                continue
            rec, problem = clean_record(rec)
            if problem:
                self.bad_lines += 1
                log.warning("%s: %s: %.80r", self.path.name, problem, line)
            if rec is not None:
                out.append(rec)
        return out


_TEXT_FIELDS = ("event", "split", "kind", "error", "method", "checkpoint", "output", "record", "message")
_COUNT_FIELDS = {"step": 0, "epoch": 0, "n": 0, "d": 1, "n_nonfinite": 0, "uniformity_pairs": 0}  # the least each takes


def clean_record(rec: Any) -> tuple[dict[str, Any] | None, str]:
    """A ``metrics.jsonl`` record made safe to follow, and what was wrong with it ("" when nothing).

    A record must be a JSON object; an ``event`` record passes as it is. Any other needs a whole
    ``step`` ≥ 0. Counts (``step``, ``epoch``, ``n``, ``d`` ≥ 1, ``n_nonfinite``) must be whole
    numbers at least their least value, text fields (``split``, ``kind``, ``error``) text, flags flags,
    lists lists, and every other field a number (or null); a field that is not is dropped.

    Returns:
        ``(record or None, problem)``: None when the line is skipped.
    """
    if not isinstance(rec, dict):
        return None, f"skipping a line that is not a JSON object ({type(rec).__name__})"
    if isinstance(rec.get("event"), str):
        return rec, ""
    step = rec.get("step")
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        return None, f"skipping a record without a whole step ≥ 0 (step {str(step)[:20]!r})"
    clean, dropped = {}, []
    for k, v in rec.items():
        if k in _COUNT_FIELDS:
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= _COUNT_FIELDS[k]
        elif k in _TEXT_FIELDS:
            ok = isinstance(v, str)
        elif isinstance(v, (bool, list)) or v is None:
            ok = True
        else:
            ok = isinstance(v, (int, float))
        if ok:
            clean[k] = v
        else:
            dropped.append(f"{k}={str(v)[:20]!r}")
    return clean, f"step {step}: ignoring field(s) of the wrong type or range: {', '.join(dropped)}" * bool(dropped)


RECORD_KINDS = {"held_out": "held-out", "train_batch": "training batch"}


def record_kind(rec: dict[str, Any]) -> str:
    """How a record was measured: "held-out" (a fixed set of images, eval mode) or "training batch".

    From its ``split`` (``held_out``/``train_batch``, as ``featviz train`` and ``FeatvizMonitor``
    write it); a record without one (``CollapseMonitor`` in a plain loop) is a training batch.
    """
    return RECORD_KINDS.get(rec.get("split"), rec.get("split") or "training batch")
