"""`featviz collapse` end to end: embedding files, checkpoints/random init, bad input, --watch."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from featviz.collapse import CollapseMonitor, append_jsonl
from featviz.io.artifacts import Embeddings
from featviz.models.description import describe


@pytest.fixture
def emb(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((600, 32)).astype(np.float32)
    a = Embeddings(z, None).save(tmp_path / "a" / "emb.npz")
    b = Embeddings(z + 0.1 * rng.standard_normal(z.shape).astype(np.float32), None).save(tmp_path / "b" / "emb.npz")
    return a, b, z


def _json(res):
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_embeddings_json_and_outputs(cli, emb, tmp_path):
    a, b, z = emb
    out = tmp_path / "out"
    data = _json(cli("collapse", a, "--positives", b, "--json", "--out", out))
    for key in ("std_l2", "std_l2_ideal", "collapse_level", "alignment", "uniformity", "rankme",
                "effective_rank", "n", "d", "alpha_req", "alpha_req_r2", "uniformity_ci95"):
        assert key in data, key
    assert data["n"] == 600 and data["d"] == 32 and data["flags"] == []
    assert data["std_l2"] == pytest.approx(data["std_l2_ideal"], rel=0.03)
    assert 0 < data["alignment"] < 0.05
    report = json.loads((out / "report.json").read_text())
    assert report["command"] == "collapse" and "rankme" in report["definitions"]
    assert len(report["outputs"]["emb"]["singular_values"]) == 32
    assert (out / "spectrum.png").stat().st_size > 10_000
    again = cli("collapse", a, "--out", out)  # never overwrite without --force
    assert again.exit_code == 1 and "--force" in again.output


def test_npy_memmap_and_table(cli, tmp_path):
    z = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    res = cli("collapse", tmp_path / "z.npy", "--uniformity-exact-max", "100", "--uniformity-pairs", "2000")
    assert res.exit_code == 0, res.output
    assert "rankme" in res.stdout and "95 % CI" in res.stdout and "pairs" in res.stdout


def test_collapsed_embeddings_flagged_and_fail_on_collapse(cli, tmp_path):
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((400, 1)) * rng.standard_normal((1, 32))).astype(np.float32)  # sign-symmetric rank 1
    path = Embeddings(z, None).save(tmp_path / "r1.npz")
    res = cli("collapse", path)
    assert res.exit_code == 0 and "dimensional collapse" in res.stdout
    assert cli("collapse", path, "--fail-on-collapse").exit_code == 3


def test_nonfinite_refused_then_dropped(cli, tmp_path):
    z = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    z[:3] = np.nan
    path = tmp_path / "bad.npy"
    np.save(path, z)
    res = cli("collapse", path)
    assert res.exit_code == 1 and "3 of 100 rows" in res.output and "--drop-nonfinite" in res.output
    assert "Traceback" not in res.output
    data = _json(cli("collapse", path, "--drop-nonfinite", "--json"))
    assert data["n"] == 97 and data["n_nonfinite"] == 3


@pytest.mark.parametrize("shape,msg", [((50, 1), "D=1"), ((1, 8), "N=1")])
def test_degenerate_shapes(cli, tmp_path, shape, msg):
    np.save(tmp_path / "z.npy", np.ones(shape, np.float32))
    res = cli("collapse", tmp_path / "z.npy")
    assert res.exit_code == 1 and msg in res.output


def test_positives_mismatch_and_usage_errors(cli, emb, tmp_path):
    a, _, z = emb
    short = Embeddings(z[:-1], None).save(tmp_path / "short.npz")
    res = cli("collapse", a, "--positives", short)
    assert res.exit_code == 1 and "positives have shape (599, 32)" in res.output
    assert cli("collapse").exit_code == 2  # no input at all
    assert cli("collapse", a, "--watch", tmp_path).exit_code == 2  # two inputs
    assert cli("collapse", "--arch", "resnet18_w16-cifar").exit_code == 2  # no --images
    assert cli("collapse", a, "--alpha-range", "5").exit_code == 2
    assert cli("collapse", a, "--pixels").exit_code == 2  # a flag that would change nothing is refused
    assert cli("collapse", "--watch", tmp_path, "--positives", a).exit_code == 2
    missing = cli("collapse", tmp_path / "nope.npz")
    assert missing.exit_code == 1 and "does not exist" in missing.output


# ------------------------------------------------------------------ --watch
def _fake_run(run_dir, steps, delay, collapse_at=None, watching=None):
    """A training run that appears late and writes metrics while being watched.

    With ``watching`` (an Event), the run appears only once the watcher has polled and said it is
    waiting, however long its start takes on a loaded machine.
    """
    if watching is not None:
        assert watching.wait(120), "the watcher never polled"
    time.sleep(delay)
    rng = np.random.default_rng(0)
    with CollapseMonitor(run_dir, every=1) as mon:
        for s in steps:
            k = 1 if collapse_at is not None and s >= collapse_at else 16
            z = rng.standard_normal((256, k)) @ rng.standard_normal((k, 16))
            mon.update(z.astype(np.float32), step=s, loss=1.0 / (s + 1))
            time.sleep(delay)


def _signal_first_wait(monkeypatch) -> threading.Event:
    """An Event set when the watcher's first poll finds nothing and says what it waits for."""
    from featviz.collapse import monitor

    watching = threading.Event()
    poll = monitor._RunSource.poll

    def signalling(self):
        new, pending, msg = poll(self)
        if msg and not new:
            watching.set()
        return new, pending, msg

    monkeypatch.setattr(monitor._RunSource, "poll", signalling)
    return watching


def test_watch_follows_a_run_being_written(cli, tmp_path, monkeypatch):
    run = tmp_path / "run"  # does not exist yet: the watcher waits for it
    # the run starts only after the watcher's first poll (not after a fixed 0.15 s, which a loaded
    # machine can spend importing the command: then the folder was there before the first poll)
    t = threading.Thread(target=_fake_run, args=(run, range(0, 50, 10), 0.05),
                         kwargs={"watching": _signal_first_wait(monkeypatch)})
    t.start()
    res = cli("collapse", "--watch", run, "--interval", "0.05", "--max-wait", "60")
    t.join()
    assert res.exit_code == 0, res.output
    assert "waiting for" in res.stderr and "the run finished" in res.stderr and "5 records" in res.stderr
    lines = [x for x in res.stdout.splitlines() if x.startswith("step ")]  # piped: one plain line per record
    assert [x.split()[1] for x in lines] == ["0", "10", "20", "30", "40"]
    assert all("training batch" in x and "rankme=" in x and x.endswith("status=ok") for x in lines)
    assert (run / "collapse-watch" / "curves.png").stat().st_size > 10_000


def test_watch_alarm_fails_the_run(cli, tmp_path):
    run = tmp_path / "run"
    t = threading.Thread(target=_fake_run, args=(run, range(10), 0.05, 5))
    t.start()
    res = cli("collapse", "--watch", run, "--interval", "0.05", "--max-wait", "20", "--fail-on-collapse",
              "--out", tmp_path / "w")
    t.join()
    assert res.exit_code == 3, res.output
    # a plain loop's records are training batches: RankMe is compared with min(N, D), not with a peak
    assert "ALARM" in res.stderr and "step 5" in res.stderr
    assert "RankMe on training batch records (256 rows) is 1 < 0.1 × min(N, D) = 1.6" in res.stderr
    summary = json.loads(cli("collapse", "--watch", run, "--interval", "0.02", "--json", "--out", tmp_path / "w",
                             "--force").stdout)  # the finished run, read again: a JSON summary for scripts
    assert summary["reason"] == "done" and summary["records"] == 10 and summary["last"]["step"] == 9
    assert [a["kind"] for a in summary["alarms"]] == ["rankme"] and summary["alarms"][0]["step"] == 5
    alarm = summary["alarms"][0]
    assert alarm["record"] == "training batch" and alarm["n"] == 256 and alarm["threshold"] == pytest.approx(1.6)
    assert alarm["value"] < 1.6


def test_watch_until_step_partial_lines_and_max_wait(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for s in range(3):
        append_jsonl(run / "metrics.jsonl", {"step": s, "std_l2": 0.2, "std_l2_ideal": 0.25, "rankme": 10.0, "d": 16})
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "std_l2"')  # a line still being written is not read
    res = cli("collapse", "--watch", run, "--interval", "0.02", "--max-wait", "0.3", "--out", tmp_path / "w")
    assert res.exit_code == 0 and "3 records" in res.stderr and "nothing new" in res.stderr
    res = cli("collapse", "--watch", run, "--interval", "0.02", "--until-step", "1", "--out", tmp_path / "w", "--force")
    assert res.exit_code == 0 and "reached step 1" in res.stderr


def test_watch_gives_up_on_a_run_that_never_appears(cli, tmp_path):
    res = cli("collapse", "--watch", tmp_path / "never", "--interval", "0.02", "--max-wait", "0.2")
    assert res.exit_code == 1 and "no metrics appeared" in res.output and "waiting for" in res.stderr


def test_checkpoint_with_projector_two_views_and_pixels(cli, sample_dir, tmp_path):
    import torch

    from featviz.models.architectures import build_backbone
    from featviz.models.checkpoints import save_featviz
    from featviz.models.heads import build_head

    m = build_backbone("resnet18_w16-cifar", seed=1)
    specs = {"projector": {"type": "mlp", "dims": [128, 64, 32], "bn": True, "last_bn": True},
             "predictor": {"type": "mlp", "dims": [32, 16, 32], "bn": True}}
    tensors = {f"backbone.{k}": v for k, v in m.state_dict().items()}
    for name, spec in specs.items():
        head = build_head(spec)
        for p in head.parameters():
            torch.nn.init.normal_(p)
        tensors.update({f"{name}.{k}": v for k, v in head.state_dict().items()})
    ck = save_featviz(tmp_path / "ck.safetensors", tensors, {"arch": describe(m).arch.to_dict(), "heads": specs,
                      "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}, "source_format": "featviz"})
    res = cli("collapse", "--checkpoint", ck, "--images", sample_dir / "photos", "--json", "--batch-size", "8",
              "--device", "cpu", "--pixels", "--pixels-per-image", "16", "--out", tmp_path / "o")
    data = _json(res)
    assert set(data["outputs"]) == {"backbone", "projector", "predictor", "pixels"}
    assert data["n"] == 20 and data["d"] == 128
    assert data["outputs"]["projector"]["d"] == 32 and data["outputs"]["predictor"]["d"] == 32
    assert data["outputs"]["pixels"]["n"] == 20 * 16
    assert data["alignment"] > 0  # two different augmented views
    assert (tmp_path / "o" / "spectrum.png").exists()


def test_watch_checkpoints_as_they_appear(cli, sample_dir, tmp_path):
    from featviz.models.architectures import build_backbone
    from featviz.models.checkpoints import save_featviz

    run = tmp_path / "ckpts"
    run.mkdir()
    for epoch in (1, 2):
        m = build_backbone("resnet18_w16-cifar", seed=epoch)
        save_featviz(run / f"epoch_{epoch:03d}.safetensors", {f"backbone.{k}": v for k, v in m.state_dict().items()},
                     {"arch": describe(m).arch.to_dict(), "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    (run / "broken.pth").write_bytes(b"not a checkpoint")  # skipped with a warning, the watch goes on
    (run / "DONE").touch()
    out = tmp_path / "w"
    res = cli("collapse", "--watch", run, "--images", sample_dir / "photos", "--interval", "0.05",
              "--max-wait", "60", "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2] and recs[0]["checkpoint"] == "epoch_001.safetensors"
    assert all(r["output"] == "backbone" and r["n"] == 20 for r in recs)
    assert "skipping broken.pth" in res.stderr and "the run finished" in res.stderr
    again = cli("collapse", "--watch", run, "--images", sample_dir / "photos", "--interval", "0.05",
                "--max-wait", "60", "--out", out, "--device", "cpu")  # restarted: no --force, nothing measured twice
    assert again.exit_code == 0, again.output
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert "2 records" in again.stderr and [x.split()[1] for x in again.stdout.splitlines()
                                            if x.startswith("step ")] == ["1", "2"]


def test_watch_trend_compares_records_measured_the_same_way():
    from featviz.collapse import CollapseWatcher

    w = CollapseWatcher()
    for rec in ({"step": 5, "split": "train_batch", "rankme": 10.0}, {"step": 10, "split": "held_out", "rankme": 2.0},
                {"step": 15, "split": "train_batch", "rankme": 10.1}, {"step": 20, "split": "held_out", "rankme": 4.0}):
        w.add(rec)
    assert w.trend("rankme", 1) == ""  # the first held-out record has nothing to compare with
    assert w.trend("rankme", 2) == "→"  # against step 5, not the held-out step 10
    assert w.trend("rankme", 3) == "↑"
