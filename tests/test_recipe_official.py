"""featviz train's recipes against transcriptions of the official code (issue 26, part 4).

Multi-crop forwards (dino ``utils.MultiCropWrapper``, swav ``src/resnet50.py``), DINO's lr / weight
decay / teacher-temperature schedules (``utils.cosine_scheduler``, ``DINOLoss``), MoCo v3's momentum
index (``main_moco.py`` ``adjust_moco_momentum``) and ContrastiveCrop's scale. Each transcription
below is written from the official file it names, on fixed tensors.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featviz.models.architectures import build_backbone
from featviz.train.methods import SSL_METHODS, build_method

ARCH = "resnet18_w16-cifar"
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ---------------------------------------------------------------- transcriptions of the official code
class OfficialMultiCropWrapper(nn.Module):
    """facebookresearch/dino ``utils.py`` ``MultiCropWrapper.forward`` (the backbone returns a tensor here)."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        if not isinstance(x, list):
            x = [x]
        idx_crops = torch.cumsum(torch.unique_consecutive(
            torch.tensor([inp.shape[-1] for inp in x]), return_counts=True)[1], 0)
        start_idx, output = 0, torch.empty(0).to(x[0].device)
        for end_idx in idx_crops:
            _out = self.backbone(torch.cat(x[start_idx: end_idx]))
            output = torch.cat((output, _out))
            start_idx = end_idx
        return self.head(output)


def official_dino_loss(student_output, teacher_output, center, ncrops, student_temp, temp, center_momentum):
    """dino ``main_dino.py`` ``DINOLoss.forward`` + ``update_center`` (one process)."""
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / temp, dim=-1).detach().chunk(2)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    total_loss /= n_loss_terms
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
    return total_loss, center * center_momentum + batch_center * (1 - center_momentum)


def official_swav_step(model, inputs, temperature, nmb_crops, crops_for_assign=(0, 1)):
    """swav ``src/resnet50.py`` ``ResNet.forward`` / ``forward_head`` and ``main_swav.py`` ``train`` (no queue)."""
    from featviz.train.methods.swav import sinkhorn  # distributed_sinkhorn, checked in test_methods.py

    with torch.no_grad():  # main_swav.py: normalize the prototypes
        w = model.prototypes.weight.data.clone()
        w = nn.functional.normalize(w, dim=1, p=2)
        model.prototypes.weight.copy_(w)
    idx_crops = torch.cumsum(torch.unique_consecutive(
        torch.tensor([inp.shape[-1] for inp in inputs]), return_counts=True)[1], 0)
    start_idx, output = 0, None
    for end_idx in idx_crops:
        _out = model.backbone(torch.cat(inputs[start_idx: end_idx]))
        output = _out if start_idx == 0 else torch.cat((output, _out))
        start_idx = end_idx
    x = nn.functional.normalize(model.projector(output), dim=1, p=2)  # forward_head
    output = model.prototypes(x)
    bs = inputs[0].size(0)
    loss = 0
    for crop_id in crops_for_assign:
        with torch.no_grad():
            out = output[bs * crop_id: bs * (crop_id + 1)].detach()
            q = sinkhorn(out, 0.05, 3)[-bs:]
        subloss = 0
        for v in np.delete(np.arange(np.sum(nmb_crops)), crop_id):
            xv = output[bs * v: bs * (v + 1)] / temperature
            subloss -= torch.mean(torch.sum(q * F.log_softmax(xv, dim=1), dim=1))
        loss += subloss / (np.sum(nmb_crops) - 1)
    return loss / len(crops_for_assign)


def official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """dino ``utils.py`` ``cosine_scheduler``."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def official_teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs):
    """dino ``main_dino.py`` ``DINOLoss.__init__``'s ``teacher_temp_schedule``."""
    return np.concatenate((np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                           np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))


def official_adjust_moco_momentum(epoch, moco_m, epochs):
    """moco-v3 ``main_moco.py`` ``adjust_moco_momentum`` (``epoch`` is ``epoch + i / iters_per_epoch``)."""
    return 1. - 0.5 * (1. + math.cos(math.pi * epoch / epochs)) * (1. - moco_m)


# ---------------------------------------------------------------- helpers
def _bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def _views(b: int = 4, n_local: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)] + \
           [torch.randn(b, 3, 8, 8, generator=g) for _ in range(n_local)]


def _assert_same_buffers(a: nn.Module, b: nn.Module) -> None:
    ba, bb = _bn_buffers(a), _bn_buffers(b)
    assert ba.keys() == bb.keys()
    for k in ba:
        torch.testing.assert_close(ba[k], bb[k], msg=k)


def _assert_same_dino_step(m, ref, loss, ref_loss, ref_center) -> None:
    """After ``m``'s end-of-step update: the official loss and centre, and ``ref``'s BatchNorm statistics."""
    m.on_step_end(0.0)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(m.center, ref_center)
    for mine, theirs in ((m.backbone, ref.backbone), (m.projector, ref.projector),
                         (m.target_backbone, ref.target_backbone), (m.target_projector, ref.target_projector)):
        _assert_same_buffers(mine, theirs)


# ---------------------------------------------------------------- multi-crop forwards
@pytest.mark.parametrize("bn_head", [True, False])
def test_dino_multicrop_forward_equals_official_multicrop_wrapper(bn_head):
    """2 global 16 px + 3 local 8 px crops: same loss, gradients, centre and BatchNorm statistics."""
    torch.manual_seed(0)
    m = build_method("dino", build_backbone(ARCH, seed=0), use_bn_in_head=bn_head, norm_last_layer=False).train()
    ref = copy.deepcopy(m)
    views = _views()

    loss = m(views)
    loss.backward()

    student = OfficialMultiCropWrapper(ref.backbone, ref.projector)
    teacher = OfficialMultiCropWrapper(ref.target_backbone, ref.target_projector)
    student_output = student(views)
    with torch.no_grad():
        teacher_output = teacher(views[:2])
    ref_loss, ref_center = official_dino_loss(student_output, teacher_output, ref.center, len(views), ref.tps,
                                              ref.tpt, ref.center_momentum)
    ref_loss.backward()
    _assert_same_dino_step(m, ref, loss, ref_loss, ref_center)
    for (name, p), q in zip(m.backbone.named_parameters(), ref.backbone.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert _bn_buffers(m.backbone) and bool(_bn_buffers(m.projector)) == bn_head
    # the two global crops went through the backbone as ONE batch of 2B: one BatchNorm update per crop size
    assert int(m.backbone.bn1.num_batches_tracked) == 2 and int(m.target_backbone.bn1.num_batches_tracked) == 1

    # the check can fail: a forward per view (featviz before issue 26) gives other statistics
    per_view = copy.deepcopy(ref)
    per_view.load_state_dict(build_method("dino", build_backbone(ARCH, seed=0), use_bn_in_head=bn_head,
                                          norm_last_layer=False).state_dict())
    for v in views:
        per_view.projector(per_view.backbone(v))
    assert not torch.allclose(per_view.backbone.bn1.running_mean, m.backbone.bn1.running_mean)


def test_dino_one_pass_crops_off_is_a_forward_per_view():
    """``one_pass_crops=False`` (a named deviation, docs/train.md): each view through backbone and head alone,
    so BatchNorm normalises B images at a time, as featviz did before issue 26; the loss is DINOLoss's."""
    torch.manual_seed(0)
    m = build_method("dino", build_backbone(ARCH, seed=0), use_bn_in_head=True, norm_last_layer=False,
                     one_pass_crops=False).train()
    ref, init = copy.deepcopy(m), copy.deepcopy(m.state_dict())
    views = _views(n_local=1)
    loss = m(views)
    student_output = torch.cat([ref.projector(ref.backbone(v)) for v in views])
    with torch.no_grad():
        teacher_output = torch.cat([ref.target_projector(ref.target_backbone(v)) for v in views[:2]])
    ref_loss, ref_center = official_dino_loss(student_output, teacher_output, ref.center, len(views), ref.tps,
                                              ref.tpt, ref.center_momentum)
    _assert_same_dino_step(m, ref, loss, ref_loss, ref_center)
    # one BatchNorm update per view: 3 for the student, 2 for the teacher (one pass: 2 and 1)
    assert int(m.backbone.bn1.num_batches_tracked) == 3 and int(m.target_backbone.bn1.num_batches_tracked) == 2
    one_pass = build_method("dino", build_backbone(ARCH, seed=0), use_bn_in_head=True, norm_last_layer=False).train()
    one_pass.load_state_dict(init)  # the same weights: only the forward differs
    assert not torch.allclose(one_pass(views), loss)


def test_swav_multicrop_forward_equals_official_resnet_forward():
    """SwAV with 2 + 2 crops: the loss and the BatchNorm statistics of ``src/resnet50.py``'s forward."""
    torch.manual_seed(0)
    m = build_method("swav", build_backbone(ARCH, seed=0), queue_length=0, freeze_prototypes_niters=0).train()
    ref = copy.deepcopy(m)
    views = _views(b=8, n_local=2, seed=1)
    loss = m(views)
    ref_loss = official_swav_step(ref, views, ref.tau, nmb_crops=[2, 2])
    torch.testing.assert_close(loss, ref_loss)
    _assert_same_buffers(m.backbone, ref.backbone)
    _assert_same_buffers(m.projector, ref.projector)
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(m.backbone.conv1.weight.grad, ref.backbone.conv1.weight.grad)
    torch.testing.assert_close(m.prototypes.weight, ref.prototypes.weight)


def test_multicrop_views_have_the_official_sizes_and_scales():
    """SwAV: nmb_crops [2, 6], size_crops [224, 96], min/max_scale_crops [0.14, 0.05] / [1, 0.14]
    (scripts/swav_400ep_bs256_pretrain.sh); DINO ViT: 2 x 224 at (0.4, 1) + N x 96 at (0.05, 0.4)
    (main_dino.py defaults); smaller trainings scale the local side by 96/224 (at least 8 px)."""
    from PIL import Image

    from featviz.data import augment

    img = Image.new("RGB", (256, 256), (120, 30, 200))
    swav = SSL_METHODS.get("swav").recipe
    assert [g.scale for g in swav.globals_] == [(0.14, 1.0)] * 2 and swav.local.scale == (0.05, 0.14)
    out = augment.MultiView(swav, 224, local_crops=6)(img)
    assert [tuple(v.shape[-2:]) for v in out] == [(224, 224)] * 2 + [(96, 96)] * 6
    dino_vit = SSL_METHODS.get("dino").for_family("vit").recipe
    assert [g.scale for g in dino_vit.globals_] == [(0.4, 1.0)] * 2 and dino_vit.local.scale == (0.05, 0.4)
    out = augment.MultiView(dino_vit, 224, local_crops=8)(img)
    assert [tuple(v.shape[-2:]) for v in out] == [(224, 224)] * 2 + [(96, 96)] * 8
    out = augment.MultiView(SSL_METHODS.get("dino").recipe, 32, local_crops=2)(img)
    assert [tuple(v.shape[-2:]) for v in out] == [(32, 32)] * 2 + [(14, 14)] * 2


# ---------------------------------------------------------------- schedules, step by step
def _apply_schedule(cfg, optim, steps_per_epoch: int) -> tuple[np.ndarray, np.ndarray]:
    from featviz.train.optim import Schedule

    w = nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.SGD([{"params": [w], "weight_decay": cfg.weight_decay, "base_weight_decay": cfg.weight_decay}],
                          lr=cfg.lr)
    sched = Schedule.of(cfg, optim, steps_per_epoch)
    lrs, wds = [], []
    for step in range(sched.total):
        lrs.append(sched.apply(opt, step))
        wds.append(opt.param_groups[0]["weight_decay"])
    return np.array(lrs), np.array(wds)


def _dino_cfg(tmp_path, **kw):
    from featviz.train.config import TrainConfig, resolve_config

    return resolve_config(TrainConfig(method="dino", data=str(tmp_path), out=str(tmp_path / "run"),
                                      arch="vit_tiny_patch8_32", batch_size=64, **kw))


def test_dino_lr_and_weight_decay_schedules_equal_cosine_scheduler(tmp_path):
    """main_dino.py:238-250: lr = cosine_scheduler(lr x bs / 256, min_lr, epochs, iters, warmup_epochs),
    wd = cosine_scheduler(weight_decay, weight_decay_end, epochs, iters), step by step."""
    spec = SSL_METHODS.get("dino").for_family("vit")
    iters, epochs = 7, 20
    cfg = _dino_cfg(tmp_path, epochs=epochs)
    assert cfg.warmup_epochs == 2  # 10 of main_dino.py's 100 epochs
    assert (cfg.weight_decay, cfg.weight_decay_end, spec.optim.min_lr) == (0.04, 0.4, 1e-6)
    lrs, wds = _apply_schedule(cfg, spec.optim, iters)
    np.testing.assert_allclose(lrs, official_cosine_scheduler(5e-4 * 64 / 256, 1e-6, epochs, iters, 2), rtol=1e-12)
    np.testing.assert_allclose(wds, official_cosine_scheduler(0.04, 0.4, epochs, iters), rtol=1e-12)
    assert lrs[0] == 0 and lrs[-1] > 1e-6  # linspace from 0; ends above min_lr (the cosine never reaches it)

    # --weight-decay and --weight-decay-end are separate, as in main_dino.py: a user's decay keeps the schedule
    cfg = _dino_cfg(tmp_path, epochs=epochs, weight_decay=0.1)
    _, wds = _apply_schedule(cfg, spec.optim, iters)
    np.testing.assert_allclose(wds, official_cosine_scheduler(0.1, 0.4, epochs, iters), rtol=1e-12)
    cfg = _dino_cfg(tmp_path, epochs=epochs, weight_decay=0.1, weight_decay_end=0.2, warmup_epochs=3)
    assert cfg.defaults["weight_decay_end"] == "user"
    lrs, wds = _apply_schedule(cfg, spec.optim, iters)
    np.testing.assert_allclose(wds, official_cosine_scheduler(0.1, 0.2, epochs, iters), rtol=1e-12)
    np.testing.assert_allclose(lrs, official_cosine_scheduler(5e-4 * 64 / 256, 1e-6, epochs, iters, 3), rtol=1e-12)


def test_weight_decay_end_option_reaches_the_config_and_other_methods_stay_constant(tmp_path):
    from featviz.train.config import TrainConfig, resolve_config

    cfg = resolve_config(TrainConfig(method="simclr", data=str(tmp_path), out=str(tmp_path / "r")))
    assert cfg.weight_decay_end is None and "weight_decay_end" not in cfg.defaults
    _, wds = _apply_schedule(cfg, SSL_METHODS.get("simclr").optim, 3)
    assert set(wds) == {cfg.weight_decay}


@pytest.mark.parametrize(("warmup_epochs", "nepochs"), [(1, 4), (3, 5), (0, 3)])
def test_dino_teacher_temperature_schedule_equals_official(warmup_epochs, nepochs):
    """DINOLoss.teacher_temp_schedule, epoch by epoch; a 1-epoch warm-up uses the warm-up value at epoch 0."""
    m = build_method("dino", build_backbone(ARCH, seed=0), warmup_tpt=0.01, warmup_tpt_epochs=warmup_epochs,
                     tpt=0.05)
    official = official_teacher_temp_schedule(0.01, 0.05, warmup_epochs, nepochs)
    mine = []
    for e in range(nepochs):
        m.set_epoch(e)
        mine.append(m.teacher_temp())
    np.testing.assert_allclose(mine, official, rtol=1e-12)


def test_moco_v3_momentum_index_equals_adjust_moco_momentum():
    """main_moco.py: step i's forward updates the momentum encoder with adjust_moco_momentum(epoch + i / iters)
    before its keys; featviz updates after step k with the momentum of step k + 1 (the same online weights)."""
    from featviz.train.ssl_task import SSLTask

    epochs, iters = 3, 4
    for name in ("moco_v3", "byol"):
        m = build_method(name, build_backbone(ARCH, seed=0))
        used = []
        m.update_targets = used.append  # records the momentum of every EMA step
        task = SimpleNamespace(model=m)
        total = epochs * iters
        for k in range(total):
            SSLTask.after_step(task, k, total)
        if name == "byol":  # BYOL (and DINO) update after the optimiser step with the step's own value
            np.testing.assert_allclose(used, [m.momentum(k / total) for k in range(total)])
            continue
        official = [official_adjust_moco_momentum(e + i / iters, 0.99, epochs)
                    for e in range(epochs) for i in range(iters)]
        np.testing.assert_allclose(used[:-1], official[1:], rtol=1e-12)
        assert used[-1] == pytest.approx(1.0)  # after the last step: no further forward, m = 1 changes nothing


def test_moco_v3_digits_preset_keeps_the_earlier_momentum_index(tmp_path):
    """Measured worse on a short digits run (docs/train.md), so the digits preset keeps the step-late index."""
    from featviz.train.config import TrainConfig, resolve_config
    from featviz.train.ssl_task import SSLTask

    cfg = resolve_config(TrainConfig(method="moco_v3", data="digits", out=str(tmp_path)))
    assert cfg.hparams["momentum_of_next_step"] is False
    assert cfg.defaults["hparams.momentum_of_next_step"] == "preset:digits"
    m = build_method("moco_v3", build_backbone(ARCH, seed=0), momentum_of_next_step=False)
    used = []
    m.update_targets = used.append
    for k in range(6):
        SSLTask.after_step(SimpleNamespace(model=m), k, 6)
    np.testing.assert_allclose(used, [m.momentum(k / 6) for k in range(6)])


def test_dino_digits_preset_keeps_its_earlier_schedule_and_takes_the_official_forward(tmp_path):
    """Measured worse on digits with the official warm-up (docs/train.md), so the digits preset keeps no warm-up
    (the earlier cosine); its forward is the official one. Every other DINO run warms up; a user's flag wins."""
    from featviz.train.config import TrainConfig, resolve_config
    from featviz.train.optim import Schedule

    cfg = resolve_config(TrainConfig(method="dino", data="digits", out=str(tmp_path)))
    assert cfg.warmup_epochs == 0 and cfg.defaults["warmup_epochs"] == "preset:digits"
    assert "one_pass_crops" not in cfg.hparams
    assert build_method("dino", build_backbone(ARCH, seed=0), **cfg.hparams).one_pass_crops is True
    sched = Schedule.of(cfg, SSL_METHODS.get("dino").optim, 44)
    lrs = [sched.peak * 0.5 * (1 + math.cos(math.pi * k / sched.total)) for k in range(sched.total)]
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    np.testing.assert_allclose([sched.apply(opt, k) for k in range(sched.total)], lrs, atol=2e-6)  # min_lr: 1e-6
    user = resolve_config(TrainConfig(method="dino", data="digits", out=str(tmp_path), warmup_epochs=1.0))
    assert user.warmup_epochs == 1.0 and user.defaults["warmup_epochs"] == "user"
    other = resolve_config(TrainConfig(method="dino", data=str(tmp_path), out=str(tmp_path / "r"), epochs=20))
    assert other.warmup_epochs == 2  # the official recipe: a tenth of the epochs


# ---------------------------------------------------------------- ContrastiveCrop's scale
def test_contrastive_crop_takes_the_official_scale_by_default(tmp_path):
    from featviz.data.contrastive_crop import OFFICIAL
    from featviz.train.config import TrainConfig, resolve_config

    assert OFFICIAL["scale"][0] == (0.2, 1.0)
    cfg = resolve_config(TrainConfig(method="simsiam", data="digits", out=str(tmp_path), crop="contrastive"))
    assert cfg.min_scale == 0.2 and cfg.defaults["min_scale"].startswith("official ContrastiveCrop")
    recipe = SSL_METHODS.get("simsiam").recipe.adjusted(min_scale=cfg.min_scale)
    assert [g.scale for g in recipe.globals_] == [OFFICIAL["scale"][0]] * 2
    assert resolve_config(cfg).min_scale == 0.2  # idempotent
    cfg = resolve_config(TrainConfig(method="simsiam", data="digits", out=str(tmp_path), crop="contrastive",
                                     min_scale=0.5))
    assert cfg.min_scale == 0.5 and cfg.defaults["min_scale"] == "user"
    rrc = resolve_config(TrainConfig(method="simsiam", data="digits", out=str(tmp_path)))
    assert rrc.min_scale == 0.8 and rrc.defaults["min_scale"] == "preset:digits"
