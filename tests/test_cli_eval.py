"""The knn, probe, attention and pca commands as a user runs them: JSON contracts and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featviz.io.artifacts import Embeddings


def one_line_error(result, match: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    text = result.output.strip()
    assert "Traceback" not in text and text.startswith("error:"), text
    assert match in " ".join(text.split()), text


def test_knn_json_contract(cli):
    r = cli("knn", "--images", "digits", "--k", "10,20", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert [e["k"] for e in d["knn"]] == [10, 20] and d["n_train"] == 1437 and d["n_val"] == 360
    assert set(d["knn"][0]) == {"k", "temperature", "top1", "top5"} and 0.95 < d["knn"][1]["top1"] <= 1.0


def test_probe_json_contract(cli):
    r = cli("probe", "--images", "digits", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["top1"] >= 0.94 and d["top5"] >= d["top1"] and d["C"] == 1.0


def test_knn_human_output_states_the_protocol(cli):
    r = cli("knn", "--images", "digits", "--k", "20")
    assert r.exit_code == 0, r.output
    assert "raw pixels" in r.output and "stratified" in r.output and "97.50 %" in r.output


@pytest.mark.parametrize(("args", "match"), [
    (["--images", "digits", "--k", "10,x"], "--k expects comma-separated positive integers"),
    (["--train", "missing.npz", "--val", "missing.npz"], "does not exist"),
    (["--images", "digits", "--train", "a.npz"], "give exactly one input"),
    (["--images", "digits", "--temperature", "0"], "--temperature must be > 0"),
])
def test_knn_bad_input(cli, args, match):
    one_line_error(cli("knn", *args), match, code=2 if "--k expects" in match else 1)  # a malformed --k is usage


def test_knn_mismatched_dims(cli, tmp_path):
    Embeddings(np.ones((10, 8)), np.arange(10) % 2).save(tmp_path / "a" / "e.npz")
    Embeddings(np.ones((10, 4)), np.arange(10) % 2).save(tmp_path / "b" / "e.npz")
    one_line_error(cli("knn", "--train", tmp_path / "a" / "e.npz", "--val", tmp_path / "b" / "e.npz"),
                   "has 8-d features but e.npz has 4-d")


def test_attention_on_a_cnn_points_to_cam(cli, tmp_path, sample_dir):
    r = cli("attention", sample_dir / "photos" / "cat" / "cat_0.jpg", "--arch", "resnet18", "--out", tmp_path / "a")
    one_line_error(r, "use `featviz cam`")
    assert not (tmp_path / "a").exists()


def test_pca_writes_once_then_needs_force(cli, tmp_path, sample_dir):
    img = sample_dir / "photos" / "coffee"
    r = cli("pca", img, "--arch", "resnet18", "--layer", "layer3", "--image-size", "96", "--out", tmp_path / "p",
            "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["images"] == 4 and d["grid"] == [6, 6] and (tmp_path / "p" / "sheet.png").exists()
    one_line_error(cli("pca", img, "--arch", "resnet18", "--out", tmp_path / "p"), "--force")
    r = cli("pca", img, "--arch", "resnet18", "--layer", "layer3", "--image-size", "96", "--out", tmp_path / "p",
            "--foreground", "none", "--force")
    assert r.exit_code == 0, r.output
    assert "sheet:" in r.output and "no background removal" in r.output and "foreground:" not in r.output


def test_knn_and_probe_take_the_shared_image_size(cli):
    """--image-size N|HxW as in every other command: the model is run at 16x24; a bad size is a usage error."""
    r = cli("knn", "--arch", "resnet18_w8-cifar", "--images", "digits", "--image-size", "16x24", "--k", "5", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["protocol"]["image_size"] == [16, 24]
    bad = cli("probe", "--images", "digits", "--image-size", "0x3")
    assert bad.exit_code == 2 and "at least 8 px" in bad.output
