"""Segmenters load whole (featviz and CAC's official layout) and CAC's trainer equals CAC's code."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cac_reference import CAC, UnsupLoss, randomise, rng_for

from featviz.data.images import IMAGENET_MEAN, IMAGENET_STD
from featviz.errors import CheckpointError
from featviz.models.description import describe
from featviz.models.segmenter import describe_segmenter, load_segmenter, segmenter_layout
from featviz.train.segmentation.cac import CACSettings, cac_unsupervised_loss, directional_contrast
from featviz.train.segmentation.task import SegTask


def _save_cac(path, model: torch.nn.Module, *, ddp: bool = True, config: dict | None = None) -> None:
    """A checkpoint as CAC's ``BaseTrainer._save_checkpoint`` writes it (DDP: ``module.`` keys)."""
    sd = {("module." if ddp else "") + k: v for k, v in model.state_dict().items()}
    cfg = config or {"dataset": "voc", "model": {"supervised": False, "semi": True, "layers": 50},
                     "train_unsupervised": {"crop_size": 320, "base_size": 400}}
    torch.save({"arch": "DistributedDataParallel", "epoch": 80, "state_dict": sd,
                "monitor_best": np.float64(0.71), "config": cfg}, path)


# ---------------------------------------------------------------- CAC's official layout
@pytest.fixture(scope="module")
def cac_r50(tmp_path_factory):
    """A random-weight CAC ResNet-50 checkpoint (DDP-saved, VOC config) and its reference modules.

    CAC's weights are the same at output stride 8 and 16; only the dilations differ."""
    ref16 = randomise(CAC(num_classes=21, layers=50, output_stride=16), seed=5).eval()
    ref8 = CAC(num_classes=21, layers=50, output_stride=8).eval()
    ref8.load_state_dict(ref16.state_dict())
    path = tmp_path_factory.mktemp("cac") / "best_model.pth"
    _save_cac(path, ref16)
    return path, {16: ref16, 8: ref8}


def _assert_same_outputs(seg, ref, x):
    with torch.no_grad():
        pooled = F.avg_pool2d(ref.encoder(x), kernel_size=2, stride=2)
        proj = F.normalize(ref.project(pooled), 2, 1)
        for got, want in ((seg(x), ref(x)), (seg.pixel_features(x, "decoder"), pooled),
                          (seg.pixel_features(x, "projector"), proj)):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert pooled.shape == (len(x), 256, x.shape[2] // 8, x.shape[3] // 8)  # stride 8: the classifier's input


@pytest.mark.parametrize("output_stride", [16, 8])
def test_cac_checkpoint_loads_whole_and_matches_reference(cac_r50, output_stride):
    path, refs = cac_r50
    assert segmenter_layout(path) == "cac"
    seg = load_segmenter(path, output_stride=output_stride)
    d = describe(seg)
    assert d.kind == "segmenter" and d.method == "cac" and d.num_classes == 21 and d.class_names[15] == "person"
    assert d.source["format"] == "cac" and d.source["output_stride"] == output_stride
    assert d.source["crop"] == {"crop_size": 320, "base_size": 400} and d.arch.name == f"resnet50-os{output_stride}"
    _assert_same_outputs(seg, refs[output_stride], torch.randn(2, 3, 32, 48))  # non-square


def test_cac_output_stride_defaults_to_the_config_else_16(cac_r50, tmp_path):
    path, refs = cac_r50
    x = torch.randn(1, 3, 32, 32)
    seg = load_segmenter(path)  # the config names none: CAC's code builds DeepLab at its default, 16
    assert describe(seg).source["output_stride"] == 16
    with torch.no_grad():
        assert not torch.allclose(seg(x), refs[8](x), atol=1e-3)  # the dilation matters
    ref = CAC(num_classes=19, layers=101, output_stride=16, semi=False).eval()  # PyTorch's default init
    city = tmp_path / "city_r101.pth"
    _save_cac(city, ref, ddp=False, config={"dataset": "cityscapes",
                                            "model": {"supervised": True, "semi": False, "output_stride": 16}})
    seg = load_segmenter(city)
    assert seg.class_names[0] == "road" and seg.projector is None and describe(seg).method == "supervised_seg"
    assert describe(seg).arch.name == "resnet101-os16"
    with torch.no_grad():
        y = torch.randn(1, 3, 32, 32)
        want = ref(y)
        np.testing.assert_allclose(seg(y).numpy(), want.numpy(), rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_layouts_are_told_apart(tmp_path, sample_dir):
    assert segmenter_layout(sample_dir / "checkpoints" / "seg_cac.safetensors") == "featviz"
    assert segmenter_layout(sample_dir / "checkpoints" / "simsiam_digits.safetensors") is None
    assert segmenter_layout(sample_dir / "checkpoints" / "moco_v2_tiny.pth.tar") is None
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    assert segmenter_layout(tmp_path / "junk.pth") is None
    with pytest.raises(CheckpointError, match="not a whole segmenter"):
        load_segmenter(sample_dir / "checkpoints" / "moco_v2_tiny.pth.tar")


def test_featviz_segmenter_loads_with_its_crop(sample_dir):
    seg = load_segmenter(sample_dir / "checkpoints" / "seg_cac.safetensors")
    d = describe(seg)
    assert d.kind == "segmenter" and d.source["format"] == "featviz" and seg.projector is not None
    assert d.source["crop"] == {"crop_size": 96, "base_size": 120}  # the scenes' working resolution
    assert seg.head_spec["align_corners"] and seg.head_spec["classifier_dropout"] == 0.1  # CAC's head
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert seg(x).shape == (2, 4, 64, 64)
        f = seg.pixel_features(x, "decoder")
        assert f.shape[-2:] == (8, 8) and f.shape[1] == seg.head_spec["dim"]
        z = seg.pixel_features(x, "projector")
        np.testing.assert_allclose(z.norm(dim=1).numpy(), 1.0, atol=1e-5)


# ---------------------------------------------------------------- the directional loss
def _hand_direction(f1, f2, c1, c2, l1, negs, neg_labels, temp, thresh):
    """CAC's loss1 (models/model.py lines 196-235) for all negatives in one chunk, written out."""
    pos = (f1 * f2).sum(-1, keepdim=True) / temp
    logits = torch.cat([pos, f1 @ negs.T / temp], 1)
    mask = torch.cat([torch.ones(len(f1), 1), (neg_labels[None] != l1[:, None]).float()], 1)
    m = logits.max(1, keepdim=True)[0]
    p = torch.exp(pos - m).squeeze(-1) / ((torch.exp(logits - m) * mask).sum(-1) + 1e-8)
    w = ((c2 > thresh) & (c1 < c2)).float()
    return ((-torch.log(p + 1e-8)) * w).sum() / (w.sum() + 1e-12)


def test_directional_contrast_equals_cac_on_fixed_tensors():
    g = torch.Generator().manual_seed(0)
    f1 = F.normalize(torch.randn(40, 8, generator=g), dim=1).requires_grad_()
    f2 = F.normalize(torch.randn(40, 8, generator=g), dim=1).requires_grad_()
    c1, c2 = torch.rand(40, generator=g), torch.rand(40, generator=g) * 0.5 + 0.5
    l1 = torch.randint(0, 3, (40,), generator=g)
    negs = F.normalize(torch.randn(9000, 8, generator=g), dim=1).requires_grad_()  # two of CAC's 8000-chunks
    neg_labels = torch.randint(0, 3, (9000,), generator=g)
    got = directional_contrast(f1, f2, c1, c2, l1, negs, neg_labels, temp=0.1, pos_thresh=0.75)
    ref = UnsupLoss(temp=0.1)._direction((f1 * f2.detach()).sum(-1, keepdim=True) / 0.1, f1, negs, neg_labels, l1,
                                          (c2 > 0.75) & (c1 < c2), 1e-8)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    ga = torch.autograd.grad(got, [f1, f2, negs], allow_unused=True)
    gb = torch.autograd.grad(ref, [f1, f2, negs], allow_unused=True)
    np.testing.assert_allclose(ga[0].numpy(), gb[0].numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ga[2].numpy(), gb[2].numpy(), rtol=1e-5, atol=1e-7)
    assert ga[1] is None and gb[1] is None  # the target side is detached
    # in a single chunk the hand-written formula agrees too
    small = directional_contrast(f1, f2, c1, c2, l1, negs[:500], neg_labels[:500], temp=0.1, pos_thresh=0.75)
    hand = _hand_direction(f1, f2.detach(), c1, c2, l1, negs[:500], neg_labels[:500], 0.1, 0.75)
    assert small.item() == pytest.approx(hand.item(), rel=1e-6)


def test_directional_contrast_hand_values():
    f1, f2, negs = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    kw = dict(temp=1.0, pos_thresh=0.5)
    got = directional_contrast(f1, f2, torch.tensor([0.6]), torch.tensor([0.9]), torch.tensor([1]), negs,
                               torch.tensor([2]), **kw)
    assert got.item() == pytest.approx(-math.log(math.e / (math.e + 1 + 1e-8) + 1e-8), rel=1e-7)
    # the counterpart is less confident: this direction is masked out
    assert directional_contrast(f1, f2, torch.tensor([0.9]), torch.tensor([0.6]), torch.tensor([1]), negs,
                                torch.tensor([2]), **kw).item() == 0.0
    # a negative with the anchor's pseudo label is left out: only the positive remains
    assert directional_contrast(f1, f2, torch.tensor([0.6]), torch.tensor([0.9]), torch.tensor([1]), negs,
                                torch.tensor([1]), **kw).item() == pytest.approx(0.0, abs=1e-6)


def test_no_gradient_flows_into_the_negatives():
    """Pixels outside the overlap enter the loss only as sampled negatives: their gradient is zero."""
    g = torch.Generator().manual_seed(1)
    z1 = F.normalize(torch.randn(2, 8, 6, 6, generator=g), dim=1).requires_grad_()
    z2 = F.normalize(torch.randn(2, 8, 6, 6, generator=g), dim=1).requires_grad_()
    logits1, logits2 = torch.randn(2, 3, 6, 6, generator=g) * 3, torch.randn(2, 3, 6, 6, generator=g) * 3
    ov = torch.tensor([[0, 0, 24, 24], [0, 0, 24, 24]])  # the top-left 3x3 cells of each crop
    flips = torch.tensor([[False, False], [False, False]])
    loss, parts = cac_unsupervised_loss(z1, z2, logits1, logits2, ov, ov, flips,
                                        CACSettings(selected_num=40, pos_thresh=0.5), np.random.default_rng(0))
    loss.backward()
    outside = torch.ones(2, 6, 6, dtype=torch.bool)
    outside[:, :3, :3] = False
    assert parts["n_overlap"] == 18 and loss.item() > 0
    for z, idx in ((z1, parts["selected"][0]), (z2, parts["selected"][1])):
        chosen = torch.zeros(2 * 36, dtype=torch.bool)
        chosen[idx] = True
        assert (chosen & outside.reshape(-1)).sum() > 10  # many negatives lie outside the overlap
        assert z.grad.permute(0, 2, 3, 1)[outside].abs().max() == 0
        assert z.grad.permute(0, 2, 3, 1)[~outside].abs().max() > 0


# ---------------------------------------------------------------- the full cac step
def _tiny_task(sample_dir, **over):
    from featviz.distributed import DistInfo
    from featviz.train.config import TrainConfig

    cfg = TrainConfig(method="cac", data=str(sample_dir / "seg"), out="unused", arch="resnet18_w16-os8",
                      batch_size=2, image_size=40, selected_num=30, pos_thresh=0.3, seed=3)
    for k, v in over.items():
        object.__setattr__(cfg, k, v)
    task = SegTask(cfg, DistInfo())
    for m in task.model.modules():  # the reference must draw the same dropout masks: switch them off
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return task


def _reference_step(model, batch, ref_loss: UnsupLoss, rng):
    """CAC.forward (semi) transcribed on featviz's modules: encoder = backbone + DeepLabv3+ decoder."""
    x_l, target_l = batch["image"], batch["mask"]
    enc = model.head.classify(model.decoder_features(x_l))
    output_l = F.interpolate(enc, size=x_l.size()[2:], mode="bilinear", align_corners=True)
    loss_sup = F.cross_entropy(output_l, target_l, ignore_index=255)
    enc_ul1 = F.avg_pool2d(model.decoder_features(batch["u1"]), kernel_size=2, stride=2)
    output_ul1 = F.normalize(model.projector(enc_ul1), 2, 1)
    enc_ul2 = F.avg_pool2d(model.decoder_features(batch["u2"]), kernel_size=2, stride=2)
    output_ul2 = F.normalize(model.projector(enc_ul2), 2, 1)
    logits1, logits2 = model.head.classify(enc_ul1), model.head.classify(enc_ul2)
    ov1, ov2, flip = batch["ov1"], batch["ov2"], batch["flip"]
    ul1, br1 = (ov1[:, 0], ov1[:, 1]), (ov1[:, 2], ov1[:, 3])
    ul2, br2 = (ov2[:, 0], ov2[:, 1]), (ov2[:, 2], ov2[:, 3])
    unsup, l1, l2, sel = ref_loss(output_ul1, output_ul2, logits1, logits2, ul1, br1, ul2, br2,
                                  (flip[:, 0], flip[:, 1]), rng)
    return loss_sup + unsup, unsup, sel


def test_cac_step_equals_cac_forward(sample_dir):
    task = _tiny_task(sample_dir, epoch_start_unsup=0, step_save=1)
    model = task.model.train()
    ref_model = copy.deepcopy(model)
    ref_loss = UnsupLoss(weight_unsup=0.1, temp=0.1, pos_thresh_value=0.3, selected_num=30, step_save=1)
    collate = task.collate
    batch = collate([task.dataset[i] for i in (0, 1)])
    seen = []
    for step in range(2):  # the same batch twice; step 1 also uses the bank (step 0's negatives)
        loss = task.loss(model, batch, torch.device("cpu"), False)
        want, unsup, sel = _reference_step(ref_model, batch, ref_loss, rng_for(3, step))
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)
        assert task.last_parts["loss_unsup"] == pytest.approx(unsup.item(), rel=1e-5) and unsup.item() > 0
        model.zero_grad()
        ref_model.zero_grad()
        loss.backward()
        want.backward()
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
            np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
        seen.append(sel[0])
    assert int(model.cac_bank.filled) == 1 and int(model.cac_bank.steps) == 2
    # the same batch twice: one fresh draw per step, not a seed from the overlap boxes
    assert not np.array_equal(seen[0], seen[1])


def test_cac_warm_up_is_supervised_only(sample_dir):
    task = _tiny_task(sample_dir)  # CAC's default epoch_start_unsup = 5
    assert task.settings.epoch_start_unsup == 5 and task.settings.step_save == 1
    batch = task.collate([task.dataset[i] for i in (0, 1)])
    model = task.model.train()
    loss = task.loss(model, batch, torch.device("cpu"), False)
    assert task.last_parts == {"loss_sup": pytest.approx(loss.item()), "loss_unsup": 0.0}
    loss.backward()
    assert all(p.grad is None for p in model.projector.parameters())
    task.dataset.set_epoch(5)
    task.loss(model, batch, torch.device("cpu"), False)
    assert task.last_parts["loss_unsup"] > 0


def test_labelled_branch_is_cac_crop_and_flip_only(sample_dir):
    """Labelled crops: long side 0.5-2.0x base, crop, flip; no blur, jitter or grayscale."""
    from PIL import Image

    from featviz.data import cac_crops as crops

    img = Image.new("RGB", (120, 90), (200, 30, 60))
    mask = np.ones((90, 120), np.uint8)
    sides, flips = set(), set()
    for s in range(60):
        c = crops.labelled_crop(img, mask, np.random.default_rng(s), base_size=100, crop_size=64)
        sides.add(c.long_side)
        flips.add(c.flip)
        assert c.image.shape == (64, 64, 3) and c.mask.shape == (64, 64)
        inside = c.mask == 1
        assert (c.image[inside] == (200, 30, 60)).all()  # colour untouched
        assert (c.image[~inside] == crops.IMAGENET_MEAN_RGB).all() and (c.mask[~inside] == 255).all()
    assert min(sides) >= 50 and max(sides) <= 200 and min(sides) < 70 and max(sides) > 170
    assert flips == {True, False}
    task = _tiny_task(sample_dir)
    item = task.dataset[0]
    rng = np.random.default_rng([3, 0, 0])
    want = crops.labelled_crop(task.voc.image(task.dataset.labelled[0]), task.voc.mask(task.dataset.labelled[0]),
                               rng, base_size=task.base_size, crop_size=40)
    np.testing.assert_array_equal(item["mask"].numpy(), want.mask)
    back = item["image"].numpy().transpose(1, 2, 0) * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    np.testing.assert_allclose(back * 255, want.image, atol=1e-3)


def test_settings_read_from_a_config():
    s = CACSettings.from_config(SimpleNamespace(weight_unsup=0.5, temp=0.2, pos_thresh=0.9, selected_num=10))
    assert (s.weight_unsup, s.temp, s.pos_thresh, s.selected_num, s.step_save, s.epoch_start_unsup) == \
        (0.5, 0.2, 0.9, 10, 1, 5)


# ---------------------------------------------------------------- DDP: gathered, detached negatives
SETTINGS = CACSettings(selected_num=12, pos_thresh=0.4)


def _rank_tensors(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    z1 = F.normalize(torch.randn(2, 8, 5, 5, generator=g), dim=1).requires_grad_()
    z2 = F.normalize(torch.randn(2, 8, 5, 5, generator=g), dim=1).requires_grad_()
    logits = [torch.randn(2, 3, 5, 5, generator=g) * 3 for _ in range(2)]
    ov1 = torch.tensor([[0, 8, 40, 40], [8, 0, 40, 32]])
    ov2 = torch.tensor([[0, 0, 40, 32], [0, 8, 32, 40]])
    flips = torch.tensor([[True, False], [False, True]])
    return z1, z2, logits, ov1, ov2, flips


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        z1, z2, logits, ov1, ov2, flips = _rank_tensors(rank)
        loss, parts = cac_unsupervised_loss(z1, z2, *logits, ov1, ov2, flips, SETTINGS,
                                            rng_for(0, 0, rank))
        loss.backward()
        neg, labels = parts["negatives"]
        torch.save({"loss": loss.detach(), "g1": z1.grad, "g2": z2.grad, "neg": neg, "labels": labels,
                    "neg_grad": neg.requires_grad}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_negatives_are_gathered_from_every_rank_without_gradient(tmp_path):
    """Each rank's loss uses its own anchors and every rank's (detached) negatives, in rank order;
    its gradient is its own (DDP averages them), with no equal-loss assumption."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert not got[0]["neg_grad"] and torch.equal(got[0]["neg"], got[1]["neg"]) and len(got[0]["neg"]) == 2 * 2 * 12
    own = []
    for r in range(2):  # this rank's 2 x 12 sampled pixels, drawn alone
        z1, z2, logits, ov1, ov2, flips = _rank_tensors(r)
        _, parts = cac_unsupervised_loss(z1, z2, *logits, ov1, ov2, flips, SETTINGS,
                                         rng_for(0, 0, r))
        own.append(parts["negatives"])
    np.testing.assert_allclose(got[0]["neg"].numpy(), torch.cat([own[0][0], own[1][0]]).numpy(), atol=1e-7)
    for r in range(2):
        z1, z2, logits, ov1, ov2, flips = _rank_tensors(r)
        other = own[1 - r]
        loss, _ = cac_unsupervised_loss(z1, z2, *logits, ov1, ov2, flips, SETTINGS,
                                        rng_for(0, 0, r), [other])  # the other rank's negatives, as if gathered
        loss.backward()
        assert got[r]["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
        np.testing.assert_allclose(got[r]["g1"].numpy(), z1.grad.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got[r]["g2"].numpy(), z2.grad.numpy(), rtol=1e-5, atol=1e-7)
    assert abs(got[0]["loss"].item() - got[1]["loss"].item()) > 1e-3  # the ranks' losses differ


def test_describe_segmenter_for_inspect(cac_r50):
    d = describe_segmenter(load_segmenter(cac_r50[0]))
    assert d["layout"] == "cac" and d["arch"] == "resnet50-os16" and d["output_stride"] == 16
    assert (d["decoder_dim"], d["projector_dim"], d["feature_stride"], d["num_classes"]) == (256, 128, 8, 21)
    assert d["aspp_rates"] == [6, 12, 18] and d["trained_crop"] == {"crop_size": 320, "base_size": 400}
    from featviz.models.loader import inspect_checkpoint

    info = inspect_checkpoint(cac_r50[0])  # what `featviz inspect` prints: the segmenter, nothing "dropped"
    assert (info["kind"], info["format"], info["layout"], info["num_classes"]) == ("segmenter", "cac", "cac", 21)
    assert "dropped" not in info


def test_cac_resume_replays_the_negative_bank(tmp_path, sample_dir):
    """The bank and the step counter live in state.pt: a run killed mid-way and resumed ends with the
    uninterrupted run's weights."""
    from safetensors.torch import load_file

    from featviz.train.config import TrainConfig
    from featviz.train.loop import train

    def cfg(out):
        return TrainConfig(method="cac", data=str(sample_dir / "seg"), out=str(tmp_path / out), epochs=3,
                           arch="resnet18_w16-os8", batch_size=2, image_size=32, limit=4, selected_num=16,
                           log_every=1, threads=1, epoch_start_unsup=0)

    train(cfg("full"))
    calls = {"n": 0}

    def killer(it, total=None):
        calls["n"] += 1
        for i, x in enumerate(it):
            if calls["n"] == 2 and i == 1:  # mid-way through epoch 2
                raise KeyboardInterrupt
            yield x

    with pytest.raises(KeyboardInterrupt):
        train(cfg("cut"), progress=killer)
    state = torch.load(tmp_path / "cut" / "state.pt", weights_only=True)["model"]
    assert int(state["cac_bank.steps"]) == 2 and int(state["cac_bank.filled"]) == 1  # saved after epoch 1
    train(cfg("cut"), resume=True)
    a, b = (load_file(tmp_path / d / "last.safetensors") for d in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
