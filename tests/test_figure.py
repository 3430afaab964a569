"""CAC Figure 3: same overlap pixels in every view, flips undone, metrics that mean what they say."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from featviz import figure
from featviz.errors import DataError


def _pointwise_model(seed: int) -> nn.Module:
    """Features depend only on each 8x8 block's colours: a stride-8, position-free 'backbone'."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(pool=nn.AvgPool2d(8), proj=nn.Conv2d(3, 16, 1), act=nn.Tanh())).eval()


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
    feats = figure.view_features(_pointwise_model(0), views, layer="act")
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
                            base_size=80, iou_bound=(0.2, 0.9), layer="act", max_pixels=60, seed=1, n_iter=100,
                            class_names=["bg", "red", "green"])
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "fig.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["block colours A", "block colours B"]
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
        figure.cac_figure(model, tmp_path / "img.png", tmp_path / "ignore.png", tmp_path / "a.png", layer="act")
    with pytest.raises(DataError, match="image's size"):
        figure.cac_figure(model, tmp_path / "img.png", tmp_path / "small.png", tmp_path / "b.png", layer="act")
    assert not list(tmp_path.glob("[ab].*"))
