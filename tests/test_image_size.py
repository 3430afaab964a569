"""`--image-size HxW` is the whole image at exactly H×W; a square N keeps the classification center crop.

An image already at H×W, given ``--image-size HxW``, must reach the model unchanged (pixel-exact after
normalisation) in the dense views and, by default, in the image-level commands; ``--center-crop``
chooses the crop there, and every manifest says which (``resize``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featviz.data.images import eval_transform, load_image, resize_rule
from featviz.models.architectures import build_backbone

ARCH = "resnet18_w16-cifar"  # any input size, cheap
H, W = 64, 96


def _noise(path: Path, h: int = H, w: int = W, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)  # PNG: lossless
    return path


def _as_given(path: Path, mean, std) -> torch.Tensor:
    """The image itself, normalised: what the model must receive (no resize, no crop)."""
    a = torch.from_numpy(np.asarray(load_image(path), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (a - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _recording(model: torch.nn.Module) -> list[torch.Tensor]:
    """Record every input the model's forward receives."""
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().cpu().clone()))
    return seen


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            _noise(root / cls / f"{cls}{i}.png", seed=10 * (cls == "b") + i)
    return root


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


# ------------------------------------------------------------------ the one transform
def test_hxw_takes_the_whole_image_and_n_keeps_today_s_center_crop(tmp_path):
    from torchvision import transforms as T

    img = load_image(_noise(tmp_path / "x.png"))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = eval_transform((H, W), mean, std)(img)
    assert torch.equal(x, _as_given(tmp_path / "x.png", mean, std))  # pixel-exact: nothing resized or cut
    assert resize_rule((H, W)) == f"whole image resized to {H}x{W}"
    # the crop is an explicit choice at HxW: it cuts the border (the image only covers HxW / 0.875 after a resize)
    c = eval_transform((H, W), mean, std, center_crop=True)(img)
    assert c.shape == x.shape and not torch.allclose(c, x)
    assert resize_rule((H, W), True).startswith("center crop")
    # square N: today's transform, bit for bit (short side to N / 0.875 above 64 px, N itself up to 64, center crop)
    big = load_image(_noise(tmp_path / "big.png", 240, 300))
    for n, short in ((224, 256), (32, 32)):
        today = T.Compose([T.Resize(short, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(n), T.ToTensor(),
                           T.Normalize(mean, std)])
        assert torch.equal(eval_transform(n, mean, std)(big), today(big))
        assert resize_rule(n) == f"center crop: short side resized to {short}, center {n}x{n} cropped"
    # --no-center-crop at N: the whole image, stretched to NxN
    whole = eval_transform(224, mean, std, center_crop=False)(big)
    assert whole.shape == (3, 224, 224) and not torch.allclose(whole, eval_transform(224, mean, std)(big))


# ------------------------------------------------------------------ a dense view
def test_a_view_gets_the_whole_image_at_hxw_and_says_so(tmp_path):
    from featviz.views.pca import run_pca

    img = _noise(tmp_path / "x.png")
    model = build_backbone(ARCH, seed=0)
    seen = _recording(model.conv1)
    run_pca([img], tmp_path / "pca", model=model, layer="layer3", image_size=f"{H}x{W}", components=2,
            foreground="none")
    norm = model.featviz.normalization
    assert seen and torch.equal(seen[0][0], _as_given(img, norm.mean, norm.std))  # the picture, unchanged
    m = json.loads((tmp_path / "pca" / "manifest.json").read_text())
    assert m["resize"] == f"whole image resized to {H}x{W}"
    # square N: the center crop, as before, and the manifest says so
    seen.clear()
    run_pca([img], tmp_path / "sq", model=model, layer="layer3", image_size=32, components=2, foreground="none")
    assert torch.equal(seen[0][0], eval_transform(32, norm.mean, norm.std)(load_image(img)))
    assert json.loads((tmp_path / "sq" / "manifest.json").read_text())["resize"].startswith("center crop")


# ------------------------------------------------------------------ image-level commands
def test_embed_at_hxw_is_the_model_on_the_picture_itself(cli, folder, tmp_path):
    out = tmp_path / "e.npz"
    _ok(cli("embed", "--arch", ARCH, "--images", folder, "--image-size", f"{H}x{W}", "--out", out))
    model = build_backbone(ARCH, seed=0).eval()
    norm = model.featviz.normalization
    files = sorted(folder.rglob("*.png"))
    with torch.no_grad():
        ref = model(torch.stack([_as_given(f, norm.mean, norm.std) for f in files])).numpy()
    with np.load(out) as z:
        np.testing.assert_allclose(z["features"], ref, rtol=1e-4, atol=1e-5)
    m = json.loads((tmp_path / "e.manifest.json").read_text())
    assert m["resize"] == f"whole image resized to {H}x{W}" and m["image_size"] == [H, W]
    assert m["arguments"]["center_crop"] is None

    # --center-crop at HxW crops, and the manifest says so
    _ok(cli("embed", "--arch", ARCH, "--images", folder, "--image-size", f"{H}x{W}", "--center-crop",
            "--out", tmp_path / "c.npz"))
    with np.load(tmp_path / "c.npz") as z:
        assert not np.allclose(z["features"], ref, rtol=1e-3, atol=1e-4)
    m = json.loads((tmp_path / "c.manifest.json").read_text())
    assert m["resize"].startswith("center crop") and m["arguments"]["center_crop"] is True

    # square N: the center crop by default (today's numbers)
    _ok(cli("embed", "--arch", ARCH, "--images", folder, "--image-size", "32", "--out", tmp_path / "n.npz"))
    with torch.no_grad():
        ref32 = model(torch.stack([eval_transform(32, norm.mean, norm.std)(load_image(f)) for f in files])).numpy()
    with np.load(tmp_path / "n.npz") as z:
        np.testing.assert_allclose(z["features"], ref32, rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "n.manifest.json").read_text())["resize"].startswith("center crop")


def test_embed_images_center_crop_reaches_the_model(tmp_path):
    from featviz.eval.embed import embed_images

    img = _noise(tmp_path / "x.png")
    model = build_backbone(ARCH, seed=0)
    norm = model.featviz.normalization
    seen = _recording(model)
    embed_images(model, [img], image_size=(H, W))
    assert torch.equal(seen[-1][0], _as_given(img, norm.mean, norm.std))
    embed_images(model, [img], image_size=(H, W), center_crop=True)
    assert torch.equal(seen[-1][0], eval_transform((H, W), norm.mean, norm.std, center_crop=True)(load_image(img)))
    assert not torch.equal(seen[-1][0], seen[0][0])


def test_pixels_refuse_a_center_crop_in_one_line(cli, folder, tmp_path):
    r = cli("embed", "--arch", ARCH, "--images", folder, "--pixels", "--masks", folder, "--center-crop",
            "--out", tmp_path / "p.npz")
    assert r.exit_code != 0
    assert "--center-crop" in r.output and "drop --center-crop" in r.output


@pytest.mark.parametrize("command", ["knn", "probe"])
def test_knn_and_probe_state_the_resize(command, cli, folder, tmp_path):
    extra = ["--k", "2"] if command == "knn" else ["--c-grid", "1"]
    r = _ok(cli(command, "--arch", ARCH, "--images", folder, "--image-size", f"{H}x{W}",
                "--json", *extra))
    assert json.loads(r.stdout)["protocol"]["resize"] == f"whole image resized to {H}x{W}"
    r = _ok(cli(command, "--arch", ARCH, "--images", folder, "--image-size", f"{H}x{W}", "--center-crop",
                "--json", *extra))
    assert json.loads(r.stdout)["protocol"]["resize"] == resize_rule((H, W), True)
    r = _ok(cli(command, "--arch", ARCH, "--images", folder, "--image-size", "32", *extra))
    assert "images: center crop" in r.stdout
