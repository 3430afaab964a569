"""featviz cam: pytorch-grad-cam parity, every method, SSL targets, guard rails, outputs, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from featviz.cli.choices import CAM_METHOD_NAMES
from featviz.errors import DataError, FeatvizError, OptionError, UnknownNameError
from featviz.models import features as F
from featviz.models.architectures import build_backbone
from featviz.models.description import attach, describe
from featviz.models.features import get_layer
from featviz.views import cam as C

MEAN = STD = (0.5, 0.5, 0.5)


def _resnet(num_classes: int | None = 10) -> nn.Module:
    torch.manual_seed(0)
    m = build_backbone("resnet18_w8-cifar", seed=0)
    if num_classes:
        m.fc = nn.Linear(64, num_classes)
        attach(m, describe(m).with_changes(kind="classifier", head="fc", num_classes=num_classes))
    return m.eval()


def _classifier(model: nn.Module) -> nn.Module:
    """``model`` described as a classifier (what ``load_model(head=True)`` attaches for one)."""
    return attach(model, describe(model).with_changes(kind="classifier"))


def _vit(num_classes: int = 0, img_size=(32, 48)) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=img_size, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                             num_classes=num_classes, reg_tokens=2).eval()


def _targets(info, x, kind="top1", arg=None):
    return C.make_targets(C.TargetContext(C.TargetSpec(kind, arg), info, MEAN, STD), x)


@pytest.fixture(scope="module")
def resnet():
    return _resnet()


@pytest.fixture(scope="module")
def x32():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def photos(tmp_path, sample_dir):
    """Three sample photos in two class folders (fast CLI runs)."""
    d = tmp_path / "photos"
    for cls, name in (("cat", "cat_0.jpg"), ("cat", "cat_1.jpg"), ("coffee", "coffee_0.jpg")):
        (d / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(sample_dir / "photos" / cls / name, d / cls / name)
    return d


# ------------------------------------------------------------------ names


def test_method_names_match_registry_and_pytorch_grad_cam():
    import pytorch_grad_cam as pgc

    assert tuple(C.CAM_METHODS) == CAM_METHOD_NAMES
    assert all(hasattr(pgc, s.cls) for s in C.CAM_METHODS.values() if s.family == "grad-cam")
    assert [n for n, s in C.CAM_METHODS.items() if s.family == "transformer"] == ["legrad", "gae"]
    assert C.parse_methods("all") == list(C.CAM_METHODS)
    assert C.parse_methods(["gradcam,eigencam", "gradcam"]) == ["gradcam", "eigencam"]
    with pytest.raises(UnknownNameError, match="did you mean: gradcam"):
        C.parse_methods("gradcma")
    with pytest.raises(UnknownNameError, match="not a class activation map|explains no target"):
        C.parse_methods("guided_backprop")
    assert C.parse_methods("Grad-CAM, gradcam_plusplus") == ["gradcam", "gradcam++"]  # aliases, - as _
    with pytest.raises(OptionError, match="--method ',' names no CAM method"):
        C.parse_methods(",")


def test_parse_target():
    assert C.parse_target("class:3") == C.TargetSpec("class", "3")
    assert str(C.parse_target("similarity:a/b.jpg")) == "similarity:a/b.jpg"
    assert C.parse_target("class:tabby") == C.TargetSpec("class", "tabby")  # a name, looked up later
    for bad in ("top2", "self:1", "seg"):
        with pytest.raises(UnknownNameError):
            C.parse_target(bad)


# ------------------------------------------------------------------ parity with pytorch-grad-cam


def _vit_reshape(t):  # what a user writes by hand for this ViT: 1 class + 2 register tokens, 4×6 grid
    return t[:, 3:, :].reshape(t.shape[0], 4, 6, t.shape[2]).permute(0, 3, 1, 2)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "eigencam", "layercam", "scorecam"])
@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_maps_equal_direct_pytorch_grad_cam(method, arch, x32):
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if arch == "resnet":
        model, x, layer_name, reshape = _resnet(), x32, "layer4", None
    else:
        model = _vit(num_classes=5)
        x, layer_name, reshape = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(2)), \
            "blocks[-1].norm1", _vit_reshape
    layer = get_layer(model, layer_name)
    info = C.probe_model(model, x)
    rt = F.reshape_transform(model, tuple(x.shape[-2:]), [layer])
    ours, stats = C.explain(info, x, method, [layer], _targets(info, x, "top1"), reshape_transform=rt,
                            token_layer=arch == "vit")
    cam = getattr(pgc, C.CAM_METHODS[method].cls)(model, [layer], reshape)
    try:
        with torch.no_grad():
            top1 = model(x).argmax(1).tolist()
        theirs = cam(x, [ClassifierOutputTarget(c) for c in top1])
    finally:
        cam.activations_and_grads.release()
    assert ours.shape == theirs.shape == (2, *x.shape[-2:])
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert all(s.status == "ok" for s in stats)
    assert ours.max() > 0.99 and ours.std() > 0.05  # a real map, not a constant


# ------------------------------------------------------------------ every method


def _run_all(model, x, layer_name, kind):
    layer = get_layer(model, layer_name)
    info = C.probe_model(model, x)
    shapes = C.layer_shapes(model, [layer], x)
    token = len(shapes[0]) == 3
    rt = F.reshape_transform(model, tuple(x.shape[-2:]), [layer])
    ran, said = {}, {}
    for name in C.CAM_METHODS:
        why = C.not_applicable(name, info, token_layer=token, input_hw=tuple(x.shape[-2:]))
        if why:
            said[name] = why
            continue
        opts = {"num_scales": 1} if name == "sess" else None
        maps, stats = C.explain(info, x, name, [layer], _targets(info, x, kind), reshape_transform=rt,
                                token_layer=token, options=opts, batch_size=64)
        assert maps.shape == (1, *x.shape[-2:]) and np.isfinite(maps).all(), name
        assert 0 <= maps.min() and maps.max() <= 1 + 1e-6, name
        ran[name] = stats[0].status
    assert not [m for m in model.modules() if m._forward_hooks], "hooks left behind"
    return ran, said


def test_every_method_runs_on_resnet_or_says_why():
    model = _resnet()
    ran, said = _run_all(model, torch.randn(1, 3, 32, 32), "layer4", "top1")
    # a ResNet classifier supports every method but the two that read a ViT's attention
    assert set(ran) == set(C.CAM_METHODS) - {"legrad", "gae"}, said
    assert set(said) == {"legrad", "gae"} and all("CNN" in w for w in said.values())
    assert all(s in ("ok", "unchecked") for s in ran.values()), ran


def test_every_method_runs_on_vit_encoder_or_says_why():
    ran, said = _run_all(_vit(num_classes=0), torch.randn(1, 3, 32, 48), "blocks[-1].norm1", "self")
    assert set(ran) | set(said) == set(C.CAM_METHODS)
    # encoder: no classes; token layer: a pytorch-grad-cam limitation; 32×48: sess needs square inputs
    assert set(said) == {"finercam", "shapleycam", "sess"}, said
    assert "classifier" in said["finercam"] and "token layers" in said["shapleycam"] and "square" in said["sess"]
    assert {"gradcam", "scorecam", "eigencam", "ablationcam", "fullgrad"} <= set(ran)


# ------------------------------------------------------------------ ViT grid


def test_vit_reshape_finds_prefix_tokens_and_non_square_grid():
    model = _vit(img_size=(32, 48))
    layer = get_layer(model, F.default_cam_layer(model))
    rt = F.reshape_transform(model, (32, 48), [layer])
    assert (rt.grid, rt.prefix) == ((4, 6), 3)  # class + 2 register tokens
    tokens = torch.arange(2 * 27 * 5, dtype=torch.float32).view(2, 27, 5)
    grid = rt(tokens)
    assert grid.shape == (2, 5, 4, 6)
    assert torch.equal(grid[0, :, 0, 1], tokens[0, 4])  # first patch token after the 3 prefix tokens
    with pytest.raises(FeatvizError, match="prefix"):
        rt(torch.zeros(1, 26, 5))


def test_default_layers():
    assert F.default_cam_layer(_resnet()) == "layer4"
    assert F.default_cam_layer(_vit()) == "blocks.0.norm1"
    with pytest.raises(FeatvizError, match="--layer"):
        F.default_cam_layer(nn.Sequential(nn.Conv2d(3, 4, 3)))


# ------------------------------------------------------------------ guard rails


def test_one_target_per_image_and_second_image_not_blank(resnet, x32):
    info = C.probe_model(resnet, x32)
    layer = get_layer(resnet, "layer4")
    with pytest.raises(ValueError, match="one target per image"):
        C.explain(info, x32, "gradcam", [layer], _targets(info, x32[:1]))
    maps, stats = C.explain(info, x32, "gradcam", [layer], _targets(info, x32, "class", "2"))
    assert maps[1].max() > 0.99 and stats[1].raw_max > 0


def test_errors_inside_cam_are_raised_and_hooks_released(resnet, x32):
    info = C.probe_model(resnet, x32)
    layer = get_layer(resnet, "layer4")
    targets = [C.ClassTarget(99, 10), C.ClassTarget(99, 10)]  # IndexError: pytorch-grad-cam's `with` swallows it
    with pytest.raises(IndexError):
        C.explain(info, x32, "gradcam", [layer], targets)
    assert not [m for m in resnet.modules() if m._forward_hooks]
    with pytest.raises(DataError, match="out of range.*10 classes"):
        C.check_target(C.parse_target("class:10"), info)


def test_frozen_backbone_in_train_mode_gets_gradients_and_state_restored(x32):
    model = _resnet()
    info = C.probe_model(model, x32)
    ref, _ = C.explain(info, x32, "gradcam", [model.layer4], _targets(info, x32, "class", "1"))
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    model.layer1.eval()  # a mixed state must come back exactly
    maps, _ = C.explain(info, x32, "gradcam", [model.layer4], _targets(info, x32, "class", "1"))
    np.testing.assert_allclose(maps, ref, atol=1e-6)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model.layer4.training and not model.layer1.training


class _NoGradBackbone(nn.Module):
    """An SSL-style encoder whose forward runs under torch.no_grad()."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)

    @torch.no_grad()
    def forward(self, x):
        return self.pool(self.body(x)).flatten(1)


class _DetachedHead(nn.Module):
    """A linear probe that detaches the features: no gradient reaches the backbone."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)).detach())


def test_no_grad_backbone_works_and_detached_model_says_why(x32):
    model = _NoGradBackbone().eval()
    info = C.probe_model(model, x32)
    maps, stats = C.explain(info, x32, "gradcam", [model.body[2]], _targets(info, x32, "self"))
    assert all(s.status == "ok" for s in stats) and maps.max() > 0.99
    det = _classifier(_DetachedHead().eval())
    info = C.probe_model(det, x32)
    with pytest.raises(C.GradientError, match="none flow.*gradient-free"):
        C.explain(info, x32, "gradcam", [det.body], _targets(info, x32, "top1"))
    maps, _ = C.explain(info, x32, "eigencam", [det.body], _targets(info, x32, "top1"))  # gradient-free still works
    assert maps.max() > 0.99


class _TupleOut(nn.Module):
    def __init__(self, inner, as_dict=False):
        super().__init__()
        self.inner, self.as_dict = inner, as_dict

    def forward(self, x):
        logits = self.inner(x)
        return {"features": logits * 2, "logits": logits} if self.as_dict else (logits, logits * 2)


@pytest.mark.parametrize("as_dict", [False, True])
def test_tuple_and_dict_outputs_are_wrapped(resnet, x32, as_dict):
    info0 = C.probe_model(resnet, x32)
    ref, _ = C.explain(info0, x32, "gradcam", [resnet.layer4], _targets(info0, x32, "class", "4"))
    wrapped = _classifier(_TupleOut(resnet, as_dict).eval())
    info = C.probe_model(wrapped, x32)
    assert info.selected and ("logits" in info.selected if as_dict else "element 0" in info.selected)
    maps, _ = C.explain(info, x32, "gradcam", [resnet.layer4], _targets(info, x32, "class", "4"))
    np.testing.assert_allclose(maps, ref, atol=1e-6)


def test_self_target_is_ok_but_cosine_to_self_is_flagged_as_noise(x32):
    model = _resnet(num_classes=None)
    info = C.probe_model(model, x32)
    assert info.kind == "embedding"
    _, stats = C.explain(info, x32, "gradcam", [model.layer4], _targets(info, x32, "self"))
    assert [s.status for s in stats] == ["ok", "ok"]
    with torch.no_grad():
        z = model(x32)
    cos_self = [C.CosineTarget(z[i], "cosine to self") for i in range(2)]
    maps, stats = C.explain(info, x32, "gradcam", [model.layer4], cos_self)
    assert all(s.status in ("noise", "blank") for s in stats) and "noise" in [s.status for s in stats]
    assert all(t.slope < 1e-4 for t in cos_self)
    noisy = [i for i, s in enumerate(stats) if s.status == "noise"]
    assert maps[noisy].max() > 0.9  # min-max scaling hides it: rounding noise looks like a heatmap


def test_pair_and_similarity_targets_explain_agreement(x32):
    model = _resnet(num_classes=None)
    info = C.probe_model(model, x32)
    views = C.augment_views(x32, MEAN, STD, seed=0)
    assert views.shape == x32.shape and not torch.allclose(views, x32)
    assert torch.equal(views, C.augment_views(x32, MEAN, STD, seed=0))  # seeded
    pair = _targets(info, x32, "pair")
    maps, stats = C.explain(info, x32, "gradcam", [model.layer4], pair)
    assert all(s.status == "ok" for s in stats) and all(-1 <= t.score <= 1 for t in pair)
    with torch.no_grad():
        ref = model(x32[1:])[0]
    sim = C.make_targets(C.TargetContext(C.TargetSpec("similarity", "ref.jpg"), info, MEAN, STD, ref), x32)
    C.explain(info, x32, "gradcam", [model.layer4], sim)
    assert sim[1].score == pytest.approx(1.0, abs=1e-5) and sim[0].score < 1 - 1e-4


class _TinySegmenter(nn.Module):
    """backbone (conv stride 2) + 1×1 head, upsampled: per-pixel logits (N, 3, H, W)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return nn.functional.interpolate(self.head(self.backbone(x)), size=x.shape[-2:], mode="bilinear")


def test_seg_target_on_segmenter_and_refused_on_classifier(resnet, x32):
    seg = _TinySegmenter().eval()
    info = C.probe_model(seg, x32)
    assert info.kind == "segmentation" and info.out_shape == (3, 32, 32)
    C.check_target(C.parse_target("seg:road"), info, ["bg", "road", "car"])
    targets = C.make_targets(C.TargetContext(C.TargetSpec("seg", "1"), info, MEAN, STD), x32)
    maps, stats = C.explain(info, x32, "hirescam", [seg.backbone], targets)
    assert maps.shape == (2, 32, 32) and all(s.status == "ok" for s in stats)
    predicted = (seg(x32).argmax(1) == 1).float()
    assert targets[0].mask.sum() == predicted[0].sum()
    # the map is brighter where the class is predicted (HiResCAM on a 1×1 head is local)
    inside = (maps * predicted.numpy()).sum() / predicted.sum().item()
    outside = (maps * (1 - predicted.numpy())).sum() / (1 - predicted).sum().item()
    assert inside > outside
    with pytest.raises(DataError, match=r"per-pixel logits \(N, C, H, W\)"):
        C.check_target(C.parse_target("seg:1"), C.probe_model(resnet, x32))
    with pytest.raises(DataError, match="out of range"):
        C.check_target(C.parse_target("seg:3"), info)


def test_metrics_work_with_ssl_targets(x32):
    model = _resnet(num_classes=None)
    info = C.probe_model(model, x32)
    targets = _targets(info, x32, "self")
    maps, _ = C.explain(info, x32, "gradcam", [model.layer4], targets)
    scores = C.faithfulness(info, x32, maps, targets)
    assert set(scores) == set(C.METRIC_DEFINITIONS)
    assert all(v.shape == (2,) and np.isfinite(v).all() for v in scores.values())
    assert set(np.unique(scores["confidence_increase"])) <= {0.0, 1.0}
    np.testing.assert_allclose(scores["road_combined"], (scores["road_lerf"] - scores["road_morf"]) / 2)


# ------------------------------------------------------------------ CLI end to end


def test_cli_writes_overlays_maps_sheet_manifest(cli, photos, tmp_path):
    out = tmp_path / "cam"
    r = cli("cam", photos, "--arch", "resnet18_w8-cifar", "--image-size", "32", "--method", "gradcam,eigencam",
            "--metrics", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["images"] == 3 and summary["methods"] == ["gradcam", "eigencam"]
    assert summary["target"] == "self" and summary["layers"] == ["layer4"]  # encoder default
    assert set(summary["metrics"]["gradcam"]) == set(C.METRIC_DEFINITIONS)
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert len(overlays) == 6 and "cat__cat_0.gradcam.png" in overlays
    with np.load(out / "maps.npz", allow_pickle=False) as z:
        assert z["gradcam"].shape == (3, 32, 32) and list(z["ids"]) == ["cat/cat_0.jpg", "cat/cat_1.jpg",
                                                                         "coffee/coffee_0.jpg"]
        assert (z["gradcam.raw_max"] > 0).all()
    man = json.loads((out / "manifest.json").read_text())
    assert man["command"] == "cam" and man["images"][0]["maps"]["gradcam"]["status"] == "ok"
    assert "road_morf" in man["images"][0]["maps"]["gradcam"]
    from PIL import Image

    w, h = Image.open(out / "contact_sheet.png").size
    assert w >= 3 * 160 and h >= 3 * 160  # 3 rows of 3 columns, thumbnails of at least 160 px (32-px inputs)
    r = cli("cam", photos, "--arch", "resnet18_w8-cifar", "--image-size", "32", "--out", out)
    assert r.exit_code == 1 and "already exists" in r.output


def test_cli_vit_encoder_and_method_that_does_not_apply(cli, photos, tmp_path):
    args = ("cam", photos / "coffee", "--arch", "vit_tiny_patch8_32", "--target", "self", "--out", tmp_path / "v")
    r = cli(*args, "--method", "eigencam", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["layers"] == ["blocks.11.norm1"] and summary["map_status"]["eigencam"]["ok"] == 1
    man = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert man["reshape_transform"] == {"grid": [4, 4], "prefix_tokens": 1, "channels_last": False}
    assert man["model"]["description"]["arch"]["name"] == "vit_tiny_patch8_32"
    line = _bad(cli, *args[1:], "--method", "shapleycam", "--force")
    assert "does not apply" in line and "token layers" in line


def _bad(cli, *args):
    r = cli("cam", *args)
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]


def test_cli_bad_inputs(cli, photos, tmp_path, monkeypatch):
    base = ("--arch", "resnet18_w8-cifar", "--image-size", "32", "--out", tmp_path / "o")
    assert "did you mean" in _bad(cli, photos, *base, "--layer", "layer5")
    assert "per-pixel logits" in _bad(cli, photos, *base, "--target", "seg:1")
    (tmp_path / "empty").mkdir()
    assert "no images found" in _bad(cli, tmp_path / "empty", *base)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert "broken.jpg" in _bad(cli, bad, *base)
    assert "did you mean" in _bad(cli, photos, *base, "--method", "gradcma")
    from featviz.models import loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **kw: (_resnet(10), None))
    assert "out of range" in _bad(cli, photos, *base, "--target", "class:10")
    det = _classifier(_DetachedHead().eval())
    monkeypatch.setattr(loader, "load_model", lambda *a, **kw: (det, None))
    assert "none flow" in _bad(cli, photos, *base, "--layer", "body", "--method", "gradcam", "--target", "top1")


def test_metrics_match_pytorch_grad_cam_definitions(resnet, x32):
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence
    from pytorch_grad_cam.metrics.road import ROADMostRelevantFirstAverage

    info = C.probe_model(resnet, x32)
    targets = _targets(info, x32, "top1")
    maps, _ = C.explain(info, x32, "gradcam", [resnet.layer4], targets)
    ours = C.faithfulness(info, x32, maps, targets)
    torch.manual_seed(0)  # ROAD's imputation adds noise: same seed for both
    np.random.seed(0)
    theirs = ROADMostRelevantFirstAverage(list(C.ROAD_PERCENTILES))(x32, maps, targets, resnet)
    np.testing.assert_allclose(ours["confidence_drop"], DropInConfidence()(x32, maps, targets, resnet).ravel(),
                               atol=1e-5)
    assert np.all(np.abs(ours["road_morf"] - np.ravel(theirs)) < 0.05 * (1 + np.abs(np.ravel(theirs))))


def test_aug_smooth_and_eigen_smooth_match_pytorch_grad_cam(resnet, x32):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    info = C.probe_model(resnet, x32)
    with torch.no_grad():
        top1 = resnet(x32).argmax(1).tolist()
    for kw in ({"aug_smooth": True}, {"eigen_smooth": True}):
        ours, _ = C.explain(info, x32, "gradcam", [resnet.layer4], _targets(info, x32, "top1"), **kw)
        cam = GradCAM(resnet, [resnet.layer4])
        try:
            theirs = cam(x32, [ClassifierOutputTarget(c) for c in top1], **kw)
        finally:
            cam.activations_and_grads.release()
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_cli_seg_target_on_a_bundled_featviz_segmenter(cli, sample_dir, tmp_path):
    """A featviz segmentation checkpoint loads as a segmenter; seg:NAME uses its class names."""
    images = sorted((sample_dir / "seg" / "JPEGImages").glob("*.jpg"))[:2]
    res = cli("cam", *images, "--checkpoint", sample_dir / "checkpoints" / "seg_supervised.safetensors",
              "--target", "seg:disc", "--method", "eigencam", "--image-size", "64", "--out", tmp_path / "o", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["model_kind"] == "segmentation" and data["target"].startswith("seg:disc")
    bad = cli("cam", *images, "--checkpoint", sample_dir / "checkpoints" / "seg_supervised.safetensors",
              "--target", "seg:hexagon", "--method", "eigencam", "--out", tmp_path / "p")
    assert bad.exit_code == 1 and "disc" in bad.output


def test_cli_same_file_name_in_two_inputs_keeps_both_overlays(cli, tmp_path, sample_dir):
    """Two inputs holding the same file name: ids fall back to full paths, so no overlay overwrites another."""
    import shutil

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy(sample_dir / "photos" / "cat" / "cat_0.jpg", tmp_path / d / "cat_0.jpg")
    out = tmp_path / "cam"
    r = cli("cam", tmp_path / "a", tmp_path / "b", "--arch", "resnet18_w8-cifar", "--image-size", "32",
            "--method", "gradcam", "--out", out)
    assert r.exit_code == 0, r.output
    assert len(list((out / "overlays").iterdir())) == 2
    with np.load(out / "maps.npz", allow_pickle=False) as z:
        assert len(set(z["ids"])) == 2


def test_cam_draws_with_the_one_heat_overlay():
    """cam's overlays are views.sheets.heat_overlay with CAM_OVERLAY: jet, half and half, maps clipped to [0, 1]."""
    from matplotlib import colormaps

    from featviz.views.sheets import heat_overlay, to_uint8

    rng = np.random.default_rng(0)
    rgb, cam = rng.random((12, 16, 3)), (rng.random((12, 16)) * 1.2 - 0.1).astype(np.float32)
    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3]
    expected = np.uint8(np.clip(0.5 * rgb + 0.5 * heat, 0, 1) * 255 + 0.5)
    assert np.array_equal(to_uint8(heat_overlay(rgb, cam, **C.CAM_OVERLAY)), expected)


def test_cam_records_its_arguments_as_the_command_received_them(cli, monkeypatch, tmp_path):
    """The manifest's arguments are the command's parameters: an option not given is None (not an empty
    list), and --note, --max-image-pixels, --force, --json and how the checkpoint is read are left out."""
    from featviz.models import loader

    seen = {}

    def run(*_args, **kw):
        seen.update(kw["arguments"])
        return {"images": 0, "methods": [], "layers": [], "target": "self", "files": {"contact_sheet": "x"},
                "metrics": None}

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: ("MODEL", None))
    monkeypatch.setattr(C, "run_cam", run)
    r = cli("cam", tmp_path / "a.jpg", "--out", tmp_path / "o", "--arch", "resnet18", "--note", "n", "--json")
    assert r.exit_code == 0, r.output
    assert seen["layer"] is None and seen["method"] == ["gradcam"] and seen["out"] == tmp_path / "o"
    assert list(seen) == ["images", "out", "checkpoint", "arch", "layer", "method", "target", "image_size",
                          "class_names", "aug_smooth", "eigen_smooth", "metrics", "score", "score_steps", "limit",
                          "sheet_images", "cmap", "device", "batch_size", "seed", "strict"]
