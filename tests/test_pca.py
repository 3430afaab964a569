"""featviz.views.pca: the DINOv2 patch-PCA recipe, its foreground rule, and the command's files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from featviz.errors import DataError, OutputExistsError
from featviz.views.pca import patch_pca, run_pca


def object_maps(n=4, c=16, h=12, w=16, seed=0, sign=1.0):
    """Feature maps with a square 'object' whose patches differ along one direction."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(c)
    u /= np.linalg.norm(u)
    x = 0.3 * rng.standard_normal((n, h, w, c))
    obj = np.zeros((n, h, w), bool)
    for i in range(n):
        y0, x0 = 3 + i % 2, 4 + i % 3
        obj[i, y0 : y0 + 6, x0 : x0 + 7] = True
    x[obj] += sign * 3.0 * u
    x[obj] += (
        0.8 * rng.standard_normal((int(obj.sum()), c)) @ np.diag(np.linspace(1, 0, c))
    )  # structure inside
    return x.transpose(0, 3, 1, 2).astype(np.float32), obj


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_foreground_is_the_object_whatever_the_components_sign(sign):
    feats, obj = object_maps(sign=sign)
    res = patch_pca(feats)
    assert res.foreground.shape == obj.shape
    iou = (res.foreground & obj).sum() / (res.foreground | obj).sum()
    assert iou > 0.9  # a sign error would give ~0, all-foreground 0.22
    assert (res.rgb[~res.foreground] == 0).all() and res.rgb[res.foreground].max() == pytest.approx(
        1.0
    )


def test_equals_the_dinov2_recipe_written_out():
    from sklearn.decomposition import PCA

    feats, _ = object_maps(seed=3)
    n, c, h, w = feats.shape
    x = feats.transpose(0, 2, 3, 1).reshape(-1, c)
    p1 = PCA(n_components=1).fit(x)
    s = p1.transform(x)[:, 0]
    border = np.zeros((h, w), bool)
    border[[0, -1]] = True
    border[:, [0, -1]] = True
    sb = s.reshape(n, h, w)
    if sb[:, border].mean() > sb[:, ~border].mean():
        s = -s
    fg = s > 0
    p2 = PCA(n_components=3).fit(x[fg])
    t = p2.transform(x)
    t = (t - t[fg].min(0)) / (t[fg].max(0) - t[fg].min(0))
    t[~fg] = 0
    res = patch_pca(feats)
    np.testing.assert_array_equal(res.foreground.reshape(-1), fg)
    np.testing.assert_allclose(res.rgb.reshape(-1, 3), np.clip(t, 0, 1), atol=2e-5)
    np.testing.assert_allclose(
        res.explained_variance_ratio, p2.explained_variance_ratio_, rtol=1e-4
    )
    assert res.first_explained_variance_ratio == pytest.approx(
        p1.explained_variance_ratio_[0], rel=1e-5
    )


def test_foreground_none_is_one_pca_of_all_patches():
    from sklearn.decomposition import PCA

    feats, _ = object_maps(seed=4)
    x = feats.transpose(0, 2, 3, 1).reshape(-1, feats.shape[1])
    t = PCA(n_components=3).fit_transform(x)
    t = (t - t.min(0)) / (t.max(0) - t.min(0))
    res = patch_pca(feats, foreground="none")
    assert res.foreground.all() and res.first_component is None
    np.testing.assert_allclose(res.rgb.reshape(-1, 3), t, atol=2e-5)


def test_bad_options():
    feats, _ = object_maps()
    with pytest.raises(DataError, match="--foreground"):
        patch_pca(feats, foreground="yes")
    with pytest.raises(DataError, match="between 1 and the feature width 16"):
        patch_pca(feats, components=17)


def test_run_pca_on_a_cnn_layer_and_a_vit(tmp_path, sample_dir):
    from featviz.models.architectures import build_backbone

    imgs = [sample_dir / "photos" / "cat", sample_dir / "photos" / "coffee" / "coffee_0.jpg"]
    cnn = build_backbone("resnet18", seed=0)
    s = run_pca(imgs, tmp_path / "cnn", model=cnn, layer="layer3", image_size=128)
    assert (
        s["images"] == 5
        and s["layer"] == "layer3"
        and s["grid"] == [8, 8]
        and s["feature_dim"] == 256
    )
    with np.load(tmp_path / "cnn" / "pca.npz") as z:
        assert z["components"].shape == (3, 256) and z["projections"].shape == (5, 8, 8, 3)
        assert z["rgb"].shape == (5, 8, 8, 3) and z["foreground"].dtype == bool
        assert abs(float(np.linalg.norm(z["first_component"])) - 1) < 1e-5
    m = json.loads((tmp_path / "cnn" / "manifest.json").read_text())
    assert m["command"] == "pca" and len(m["images"]) == 5
    assert len(list((tmp_path / "cnn" / "rgb").glob("*.png"))) == 5
    assert (tmp_path / "cnn" / "sheet.png").stat().st_size > 10_000
    with pytest.raises(OutputExistsError):
        run_pca(imgs, tmp_path / "cnn", model=cnn)

    import timm

    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, dynamic_img_size=True
    ).eval()
    s = run_pca(imgs[1:], tmp_path / "vit", model=vit, image_size="96x160", foreground="none")
    assert s["grid"] == [6, 10] and s["feature_dim"] == 192 and s["foreground_share"] == 1.0
    with pytest.raises(DataError, match="16x16 patches"):
        run_pca(imgs[1:], tmp_path / "bad", model=vit, image_size="100x160")
    assert not (tmp_path / "bad").exists()


def test_the_result_is_typed_and_reads_as_its_summary(tmp_path, sample_dir):
    """run_pca returns a PcaResult; to_dict() is the --json summary, and the result reads as it."""
    from featviz.models.architectures import build_backbone
    from featviz.views.pca import PcaResult

    img = sample_dir / "photos" / "coffee" / "coffee_0.jpg"
    s = run_pca([img], tmp_path / "o", model=build_backbone("resnet18", seed=0), layer="layer3", image_size=64)
    assert isinstance(s, PcaResult) and s.grid == (4, 4) and s["grid"] == [4, 4]
    assert dict(s) == s.to_dict() and list(s) == [
        "out", "images", "arch", "layer", "image_size", "grid", "feature_dim", "components", "foreground",
        "threshold", "foreground_share", "explained_variance_ratio", "first_component_explained_variance_ratio",
        "files", "warnings", "sheet"]


def test_the_manifest_records_the_command_s_own_parameters(cli, tmp_path, sample_dir):
    """The arguments come from the command's parameters (signature order), without how the checkpoint
    is read, --force or --json; out_dir is recorded as out."""
    img = sample_dir / "photos" / "coffee" / "coffee_0.jpg"
    out = tmp_path / "o"
    r = cli("pca", img, "--out", out, "--arch", "resnet18", "--layer", "layer3", "--image-size", "64",
            "--components", "2", "--seed", "1", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    args = json.loads((out / "manifest.json").read_text())["arguments"]
    assert args == {"images": [str(img)], "out": str(out), "checkpoint": None, "arch": "resnet18", "layer": "layer3",
                    "image_size": 64, "components": 2, "foreground": "auto", "threshold": 0.0, "sheet_images": 40,
                    "device": "cpu", "batch_size": 8, "seed": 1}
    assert list(args) == ["images", "out", "checkpoint", "arch", "layer", "image_size", "components", "foreground",
                          "threshold", "sheet_images", "device", "batch_size", "seed"]
    assert json.loads(r.output[r.output.index("{"):])["components"] == 2


# ------------------------------------------------------------------ DINOv3's recipe (--recipe dinov3)
def dinov3_notebook(feats, fg_scores):
    """DINOv3's PCA notebook, transcribed: facebookresearch/dinov3, notebooks/pca.ipynb (commit 6876159a),
    cells "Computing Foreground Probability", "Extracting Foreground Patches", "Fitting the PCA" and
    "Applying the PCA, and Masking Background". The notebook does one image; its fit is run here on the
    foreground patches of all the images together (featviz's joint fit), everything else as written."""
    from scipy import signal
    from sklearn.decomposition import PCA

    xs, fgs, sels = [], [], []
    for feat, fg_score in zip(feats, fg_scores, strict=True):
        x = torch.from_numpy(feat)  # the notebook's feats[-1].squeeze(): (dim, h, w)
        dim = x.shape[0]
        x = x.view(dim, -1).permute(1, 0)
        fg_score_mf = torch.from_numpy(signal.medfilt2d(fg_score, kernel_size=3))
        foreground_selection = fg_score_mf.view(-1) > 0.5
        xs.append(x)
        fgs.append(fg_score_mf)
        sels.append(x[foreground_selection])
    fg_patches = torch.cat(sels)
    pca = PCA(n_components=3, whiten=True)
    pca.fit(fg_patches)
    out = []
    for x, fg_score_mf in zip(xs, fgs, strict=True):
        h_patches, w_patches = fg_score_mf.shape
        projected_image = torch.from_numpy(pca.transform(x.numpy())).view(h_patches, w_patches, 3)
        projected_image = torch.nn.functional.sigmoid(projected_image.mul(2.0)).permute(2, 0, 1)
        projected_image *= fg_score_mf.unsqueeze(0) > 0.5
        out.append(projected_image.permute(1, 2, 0).numpy())
    return np.stack(out), pca


def test_dinov3_recipe_equals_the_notebook_transcribed():
    from featviz.views.pca import dinov3_pca

    feats, obj = object_maps(seed=5)
    rng = np.random.default_rng(0)
    scores = np.clip(obj * 0.8 + 0.1 + 0.3 * rng.standard_normal(obj.shape), 0, 1)  # a noisy classifier
    want, pca = dinov3_notebook(feats, scores)
    res = dinov3_pca(feats, foreground_score=scores)
    np.testing.assert_allclose(res.rgb, want, atol=2e-5)
    np.testing.assert_allclose(res.explained_variance, pca.explained_variance_, rtol=1e-4)
    assert (res.rgb[~res.foreground] == 0).all() and (res.foreground & obj).sum() / (res.foreground | obj).sum() > 0.8
    # with one image it is the notebook exactly, joint fit or not
    one, _ = dinov3_notebook(feats[:1], scores[:1])
    np.testing.assert_allclose(dinov3_pca(feats[:1], foreground_score=scores[:1]).rgb, one, atol=2e-5)


def test_dinov3_recipe_without_masks_median_filters_the_first_component_rule():
    from scipy.signal import medfilt2d

    from featviz.views.pca import dinov3_pca

    feats, obj = object_maps(seed=6)
    v2 = patch_pca(feats)  # DINOv2's first-component foreground, before the notebook's median filter
    res = dinov3_pca(feats)
    want = np.stack([medfilt2d(f.astype(float), 3) for f in v2.foreground]) > 0.5
    np.testing.assert_array_equal(res.foreground, want)
    iou = (res.foreground & obj).sum() / (res.foreground | obj).sum()
    assert iou > 0.9
    assert dinov3_pca(feats, foreground="none").foreground.all()


def test_run_pca_dinov3_with_a_mask_folder(tmp_path, sample_dir, cli):
    """Masks go through the images' transform and are averaged per patch: a mask whose left half is white
    gives a score of exactly 1 on the left half of the patch grid and 0 on the right; the notebook's median
    filter (scipy's, zero-padded) then drops the half's four corners."""
    from PIL import Image

    masks = tmp_path / "masks"
    masks.mkdir()
    imgs = sample_dir / "photos" / "coffee"
    for f in sorted(imgs.glob("*.jpg")):
        w, h = Image.open(f).size
        m = np.zeros((h, w, 4), np.uint8)  # an RGBA cut-out, as the notebook's labels: alpha = foreground
        m[:, : w // 2, 3] = 255
        Image.fromarray(m, "RGBA").save(masks / f"{f.stem}.png")
    out = tmp_path / "o"
    r = cli("pca", imgs, "--arch", "resnet18", "--layer", "layer3", "--image-size", "96x128", "--recipe", "dinov3",
            "--mask-dir", masks, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output[r.output.index("{"):])
    assert s["recipe"] == "dinov3" and s["whiten"] and s["foreground"] == "masks" and s["grid"] == [6, 8]
    with np.load(out / "pca.npz") as z:
        want = np.zeros((6, 8), bool)
        want[:, :4] = True
        want[[0, 0, -1, -1], [0, 3, 0, 3]] = False  # 4 of the 9 cells around these are foreground: median 0
        assert (z["foreground"] == want).all()
        np.testing.assert_allclose(z["foreground_score"][:, :, :4], 1.0)
        np.testing.assert_allclose(z["foreground_score"][:, :, 4:], 0.0, atol=1e-6)
    man = json.loads((out / "manifest.json").read_text())
    assert man["arguments"]["recipe"] == "dinov3" and "medfilt2d" in man["definitions"]["foreground"]
    # bad input: one line each
    for args, words in [
        (["--mask-dir", masks], "add --recipe dinov3"),
        (["--recipe", "dinov3", "--mask-dir", tmp_path / "nope"], "not a folder"),
        (["--recipe", "dinov3", "--mask-dir", tmp_path], "no mask for coffee_0.jpg"),
    ]:
        r = cli("pca", imgs, "--arch", "resnet18", "--image-size", "64", "--out", tmp_path / "x", *args)
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code != 0 and len(lines) == 1 and words in r.output, r.output
