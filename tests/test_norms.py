"""featviz.views.norms: the outlier-token rule, the class token's attention on them, and `featviz norms`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from featviz.errors import DataError
from featviz.views.norms import (
    attention_mass,
    otsu_threshold,
    outlier_split,
    outliers,
    run_norms,
    valley_dip,
)


def planted_maps(n=6, c=32, h=8, w=10, k=2, seed=0):
    """(N, C, h, w) features with norms in [4, 8], and ``k`` tokens per image with norms in [40, 60]."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    mask = np.zeros((n, h, w), bool)
    for i in range(n):
        mask[i].flat[rng.choice(h * w, size=k, replace=False)] = True
    r = np.where(mask, rng.uniform(40, 60, (n, h, w)), rng.uniform(4, 8, (n, h, w)))
    return (x * r[:, None]).astype(np.float32), mask


def otsu_reference(v):
    """skimage's threshold_otsu moved from its bin's centre to the bin's upper edge (the split it evaluated)."""
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(v, nbins=256)) + (v.max() - v.min()) / 256 / 2


def test_otsu_is_skimage_s_rule():
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(1)
    for v in (
        rng.normal(50, 10, 5000),
        rng.lognormal(3, 0.5, 3000),
        np.r_[rng.normal(50, 10, 4900), rng.normal(250, 20, 100)],
        rng.integers(0, 7, 400).astype(float),
    ):
        assert otsu_threshold(v) == pytest.approx(otsu_reference(v), rel=1e-12)
        high = v > otsu_threshold(v)  # the high class is the bins above skimage's bin, whole
        assert (v[high] > threshold_otsu(v, nbins=256)).all()


def test_the_rule_finds_exactly_the_planted_high_norm_tokens():
    x, planted = planted_maps()
    norms = np.linalg.norm(x, axis=1)
    split = outlier_split(norms)
    assert split.rule == "otsu" and split.bimodal and split.dip < 0.5
    # the threshold is what the rule says: Otsu's on the patch norms of all images
    assert split.threshold == pytest.approx(otsu_reference(norms.ravel()))
    np.testing.assert_array_equal(outliers(norms, split), planted)
    # Darcet et al.'s fixed cutoff instead: exactly the tokens above it
    fixed = outlier_split(norms, threshold=20.0)
    assert fixed.rule == "fixed" and fixed.threshold == 20.0 and fixed.bimodal is None
    np.testing.assert_array_equal(outliers(norms, fixed), norms > 20.0)


def test_a_unimodal_layer_has_no_outliers():
    x, _ = planted_maps(k=0)
    norms = np.linalg.norm(x, axis=1)
    split = outlier_split(norms)
    assert split.bimodal is False and split.threshold is None and split.otsu_threshold is not None
    assert split.dip >= 0.5 and not outliers(norms, split).any()
    # a valley's depth: none between two touching halves of a uniform sample, an empty one across a gap
    assert valley_dip(np.linspace(0, 1, 1000), 0.5) > 0.8
    assert valley_dip(np.r_[np.linspace(0, 1, 1000), np.linspace(5, 6, 30)], 3.0) == 0.0


def test_a_large_high_side_is_two_populations_not_outliers():
    x, planted = planted_maps(k=12)  # 15 % of the tokens long: a valley, but no minority
    split = outlier_split(np.linalg.norm(x, axis=1))
    assert split.dip < 0.5 and split.high_share == pytest.approx(planted.mean()) and split.high_share > 0.1
    assert split.bimodal is False and split.threshold is None


def test_attention_mass_sums_the_map_over_the_mask():
    att = np.full((2, 3, 4), 1 / 12)
    mask = np.zeros((2, 3, 4), bool)
    mask[0, 0, :2] = True
    np.testing.assert_allclose(attention_mass(att, mask), [2 / 12, 0.0])


# ------------------------------------------------------------------ on a model
def tiny_vit(reg=4, plant=(3, 10), depth=2, attend=None):
    """A 48x48 ViT (8x8 patches: 6x6 grid) whose position embedding makes ``plant`` patches long tokens.

    attend: None (random attention), "uniform" (q = k = 0: every token gets 1/T), or "outliers"
    (every query attends to the planted tokens only).
    """
    import timm

    torch.manual_seed(0)
    m = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, img_size=48, patch_size=8,
        embed_dim=32, depth=depth, num_heads=2, reg_tokens=reg,
    ).eval()
    c = 32
    with torch.no_grad():
        m.patch_embed.proj.weight.mul_(0.1)  # ordinary tokens of similar norms: no image makes a stray long one
        off = 0 if m.no_embed_class else m.num_prefix_tokens
        for p in plant:  # +30 on dim 0, -30 on dim 1: survives the LayerNorm's mean removal
            m.pos_embed[0, off + p, 0] += 30.0
            m.pos_embed[0, off + p, 1] -= 30.0
        for blk in m.blocks:
            w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
            if attend == "uniform":
                w[: 2 * c] = 0
                b[: 2 * c] = 0
            elif attend == "outliers":
                w[: 2 * c] = 0
                b[: 2 * c] = 0
                b[:c] = 1.0  # every query is the constant 1 vector ...
                w[c : 2 * c, 0] = 50.0  # ... and keys are large only where dim 0 is (the planted tokens)
                w[c : 2 * c, 1] = -50.0
    return m


def test_layer_tokens_is_the_feature_core_s_map_plus_the_prefix():
    from featviz.models.features import FeatureExtractor
    from featviz.models.taps import layer_tokens

    m = tiny_vit(depth=3)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        got = layer_tokens(m, x, ["blocks.0", "blocks.2"])
        for name in ("blocks.0", "blocks.2"):
            with FeatureExtractor(m, name) as fx:
                torch.testing.assert_close(got[name].map, fx(x))
            assert got[name].prefix.shape == (2, 5, 32)
        full = m.forward_features(x)  # the last block's tokens, after the final norm
        torch.testing.assert_close(m.norm(got["blocks.2"].prefix), full[:, :5])


def test_one_query_row_is_the_row_of_the_full_attention():
    from featviz.views.attention_probs import model_attention

    m = tiny_vit()
    x = torch.randn(2, 3, 48, 48)
    full = model_attention(m, m.blocks, x, [0, 1], 41)
    row = model_attention(m, m.blocks, x, [0, 1], 41, query=0)
    for i in (0, 1):
        assert row[i].shape == (2, 2, 1, 41)
        torch.testing.assert_close(row[i], full[i][:, :, :1])


@pytest.mark.parametrize("attend", ["uniform", "outliers"])
def test_class_token_attention_on_planted_outliers_is_known(tmp_path, sample_dir, attend):
    """Uniform attention gives each of the T = 1 + 4 + 36 tokens 1/T, so the 2 outliers get 2/41 and the 4
    registers 4/41; attention steered onto the planted tokens puts all the class token's mass on them."""
    m = tiny_vit(attend=attend)
    img = sample_dir / "photos" / "cat"
    s = run_norms([img], tmp_path / attend, models=[m], names=["planted"], image_size=48,
                  layers=["blocks.0", "blocks[-1]", "blocks.1"], map_layer="blocks.-1")
    layers = s["models"][0]["layers"]
    assert [ly["layer"] for ly in layers] == ["blocks.0", "blocks.1"]  # canonical names, each once
    assert s["models"][0]["map_layer"] == "blocks.1"
    for ly in layers:
        assert ly["outliers_per_image"] == [2] * s["images"] and ly["bimodal"]
        att = ly["cls_attention"]
        if attend == "uniform":
            assert att["on_outliers"] == pytest.approx(2 / 41, abs=1e-6)
            assert att["on_registers"] == pytest.approx(4 / 41, abs=1e-6)
            assert att["on_class"] == pytest.approx(1 / 41, abs=1e-6)
        else:
            assert att["on_outliers"] == pytest.approx(1.0, abs=1e-5)
        assert att["outlier_token_share"] == pytest.approx(2 / 41)
        assert ly["registers"]["count"] == 4 and ly["registers"]["above_threshold_share"] == 0.0
    with np.load(tmp_path / attend / "norms.npz") as z:
        mask = z["0/blocks.1/outliers"]
        assert mask.shape == (s["images"], 6, 6) and mask[:, 0, 3].all() and mask[:, 1, 4].all()
        assert z["0/blocks.1/prefix_norms"].shape == (s["images"], 5)


# ------------------------------------------------------------------ the command
def test_cli_on_vits_with_and_without_registers_side_by_side(cli, tmp_path, sample_dir):
    paths = []
    for reg in (4, 0):
        m = tiny_vit(reg=reg, attend="uniform")
        paths.append(tmp_path / f"vit_reg{reg}.pth")
        torch.save(m.state_dict(), paths[-1])
    out = tmp_path / "o"
    r = cli("norms", sample_dir / "photos" / "cat", "--checkpoint", paths[0], "--checkpoint", paths[1],
            "--num-heads", "2", "--out", out, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output[r.output.index("{"):])
    assert s == json.loads((out / "norms.json").read_text())
    assert s["rule"]["name"] == "otsu" and "Otsu" in s["rule"]["definition"]
    reg, plain = s["models"]
    assert reg["tokens"]["register"] == 4 and plain["tokens"]["register"] == 0
    assert reg["layers"][0]["registers"]["count"] == 4 and plain["layers"][0]["registers"] is None
    assert all(ly["outlier_share"] == pytest.approx(2 / 36) for m in (reg, plain) for ly in m["layers"])
    for f in ("norms_vit_reg4.png", "norms_vit_reg0.png", "outliers_vit_reg4.png", "comparison.png"):
        assert (out / f).stat().st_size > 10_000, f
    man = json.loads((out / "manifest.json").read_text())
    assert man["command"] == "norms" and man["arguments"]["checkpoint"] == [str(p) for p in paths]
    assert man["rule"]["name"] == "otsu" and len(man["models"]) == 2
    # a fixed cutoff, as Darcet et al.
    r = cli("norms", sample_dir / "photos" / "cat", "-c", paths[1], "--num-heads", "2", "--out", tmp_path / "f",
            "--threshold", "1e6", "--json")
    s = json.loads(r.output[r.output.index("{"):])
    assert s["rule"]["name"] == "fixed" and s["models"][0]["layers"][0]["outliers"] == 0


def test_cli_on_a_cnn_says_attention_is_not_applicable(cli, tmp_path, sample_dir):
    out = tmp_path / "cnn"
    r = cli("norms", sample_dir / "photos" / "coffee", "--arch", "resnet18", "--layers", "layer2,layer3",
            "--image-size", "96", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output[r.output.index("{"):])
    m = s["models"][0]
    assert m["tokens"] is None and [ly["layer"] for ly in m["layers"]] == ["layer2", "layer3"]
    assert [ly["grid"] for ly in m["layers"]] == [[12, 12], [6, 6]]
    assert all(ly["cls_attention"] == "n/a" and ly["registers"] is None for ly in m["layers"])
    with np.load(out / "norms.npz") as z:
        assert z["0/layer3/norms"].shape == (4, 6, 6) and "0/layer3/cls_attention" not in z
    assert (out / "norms_resnet18.png").exists() and not (out / "comparison.png").exists()


def test_bad_input_is_one_line(cli, tmp_path, sample_dir):
    img = sample_dir / "photos" / "coffee" / "coffee_0.jpg"
    for args, words in [
        (["--layers", "layer9"], "no layer 'layer9'"),
        (["--layers", "fc"], "no spatial map"),
        (["--map-layer", "layer3"], "--map-layer 'layer3' is not one of the layers read"),
        (["--threshold", "-1"], "--threshold must be a positive norm"),
        (["--layers", " ,", "--layers", ""], "--layers ' ,,' names no layer"),
    ]:
        r = cli("norms", img, "--arch", "resnet18", "--image-size", "64", "--out", tmp_path / "x", *args)
        assert r.exit_code != 0 and "Traceback" not in r.output, r.output
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and words in r.output, r.output
    with pytest.raises(DataError, match="needs a model"):
        run_norms([img], tmp_path / "y", models=[])


def test_limit_sheet_images_and_cmap_follow_the_shared_rules(cli, tmp_path, sample_dir, monkeypatch):
    from featviz.views import norms_figures

    cells, real = [], norms_figures.grid_sheet
    monkeypatch.setattr(norms_figures, "grid_sheet", lambda p, c, **kw: cells.append(kw) or real(p, c, **kw))
    common = [sample_dir / "photos", "--arch", "resnet18", "--layers", "layer3", "--image-size", "32"]
    r = cli("norms", *common, "--limit", "6", "--sheet-images", "3", "--cmap", "viridis", "--json", "--out",
            tmp_path / "v")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["images"] == 6 and s["sheet"] == {"shown": 3, "of": 6}
    man = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert man["limit"] == {"first": 6, "of": 20} and len(man["images"]) == 6
    assert man["arguments"]["cmap"] == "viridis" and man["arguments"]["sheet_images"] == 3
    shown = [t for row in cells[-1]["cell_titles"] for t in row[::2]]  # each image's title, beside its map
    ids = [i["id"] for i in man["images"]]
    assert shown == [ids[0], ids[2], ids[5]]  # spread over the six, the first and the last among them
    assert "showing 3 of 6 images" in cells[-1]["title"]
    with np.load(tmp_path / "v" / "norms.npz") as z:
        assert z["0/layer3/norms"].shape[0] == 6  # the numbers of every image, not only the sheet's
    r = cli("norms", *common, "--limit", "6", "--sheet-images", "3", "--out", tmp_path / "d")
    assert r.exit_code == 0 and "showing 3 of 6 images" in " ".join(r.output.split()), r.output
    from PIL import Image

    v = np.asarray(Image.open(tmp_path / "v" / "outliers_resnet18.png").convert("RGB"), np.int64)
    d = np.asarray(Image.open(tmp_path / "d" / "outliers_resnet18.png").convert("RGB"), np.int64)
    assert v.shape == d.shape and np.abs(v - d).mean() > 2  # another colour map, other pixels


def test_figures_of_random_weights_say_so(tmp_path, sample_dir, monkeypatch):
    from matplotlib.figure import Figure

    from featviz.models.description import RANDOM_WEIGHTS
    from featviz.models.loader import load_model

    titles, real = [], Figure.suptitle
    monkeypatch.setattr(Figure, "suptitle", lambda self, t, **kw: titles.append(t) or real(self, t, **kw))
    random, _ = load_model(arch="resnet18", seed=0)
    run_norms([sample_dir / "photos" / "cat"], tmp_path / "o", models=[random], layers=["layer3"], image_size=32)
    assert len(titles) == 2 and all(t.startswith(RANDOM_WEIGHTS + " · ") for t in titles), titles
    trained, _ = load_model(sample_dir / "checkpoints" / "vit_photos.safetensors")
    titles.clear()
    run_norms([sample_dir / "photos" / "cat"], tmp_path / "t", models=[trained], layers=["blocks.3"])
    assert len(titles) == 2 and not any(RANDOM_WEIGHTS in t for t in titles), titles
