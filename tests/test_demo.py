"""`featviz demo` runs on the bundled data and says where each output is and how to make it."""

from __future__ import annotations

import json


def test_demo_writes_outputs_and_commands(cli, tmp_path):
    out = tmp_path / "demo"
    r = cli("demo", "--out", out)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "inspect.json").read_text())
    assert report["format"] == "moco" and report["arch"]["name"] == "resnet18_w8-cifar"
    assert any(row["name"] == "layer4" for row in json.loads((out / "layers.json").read_text()))
    assert "featviz inspect" in r.stdout and str(out / "inspect.json") in r.stdout
    # a second run replaces its own earlier output without --force
    assert cli("demo", "--out", out).exit_code == 0


def test_demo_refuses_a_foreign_folder(cli, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    r = cli("demo", "--out", tmp_path)
    assert r.exit_code == 1 and "--force" in r.output
    assert (tmp_path / "mine.txt").read_text() == "keep me"
