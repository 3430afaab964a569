"""CAC Figure 3: same overlap pixels in every view, flips undone, metrics that mean what they say."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from featviz.errors import DataError
from featviz.maps import cac_figure as figure


def _pointwise_model(seed: int, stride: int = 8) -> nn.Module:
    """Features depend only on each block's colours: a stride-``stride``, position-free 'backbone'."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(pool=nn.AvgPool2d(stride), proj=nn.Conv2d(3, 16, 1), act=nn.Tanh())).eval()


def _scene(size: int = 96):
    """Left half class 1 (red), right half class 2 (green), a band of ignore and a background row."""
    rng = np.random.default_rng(0)
    img = np.zeros((size, size, 3), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    img[:, : size // 2] = (200, 40, 40)
    img[:, size // 2:] = (40, 180, 60)
    mask[:, : size // 2], mask[:, size // 2:] = 1, 2
    img[: size // 4] = (120, 120, 120)
    mask[: size // 4] = 0
    mask[:, size // 2 - 2: size // 2 + 2] = 255
    img = np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img), mask


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_same_pixels_in_every_view(seed):
    img, mask = _scene()
    views = figure.make_views(img, mask, seed=seed, crop_size=64, base_size=80, stride=8, iou_bound=(0.2, 0.9))
    feats, info = figure.view_features(_pointwise_model(0), views, features="act")
    assert info == {"features": "act", "layer": "act", "feature_stride": 8, "feature_dim": 16}
    # crop 2 shows the same image pixels as crop 1 at the sampled cells: identical features, flips undone
    np.testing.assert_allclose(feats[0], feats[1], atol=1e-5)
    assert feats[0].shape == (len(views.labels), 16)
    assert (views.labels != 255).all()


def test_cac_figure_outputs_and_metrics(tmp_path):
    img, mask = _scene()
    img.save(tmp_path / "img.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    models = [figure.FigureModel("block colours A", _pointwise_model(0), {}),
              figure.FigureModel("block colours B", _pointwise_model(1), {})]
    rep = figure.cac_figure(models, tmp_path / "img.png", tmp_path / "mask.png", tmp_path / "fig.png", crop_size=64,
                            base_size=80, iou_bound=(0.2, 0.9), features="act", max_pixels=60, seed=1, n_iter=100,
                            class_names=["bg", "red", "green"])
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "fig.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["block colours A", "block colours B"]
    assert [r["features"] for r in saved["rows"]] == ["act", "act"] and saved["features"] == "act"
    assert all(r["feature_stride"] == 8 and r["feature_dim"] == 16 for r in saved["rows"])
    for row in rep["rows"]:
        m = row["metrics"]
        assert m["cosine_same_pixel"]["I_vs_II"] == pytest.approx(1.0, abs=1e-5)  # context cannot change these features
        assert m["cosine_same_pixel"]["I_vs_III"] <= 1.0
        assert m["knn_class_agreement"]["II_to_I"] > 0.9
        assert set(m["silhouette_per_class"]) <= {"bg", "red", "green"}
    with np.load(tmp_path / "fig.npz", allow_pickle=False) as z:
        assert z["coords_row0"].shape == (3 * len(z["labels"]), 2)
        assert len(z["cells"]) == len(z["labels"]) <= 60
    assert saved["crop_pair"]["crop_size"] == 64 and saved["low_level"] is not None


def test_bad_masks_are_refused(tmp_path):
    img, mask = _scene()
    img.save(tmp_path / "img.png")
    Image.fromarray(np.full_like(mask, 255)).save(tmp_path / "ignore.png")
    Image.fromarray(mask[:90]).save(tmp_path / "small.png")
    model = [figure.FigureModel("m", _pointwise_model(0), {})]
    with pytest.raises(DataError, match="only ignore"):
        figure.cac_figure(model, tmp_path / "img.png", tmp_path / "ignore.png", tmp_path / "a.png", features="act")
    with pytest.raises(DataError, match="image's size"):
        figure.cac_figure(model, tmp_path / "img.png", tmp_path / "small.png", tmp_path / "b.png", features="act")
    assert not list(tmp_path.glob("[ab].*"))


# ---------------------------------------------------------------- native grids
@pytest.mark.parametrize("seed", range(6))
def test_view_two_is_read_on_its_own_grid_at_output_stride_16(seed):
    """Stride-16 features: crops are snapped to 16 and each view is read on its own 16-px grid, so
    the same image block gives the very same feature in views I and II (no resizing onto stride 8,
    which puts view II off view I's grid)."""
    img, mask = _scene(160)
    model = _pointwise_model(0, stride=16)
    assert figure.native_stride(model, "act", 96) == 16
    views = figure.make_views(img, mask, seed=seed, crop_size=96, base_size=120, stride=16, iou_bound=(0.1, 0.9))
    p = views.sample.pair
    assert (p.crop2[0] - p.crop1[0]) % 16 == 0 and (p.crop2[1] - p.crop1[1]) % 16 == 0
    feats, info = figure.view_features(model, views, features="act")
    assert info["feature_stride"] == 16
    np.testing.assert_allclose(feats[0], feats[1], atol=1e-6)
    # and it is the raw stride-16 map of crop 2, indexed at the cell that holds each point
    x = torch.from_numpy(views.images[1].astype(np.float32) / 255).permute(2, 0, 1)[None]
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        raw = model(x)[0]
    raw = raw.flip(-1) if views.flips[1] else raw
    r = views.grids[1][0].start + views.cells[:, 0]
    c = views.grids[1][1].start + views.cells[:, 1]
    np.testing.assert_allclose(feats[1], raw[:, r, c].T.numpy(), atol=1e-6)


def test_rows_with_different_strides_share_pixels(tmp_path):
    img, mask = _scene(160)
    img.save(tmp_path / "img.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    models = [figure.FigureModel("s8", _pointwise_model(0, 8), {}),
              figure.FigureModel("s16", _pointwise_model(1, 16), {})]
    rep = figure.cac_figure(models, tmp_path / "img.png", tmp_path / "mask.png", tmp_path / "fig.png", crop_size=96,
                            base_size=120, features="act", max_pixels=80, seed=2, n_iter=100)
    assert rep["stride"] == 16 and [r["feature_stride"] for r in rep["rows"]] == [8, 16]
    for row in rep["rows"]:
        assert row["metrics"]["cosine_same_pixel"]["I_vs_II"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(DataError, match="multiple of 16"):
        figure.cac_figure(models, tmp_path / "img.png", tmp_path / "mask.png", tmp_path / "g.png", crop_size=88,
                          base_size=120, features="act")
    assert not list(tmp_path.glob("g.*"))


# ---------------------------------------------------------------- which features
def _tiny_segmenter(projector: bool):
    from featviz.models.architectures import build_backbone
    from featviz.models.segmenter import Segmenter, head_spec

    bb = build_backbone("resnet18_w16-os8", seed=0)
    spec = head_spec(bb, 3, 64)
    return Segmenter(bb, spec, {"type": "conv_mlp", "out": 32} if projector else None, ["bg", "red", "green"]).eval()


def test_features_choice_per_row(tmp_path):
    sup, cac = _tiny_segmenter(False), _tiny_segmenter(True)
    rows = [figure.FigureModel("sup", sup, {}), figure.FigureModel("cac", cac, {})]
    assert figure.resolve_features(rows, None) == "decoder"
    with pytest.raises(DataError, match="'sup' has no CAC projector"):
        figure.resolve_features(rows, "projector")
    assert figure.resolve_features(rows[1:], "projector") == "projector"
    enc = figure.FigureModel("enc", _pointwise_model(0), {})
    with pytest.raises(DataError, match="mix segmenters and plain encoders"):
        figure.resolve_features([rows[0], enc], None)
    with pytest.raises(DataError, match="needs segmenters"):
        figure.resolve_features([enc], "decoder")
    assert figure.resolve_features([enc], None) == "backbone"
    img, mask = _scene(96)
    views = figure.make_views(img, mask, seed=0, crop_size=64, base_size=80, stride=32)
    for features, stride, dim in (("decoder", 8, sup.head_spec["dim"]), ("backbone", 8, 128)):
        feats, info = figure.view_features(sup, views, features=features)
        assert (info["feature_stride"], info["feature_dim"]) == (stride, dim)
        assert feats[0].shape == (len(views.labels), dim)
    assert figure.view_features(cac, views, features="projector")[1]["layer"] is None
    assert figure.view_features(sup, views, features="backbone")[1]["layer"] == "layer4"


# ---------------------------------------------------------------- the CLI on the bundled segmenters
def test_cli_figure_on_whole_segmenters(cli, tmp_path, sample_dir):
    ck, seg = sample_dir / "checkpoints", sample_dir / "seg"
    common = ["tsne", "--figure", "cac", "-c", ck / "seg_supervised.safetensors", "-c", ck / "seg_cac.safetensors",
              "--image", seg / "JPEGImages/scene_034.jpg", "--mask", seg / "SegmentationClass/scene_034.png",
              "--max-pixels", "60", "--iterations", "100"]
    r = cli(*common, "--features", "projector", "--out", tmp_path / "p.png")
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and "has no CAC projector" in lines[0], r.output
    assert not list(tmp_path.iterdir())
    r = cli(*common, "--row-names", "supervised,CAC", "--out", tmp_path / "fig.png")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "fig.json").read_text())
    assert [(x["name"], x["features"], x["feature_stride"]) for x in rep["rows"]] == \
        [("supervised", "decoder", 8), ("CAC", "decoder", 8)]
    assert rep["crop_from"] == "the checkpoints' training crop" and rep["rescale_factor"] <= 1
    assert rep["rows"][1]["source"]["segmenter"]["projector_dim"] is not None
