"""ContrastiveCrop: the transform against a transcription of the official code, its centre
distribution, crops inside the image, exact boxes from known heatmaps, the training schedule,
resume and DDP (gloo) of the boxes, and `featviz crops`."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from featviz.data.contrastive_crop import (
    ContrastiveCrop,
    CropSchedule,
    box_tensor,
    boxes_from_heatmaps,
    heatmaps,
)


# ---------------------------------------------------------------- the official code, transcribed
def official_get_params(width: int, height: int, box, scale, ratio, beta):
    """xyupeng/ContrastiveCrop datasets/transforms/ContrastiveCrop.py:16-66 (get_params), line by line."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            h0, w0, h1, w1 = box
            ch0 = min(max(int(height * h0) - h // 2, 0), height - h)
            ch1 = min(max(int(height * h1) - h // 2, 0), height - h)
            cw0 = min(max(int(width * w0) - w // 2, 0), width - w)
            cw1 = min(max(int(width * w1) - w // 2, 0), width - w)
            i = ch0 + int((ch1 - ch0) * beta.sample())
            j = cw0 + int((cw1 - cw0) * beta.sample())
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return i, j, h, w


def _random_box(rng: random.Random, grid: int):
    """A box as the official update_box makes them: row/column indices over the grid, as float32."""
    r0, r1 = sorted(rng.randrange(grid) for _ in range(2))
    c0, c1 = sorted(rng.randrange(grid) for _ in range(2))
    return torch.tensor([r0 / grid, c0 / grid, r1 / grid, c1 / grid]).float().tolist()


@pytest.mark.parametrize("alpha", [0.1, 0.6, 1.0])
def test_transform_equals_official_geometry_on_fixed_draws(alpha):
    rng = random.Random(0)
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    t = ContrastiveCrop(32, scale=scale, ratio=ratio, alpha=alpha)
    beta = torch.distributions.Beta(alpha, alpha)
    for k in range(400):
        width, height = rng.choice([(32, 32), (64, 48), (31, 57), (224, 224), (500, 375), (40, 400)])
        box = _random_box(rng, rng.choice([32, 224])) if k % 7 else [0.0, 0.0, 1.0, 1.0]
        torch.manual_seed(k)
        want = official_get_params(width, height, box, scale, ratio, beta)
        state = torch.random.get_rng_state()
        torch.manual_seed(k)
        got = t.make_params([box_tensor(box, (height, width))])
        assert (got["top"], got["left"], got["height"], got["width"]) == want, (k, width, height, box)
        assert torch.equal(torch.random.get_rng_state(), state)  # the same draws were consumed


def test_transform_output_is_the_official_crop_and_the_rng_stream_matches():
    """Through a v2.Compose with the box in the sample: the pixels are F.resized_crop at the
    official parameters, and the draws after the crop (flip, jitter) see the same RNG state."""
    import torchvision.transforms.functional as TF

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8))
    box = [0.25, 0.125, 0.75, 0.5]
    ours = v2.Compose([ContrastiveCrop(16, alpha=0.1), v2.RandomHorizontalFlip()])
    beta = torch.distributions.Beta(0.1, 0.1)
    for seed in range(20):
        torch.manual_seed(seed)
        out, _ = ours(img, box_tensor(box, (48, 64)))
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        i, j, h, w = official_get_params(64, 48, box, (0.2, 1.0), (3 / 4, 4 / 3), beta)
        ref = TF.resized_crop(img, i, j, h, w, [16, 16], TF.InterpolationMode.BILINEAR)
        if torch.rand(1) < 0.5:  # RandomHorizontalFlip's draw
            ref = TF.hflip(ref)
        assert torch.rand(1).item() == after_ours.item()
        assert np.array_equal(np.asarray(out), np.asarray(ref)), seed


def test_without_a_box_the_whole_image_is_the_box():
    t = ContrastiveCrop(8, alpha=0.5)
    img = Image.new("RGB", (40, 30))
    torch.manual_seed(3)
    a = t.make_params([img])
    torch.manual_seed(3)
    b = t.make_params([img, box_tensor([0.0, 0.0, 1.0, 1.0], (30, 40))])
    assert a == b


def _beta_gof(cells: np.ndarray, n: int, alpha: float) -> float:
    """Chi-square p-value of ``cells`` (integers k in [0, n], the official ``int(n * Beta(a, a))``)
    against Beta(alpha, alpha), on 20 bins whose edges lie on the grid: k < e <=> B < e / n, so the
    expected counts are exact even where Beta(0.1, 0.1) piles up against the ends."""
    from scipy import stats

    dist = stats.beta(alpha, alpha)
    edges = np.unique(np.round(dist.ppf(np.linspace(0, 1, 21)[1:-1]) * n).astype(np.int64))
    edges = edges[(edges > 0) & (edges < n)]  # the last bin holds k = n (float32 Beta draws of 1.0)
    p = np.diff(np.concatenate([[0.0], dist.cdf(edges / n), [1.0]]))
    observed = np.bincount(np.searchsorted(edges, cells, side="right"), minlength=len(p))
    return float(stats.chisquare(observed, p * len(cells)).pvalue)


@pytest.mark.parametrize("alpha", [0.1, 0.6, 2.0])
def test_centre_sampler_is_beta(alpha):
    """Goodness of fit: on a canvas where nothing is clipped, the crop centre's offset in the box,
    ``top - lo`` in [0, hi - lo], is ``int((hi - lo) * Beta(alpha, alpha))`` (3000 draws per axis,
    chi-square p > 0.001), and the same draws reject a wrong alpha (p < 1e-6)."""
    side = 100_000
    t = ContrastiveCrop(8, scale=(1e-4, 1e-4), ratio=(1.0, 1.0), alpha=alpha)
    box = [0.3, 0.25, 0.7, 0.65]
    b = box_tensor(box, (side, side))
    torch.manual_seed(0)
    k_h, k_w, spans = [], [], set()
    for _ in range(3000):
        p = t.make_params([b])
        h, w = p["height"], p["width"]
        lo_h, hi_h = int(side * box[0]) - h // 2, int(side * box[2]) - h // 2
        lo_w, hi_w = int(side * box[1]) - w // 2, int(side * box[3]) - w // 2
        k_h.append(p["top"] - lo_h)
        k_w.append(p["left"] - lo_w)
        spans.add((hi_h - lo_h, hi_w - lo_w))
        assert side * box[0] <= p["top"] + h // 2 <= side * box[2]  # the centre lies in the box
    assert spans == {(40_000, 40_000)}  # scale and ratio fixed: one span per axis
    wrong = 1.0 if alpha != 1.0 else 0.3
    for k in (np.array(k_h), np.array(k_w)):
        assert _beta_gof(k, 40_000, alpha) > 1e-3
        assert _beta_gof(k, 40_000, wrong) < 1e-6


def test_crops_never_leave_the_image():
    rng = random.Random(1)
    for alpha in (0.05, 0.6, 3.0):
        t = ContrastiveCrop(16, scale=(0.01, 1.0), ratio=(0.2, 5.0), alpha=alpha)
        for k in range(600):
            height, width = rng.randint(1, 90), rng.randint(1, 90)
            kind = k % 4
            if kind == 0:  # a box at an edge or a corner
                box = rng.choice([[0, 0, 0, 0], [1, 1, 1, 1], [0, 0.9, 0.05, 1], [0.99, 0, 1, 0.02]])
            elif kind == 1:  # a degenerate point box
                y, x = rng.random(), rng.random()
                box = [y, x, y, x]
            else:
                box = _random_box(rng, rng.choice([7, 32, 224]))
            p = t.make_params([box_tensor(box, (height, width))])
            assert p["top"] >= 0 and p["left"] >= 0 and p["height"] >= 1 and p["width"] >= 1, (p, box)
            assert p["top"] + p["height"] <= height and p["left"] + p["width"] <= width, (p, box, height, width)


# ---------------------------------------------------------------- boxes from heatmaps
def official_boxes(eval_train_map: torch.Tensor, t: float) -> torch.Tensor:
    """DDP_simsiam_ccrop.py:113-121, for (N, 1, Hi, Wi) maps already scaled and upsampled."""
    Hi, Wi = eval_train_map.shape[-2:]
    boxes = []
    for hmap in eval_train_map:
        hmap = hmap.squeeze(0)
        h_filter = (hmap.max(1)[0] > t).int()
        w_filter = (hmap.max(0)[0] > t).int()
        h_min, h_max = torch.nonzero(h_filter).view(-1)[[0, -1]] / Hi
        w_min, w_max = torch.nonzero(w_filter).view(-1)[[0, -1]] / Wi
        boxes.append(torch.tensor([h_min, w_min, h_max, w_max]))
    return torch.stack(boxes)


def test_boxes_from_a_known_heatmap_are_exact():
    h = torch.zeros(3, 10, 20)
    h[0, 2:5, 3:9] = 1.0  # a rectangle: rows 2-4, columns 3-8
    h[1, 7, 15] = 0.5     # one pixel above 0.1
    h[1, 1, 1] = 0.1      # not above 0.1 (strictly greater)
    h[2] = 1.0            # everything: the whole image
    b = boxes_from_heatmaps(h, 0.1)
    want = torch.tensor([[2 / 10, 3 / 20, 4 / 10, 8 / 20], [7 / 10, 15 / 20, 7 / 10, 15 / 20],
                         [0.0, 0.0, 9 / 10, 19 / 20]])
    assert torch.equal(b.boxes, want.float())
    assert torch.allclose(b.area, torch.tensor([3 * 6 / 200, 1 / 200, 1.0]))
    assert b.whole.tolist() == [False, False, True] and b.constant.tolist() == [False] * 3
    # the same boxes as the official loop, on random scaled maps
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(16, 1, 4, 4, generator=g) ** 3
    lo, hi = maps.amin((2, 3), keepdim=True), maps.amax((2, 3), keepdim=True)
    maps = (maps - lo) / (hi - lo)
    up = torch.nn.functional.interpolate(maps, size=(32, 32), mode="bilinear")
    for t in (0.05, 0.1, 0.5, 0.9):
        assert torch.equal(boxes_from_heatmaps(up[:, 0], t).boxes, official_boxes(up, t).float()), t


def test_box_input_is_the_pipelines_normalisation():
    from featviz.data.augment import finish
    from featviz.data.contrastive_crop import box_input

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8))
    want = v2.Compose([v2.Resize((16, 16), antialias=True), *finish((0.4, 0.5, 0.6), (0.2, 0.3, 0.4))])(img)
    assert torch.equal(box_input(16, (0.4, 0.5, 0.6), (0.2, 0.3, 0.4))(img), want)


def test_heatmap_is_the_channel_mean_scaled_and_upsampled_and_constant_maps_get_the_whole_image():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer4 = torch.nn.Identity()

        def forward(self, x):
            return self.layer4(x[:, :, ::4, ::4])  # an (N, 3, 4, 4) "feature map"

    x = torch.zeros(2, 3, 16, 16)
    x[0, :, 4, 8] = torch.tensor([3.0, 6.0, 9.0])  # feature (1, 2) of image 0
    hm, const = heatmaps(Net(), x)
    m = torch.zeros(1, 1, 4, 4)
    m[0, 0, 1, 2] = 1.0
    assert torch.equal(hm[0], torch.nn.functional.interpolate(m, size=(16, 16), mode="bilinear")[0, 0])
    assert const.tolist() == [False, True] and float(hm[1].abs().max()) == 0.0
    b = boxes_from_heatmaps(hm, 0.1, const)
    assert b.boxes[1].tolist() == [0.0, 0.0, 1.0, 1.0] and bool(b.whole[1]) and int(b.constant.sum()) == 1


# ---------------------------------------------------------------- the schedule
def test_schedule_is_the_official_one():
    # official (1-based E): use_box = E >= warmup + 1; update after E if E >= warmup, E != epochs, E % every == 0
    for warmup, every, epochs in [(100, 100, 500), (20, 20, 100), (2, 2, 10), (0, 501, 500), (3, 2, 9), (1, 1, 3)]:
        s = CropSchedule(0.1, 0.6, warmup, every, epochs)
        for e0 in range(epochs):
            E = e0 + 1
            assert s.uses_boxes(e0) == (E >= warmup + 1)
            assert s.updates_after(e0) == (E >= warmup and E != epochs and E % every == 0)
    assert CropSchedule(0.1, 0.6, 100, 100, 500).update_epochs() == [100, 200, 300, 400]


# ---------------------------------------------------------------- training: views, resume, DDP
TINY = dict(arch="resnet18_w16-cifar", image_size=16, batch_size=16, limit=40, log_every=1, seed=0)
CCROP = dict(crop="contrastive", crop_threshold=0.5, crop_warmup=1, crop_update_every=1)


def test_view_dataset_crops_inside_the_boxes_after_the_warmup():
    """With boxes set, each global view is ContrastiveCrop in that image's box (same seeded draws
    as the pipeline built by hand); without, RandomResizedCrop as before."""
    from featviz.data.augment import MultiView, View, ViewDataset, finish, sample_seed

    view = View(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1))
    from featviz.data.augment import Recipe

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (24, 20, 3), np.uint8)) for _ in range(3)]
    ds = ViewDataset(imgs, np.zeros(3, np.int64), MultiView(Recipe((view, view)), 8, crop_alpha=0.1), seed=5)
    plain = [ds[i][0] for i in range(3)]
    ds.boxes = torch.tensor([[0.0, 0.0, 0.25, 0.25], [0.5, 0.5, 1.0, 1.0], [0.2, 0.1, 0.3, 0.9]])
    boxed = [ds[i][0] for i in range(3)]
    by_hand = v2.Compose([*view.geometric(8, crop_alpha=0.1), *view.photometric(8), *finish()])
    for i in range(3):
        torch.manual_seed(sample_seed(5, 0, i))
        want = [by_hand(imgs[i], box_tensor(ds.boxes[i], (24, 20)))[0] for _ in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(boxed[i], want, strict=True))
        assert not torch.equal(boxed[i][0], plain[i][0])


def test_resume_reproduces_the_boxes_and_the_weights(tmp_path, one_thread):
    from safetensors.torch import load_file

    from featviz.train.config import TrainConfig
    from featviz.train.loop import train

    base = dict(method="simsiam", data="digits", epochs=3, **TINY, **CCROP)
    full = train(TrainConfig(out=str(tmp_path / "full"), **base))
    calls = {"n": 0}

    def killer(it, total=None):
        calls["n"] += 1
        for i, x in enumerate(it):
            if calls["n"] == 2 and i == 1:  # mid-way through epoch 2, which crops in the boxes of epoch 1
                raise KeyboardInterrupt
            yield x

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "cut"), **base), progress=killer)
    st = torch.load(tmp_path / "cut" / "state.pt", weights_only=True)
    assert int(st["epoch"]) == 1 and int(st["ccrop_updated"]) == 1
    train(TrainConfig(out=str(tmp_path / "cut"), **base), resume=True)
    a, b = (load_file(str(tmp_path / d / "last.safetensors")) for d in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(tmp_path / d / "state.pt", weights_only=True) for d in ("full", "cut"))
    assert torch.equal(sa["ccrop_boxes"], sb["ccrop_boxes"]) and int(sb["ccrop_updated"]) == 2
    npz = np.load(tmp_path / "cut" / "boxes.npz")
    assert np.array_equal(npz["boxes"], sb["ccrop_boxes"].numpy()) and int(npz["epoch"]) == 2
    assert len(npz["ids"]) == 32 and str(npz["ids"][0]).startswith("digits/")
    whole = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert not (sb["ccrop_boxes"] == whole).all(1).all()  # the boxes moved off the whole image
    # metrics.jsonl: one boxes line per update (after epochs 1 and 2, not the last), none repeated
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    boxes = [r for r in lines if r.get("event") == "boxes"]
    assert [r["epoch"] for r in boxes] == [1, 2] and [r["step"] for r in boxes] == [2, 4]
    for r in boxes:
        assert 0 < r["mean_box_area"] <= 1 and 0 <= r["whole_image_share"] <= 1 and r["n"] == 32
    assert full.config["contrastive_crop"]["updates_after_epochs"] == [1, 2]


def _scale_bn(model, k: float) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var *= k


def _ddp_items() -> list:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)) for _ in range(7)]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from featviz.data.contrastive_crop import compute_boxes
    from featviz.distributed import DistInfo
    from featviz.models.architectures import build_backbone

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build_backbone("resnet18_w16-cifar", seed=0)
        _scale_bn(model, 1 + 0.5 * rank)  # each rank's BatchNorm statistics differ, as after a DDP epoch
        b = compute_boxes(model, _ddp_items(), image_size=32, threshold=0.5, mean=(0.5,) * 3, std=(0.25,) * 3,
                          info=DistInfo(rank, world, rank, torch.device("cpu")), batch_size=2)
        torch.save({"boxes": b.boxes, "area": b.area, "whole": b.whole}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_boxes_are_each_ranks_shard_all_gathered(tmp_path):
    """2 gloo processes (7 images: shards of 4 and 3) end with the same boxes on both ranks, equal
    to one process's with rank 0's BatchNorm statistics."""
    import socket

    import torch.multiprocessing as mp

    from featviz.data.contrastive_crop import compute_boxes
    from featviz.models.architectures import build_backbone

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    kw = dict(image_size=32, threshold=0.5, mean=(0.5,) * 3, std=(0.25,) * 3)
    one = compute_boxes(build_backbone("resnet18_w16-cifar", seed=0), _ddp_items(), **kw)
    assert len(r0["boxes"]) == 7
    for r in (r0, r1):
        assert torch.equal(r["boxes"], one.boxes) and torch.equal(r["area"], one.area)
    assert not one.whole.any()  # the boxes are not trivial
    other = build_backbone("resnet18_w16-cifar", seed=0)
    _scale_bn(other, 1.5)  # rank 1's own statistics give other boxes: the broadcast matters
    assert not torch.equal(compute_boxes(other, _ddp_items(), **kw).boxes, one.boxes)


def test_crop_names_match_the_cli_and_train_flags_fail_in_one_line(cli, tmp_path):
    from typing import get_args

    from featviz.cli.choices import CropName
    from featviz.data.contrastive_crop import CROPS

    assert set(get_args(CropName)) == set(CROPS)
    base = ["train", "-m", "simsiam", "-d", "digits", "-a", "resnet18_w16-cifar", "--image-size", "16"]
    cases = [(["--crop-alpha", "0.3"], "only apply with --crop contrastive"),
             (["-m", "cac", "--crop", "contrastive"], "makes its own crops")]
    for extra, msg in cases:
        r = cli(*base, *extra, "-o", tmp_path / "x")
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 1 and len(lines) == 1 and msg in lines[0], r.output
        assert not (tmp_path / "x").exists()
    r = cli(*base, "--crop", "contrastiv", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "contrastiv" in r.output


# ---------------------------------------------------------------- featviz crops
def test_view_statistics_match_brute_force():
    from featviz.views.crops import box_pixels, inside_share, object_share, pair_iou

    rng = np.random.default_rng(0)
    mask = rng.choice([0, 0, 0, 1, 2, 255], size=(30, 40))
    views = np.array([[[0, 0, 30, 40], [10, 5, 10, 20]], [[2, 3, 5, 5], [20, 30, 10, 10]],
                      [[4, 4, 6, 6], [4, 4, 6, 6]]])
    for (a, b), iou in zip(views, pair_iou(views), strict=True):
        pa, pb = np.zeros((30, 40), bool), np.zeros((30, 40), bool)
        pa[a[0]:a[0] + a[2], a[1]:a[1] + a[3]] = True
        pb[b[0]:b[0] + b[2], b[1]:b[1] + b[3]] = True
        assert iou == pytest.approx((pa & pb).sum() / (pa | pb).sum())
    box = box_pixels([0.2, 0.25, 0.5, 0.5], (30, 40), (10, 8))  # rows 6 .. (0.5 + 0.1) * 30 = 18
    assert box == pytest.approx((6.0, 10.0, 18.0, 25.0))
    ins = inside_share(views, box)
    obj = object_share(views, mask)
    for i in range(3):
        for v in range(2):
            t, le, h, w = views[i, v]
            cell = np.zeros((30, 40), bool)
            cell[t:t + h, le:le + w] = True
            inb = np.zeros((30, 40), bool)
            inb[6:18, 10:25] = True
            assert ins[i, v] == pytest.approx((cell & inb).sum() / cell.sum())
            m = mask[cell]
            assert obj[i, v] == pytest.approx(((m != 0) & (m != 255)).sum() / (m != 255).sum())


def test_crops_cli_writes_the_sheet_and_the_numbers(cli, tmp_path, sample_dir):
    import shutil

    imgs, masks = tmp_path / "imgs", tmp_path / "masks"
    imgs.mkdir()
    masks.mkdir()
    for s in ("scene_000", "scene_001", "scene_004"):
        shutil.copy(sample_dir / "seg" / "JPEGImages" / f"{s}.jpg", imgs)
        shutil.copy(sample_dir / "seg" / "SegmentationClass" / f"{s}.png", masks)
    out = tmp_path / "out"
    r = cli("crops", imgs, "-a", "resnet18_w16-cifar", "--image-size", "32", "--masks", masks, "--samples", "64",
            "--pairs", "2", "--threshold", "0.3", "-o", out, "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout[r.stdout.index("{"):])
    assert s["images"] == 3 and s["masks"] == 3 and s["heatmap_size"] == [32, 32] and s["alpha"] == 0.1
    assert s["layer"] == "layer4" and s["samples"] == 64
    z = np.load(out / "crops.npz")
    assert z["views_contrastive"].shape == (3, 64, 2, 4) and z["heatmaps"].shape == (3, 32, 32)
    assert z["object_rrc"].shape == (3, 64, 2)
    for m in ("contrastive", "rrc"):
        assert s[m]["iou"] == pytest.approx(float(z[f"iou_{m}"].mean(1).mean()), abs=1e-6)
        assert s[m]["object_share"] == pytest.approx(float(np.nanmean(np.nanmean(z[f"object_{m}"], (1, 2)))), 1e-6)
        v = z[f"views_{m}"]  # crops inside the 240x180 scenes
        assert (v[..., 0] >= 0).all() and (v[..., 0] + v[..., 2] <= 180).all() and (v[..., 1] + v[..., 3] <= 240).all()
    # the boxes are the thresholded heatmaps' bounding boxes
    assert np.array_equal(z["boxes"], boxes_from_heatmaps(torch.from_numpy(z["heatmaps"].astype(np.float32)),
                                                          0.3).boxes.numpy())
    man = json.loads((out / "manifest.json").read_text())
    assert man["command"] == "crops" and len(man["per_image"]) == 3 and "versions" in man
    assert (out / "sheet.png").stat().st_size > 20_000
    # the human summary, and errors: one line, nothing written
    r = cli("crops", imgs, "-a", "resnet18_w16-cifar", "--image-size", "32", "-o", out, "--samples", "8")
    assert r.exit_code == 1 and "--force" in r.output and len(r.stderr.strip().splitlines()) == 1
    r = cli("crops", imgs, "-a", "resnet18_w16-cifar", "--image-size", "32", "-o", tmp_path / "o2", "--samples", "8",
            "--masks", tmp_path / "nope")
    assert r.exit_code == 1 and "is not a folder" in r.stderr and not (tmp_path / "o2").exists()
    other = tmp_path / "other"
    other.mkdir()
    Image.new("L", (240, 180)).save(other / "cat.png")
    r = cli("crops", imgs, "-a", "resnet18_w16-cifar", "--image-size", "32", "-o", tmp_path / "o5", "--samples", "8",
            "--masks", other)
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and "same file stem" in r.stderr
    assert "'cat'" in r.stderr and not (tmp_path / "o5").exists()
    Image.new("L", (10, 10)).save(masks / "scene_001.png")
    r = cli("crops", imgs, "-a", "resnet18_w16-cifar", "--image-size", "32", "-o", tmp_path / "o3", "--samples", "8",
            "--masks", masks)
    assert r.exit_code == 1 and "10x10" in r.stderr and "240x180" in r.stderr and not (tmp_path / "o3").exists()
    r = cli("crops", imgs, "-a", "resnet18_w16-cifar", "--image-size", "32", "-o", tmp_path / "o4", "--samples", "16")
    assert r.exit_code == 0, r.output
    assert "IoU of the two views" in r.stdout and "sheet:" in r.stdout


def test_vit_heatmap_is_the_patch_tokens_channel_mean():
    """A ViT's heatmap (through the feature core): its last block's patch tokens (class and
    register tokens left out) on the patch grid, channel mean, scaled, upsampled. Not the final
    norm's: a LayerNorm centres each token, its channel mean is rounding noise, which the
    constant-map rule catches (whole-image boxes, not boxes drawn from noise)."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=(32, 48), depth=1, reg_tokens=2, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 48)
    hm, const = heatmaps(vit, x)
    with torch.no_grad():
        tok = vit.blocks(vit.norm_pre(vit._pos_embed(vit.patch_embed(x))))[:, vit.num_prefix_tokens:]  # (2, 6, 192)
    m = tok.mean(2).reshape(2, 1, 2, 3)
    lo, hi = m.amin((2, 3), keepdim=True), m.amax((2, 3), keepdim=True)
    want = torch.nn.functional.interpolate((m - lo) / (hi - lo), size=(32, 48), mode="bilinear")[:, 0]
    assert hm.shape == (2, 32, 48) and not const.any()
    assert torch.allclose(hm, want, atol=1e-5)
    assert torch.equal(boxes_from_heatmaps(hm, 0.5).boxes, boxes_from_heatmaps(want, 0.5).boxes)
    normed, const = heatmaps(vit, x, layer="norm")
    assert const.all() and float(normed.abs().max()) == 0.0
    b = boxes_from_heatmaps(normed, 0.5, const)
    assert b.whole.all() and int(b.constant.sum()) == 2
