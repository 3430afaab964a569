"""The SSL methods against their official code: registrations, losses transcribed from the
official repositories on fixed tensors, and each method's defining tricks."""

from __future__ import annotations

import inspect
from typing import get_args

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featviz.cli.choices import MethodName, OptimizerName
from featviz.data import augment
from featviz.models import heads
from featviz.models.architectures import build_backbone
from featviz.train import methods
from featviz.train.methods import SSL_METHODS, MethodRegistration, build_method, contrastive, swav
from featviz.train.optim import Optim

ARCH = "resnet18_w16-cifar"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _net(name: str, **kw) -> methods.SSLMethod:
    return build_method(name, build_backbone(ARCH, seed=0), **kw).train()


# ---------------------------------------------------------------- one registration per method
def test_names_in_sync_with_the_registry():
    from featviz.train.config import method_names
    from featviz.train.optim import OPTIMIZERS

    assert set(get_args(MethodName)) == set(method_names())
    assert set(get_args(OptimizerName)) == set(OPTIMIZERS)


@pytest.mark.parametrize("name", SSL_METHODS.names())
def test_every_registered_method_has_every_part(name):
    spec = SSL_METHODS.get(name)
    assert isinstance(spec, MethodRegistration) and spec.name == name
    assert isinstance(spec.official, Optim) and spec.official.source, "official optimiser with its file and line"
    assert isinstance(spec.optim, Optim) and spec.optim.source
    assert spec.source
    cls = spec.model
    assert callable(cls)
    assert issubclass(cls, methods.SSLMethod) and cls.name == name
    assert isinstance(spec.recipe, augment.Recipe) and len(spec.recipe.globals_) == 2 and spec.recipe.source
    assert spec.recipe is augment.METHOD_RECIPES[name]  # the views live in the one augmentation pipeline
    assert spec.for_family("vit").recipe is augment.VIT_RECIPES.get(name, spec.recipe)
    assert spec.presets.get("digits"), "the measured digits preset"
    params = inspect.signature(cls.__init__).parameters
    assert all(k in params for k in spec.hparams), "hparams are constructor keywords"
    if spec.defaults is not None:
        ctx = methods.DataContext(n_train=1438, batch_size=64, epochs=10, image_size=32, feature_dim=128)
        assert all(k in params for k in spec.defaults(ctx))
    if spec.official_local_crops:
        assert spec.multi_crop
    # deviations from the official optimiser are declared
    if spec.optim.name != spec.official.name:
        assert any(spec.official.name in d or "LARS" in d or "LARC" in d for d in spec.deviations)
    # the exported heads rebuild from their specs
    m = _net(name)
    for head, hspec in m.head_specs.items():
        rebuilt = heads.build_head(hspec)
        rebuilt.load_state_dict(getattr(m, head).state_dict())
    assert set(m.exported()) == {"backbone", *m.head_specs}


@pytest.mark.parametrize("name", ["supervised_seg", "cac"])
def test_every_segmentation_method_has_every_part(name):
    """Segmentation methods have their own registry, apart from the SSL methods', with the same parts."""
    from featviz.train.segmentation.registry import SEG_METHODS

    spec = SEG_METHODS.get(name)
    assert spec.name == name and name not in SSL_METHODS
    assert isinstance(spec.official, Optim) and spec.official.source, "official optimiser with its file and line"
    assert isinstance(spec.optim, Optim) and spec.optim.source
    assert spec.source
    assert spec.recipe is None and spec.for_family("vit") is spec  # the task makes its own crops


def test_unknown_hyperparameter_is_one_clear_error():
    from featviz.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="queue_size"):
        build_method("moco_v2", build_backbone(ARCH, seed=0), queue_sise=16)


def test_head_widths_and_zero_init_residual_are_hyperparameters():
    """--hparam hidden_dim/out_dim (BYOL), mlp_dim/dim (MoCo v3), hidden_dim/bottleneck_dim (DINO) set the
    heads; zero_init_residual (official for SimSiam) can be turned off and is recorded."""
    byol = _net("byol", hidden_dim=48, out_dim=24)
    assert [m.out_features for m in byol.projector if isinstance(m, nn.Linear)] == [48, 24]
    v3 = _net("moco_v3", mlp_dim=40, dim=20)
    assert [m.out_features for m in v3.predictor if isinstance(m, nn.Linear)] == [40, 20]
    dino = _net("dino", hidden_dim=36, bottleneck_dim=12, out=64)
    assert [m.out_features for m in dino.projector.modules() if isinstance(m, nn.Linear)][:3] == [36, 36, 12]
    on, off = _net("simsiam"), _net("simsiam", zero_init_residual=False)
    assert on.hparams["zero_init_residual"] is True and off.hparams["zero_init_residual"] is False
    assert float(on.backbone.layer1[0].bn2.weight.detach().abs().sum()) == 0.0
    assert float(off.backbone.layer1[0].bn2.weight.detach().abs().sum()) > 0.0


# ---------------------------------------------------------------- losses = the official formulas
def test_nt_xent_equals_simclr_add_contrastive_loss():
    """google-research/simclr tf2/objective.py:35-89, transcribed to torch."""
    g = torch.Generator().manual_seed(0)
    h1, h2, tau = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g), 0.5
    hidden = F.normalize(torch.cat([h1, h2]), dim=-1)
    a, b = hidden.chunk(2)
    n = a.shape[0]
    labels = F.one_hot(torch.arange(n), 2 * n).float()
    masks = F.one_hot(torch.arange(n), n).float()
    logits_aa = a @ a.T / tau - masks * 1e9
    logits_bb = b @ b.T / tau - masks * 1e9
    logits_ab, logits_ba = a @ b.T / tau, b @ a.T / tau
    loss_a = -(labels * torch.log_softmax(torch.cat([logits_ab, logits_aa], 1), 1)).sum(1)
    loss_b = -(labels * torch.log_softmax(torch.cat([logits_ba, logits_bb], 1), 1)).sum(1)
    official = (loss_a + loss_b).mean()
    assert methods.nt_xent(h1, h2, tau).item() == pytest.approx(official.item(), rel=1e-6)


def test_moco_infonce_equals_moco_builder():
    """facebookresearch/moco moco/builder.py:154-168 (einsum logits / T, label 0)."""
    g = torch.Generator().manual_seed(1)
    q, k = F.normalize(torch.randn(5, 8, generator=g), dim=1), F.normalize(torch.randn(5, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(8, 16, generator=g), dim=0)  # dim x K, as the builder stores it
    l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", [q, queue])
    official = nn.CrossEntropyLoss()(torch.cat([l_pos, l_neg], 1) / 0.2, torch.zeros(5, dtype=torch.long))
    assert methods.moco_infonce(q, k, queue.T, 0.2).item() == pytest.approx(official.item(), rel=1e-6)


def test_moco_ctr_equals_moco_v3_contrastive_loss():
    """facebookresearch/moco-v3 moco/builder.py:63-73."""
    g = torch.Generator().manual_seed(2)
    q, k, T = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g), 1.0
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    official = nn.CrossEntropyLoss()(torch.einsum("nc,mc->nm", [qn, kn]) / T, torch.arange(6)) * (2 * T)
    assert methods.moco_ctr(q, k, T).item() == pytest.approx(official.item(), rel=1e-6)


def test_byol_loss_equals_regression_loss():
    """deepmind-research byol/utils/helpers.py:109-112, byol_experiment.py:243-250."""
    g = torch.Generator().manual_seed(3)
    p1, p2, t1, t2 = (torch.randn(4, 8, generator=g) for _ in range(4))

    def regression_loss(x, y):
        return ((F.normalize(x, dim=-1) - F.normalize(y, dim=-1)) ** 2).sum(-1)

    official = (regression_loss(p1, t2) + regression_loss(p2, t1)).mean()
    ours = (2 + 2 * methods.neg_cosine(p1, t2)) + (2 + 2 * methods.neg_cosine(p2, t1))
    assert ours.item() == pytest.approx(official.item(), rel=1e-6)


def test_simsiam_forward_equals_main_simsiam_loss():
    """facebookresearch/simsiam main_simsiam.py:191,295: -(cos(p1, z2) + cos(p2, z1)) / 2."""
    m = _net("simsiam")
    v = [torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)]
    loss = m(v)
    z1, z2 = m.projector(m.backbone(v[0])), m.projector(m.backbone(v[1]))
    p1, p2 = m.predictor(z1), m.predictor(z2)
    criterion = nn.CosineSimilarity(dim=1)
    official = -(criterion(p1, z2.detach()).mean() + criterion(p2, z1.detach()).mean()) * 0.5
    assert loss.item() == pytest.approx(official.item(), rel=1e-5)


def test_barlow_loss_equals_barlowtwins_main():
    """facebookresearch/barlowtwins main.py:180-221 (bn affine=False, c / batch, off_diagonal)."""
    g = torch.Generator().manual_seed(4)
    z1, z2, lambd = torch.randn(16, 6, generator=g), torch.randn(16, 6, generator=g), 0.0051
    bn = nn.BatchNorm1d(6, affine=False).train()
    c = bn(z1).T @ bn(z2)
    c.div_(16)

    def off_diagonal(x):
        n, m = x.shape
        return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()

    official = torch.diagonal(c).add_(-1).pow_(2).sum() + lambd * off_diagonal(c).pow_(2).sum()
    assert methods.barlow_loss(z1, z2, lambd).item() == pytest.approx(official.item(), rel=1e-5)


def _official_sinkhorn(out, epsilon=0.05, iters=3):
    """facebookresearch/swav main_swav.py:353-376 (world size 1)."""
    Q = torch.exp(out / epsilon).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(iters):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def test_sinkhorn_and_swav_loss_equal_main_swav():
    g = torch.Generator().manual_seed(5)
    scores = F.normalize(torch.randn(8, 6, generator=g), dim=1) @ F.normalize(torch.randn(10, 6, generator=g), dim=1).T
    torch.testing.assert_close(methods.sinkhorn(scores, 0.05, 3), _official_sinkhorn(scores.clone()), rtol=1e-5,
                               atol=1e-7)
    # the whole SwAV forward (2 crops, no queue) against main_swav.py:289-315; src/resnet50.py's forward
    # runs the two same-size crops through the backbone as one batch
    m = _net("swav", queue_length=0)
    views = [torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)]
    loss = m(views)
    with torch.no_grad():
        output = m.prototypes(F.normalize(m.projector(m.backbone(torch.cat(views))), dim=1))
    official = 0
    for crop_id in (0, 1):
        q = _official_sinkhorn(output[8 * crop_id:8 * (crop_id + 1)].clone())
        x = output[8 * (1 - crop_id):8 * (2 - crop_id)] / 0.1
        official += -torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
    assert loss.item() == pytest.approx((official / 2).item(), rel=1e-4)


def test_dino_loss_equals_dinoloss_forward():
    """facebookresearch/dino main_dino.py:380-404, with 2 global and 2 local crops."""
    g = torch.Generator().manual_seed(6)
    student, teacher, center = torch.randn(4 * 3, 5, generator=g), torch.randn(2 * 3, 5, generator=g), torch.randn(1, 5)
    student_out = (student / 0.1).chunk(4)
    teacher_out = F.softmax((teacher - center) / 0.04, dim=-1).chunk(2)
    total, terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            terms += 1
    official = total / terms
    s, t = student.chunk(4), teacher.chunk(2)
    ours = sum(methods.dino_h(t[i], s[j], center, 0.1, 0.04) for i in range(2) for j in range(4) if i != j) / 6
    assert ours.item() == pytest.approx(official.item(), rel=1e-6)


def test_lars_equals_the_official_lars_step():
    """facebookresearch/barlowtwins main.py:224-263 (= BYOL/MoCo v3/DINO LARS), two steps."""
    from featviz.train.optim import LARS

    g = torch.Generator().manual_seed(7)
    w0, b0 = torch.randn(4, 3, generator=g), torch.randn(4, generator=g)
    grads = [(torch.randn(4, 3, generator=g), torch.randn(4, generator=g)) for _ in range(2)]
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = LARS([{"params": [w], "weight_decay": 1e-2}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
               lr=0.5, momentum=0.9)
    rw, rb, mu = w0.clone(), b0.clone(), {}
    for gw, gb in grads:
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        for name, p, dp, filt in (("w", rw, gw, False), ("b", rb, gb, True)):
            if not filt:  # weight_decay_filter / lars_adaptation_filter exclude 1-D parameters
                dp = dp.add(p, alpha=1e-2)
                q = 0.001 * torch.norm(p) / torch.norm(dp)
                dp = dp.mul(q)
            mu[name] = mu.get(name, torch.zeros_like(p)).mul(0.9).add(dp)
            p.add_(mu[name], alpha=-0.5)
    torch.testing.assert_close(w.detach(), rw)
    torch.testing.assert_close(b.detach(), rb)


# ---------------------------------------------------------------- heads as in the official builders
def test_heads_follow_the_official_builders():
    simclr = _net("simclr")
    lin = [m for m in simclr.projector if isinstance(m, nn.Linear)]
    bns = [m for m in simclr.projector if isinstance(m, nn.BatchNorm1d)]
    assert len(lin) == 3 and len(bns) == 3 and all(m.bias is None for m in lin)  # every layer Linear-BN
    assert not bns[-1].bias.requires_grad and bns[-1].weight.requires_grad  # last BN: a scale, no shift
    v3 = _net("moco_v3")
    assert v3.tau == 1.0  # MoCo_ResNet: --moco-t 1.0
    assert sum(isinstance(m, nn.Linear) for m in v3.projector) == 2  # _build_mlp(2, ...)
    assert isinstance(v3.predictor[-1], nn.Linear) and v3.predictor[-1].bias is None  # no final BN
    vit = build_method("moco_v3", build_backbone("vit_tiny_patch8_32", seed=0))
    assert vit.tau == 0.2 and isinstance(vit.predictor[-1], nn.BatchNorm1d)  # MoCo_ViT
    assert sum(isinstance(m, nn.Linear) for m in vit.projector) == 3
    byol = _net("byol")
    assert byol.projector[-1].bias is None and byol.predictor[-1].bias is None  # networks.MLP
    barlow = _net("barlow_twins")
    assert barlow.lambd == 0.0051 and barlow.projector[-1].bias is None
    simsiam = _net("simsiam")
    assert float(simsiam.backbone.layer1[0].bn2.weight.detach().abs().sum()) == 0  # zero_init_residual
    moco = _net("moco_v2", queue_size=8)
    assert float(moco.backbone.layer1[0].bn2.weight.detach().abs().sum()) > 0  # MoCo: torchvision's default init


# ---------------------------------------------------------------- MoCo v2: shuffle-BN / split BN
def test_split_bn_shuffle_gives_the_positive_key_other_statistics():
    """With SplitBatchNorm the query of image i is normalised with its sub-batch's statistics;
    the key of image i, drawn from a shuffled batch, with another sub-batch's (MoCo Sec. 3.3)."""
    torch.manual_seed(0)
    m = _net("moco_v2", bn_splits=2, queue_size=16, momentum=0.99)
    x = torch.randn(8, 3, 16, 16)
    bn_q, bn_k = m.backbone.bn1, m.target_backbone.bn1
    seen: dict[str, torch.Tensor] = {}
    hq = bn_q.register_forward_hook(lambda mod, i, o: seen.__setitem__("q", i[0].detach()))
    hk = bn_k.register_forward_hook(lambda mod, i, o: seen.__setitem__("k", i[0].detach()))
    torch.manual_seed(3)
    k = m.keys(x)
    torch.manual_seed(3)
    perm = torch.randperm(8)
    m.backbone(x)
    hq.remove()
    hk.remove()
    # sub-batch j of SplitBatchNorm2d holds rows j, j + s, ... of what it is given
    q_group = {i: {r for r in range(8) if r % 2 == i % 2} for i in range(8)}
    pos = torch.argsort(perm)  # where image i sits in the shuffled key batch
    k_group = {i: {int(perm[r]) for r in range(8) if r % 2 == int(pos[i]) % 2} for i in range(8)}
    assert torch.equal(seen["k"], seen["q"][perm])  # the key encoder saw the shuffled batch
    assert any(q_group[i] != k_group[i] for i in range(8))
    # the key of each image equals the key encoder run on its own shuffled sub-batch, unsplit
    enc = nn.Sequential(m.target_backbone, m.target_projector)
    methods.set_bn_splits(enc, 1)
    for i in (0, 5):
        members = sorted(k_group[i])
        with torch.no_grad():
            ref = F.normalize(enc(x[members]).float(), dim=1)[members.index(i)]
        torch.testing.assert_close(k[i], ref, rtol=1e-4, atol=1e-5)
    # without shuffle-BN the key shares its query's sub-batch (the leak)
    methods.set_bn_splits(enc, 2)
    leak = _net("moco_v2", bn_splits=2, queue_size=16, shuffle_bn=False)
    assert all(isinstance(b, nn.BatchNorm2d) and not isinstance(b, methods.SplitBatchNorm2d)
               for b in leak.backbone.modules() if isinstance(b, nn.BatchNorm2d))


def test_split_batchnorm_statistics_and_eval_equal_plain_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5)
    split = methods.SplitBatchNorm2d(4, splits=2).train()
    out = split(x)
    for j in (0, 1):
        ref = nn.BatchNorm2d(4).train()
        torch.testing.assert_close(out[j::2], ref(x[j::2]), rtol=1e-5, atol=1e-5)
    m0, m1 = x[0::2].mean((0, 2, 3)), x[1::2].mean((0, 2, 3))
    torch.testing.assert_close(split.running_mean, 0.1 * (m0 + m1) / 2)
    split.eval()
    plain = nn.BatchNorm2d(4)
    plain.load_state_dict(split.state_dict())
    torch.testing.assert_close(split(x), plain.eval()(x))


def test_moco_v2_defaults_reproduce_the_official_settings():
    d = contrastive._moco_v2_defaults
    cifar = d(methods.DataContext(n_train=50000, batch_size=512, epochs=200, image_size=32))
    assert cifar["queue_size"] == 4096 and cifar["momentum"] == pytest.approx(0.99, abs=1e-3)  # the CIFAR demo
    imagenet = d(methods.DataContext(n_train=1281167, batch_size=256, epochs=200, image_size=224))
    assert imagenet["queue_size"] == 65536 and imagenet["momentum"] == 0.999  # main_moco.py
    assert cifar["bn_splits"] == 8 and imagenet["bn_splits"] == 8


def _ddp_shuffle_worker(rank: int, world: int, port: int, q) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # rank 0's permutation is broadcast
    x = torch.arange(4.0).view(4, 1) + 10 * rank
    xs, undo = methods.batch_shuffle_ddp(x)
    back = methods.batch_unshuffle_ddp(xs, undo)
    q.put((rank, xs.flatten().tolist(), back.flatten().tolist()))
    dist.destroy_process_group()


def test_batch_shuffle_ddp_shuffles_across_processes_and_undoes():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")  # no re-import of torch (spawn costs ~10 s more)
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_shuffle_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = dict((r, (a, b)) for r, a, b in (q.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(30)
    shuffled = res[0][0] + res[1][0]
    assert sorted(shuffled) == [0, 1, 2, 3, 10, 11, 12, 13]  # one permutation of the global batch
    assert set(res[0][0]) != {0, 1, 2, 3}  # rank 0's keys are not its own images
    assert res[0][1] == [0, 1, 2, 3] and res[1][1] == [10, 11, 12, 13]


# ---------------------------------------------------------------- SwAV: queue and prototype freezing
def test_swav_queue_fills_and_is_used_after_epoch_queue_starts(monkeypatch):
    m = _net("swav", queue_length=16, epoch_queue_starts=1, freeze_prototypes_niters=0)
    sizes = []
    real = swav.sinkhorn
    monkeypatch.setattr(swav, "sinkhorn", lambda s, *a: sizes.append(s.shape[0]) or real(s, *a))
    g = torch.Generator().manual_seed(0)
    batch = lambda: [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]  # noqa: E731
    m.set_epoch(0)
    m(batch())
    assert not m.queue_used and float(m.queue.abs().sum()) == 0 and sizes == [8, 8]  # epoch 0: no queue
    m.set_epoch(1)
    m(batch())  # fills the first half
    assert not m.queue_used and float(m.queue[:, -1].abs().sum()) == 0 and float(m.queue[:, 0].abs().sum()) > 0
    m(batch())  # now full
    assert not m.queue_used
    m(batch())
    assert m.queue_used and sizes[-2:] == [16 + 8, 16 + 8]  # the queue joins the assignment


def test_swav_prototypes_do_not_move_during_freeze_prototypes_niters():
    m = _net("swav", queue_length=0, freeze_prototypes_niters=2)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    snaps = []
    for step in range(4):
        loss = m([torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)])  # normalises the prototypes first
        snaps.append(m.prototypes.weight.detach().clone())
        opt.zero_grad()
        loss.backward()
        m.before_step(step)
        if step < 2:
            assert m.prototypes.weight.grad is None
        opt.step()
    torch.testing.assert_close(snaps[0], snaps[1])
    torch.testing.assert_close(snaps[1], snaps[2])  # steps 0 and 1 frozen
    assert not torch.allclose(snaps[2], snaps[3])  # step 2 moved them


# ---------------------------------------------------------------- DINO: last layer, teacher BN
def test_dino_last_layer_gain_frozen_and_no_gradient_during_freeze_last_layer():
    m = _net("dino")
    head = m.projector
    assert not head.gain.requires_grad and torch.all(head.gain == 1)  # norm_last_layer
    assert m.freeze_last_layer == 1
    v = head.last_layer.parametrizations.weight.original1
    g = torch.Generator().manual_seed(0)
    for epoch in (0, 1):
        m.set_epoch(epoch)
        m.zero_grad()
        m([torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]).backward()
        m.before_step(0)
        if epoch == 0:
            assert v.grad is None  # cancel_gradients_last_layer
        else:
            assert v.grad is not None and v.grad.abs().sum() > 0
        assert head.gain.grad is None
        m.on_step_end(0.5)
    assert torch.all(m.target_projector.gain == 1)  # the EMA keeps the teacher's gain at 1


def test_momentum_targets_keep_their_own_batchnorm_statistics():
    """The EMA moves parameters only; the target's BatchNorm statistics come from its own
    forwards (MoCo/BYOL/DINO official code), never from the online network's."""
    for name in ("byol", "dino", "moco_v3", "moco_v2"):
        m = _net(name, **({"queue_size": 8} if name == "moco_v2" else {}))
        g = torch.Generator().manual_seed(0)
        m([torch.randn(8, 3, 16, 16, generator=g) + 3 for _ in range(2)])
        target = m.target_backbone.bn1
        own = target.running_mean.clone()
        assert int(target.num_batches_tracked) >= 1  # updated by the target's own forward
        m.backbone.bn1.running_mean.fill_(5.0)  # the online network's statistics
        m.on_step_end(0.1)
        torch.testing.assert_close(target.running_mean, own, msg=name)


def test_simsiam_predictor_lr_stays_fixed():
    from featviz.train.optim import param_groups, schedule_step

    m = _net("simsiam")
    spec = SSL_METHODS.get("simsiam")
    groups = param_groups(m, spec.optim, weight_decay=1e-4)
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    fixed = [g for g in opt.param_groups if g["fix_lr"]]
    assert fixed and {id(p) for g in fixed for p in g["params"]} == {id(p) for p in m.predictor.parameters()}
    for step in (0, 50, 99):
        schedule_step(opt, step, total=100, warmup=0, peak=0.1, final=0.0, wd=1e-4, wd_end=None)
        assert all(g["lr"] == pytest.approx(0.1) for g in fixed)
    assert all(g["lr"] < 0.01 for g in opt.param_groups if not g["fix_lr"])


def test_no_weight_decay_on_biases_and_norms_and_dino_weight_decay_schedule():
    from featviz.train.optim import _wd_at, param_groups

    for name in ("byol", "dino", "barlow_twins"):
        m = _net(name)
        spec = SSL_METHODS.get(name)
        for g in param_groups(m, spec.optim, weight_decay=0.1):
            if g["name"].startswith("1d"):
                assert g["weight_decay"] == 0 and all(p.ndim == 1 for p in g["params"])
            else:
                assert g["weight_decay"] == 0.1
    vit = SSL_METHODS.get("dino").for_family("vit").official
    assert (vit.weight_decay, vit.weight_decay_end) == (0.04, 0.4)
    assert _wd_at(0, 100, 0.04, 0.4) == pytest.approx(0.04) and _wd_at(100, 100, 0.04, 0.4) == pytest.approx(0.4)
    assert _wd_at(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert SSL_METHODS.get("dino").optim.clip_grad == 3.0


def test_dino_clip_grad_clips_each_parameter():
    from featviz.distributed import DistInfo
    from featviz.train.config import TrainConfig, resolve_config
    from featviz.train.ssl_task import SSLTask

    cfg = resolve_config(TrainConfig(method="dino", data="digits", out="unused", image_size=16, batch_size=8,
                                     limit=20, epochs=1))
    task = SSLTask(cfg, DistInfo())
    for p in task.model.parameters():
        p.grad = torch.full_like(p, 10.0)
    task.model.set_epoch(5)  # past freeze_last_layer
    task.before_step(0)
    norms = [float(p.grad.norm()) for p in task.model.parameters() if p.grad is not None]
    assert max(norms) == pytest.approx(3.0, rel=1e-3)


# ---------------------------------------------------------------- every method trains
@pytest.mark.parametrize("name", list(SSL_METHODS))
def test_method_trains_few_steps_without_nan(name):
    m = _net(name)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        views = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]
        if SSL_METHODS.get(name).multi_crop:
            views.append(torch.randn(8, 3, 8, 8, generator=g))
        loss = m(views)
        assert torch.isfinite(loss), (name, step, loss)
        opt.zero_grad()
        loss.backward()
        m.before_step(step)
        opt.step()
        m.on_step_end(step / 3)
    assert any(not torch.equal(before[k], v) for k, v in m.backbone.state_dict().items())
    assert m.embeddings is not None and m.embeddings[0].shape[0] == 8
    m.eval()
    with torch.no_grad():
        m(views)
    assert torch.allclose(m.monitored(views[0]), m.embeddings[0], atol=1e-5), name


def test_digits_presets_are_recorded_in_the_run_config(tmp_path):
    from featviz.train.config import TrainConfig, resolve_config

    cfg = resolve_config(TrainConfig(method="simsiam", data="digits", out=str(tmp_path)))
    assert cfg.image_size == 16 and cfg.defaults["image_size"] == "preset:digits" and cfg.batch_size == 32
    assert cfg.defaults["epochs"] == "preset:digits" and cfg.hflip is False
    assert cfg.lr == 0.2 and cfg.defaults["lr"] == "preset:digits"  # measured; the official 0.05 x 32/256 was not
    moco = resolve_config(TrainConfig(method="moco_v2", data="digits", out=str(tmp_path)))
    assert moco.lr == 0.03  # lr 0.1 collapsed its projector (loss -> log(K+1)); docs/train.md
    # the non-contrastive presets (measured, docs/train.md): layer-wise optimisers, the slant augmentation,
    # a short-horizon EMA, SwAV's sharper codes and DINO's head with BatchNorm; a user's choice still wins
    byol = resolve_config(TrainConfig(method="byol", data="digits", out=str(tmp_path)))
    assert (byol.optimizer, byol.lr, byol.rotate, byol.shear) == ("lars", 2.0, 15.0, 10.0)
    assert byol.hparams == {"momentum": 0.99} and byol.defaults["hparams.momentum"] == "preset:digits"
    assert byol.defaults["optimizer"] == "preset:digits" and byol.weight_decay == 1.5e-6
    swav = resolve_config(TrainConfig(method="swav", data="digits", out=str(tmp_path), hparams={"eps": 0.05}))
    assert (swav.optimizer, swav.lr, swav.hparams["eps"], swav.defaults["hparams.eps"]) == ("larc", 1.0, 0.05, "user")
    dino = resolve_config(TrainConfig(method="dino", data="digits", out=str(tmp_path), optimizer="sgd"))
    assert dino.optimizer == "sgd" and dino.defaults["optimizer"] == "user"
    assert dino.lr == pytest.approx(0.03 * 32 / 256) and dino.defaults["lr"].startswith("method")  # not LARC's 1.0
    assert dino.hparams == {"momentum": 0.99, "norm_last_layer": False, "use_bn_in_head": True}
    lars = resolve_config(TrainConfig(method="simsiam", data="digits", out=str(tmp_path), optimizer="lars"))
    assert lars.lr == pytest.approx(0.05 * 32 / 256)  # SimSiam's preset lr 0.2 was measured with SGD
    barlow = resolve_config(TrainConfig(method="barlow_twins", data="digits", out=str(tmp_path)))
    assert (barlow.optimizer, barlow.lr, barlow.rotate) == ("lars", 0.2, 15.0)
    # measured on the CPU ResNet: a ViT keeps its own recipe (AdamW, no BatchNorm head), not LARC at lr 1.0
    vit = resolve_config(TrainConfig(method="dino", data="digits", out=str(tmp_path), arch="vit_small_patch16_224"))
    assert vit.optimizer == "adamw" and vit.hparams == {} and vit.defaults["optimizer"] == "method"
    assert vit.image_size == 224 and vit.lr == pytest.approx(5e-4)
    user = resolve_config(TrainConfig(method="simsiam", data="digits", out=str(tmp_path), batch_size=16, hflip=True))
    assert user.batch_size == 16 and user.hflip is True and user.defaults["batch_size"] == "user"
    assert resolve_config(user) == user  # idempotent
    other = resolve_config(TrainConfig(method="simsiam", data=str(tmp_path), out=str(tmp_path)))
    assert other.batch_size == 256 and other.lr == pytest.approx(0.05) and other.hflip is True


@pytest.mark.parametrize("arch", ["resnet18_w16-cifar", "resnet18", "vit_tiny_patch8_32", "timm:vit_small_patch16_384"])
def test_default_image_size_is_the_models_input_size(tmp_path, arch):
    """One input-size rule: a run without --image-size (and no preset) trains at the size the
    architecture's description gives, which is what `featviz embed` uses for the checkpoint."""
    from featviz.models.description import describe
    from featviz.train.config import TrainConfig, resolve_config

    cfg = resolve_config(TrainConfig(method="simsiam", data=str(tmp_path), out=str(tmp_path), arch=arch))
    assert (cfg.image_size, cfg.image_size) == describe(build_backbone(arch)).input_size
    assert cfg.defaults["image_size"] == "architecture"

