"""FeatvizMonitor under a real Lightning Trainer (CPU, digits, a few hundred steps).

Three runs, each carrying FeatvizMonitor: a plain LightningModule (SimCLR with an MLP, embeddings
from training_step's outputs), lightly's SimCLR module from lightly's own example
(examples/pytorch_lightning/simclr.py: backbone, SimCLRProjectionHead, NTXentLoss, SGD lr 0.06;
its torchvision ResNet-18 backbone is swapped for a small MLP so the run takes seconds on CPU; it
imports pytorch_lightning, so the monitor comes from ``monitor_class("pytorch_lightning")``,
embeddings from an embeddings function), and SimSiam without stop-gradient, which collapses.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from featviz.collapse import JsonlTail
from featviz.integrations.lightning import logged_scalars, monitor_class
from featviz.integrations.online import OnlineKnn, frozen_batchnorm

STEPS, EVERY, KNN_EVERY = 200, 20, 100
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: threads only add contention (0.6 s a step)
BATCH_KEYS = ("std_l2", "rankme", "effective_rank", "alignment", "uniformity", "lidar", "loss")


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = order[:1400], order[1400:1700]
    return x[train], y[train], x[val], y[val]


def _augment(x: torch.Tensor) -> torch.Tensor:
    """A digits view of a batch: a random shift of up to one pixel, pixel dropout and noise."""
    img = x.view(-1, 8, 8)
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,)))
    img = torch.roll(img, shifts=(dy, dx), dims=(1, 2))
    keep = (torch.rand(img.shape) > 0.15).float()
    return (img * keep + 0.1 * torch.randn(img.shape)).view(x.shape)


def _two_views(items):
    """lightly's batch format, ((view0, view1), labels), augmented a batch at a time (fast on CPU)."""
    x = torch.stack([i[0] for i in items])
    return (_augment(x), _augment(x)), torch.stack([i[1] for i in items])


def _loader(x, y):
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=64,
        shuffle=True,
        drop_last=True,
        collate_fn=_two_views,
        generator=torch.Generator().manual_seed(0),
    )


def _mlp(*dims, last_bn=False):
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(b), nn.ReLU()]
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=False))
    return nn.Sequential(*layers)


def _nt_xent(z0, z1, t=0.5):
    z = nn.functional.normalize(torch.cat([z0, z1]), dim=1)
    sim = z @ z.T / t
    sim.fill_diagonal_(float("-inf"))
    n = len(z0)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return nn.functional.cross_entropy(sim, target)


def _modules(L):
    class PlainSimCLR(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = _mlp(64, 128, 64)
            self.head = _mlp(64, 64, 32)

        def forward(self, x):
            return self.head(self.backbone(x))

        def training_step(self, batch, batch_idx):
            (x0, x1), _ = batch
            z0, z1 = self(x0), self(x1)
            return {"loss": _nt_xent(z0, z1), "z1": z0.detach(), "z2": z1.detach()}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    class SimSiamNoStopGrad(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = _mlp(64, 128, 64)
            self.projector = _mlp(64, 64, 32)
            self.predictor = _mlp(32, 16, 32)

        def forward(self, x):
            return self.projector(self.backbone(x))

        def training_step(self, batch, batch_idx):
            (x0, x1), _ = batch
            z0, z1 = self(x0), self(x1)
            p0, p1 = self.predictor(z0), self.predictor(z1)
            cos = nn.functional.cosine_similarity
            loss = -(cos(p0, z1).mean() + cos(p1, z0).mean()) / 2  # no .detach() on z: the ablation
            return {"loss": loss, "z1": p0.detach(), "z2": p1.detach()}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    return PlainSimCLR, SimSiamNoStopGrad


def _lightly_simclr(pl):
    """lightly's examples/pytorch_lightning/simclr.py module, with a small MLP backbone."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    class SimCLR(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = _mlp(64, 128, 64)  # the example: nn.Sequential(*list(resnet18().children())[:-1])
            self.projection_head = SimCLRProjectionHead(64, 64, 32)  # the example: (512, 2048, 2048)
            self.criterion = NTXentLoss()

        def forward(self, x):
            x = self.backbone(x).flatten(start_dim=1)
            z = self.projection_head(x)
            return z

        def training_step(self, batch, batch_index):
            (x0, x1) = batch[0]
            z0 = self.forward(x0)
            z1 = self.forward(x1)
            loss = self.criterion(z0, z1)
            return loss

        def configure_optimizers(self):
            optim = torch.optim.SGD(self.parameters(), lr=0.06)
            return optim

    return SimCLR()


def _fit(L, loggers_mod, module, monitor, loader, root):
    torch.manual_seed(0)
    loggers = [loggers_mod.TensorBoardLogger(root, name="run"), loggers_mod.CSVLogger(root, name="csv")]
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=loggers,
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=50,
    )
    trainer.fit(module, loader)
    return trainer


def _check_run(run_dir, monitor):
    recs = JsonlTail(run_dir / "metrics.jsonl").read()
    assert recs[-1]["event"] == "done"
    batches = [r for r in recs if r.get("split") == "train_batch"]
    held = [r for r in recs if r.get("split") == "held_out"]
    assert [r["step"] for r in batches] == list(range(EVERY, STEPS + 1, EVERY))  # every metric at the stated steps
    assert all(isinstance(r[k], float) for r in batches for k in BATCH_KEYS)
    assert all(1.0 <= r["lidar"] <= 32 and r["n"] == 64 for r in batches)
    assert [r["step"] for r in held] == [KNN_EVERY, STEPS]
    assert all(0.0 <= r["knn_acc"] <= 1.0 and r["n"] == 300 and "rankme" in r for r in held)
    protocol = json.loads((run_dir / "featviz-monitor.json").read_text())
    assert protocol["knn"]["k"] == 20 and protocol["knn"]["t"] == 0.07 and protocol["every"] == EVERY
    assert monitor.records == [r for r in recs if "event" not in r]
    return recs


def _watch(cli, run, out):
    """`featviz collapse --watch RUN --fail-on-collapse` on a finished run."""
    return cli("collapse", "--watch", run, "--interval", "0.01", "--max-wait", "30", "--fail-on-collapse", "--out", out)


def _check_tensorboard(run_dir, recs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    for rec in (r for r in recs if "event" not in r):
        for tag, value in logged_scalars(rec).items():
            events = {e.step: e.value for e in acc.Scalars(tag)}
            assert events[rec["step"]] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, rec["step"])


def test_plain_lightning_module_logs_every_metric_to_jsonl_tensorboard_and_csv(cli, digits, tmp_path):
    import lightning.pytorch as L
    from lightning.pytorch import loggers

    xtr, ytr, xva, yva = digits
    plain, _ = _modules(L)
    knn = OnlineKnn(xtr[:500], ytr[:500], xva, yva)
    monitor = monitor_class()(every=EVERY, knn=knn, knn_every=KNN_EVERY)
    assert isinstance(monitor, L.Callback) and type(monitor).__name__ == "FeatvizMonitor"
    trainer = _fit(L, loggers, plain(), monitor, _loader(xtr, ytr), tmp_path)
    run = tmp_path / "run" / "version_0"
    assert monitor.out_dir == run == __import__("pathlib").Path(trainer.log_dir)
    recs = _check_run(run, monitor)
    assert recs[-2]["knn_acc"] > 0.7  # digits: a trained MLP's backbone separates the classes
    _check_tensorboard(run, recs)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    logged = {int(r["step"]): float(r["featviz/train_batch/lidar"]) for r in rows if r.get("featviz/train_batch/lidar")}
    assert logged == {r["step"]: pytest.approx(r["lidar"], rel=1e-6) for r in recs if r.get("lidar")}
    # the online kNN is `featviz knn` on the same features
    from featviz.io.artifacts import Embeddings

    bank_f, query_f = knn.last
    Embeddings(bank_f, ytr[:500].numpy()).save(tmp_path / "bank.npz")
    Embeddings(query_f, yva.numpy()).save(tmp_path / "queries.npz")
    res = cli("knn", "--train", tmp_path / "bank.npz", "--val", tmp_path / "queries.npz", "--k", "20", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["knn"][0]["top1"] == recs[-2]["knn_acc"]
    # featviz collapse --watch reads the run
    watch = _watch(cli, run, tmp_path / "w")
    assert watch.exit_code == 0, watch.output
    assert f"{len(recs) - 1} records, 0 alarms" in watch.stderr
    assert "step 200  held-out  n=300" in watch.stdout and "lidar=" in watch.stdout


def test_lightlys_simclr_module_with_an_embeddings_function(cli, digits, tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning import loggers

    xtr, ytr, xva, yva = digits
    module = _lightly_simclr(pl)
    cls = monitor_class("pytorch_lightning")
    assert cls is not monitor_class("lightning") and issubclass(cls, pl.Callback)
    monitor = cls(
        every=EVERY,
        knn=OnlineKnn(xtr[:500], ytr[:500], xva, yva),
        knn_every=KNN_EVERY,
        embeddings=lambda m, batch: (m(batch[0][0]), m(batch[0][1])),
    )
    _fit(pl, loggers, module, monitor, _loader(xtr, ytr), tmp_path)
    run = tmp_path / "run" / "version_0"
    recs = _check_run(run, monitor)
    _check_tensorboard(run, recs)
    watch = _watch(cli, run, tmp_path / "w")
    assert watch.exit_code == 0, watch.output


def test_simsiam_without_stop_gradient_raises_the_alarm_watch_shows(cli, digits, tmp_path):
    import lightning.pytorch as L
    from lightning.pytorch import loggers

    xtr, ytr, xva, yva = digits
    _, simsiam = _modules(L)
    monitor = monitor_class()(every=EVERY, knn=OnlineKnn(xtr[:500], ytr[:500], xva, yva), knn_every=KNN_EVERY)
    _fit(L, loggers, simsiam(), monitor, _loader(xtr, ytr), tmp_path)
    run = tmp_path / "run" / "version_0"
    watch = _watch(cli, run, tmp_path / "w")
    assert watch.exit_code == 3, watch.output
    assert "ALARM step 20: std_l2 on training batch records (64 rows)" in watch.stderr  # outputs at one point
    full = json.loads(cli("collapse", "--watch", run, "--interval", "0.01", "--json", "--out", tmp_path / "w2").stdout)
    assert {(a["kind"], a["record"]) for a in full["alarms"]} >= {("std_l2", "training batch"), ("std_l2", "held-out")}


def test_frozen_batchnorm_leaves_the_statistics_as_they_were():
    net = _mlp(8, 16, 4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad(), frozen_batchnorm(net):
        net(torch.randn(32, 8) * 5 + 3)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    net(torch.randn(32, 8) * 5 + 3)  # without it, a train-mode pass moves them
    assert not torch.equal(before["1.running_mean"], net.state_dict()["1.running_mean"])


def test_tsne_snapshots_every_k_epochs_in_the_run_folder_and_named_by_watch(cli, digits, tmp_path):
    """FeatvizMonitor(tsne_every=1): a t-SNE of the held-out queries after each epoch, in RUN/tsne/, and a
    snapshot line in metrics.jsonl that `featviz collapse --watch` names (its line and --json)."""
    import lightning.pytorch as L
    from lightning.pytorch import loggers
    from matplotlib.image import imread

    xtr, ytr, xva, yva = digits
    plain, _ = _modules(L)
    monitor = monitor_class()(every=5, knn=OnlineKnn(xtr[:200], ytr[:200], xva[:120], yva[:120]), tsne_every=1)
    torch.manual_seed(0)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=loggers.CSVLogger(tmp_path, name="run"),
                        callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, log_every_n_steps=5)
    trainer.fit(plain(), _loader(xtr[:320], ytr[:320]))  # 5 steps an epoch
    run = tmp_path / "run" / "version_0"
    snaps = [r for r in JsonlTail(run / "metrics.jsonl").read() if r.get("event") == "snapshot"]
    assert [(r["epoch"], r["step"], r["path"], r["n"]) for r in snaps] == [
        (1, 5, "tsne/epoch_0001.png", 120), (2, 10, "tsne/epoch_0002.png", 120)]
    assert monitor.snapshots == snaps
    img = imread(run / "tsne" / "epoch_0002.png")
    assert img.shape[0] > 300 and img[..., :3].std() > 0.05  # a drawn scatter, not a blank canvas
    assert json.loads((run / "featviz-monitor.json").read_text())["tsne_every"] == 1
    watch = cli("collapse", "--watch", run, "--interval", "0.01", "--max-wait", "30", "--out", tmp_path / "w")
    assert watch.exit_code == 0, watch.output
    assert f"t-SNE of the held-out split at epoch 2 (step 10): {run / 'tsne' / 'epoch_0002.png'}" in watch.stderr
    assert "event=snapshot  path=tsne/epoch_0001.png" in watch.stdout
    full = json.loads(cli("collapse", "--watch", run, "--interval", "0.01", "--json", "--out", tmp_path / "w2").stdout)
    assert full["snapshots"] == [str(run / "tsne" / "epoch_0001.png"), str(run / "tsne" / "epoch_0002.png")]
    with pytest.raises(ValueError, match="knn"):
        monitor_class()(tsne_every=1)


def test_watch_names_only_snapshot_paths_inside_the_run(tmp_path):
    from featviz.collapse.monitor import snapshot_path

    assert snapshot_path(tmp_path, {"event": "snapshot", "path": "tsne/epoch_0003.png"}) == \
        tmp_path / "tsne" / "epoch_0003.png"
    for bad in ("../elsewhere.png", "/etc/passwd", "", 3, None):
        assert snapshot_path(tmp_path, {"event": "snapshot", "path": bad}) is None
    assert snapshot_path(tmp_path, {"event": "done", "path": "tsne/x.png"}) is None
