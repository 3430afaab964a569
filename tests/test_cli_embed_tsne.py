"""`featviz embed` / `featviz tsne` end to end, and the bad-input list: one line, exit 1, no output."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featviz.io.artifacts import Embeddings

ARCH = "resnet18_w16-cifar"


def _one_error_line(res) -> str:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if "error:" in ln]
    assert len(lines) == 1, res.output
    return res.output


def _no_outputs(folder: Path) -> None:
    left = [p.name for p in folder.iterdir() if p.suffix in (".npz", ".png", ".json") or ".tmp" in p.name]
    assert not left, left


@pytest.fixture
def photos(tmp_path, sample_dir) -> Path:
    dst = tmp_path / "photos"
    shutil.copytree(sample_dir / "photos", dst)
    return dst


@pytest.fixture
def seg(tmp_path, sample_dir) -> Path:
    root = tmp_path / "seg"
    (root / "img").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(3):
        shutil.copy(sample_dir / f"seg/JPEGImages/scene_{i:03d}.jpg", root / "img")
        shutil.copy(sample_dir / f"seg/SegmentationClass/scene_{i:03d}.png", root / "masks")
    return root


@pytest.mark.slow
def test_embed_then_tsne_then_shared_map(cli, tmp_path, photos):
    out = tmp_path / "out"
    out.mkdir()
    r = cli("embed", "--arch", ARCH, "--images", photos, "--image-size", "32", "--out", out / "a.npz")
    assert r.exit_code == 0, r.output
    assert "20 images x 128 dims, 5 classes" in r.output
    r = cli("embed", "--arch", ARCH, "--images", photos, "--image-size", "32", "--seed", "1", "--out", out / "b.npz")
    assert r.exit_code == 0, r.output
    r = cli("tsne", out / "a.npz", out / "b.npz", "--out", out / "maps.png", "--coords", out / "coords.npz",
            "--iterations", "100")
    assert r.exit_code == 0, r.output
    assert (out / "maps.png").read_bytes()[:4] == b"\x89PNG"
    with np.load(out / "coords.npz", allow_pickle=False) as z:
        assert list(z["group_names"]) == ["a", "b"] and z["coords"].shape == (40, 2)
    r = cli("tsne", out / "b.npz", "--reference", out / "a.npz", "--out", out / "ref.svg", "--iterations", "100")
    assert r.exit_code == 0, r.output
    # refuses to overwrite without --force
    r = cli("tsne", out / "a.npz", "--out", out / "maps.png")
    assert "already exists" in _one_error_line(r)


@pytest.mark.slow
def test_end_to_end_tsne_from_images(cli, tmp_path, photos):
    r = cli("tsne", "--arch", ARCH, "--images", photos, "--image-size", "32", "--out", tmp_path / "m.png",
            "--iterations", "100")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m.png").is_file()


def test_empty_folder(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    out = _one_error_line(cli("embed", "--arch", ARCH, "--images", tmp_path / "empty", "--out", tmp_path / "e.npz"))
    assert "no images found" in out
    _no_outputs(tmp_path)


def test_undecodable_file_is_skipped_with_a_count_or_fatal_with_strict(cli, tmp_path):
    folder = tmp_path / "imgs" / "cls"
    folder.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (20, 20), (i * 50, 10, 10)).save(folder / f"ok{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = Image.new("RGB", (64, 64), (1, 2, 3))
    good.save(folder / "trunc.png")
    (folder / "trunc.png").write_bytes((folder / "trunc.png").read_bytes()[:60])
    r = cli("embed", "--arch", ARCH, "--images", tmp_path / "imgs", "--image-size", "16", "--out", tmp_path / "a.npz")
    assert r.exit_code == 0, r.output
    assert "skipped 2 of 6 images" in r.output
    emb = Embeddings.load(tmp_path / "a.npz")
    assert emb.n == 4 and all("ok" in i for i in emb.ids)
    r = cli("embed", "--arch", ARCH, "--images", tmp_path / "imgs", "--image-size", "16", "--strict",
            "--out", tmp_path / "b.npz")
    assert "broken.jpg" in _one_error_line(r)
    assert not (tmp_path / "b.npz").exists()


def test_mask_size_differs(cli, tmp_path, seg):
    m = Image.open(seg / "masks/scene_001.png")
    m.resize((90, 96), Image.NEAREST).save(seg / "masks/scene_001.png")
    out = _one_error_line(cli("embed", "--arch", ARCH, "--images", seg / "img", "--masks", seg / "masks", "--pixels",
                              "--out", tmp_path / "p.npz"))
    assert "scene_001.png is 90x96" in out and "240x180" in out  # the bundled scenes are 240x180
    _no_outputs(tmp_path)


def test_mask_with_only_ignore(cli, tmp_path, seg):
    for p in (seg / "masks").iterdir():
        Image.fromarray(np.full((180, 240), 255, np.uint8)).save(p)  # the bundled scenes are 240x180
    out = _one_error_line(cli("embed", "--arch", ARCH, "--images", seg / "img", "--masks", seg / "masks", "--pixels",
                              "--image-size", "32", "--out", tmp_path / "p.npz"))
    assert "only ignore" in out
    _no_outputs(tmp_path)


def test_unknown_layer_suggests(cli, tmp_path, seg):
    out = _one_error_line(cli("embed", "--arch", ARCH, "--images", seg / "img", "--masks", seg / "masks", "--pixels",
                              "--layer", "layer9", "--out", tmp_path / "p.npz"))
    assert "did you mean" in out and "layer" in out
    _no_outputs(tmp_path)


def test_nan_features_and_too_few_points(cli, tmp_path):
    x = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)
    x[2, 3] = np.nan
    Embeddings(x, np.zeros(10)).save(tmp_path / "nan.npz")
    Embeddings(x[3:6], np.zeros(3)).save(tmp_path / "three.npz", force=True)
    out = _one_error_line(cli("tsne", tmp_path / "nan.npz", "--out", tmp_path / "n.png"))
    assert "NaN" in out and "--drop-nonfinite" in out
    assert "at least 4 points" in _one_error_line(cli("tsne", tmp_path / "three.npz", "--out", tmp_path / "t.png"))
    r = cli("tsne", tmp_path / "nan.npz", "--drop-nonfinite", "--out", tmp_path / "d.png", "--iterations", "50")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "n.png").exists() and not (tmp_path / "t.png").exists()


def test_not_an_embeddings_file(cli, tmp_path):
    (tmp_path / "x.npz").write_bytes(b"nope")
    assert "not a NumPy .npz file" in _one_error_line(cli("tsne", tmp_path / "x.npz", "--out", tmp_path / "x.png"))


@pytest.mark.slow
def test_cac_figure_cli_with_two_random_init_rows(cli, tmp_path, sample_dir):
    seg = sample_dir / "seg"
    r = cli("tsne", "--figure", "cac", "--arch", ARCH, "--model-seed", "0", "--model-seed", "1",
            "--image", seg / "JPEGImages/scene_003.jpg", "--mask", seg / "SegmentationClass/scene_003.png",
            "--crop-size", "64", "--base-size", "80", "--max-pixels", "80", "--iterations", "100",
            "--row-names", "seed 0,seed 1", "--out", tmp_path / "fig.png")
    assert r.exit_code == 0, r.output
    assert "seed 0: cos(I,II)" in r.output
    assert (tmp_path / "fig.png").is_file() and (tmp_path / "fig.json").is_file() and (tmp_path / "fig.npz").is_file()
