"""benchmarks/gpu_suite.py: the skip line without CUDA, a tiny CPU section end to end, the capped maps rows."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"


@pytest.fixture(scope="module")
def suite_mod():
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def test_no_cuda_prints_one_skip_line_and_exits_0(tmp_path):
    out = tmp_path / "s.json"
    res = _run("--json", str(out))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_suite: skipped: no CUDA device"), res.stdout
    assert "--cpu-small" in lines[0]
    data = json.loads(out.read_text())
    assert data["skipped"] == lines[0] and data["rows"] == []


def test_cpu_small_cam_section_matches_pytorch_grad_cam(suite_mod, tmp_path, monkeypatch, capsys, one_thread):
    """One real section through main() on CPU: both sides timed, the maps equal, the row in the table and the JSON."""
    out = tmp_path / "cam.json"
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--cpu-small", "--sections", "cam", "--json", str(out)])
    suite_mod.main()
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["meta"]["mode"] == "cpu-small" and data["meta"]["device"] == "cpu"
    (row,) = data["rows"]
    assert row["section"] == "cam" and row["status"] == "ok", row
    assert row["featviz"] > 0 and row["baseline"] > 0 and row["unit"] == "img/s"
    assert row["ratio"] == pytest.approx(row["featviz"] / row["baseline"])
    assert row["max_map_difference"] < 1e-4  # featviz's Grad-CAM is pytorch-grad-cam's
    assert "| cam | Grad-CAM resnet18 layer4" in printed and "wall time" in printed


def test_clock_rate_is_steady_state(suite_mod):
    clock = suite_mod.Clock()
    clock.t, clock.sizes = [0.0, 5.0, 6.0, 7.0, 8.0], [4, 4, 4, 2]  # a slow first batch (warm-up)
    assert clock.rate(1) == pytest.approx(10 / 3)  # batches 1..3: 10 images in 3 s
    assert clock.rate(1, per_item=True) == pytest.approx(1.0)
    assert clock.rate(10) == pytest.approx(6 / 2)  # never skips all: the last two batches at least
    views = suite_mod.Clock()
    list(views([([np.zeros((3, 1)), np.zeros((3, 1))], None, None)]))  # training views: a list per batch
    assert views.sizes == [3] and len(views.t) == 2


def test_capped_run_is_killed_at_its_cap(suite_mod, tmp_path):
    t = time.perf_counter()
    dt, rc, text = suite_mod._run_capped([sys.executable, "-c", "import time; print('started', flush=True); "
                                          "time.sleep(60)"], 2.0, tmp_path / "log")
    assert rc is None and 2.0 <= dt < 20 and time.perf_counter() - t < 20
    assert "started" in text
    dt, rc, text = suite_mod._run_capped([sys.executable, "-c", "print('{\"a\": {\"knn_recall@10\": 0.5}}')"], 30,
                                         tmp_path / "log2")
    assert rc == 0 and suite_mod._quality(suite_mod._last_json(text)) == {"a.knn_recall@10": 0.5}


def test_maps_rows_report_capped_peers_and_the_missing_backend(suite_mod, tmp_path):
    """The maps section at a toy size with 1-s caps: each row says what ran, what was capped and why."""
    import torch

    args = argparse.Namespace(json=str(tmp_path / "m.json"), budget=1e9)
    suite = suite_mod.Suite(args, {"mode": "test"})
    cfg = dict(map_n=300, map_dim=8, map_caps={"featviz": 1, "opentsne": 1, "umap-learn": 1})
    suite_mod.section_maps(suite, cfg, torch.device("cpu"), tmp_path)
    assert [r["case"].split()[0] for r in suite.rows] == ["t-SNE", "UMAP"]
    help_text = subprocess.run([sys.executable, "-m", "featviz", "tsne", "--help"], capture_output=True, text=True,
                               cwd=ROOT, env={**os.environ, "COLUMNS": "200"}).stdout
    for row in suite.rows:
        assert row["baseline"] == "did not finish in 1 s" or isinstance(row["baseline"], float), row
        if "--backend" not in help_text:  # issue 27's TorchDR backend not merged yet
            assert row["status"] == "skipped" and "--backend" in row["notes"] and row["featviz"] is None
        else:
            assert row["featviz"] is not None and row["status"] in ("ok", "capped", "failed")
    saved = json.loads((tmp_path / "m.json").read_text())
    assert len(saved["rows"]) == 2
    table = suite_mod.table(suite.rows)
    assert table.count("\n| maps |") == 2
