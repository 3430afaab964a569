"""`featviz tsne --html/--method` and `featviz embed --tensorboard` from the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from featviz.cli import choices as _names
from featviz.maps import projection as tsne

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


@pytest.fixture(scope="module")
def photos_npz(tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    from featviz.cli import app

    d = tmp_path_factory.mktemp("photos")
    r = CliRunner().invoke(app, ["embed", "--checkpoint", str(SAMPLE / "checkpoints" / "moco_v2_tiny.pth.tar"),
                                 "--images", str(SAMPLE / "photos"), "--image-size", "32",
                                 "--out", str(d / "photos.npz"), "--tensorboard", str(d / "tb")])
    assert r.exit_code == 0, r.output
    return d / "photos.npz"


def test_method_names_match_the_library():
    assert set(_names.MapMethod.__args__) == set(tsne.MAP_METHODS)


@pytest.mark.slow
def test_tsne_html_on_the_sample_photos(cli, photos_npz, tmp_path):
    """The issue's command: one self-contained file, one thumbnail per image."""
    r = cli("tsne", photos_npz, "--out", tmp_path / "map.png", "--html", tmp_path / "map.html")
    assert r.exit_code == 0, r.output
    html = (tmp_path / "map.html").read_text()
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"
    assert not re.search(r"<script[^>]+src=", html)
    assert len(set(re.findall(r"data:image/webp;base64,[A-Za-z0-9+/=]+", html))) == 20
    assert str(tmp_path / "map.html") in r.output


def test_embed_tensorboard_wrote_the_projector(photos_npz):
    tb = photos_npz.parent / "tb"
    assert (tb / "projector_config.pbtxt").is_file()
    assert (tb / "00000" / "featviz" / "sprite.png").is_file()


def test_pca_json_and_bad_outputs(cli, photos_npz, tmp_path):
    r = cli("tsne", photos_npz, "--method", "pca", "--out", tmp_path / "p.png", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["method"] == "pca" and summary["n_per_input"] == [20]
    bad = cli("tsne", photos_npz, "--out", tmp_path / "q.png", "--html", tmp_path / "q.htm1")
    assert bad.exit_code == 1 and "--html must end in .html" in bad.output
    assert not (tmp_path / "q.png").exists()  # checked before any work
    again = cli("tsne", photos_npz, "--method", "pca", "--out", tmp_path / "p.png")
    assert again.exit_code == 1 and "--force" in again.output


def test_cac_figure_html(cli, tmp_path):
    """`--figure cac --html`: every view of every row linked; a crop around each pixel per view."""
    seg = SAMPLE / "seg"
    args = ["tsne", "--figure", "cac", "--arch", "resnet18_w16-cifar", "--model-seed", "0", "--model-seed", "1",
            "--image", seg / "JPEGImages/scene_003.jpg", "--mask", seg / "SegmentationClass/scene_003.png",
            "--crop-size", "64", "--base-size", "80", "--max-pixels", "40", "--iterations", "100",
            "--out", tmp_path / "fig.png", "--html", tmp_path / "fig.html"]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    html = (tmp_path / "fig.html").read_text()
    n = json.loads((tmp_path / "fig.json").read_text())["n_pixels"]
    assert len(set(re.findall(r"data:image/webp;base64,[A-Za-z0-9+/=]+", html))) == 3 * n
    assert html.count("featviz-panel-5") >= 1  # 2 rows x 3 views
    assert str(tmp_path / "fig.html") in r.output
    bad = cli(*args[:-1], tmp_path / "fig.htm1", "--force")
    assert bad.exit_code == 1 and "--html must end in .html" in bad.output


def test_view_pixels_sit_on_the_labelled_pixel_of_every_view():
    """The page's (y, x) per view: the masks of all three displayed crops carry the point's label there."""
    import numpy as np
    from PIL import Image

    from featviz.data.masks import read_mask
    from featviz.maps import cac_figure as figure

    seg = SAMPLE / "seg"
    img = Image.open(seg / "JPEGImages/scene_003.jpg").convert("RGB")
    mask = read_mask(seg / "SegmentationClass/scene_003.png").astype(np.uint8)
    for seed in (0, 1, 2):  # flips differ between seeds
        v = figure.make_views(img, mask, seed=seed, crop_size=96, base_size=120, stride=8, max_pixels=200)
        yx = figure.view_pixels(v)
        for k, m in enumerate((v.sample.mask1, v.sample.mask2, v.sample.mask1)):
            np.testing.assert_array_equal(m[yx[k][:, 0], yx[k][:, 1]], v.labels)
