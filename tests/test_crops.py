"""CAC's overlapping-crop generator: IoU bounds, stride snapping, flips and overlap alignment."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from featviz.data import cac_crops as crops
from featviz.errors import DataError


def _coord_image(h: int, w: int) -> Image.Image:
    """An image whose pixels encode their own (y, x), so crops can be compared by content."""
    yy, xx = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([yy % 256, xx % 256, (yy // 256) * 16 + xx // 256], -1).astype(np.uint8))


@pytest.mark.parametrize("seed", range(25))
def test_pairs_respect_iou_bound_stride_and_overlap(seed):
    rng = np.random.default_rng(seed)
    pair = crops.sample_crop_pair((300, 420), rng, crop_size=160, iou_bound=(0.3, 0.7), stride=8)
    (y1, x1), (y2, x2) = pair.crop1, pair.crop2
    assert (y2 - y1) % 8 == 0 and (x2 - x1) % 8 == 0
    if pair.tries < crops.CAC_MAX_ITERS:
        assert 0.3 <= pair.iou <= 0.7
        inter = (160 - abs(y2 - y1)) * (160 - abs(x2 - x1))
        assert pair.iou == pytest.approx(inter / (2 * 160 * 160 - inter))
    t1, l1, b1, r1 = pair.overlap1
    t2, l2, b2, r2 = pair.overlap2
    assert (b1 - t1, r1 - l1) == (b2 - t2, r2 - l2) and b1 > t1 and r1 > l1
    # both boxes are the same image pixels
    assert (y1 + t1, x1 + l1) == (y2 + t2, x2 + l2)


@pytest.mark.parametrize("seed", range(10))
def test_overlap_content_matches_after_unflip(seed):
    """Unflipped crop-1 and crop-2 overlaps hold the very same image and mask pixels, also on the stride grid."""
    img = _coord_image(120, 90)
    mask = (np.arange(120 * 90).reshape(120, 90) % 7).astype(np.uint8)
    s = crops.cac_pair(img, mask, np.random.default_rng(seed), base_size=100, crop_size=64,
                       iou_bound=(0.1, 1.0), stride=8)
    p = s.pair
    c1 = crops.unflip(s.crop1.transpose(2, 0, 1), p.flip[0])
    c2 = crops.unflip(s.crop2.transpose(2, 0, 1), p.flip[1])
    t1, l1, b1, r1 = p.overlap1
    t2, l2, b2, r2 = p.overlap2
    np.testing.assert_array_equal(c1[:, t1:b1, l1:r1], c2[:, t2:b2, l2:r2])
    m1 = crops.unflip(s.mask1, p.flip[0])
    m2 = crops.unflip(s.mask2, p.flip[1])
    np.testing.assert_array_equal(m1[t1:b1, l1:r1], m2[t2:b2, l2:r2])
    # nearest-downsampled to the stride-8 grid, the overlap cells line up too
    g1 = m1[::8, ::8][p.overlap_grid(1)]
    g2 = m2[::8, ::8][p.overlap_grid(2)]
    np.testing.assert_array_equal(g1, g2)
    assert g1.size > 0


def test_flips_are_independent_and_seeded():
    flips = {crops.sample_crop_pair((200, 200), np.random.default_rng(i), crop_size=96).flip for i in range(40)}
    assert flips == {(False, False), (False, True), (True, False), (True, True)}
    a = crops.sample_crop_pair((200, 300), np.random.default_rng(3), crop_size=96)
    b = crops.sample_crop_pair((200, 300), np.random.default_rng(3), crop_size=96)
    assert a == b


def test_small_image_is_padded_with_ignore():
    img = Image.new("RGB", (40, 30), (10, 20, 30))
    s = crops.cac_pair(img, np.zeros((30, 40), np.uint8), np.random.default_rng(0), base_size=20,
                       crop_size=64, stride=8)
    assert s.crop1.shape == (64, 64, 3) and s.mask1.shape == (64, 64)
    assert (s.mask1 == crops.IGNORE_INDEX).any() and (s.mask1 == 0).any()
    # padding is the mean colour, not black
    assert tuple(s.crop1[-1, -1]) == crops.IMAGENET_MEAN_RGB or tuple(s.crop1[-1, 0]) == crops.IMAGENET_MEAN_RGB


def test_impossible_bound_falls_back_to_identical_crops():
    p = crops.sample_crop_pair((64, 64), np.random.default_rng(0), crop_size=64, iou_bound=(0.1, 0.5))
    assert p.tries == crops.CAC_MAX_ITERS and p.crop1 == p.crop2 and p.iou == 1.0


def test_bad_arguments():
    with pytest.raises(DataError, match="iou-bound"):
        crops.sample_crop_pair((64, 64), np.random.default_rng(0), crop_size=32, iou_bound=(0.8, 0.2))
    with pytest.raises(DataError, match="mask"):
        crops.cac_pair(Image.new("RGB", (40, 30)), np.zeros((31, 40), np.uint8), np.random.default_rng(0))


def test_low_level_augment_is_seeded_photometric_only():
    rng = np.random.default_rng(0)
    img = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    a, b = crops.LowLevelAugment(7), crops.LowLevelAugment(7)
    outs_a = [a(img) for _ in range(20)]
    outs_b = [b(img) for _ in range(20)]
    for x, y in zip(outs_a, outs_b, strict=True):
        np.testing.assert_array_equal(x, y)
        assert x.shape == img.shape and x.dtype == np.uint8
    params = [crops.LowLevelAugment(i).draw() for i in range(400)]
    # CAC's probabilities: blur 0.5, jitter 0.8, grayscale 0.2
    assert np.mean([p.blur for p in params]) == pytest.approx(0.5, abs=0.08)
    assert np.mean([p.jitter for p in params]) == pytest.approx(0.8, abs=0.08)
    assert np.mean([p.grayscale for p in params]) == pytest.approx(0.2, abs=0.06)
    assert all(0.6 <= p.brightness <= 1.4 and -0.1 <= p.hue <= 0.1 for p in params)
    gray = crops.LowLevelAugment(0).apply(img, crops.LowLevelParams(False, False, 1, 1, 1, 0, (0, 1, 2, 3), True))
    assert (gray[..., 0] == gray[..., 1]).all()
    ident = crops.LowLevelAugment(0).apply(img, crops.LowLevelParams(False, False, 1, 1, 1, 0, (0, 1, 2, 3), False))
    np.testing.assert_array_equal(ident, img)
