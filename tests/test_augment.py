"""The one augmentation pipeline (featviz.data.augment) and the consumers that draw from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from featviz.data import augment
from featviz.data.augment import analysis_view
from featviz.train.methods import SSL_METHODS

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture
def img() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8))


def _seeded(fn, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def test_view_steps_follow_the_papers_lists():
    byol1, byol2 = SSL_METHODS.get("byol").recipe.globals_
    steps = v2.Compose(byol2.photometric(224)).transforms
    kinds = [type(s.transforms[0]).__name__ if isinstance(s, v2.RandomApply) else type(s).__name__ for s in steps]
    assert kinds == ["ColorJitter", "RandomGrayscale", "GaussianBlur", "RandomSolarize"]
    assert byol1.blur_p == 1.0 and byol2.blur_p == 0.1 and byol2.solarize_p == 0.2
    # no blur below 64 px (SimCLR / SimSiam CIFAR), sigma scaled with the side above
    assert not any(isinstance(s, v2.RandomApply) and isinstance(s.transforms[0], v2.GaussianBlur)
                   for s in byol2.photometric(32))
    blur = [s for s in v2.Compose(byol1.photometric(112)).transforms if isinstance(s, v2.GaussianBlur)][0]
    assert blur.sigma == pytest.approx([0.05, 1.0])


def test_multiview_recipe_and_adjustments(img):
    r = SSL_METHODS.get("swav").recipe.adjusted(min_scale=0.5, hflip=False)
    assert all(g.scale == (0.5, 1.0) and g.hflip == 0.0 for g in r.globals_)
    assert r.local.scale == (0.05, 0.14) and r.local.hflip == 0.0  # local crops keep their small scale
    views = _seeded(lambda: augment.MultiView(r, 64, local_crops=3)(img))
    assert [tuple(v.shape) for v in views] == [(3, 64, 64)] * 2 + [(3, 27, 27)] * 3  # 96/224 of 64
    again = _seeded(lambda: augment.MultiView(r, 64, local_crops=3)(img))
    assert all(torch.equal(a, b) for a, b in zip(views, again, strict=True))
    dino_vit = SSL_METHODS.get("dino").for_family("vit").recipe
    assert dino_vit.globals_[0].scale == (0.4, 1.0) and dino_vit.without_local().globals_[0].scale == (0.14, 1.0)


def test_training_views_are_seeded_per_sample_and_epoch(img):
    r = SSL_METHODS.get("simsiam").recipe
    mv = augment.MultiView(r, 32)
    ds = augment.ViewDataset([img, img], np.array([0, 1]), mv, seed=3)
    ds.set_epoch(2)
    views, label, i = ds[1]
    ref = _seeded(lambda: mv(img), augment.sample_seed(3, 2, 1))
    assert label == 1 and i == 1 and all(torch.equal(a, b) for a, b in zip(views, ref, strict=True))
    ds.set_epoch(3)
    assert not torch.equal(ds[1][0][0], views[0])


def test_collapse_two_views_come_from_the_pipeline(img):
    from featviz.collapse.twoview import view_pair

    for shared in (False, True):
        a = _seeded(lambda s=shared: view_pair(img, 32, MEAN, STD, shared_geometry=s))
        b = _seeded(lambda s=shared: augment.view_pair(img, 32, MEAN, STD, shared_geometry=s, view=analysis_view(None)))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], a[1])


def test_collapse_two_view_features_use_the_pipeline():
    from featviz.collapse.twoview import two_view_features
    from featviz.models.architectures import build_backbone

    rng = np.random.default_rng(1)
    imgs = [Image.fromarray((rng.random((36, 36, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    model = build_backbone("resnet18_w16-cifar", seed=0)
    feats, _ = two_view_features(model, imgs, image_size=32, seed=5)

    def ref():
        pairs = [augment.view_pair(im, 32, MEAN, STD) for im in imgs]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    v1, v2_ = _seeded(ref, 5)
    with torch.no_grad():
        np.testing.assert_allclose(feats["backbone"][0], model(v1).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(feats["backbone"][1], model(v2_).numpy(), rtol=1e-4, atol=1e-5)


def test_cam_pair_target_view_comes_from_the_pipeline():
    from featviz.views.cam.targets import augment_views

    x = torch.randn(2, 3, 24, 20)
    ref = augment.augment_batch(x, MEAN, STD, seed=4, view=augment.ANALYSIS_VIEW)
    assert torch.equal(augment_views(x, MEAN, STD, seed=4), ref)
    byol = augment_views(x, MEAN, STD, seed=4, method="byol")  # a BYOL checkpoint: BYOL's first view
    byol_view = SSL_METHODS.get("byol").recipe.globals_[0]
    assert torch.equal(byol, augment.augment_batch(x, MEAN, STD, seed=4, view=byol_view))
    assert analysis_view("byol") is SSL_METHODS.get("byol").recipe.globals_[0]
    assert analysis_view(None) is augment.ANALYSIS_VIEW
    assert byol.shape == x.shape and not torch.equal(byol, ref)


def test_cac_low_level_augment_is_the_pipelines():
    from featviz.data import cac_crops as crops

    assert crops.LowLevelAugment is augment.LowLevelAugment and crops.LowLevelParams is augment.LowLevelParams
    rng = np.random.default_rng(0)
    arr = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
    p = augment.LowLevelParams(False, True, 1.2, 0.8, 1.1, 0.05, (3, 2, 1, 0), False)
    out = augment.LowLevelAugment(0).apply(arr, p)
    import torchvision.transforms.functional as TF

    im = Image.fromarray(arr)
    for op in (lambda x: TF.adjust_hue(x, 0.05), lambda x: TF.adjust_saturation(x, 1.1),
               lambda x: TF.adjust_contrast(x, 0.8), lambda x: TF.adjust_brightness(x, 1.2)):
        im = op(im)
    np.testing.assert_array_equal(out, np.asarray(im))  # CAC's torchvision ColorJitter ops, in the drawn order


def test_normalisation_matches_the_hand_written_one():
    rng = np.random.default_rng(2)
    arr = (rng.random((10, 12, 3)) * 255).astype(np.uint8)
    hand = (arr.astype(np.float32) / 255.0 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    np.testing.assert_allclose(augment.to_input(arr, MEAN, STD).numpy(), hand.transpose(2, 0, 1), rtol=1e-5, atol=1e-6)
    x = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(augment.denormalize(augment.normalize(x, MEAN, STD), MEAN, STD), x)
    from featviz.errors import DataError

    with pytest.raises(DataError, match="uint8"):
        augment.to_input(arr.astype(np.float32))
