"""`featviz demo`: every output on the bundled data, the commands that made them, and an HTML report
that opens in a real headless browser."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

EXPECTED = ["inspect.json", "digits_tsne.png", "digits.npz", "cac_figure.png", "cac_figure.json",
            "cam_photos/contact_sheet.png", "cam_seg/contact_sheet.png", "attention_photos/contact_sheet.png",
            "pca_photos/sheet.png", "similarity_photos/sheet.png", "collapse/report.json",
            "collapse/spectrum.png", "collapse/simsiam_stopgrad.png", "index.html"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from typer.testing import CliRunner

    from featviz.cli import app

    out = tmp_path_factory.mktemp("d") / "demo"
    r = CliRunner().invoke(app, ["demo", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out, r


def test_demo_writes_every_output_and_says_how(demo):
    out, r = demo
    for f in EXPECTED:
        assert (out / f).is_file(), f
    for f in ("inspect.json", "digits_tsne.png", "cac_figure.png", "contact_sheet.png", "index.html"):
        assert f in r.stdout
    assert r.stdout.count("on your data:") >= 6
    report = json.loads((out / "inspect.json").read_text())
    assert report["format"] == "moco" and report["arch"]["name"] == "resnet18_w8-cifar"
    steps = json.loads((out / "demo.json").read_text())
    assert all(s["command"].startswith("featviz ") for s in steps)
    # the commands work from any folder: bundled files as "$S/..." (S=$(featviz sample-data)), never cwd-relative
    assert all(" sample_data/" not in s["command"] for s in steps) and any('"$S/' in s["command"] for s in steps)


def test_demo_files_name_the_final_folder_never_the_temporary_one(demo):
    out, _ = demo
    texts = {p: p.read_text(errors="replace") for p in out.rglob("*") if p.suffix in (".json", ".log", ".html")}
    assert texts
    stale = [str(p) for p, t in texts.items() if ".tmp/" in t or ".tmp\"" in t]
    assert stale == []
    assert json.loads((out / "cam_photos" / "manifest.json").read_text())["arguments"]["out"] == str(out / "cam_photos")


def test_demo_writes_every_figure_the_readme_shows(demo):
    import re

    from featviz.demo import README_FIGURES

    out, _ = demo
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert set(re.findall(r"docs/img/([\w.-]+\.png)", readme)) == set(README_FIGURES)
    for name, made in README_FIGURES.items():
        assert (out / made).is_file(), (name, made)
    man = json.loads((out / "attention_photos" / "manifest.json").read_text())
    assert man["model"]["description"]["source"]["path"].endswith("vit_photos.safetensors")


def test_demo_similarity_of_the_suit_finds_the_suits_not_the_rocket(demo):
    out, _ = demo
    s = json.loads((out / "similarity_photos" / "similarity.json").read_text())
    assert s["queries"][0]["point"] == [60.0, 100.0] and s["queries"][0]["image"] == "astronaut_1.jpg"
    best = {i["id"]: i["queries"][0] for i in s["images"]}
    others = [best[f"astronaut_{k}.jpg"] for k in (0, 2, 3)]
    assert all(q["max"] > 0.9 and q["argmax"][0] >= 3 for q in others), others  # the suit: below the head
    assert best["rocket_0.jpg"]["max"] < min(q["max"] for q in others) - 0.3  # another subject, far less similar
    assert "RANDOM WEIGHTS" not in json.dumps(s)  # a trained model: no caution


def test_demo_photo_cam_explains_the_real_imagenet_model(demo):
    out, _ = demo
    man = json.loads((out / "cam_photos" / "manifest.json").read_text())
    assert man["model"]["arch"] == "timm:efficientnet_lite1" and man["image_size"] == [240, 240]
    top1 = {Path(i["path"]).name: i["target"] for i in man["images"]}
    assert top1["cat_0.jpg"].startswith("class 285 Egyptian cat")
    assert top1["coffee_0.jpg"].startswith("class 967 espresso")
    w, h = Image.open(out / "cam_photos" / "contact_sheet.png").size
    columns = len(man["methods"]) + 1
    assert w >= columns * 240 and h >= len(man["images"]) * 240  # thumbnails at the model's input size or larger


def test_demo_cac_figure_is_on_a_held_out_scene_with_plain_row_labels(demo):
    out, _ = demo
    fig = json.loads((out / "cac_figure.json").read_text())
    val = (Path(__file__).resolve().parents[1] / "sample_data/seg/ImageSets/Segmentation/val.txt").read_text().split()
    assert Path(fig["arguments"]["image"]).stem == "scene_034" and "scene_034" in val
    assert [r["name"] for r in fig["rows"]] == ["supervised only", "CAC"]


def test_demo_figures_are_real_pictures(demo):
    out, _ = demo
    for f in EXPECTED:
        if f.endswith(".png"):
            a = np.asarray(Image.open(out / f).convert("L"), dtype=float)
            assert a.shape[0] > 200 and a.shape[1] > 200 and a.std() > 10, f  # not blank


def test_demo_collapse_numbers_match_the_trained_checkpoint(demo):
    out, _ = demo
    rep = json.loads((out / "collapse" / "report.json").read_text())["outputs"]["digits"]
    assert rep["d"] == 128 and rep["n"] == 1797 and rep["rankme"] > 5  # a trained, uncollapsed encoder


def test_demo_html_is_self_contained_and_renders(demo, tmp_path):
    out, _ = demo
    text = (out / "index.html").read_text()
    assert text.count("data:image/png;base64,") >= 6 and 'src="http' not in text and "file://" not in text
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1280,2000", f"--screenshot={shot}", (out / "index.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    a = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert a.shape == (2000, 1280) and a.std() > 20  # text and figures, not a blank or error page


def test_demo_second_run_replaces_its_own_folder_but_not_a_foreign_one(demo, cli, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    r = cli("demo", "--out", tmp_path)
    assert r.exit_code == 1 and "--force" in r.output
    assert (tmp_path / "mine.txt").read_text() == "keep me"
