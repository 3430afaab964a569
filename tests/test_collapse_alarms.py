"""`featviz collapse --watch` alarms on the README's own runs, and a restarted watch.

``sample_data/runs`` holds the metrics of ``featviz train -m simsiam -d digits`` (the README's
healthy run: 10 epochs, batch 32, 440 steps) and of the same run with ``--no-stop-grad`` (SimSiam
without stop-gradient, which collapses). With one RankMe peak across held-out records (359 rows,
RankMe 24) and 32-row training batches (RankMe ≤ 32, falling early in every run), the healthy run
raised 9 "RankMe fell" alarms and ``--fail-on-collapse`` exited 3.
"""

from __future__ import annotations

import json

import pytest

from featviz.collapse import CollapseWatcher, JsonlTail


@pytest.fixture
def runs(sample_dir):
    return sample_dir / "runs"


def _watch_failing(cli, run, out):
    """`featviz collapse --watch RUN --fail-on-collapse` on a finished run."""
    return cli("collapse", "--watch", run, "--fail-on-collapse", "--interval", "0.01", "--max-wait", "60", "--out", out)


def _records(path):
    return JsonlTail(path / "metrics.jsonl").read()


def test_the_healthy_readme_run_raises_no_alarm_and_exits_0(cli, runs, tmp_path):
    res = _watch_failing(cli, runs / "simsiam_digits", tmp_path / "w")
    assert res.exit_code == 0, res.output
    assert "ALARM" not in res.output and "54 records, 0 alarms" in res.stderr
    lines = [x for x in res.stdout.splitlines() if x.startswith("step ")]
    assert len(lines) == 54 and sum("held-out" in x for x in lines) == 10  # piped: one plain line per record
    assert "step 440  held-out  n=359" in res.stdout and "knn_acc=0.9415" in res.stdout


def test_the_old_single_peak_rule_raised_the_false_alarm(runs):
    """The bug, shown on the same records: batches against the held-out peak."""
    recs = [r for r in _records(runs / "simsiam_digits") if "rankme" in r]
    peak, falls = 0.0, 0
    for r in recs:
        falls += r["rankme"] < 0.5 * peak
        peak = max(peak, r["rankme"])
    assert falls >= 9 and peak == pytest.approx(24.0, abs=0.1)
    w = CollapseWatcher()  # the rules per kind of record
    assert [a for r in recs for a in w.add(dict(r))] == []


def test_the_no_stop_gradient_run_alarms_and_exits_3(cli, runs, tmp_path):
    res = _watch_failing(cli, runs / "simsiam_digits_nostopgrad", tmp_path / "w")
    assert res.exit_code == 3, res.output
    assert "ALARM" in res.stderr and "RankMe on training batch records (32 rows)" in res.stderr
    summary = json.loads(
        cli(
            "collapse",
            "--watch",
            runs / "simsiam_digits_nostopgrad",
            "--interval",
            "0.01",
            "--json",
            "--out",
            tmp_path / "w2",
        ).stdout
    )
    kinds = {(a["kind"], a["record"]) for a in summary["alarms"]}
    assert kinds == {("rankme", "training batch"), ("rankme", "held-out")}  # both kinds of record see it
    held = next(a for a in summary["alarms"] if a["record"] == "held-out")
    assert held["n"] == 359 and held["value"] < held["threshold"] == pytest.approx(0.5 * 2.9698, rel=1e-3)
    assert "from its peak 2.97 at step 44" in held["message"]


def test_a_restarted_watch_resumes_its_own_output(cli, runs, tmp_path):
    out = tmp_path / "w"
    args = ("collapse", "--watch", runs / "simsiam_digits", "--interval", "0.01", "--max-wait", "60", "--out", out)
    assert cli(*args).exit_code == 0
    first = (out / "curves.png").stat().st_mtime_ns
    again = cli(*args)  # no --force: the folder is this command's own
    assert again.exit_code == 0, again.output
    assert "54 records" in again.stderr and (out / "curves.png").stat().st_mtime_ns > first
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused = cli("collapse", "--watch", runs / "simsiam_digits", "--interval", "0.01", "--out", other)
    assert refused.exit_code == 1 and "not written by featviz" in refused.output  # a foreign folder is still refused
