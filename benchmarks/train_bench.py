"""Steps/s of `featviz train` against a bare hand-written loop of the same model and loss.

Two methods: SimSiam (two symmetric branches, fixed predictor lr) and MoCo v2 with its queue,
momentum encoder and shuffle-BN (SplitBatchNorm + a shuffled key batch in one process). Both
sides build the same ``featviz.train.methods`` model with the same hyperparameters, draw the same
seeded views through the same DataLoader (``featviz.data.augment``) on the digits training split;
the bare loop is what a researcher writes by hand: forward, the loss written out, backward,
step, the momentum update and the enqueue -- no checkpoints, metrics, kNN monitor, NaN check,
schedules or gradient hooks. Two figures:

- training steps/s: the time spent in the epochs' batch loops (data loading, forward, backward,
  optimiser step; featviz adds its schedule, NaN check, hooks and metrics lines every
  `log_every` steps), timed from outside on both sides (featviz: through its `progress` hook).
  Target >= 0.95x.
- whole run: from loading the data and building the model to the end; featviz's is its whole
  `train()` call, which adds per epoch the kNN and held-out collapse evaluation and three
  checkpoint files.

Runs alternate (bare, featviz, bare, featviz, ...) so a busy machine hurts both alike; the
median of the repeats is reported. ``--device cuda`` times both under bf16 autocast.

    python benchmarks/train_bench.py [--methods simsiam,moco_v2] [--epochs 2] [--batch-size 64]
                                     [--image-size 32] [--repeats 3] [--threads 1] [--device cpu] [--json]

``--lightning`` measures instead what ``featviz.integrations.lightning.FeatvizMonitor`` costs
under a real Lightning ``Trainer``: the same SimSiam LightningModule (featviz's ResNet-18 w16
CIFAR backbone, SimSiam's projector and predictor heads, digits at ``--image-size``) fitted for
``--steps`` steps without and with the callback at its default frequency (a training-batch record
every 50 steps; an ``OnlineKnn`` of 500 bank / 300 held-out images every 500), alternating; the
steps/s are timed from the first batch's start to the last batch's end (the callback's work
included). Target: the callback costs <= 5 % of the steps/s.

    python benchmarks/train_bench.py --lightning [--steps 500] [--batch-size 64] [--image-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F


class LoopTimer:
    """A ``progress`` hook for ``featviz.train.loop.train`` that times the batch loops from outside."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, iterable, total=None):
        t = time.perf_counter()
        yield from iterable
        self.seconds += time.perf_counter() - t


def _config(method: str, args, out: str):
    from featviz.train.config import TrainConfig, resolve_config

    return resolve_config(TrainConfig(method=method, data="digits", out=out, epochs=args.epochs,
                                      batch_size=args.batch_size, image_size=args.image_size, threads=args.threads,
                                      device=args.device, log_every=10))


def bare_loop(method: str, args) -> tuple[int, float, float]:
    """The loop a researcher would write by hand: build, load, forward, backward, step."""
    from featviz.distributed import DistInfo
    from featviz.train.loop import epoch_batches
    from featviz.train.ssl_task import SSLTask

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cfg = _config(method, args, "unused")
    task = SSLTask(cfg, DistInfo())  # the same model, hyperparameters, views and split as featviz
    dev = torch.device(args.device)
    model = task.model.to(dev).train()
    amp = dev.type == "cuda"
    if method == "simsiam":
        opt = torch.optim.SGD([{"params": [p for n, p in model.named_parameters() if not n.startswith("predictor")]},
                               {"params": model.predictor.parameters()}], lr=cfg.lr, momentum=0.9,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, momentum=0.9,
                              weight_decay=cfg.weight_decay)
    steps, loop = 0, 0.0
    for epoch in range(cfg.epochs):
        task.dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(task.dataset, batch_sampler=epoch_batches(task.n, cfg.batch_size, epoch,
                                             cfg.seed, DistInfo()), collate_fn=task.collate)
        t = time.perf_counter()
        for (x1, x2), _, _ in loader:
            x1, x2 = x1.to(dev), x2.to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                if method == "simsiam":
                    z1, z2 = model.projector(model.backbone(x1)), model.projector(model.backbone(x2))
                    p1, p2 = model.predictor(z1), model.predictor(z2)
                    cos = F.cosine_similarity
                    loss = -(cos(p1, z2.detach()).mean() + cos(p2, z1.detach()).mean()) / 2
                else:  # MoCo v2: query, shuffled keys from the momentum encoder, the queue
                    q = F.normalize(model.projector(model.backbone(x1)).float(), dim=1)
                    with torch.no_grad():
                        perm = torch.randperm(len(x2), device=dev)
                        k = F.normalize(model.target_projector(model.target_backbone(x2[perm])).float(), dim=1)
                        k = k[torch.argsort(perm)]
                    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ model.queue.clone().T], 1) / model.tau
                    loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if method == "moco_v2":
                with torch.no_grad():
                    m = model.base_momentum
                    online = [*model.backbone.parameters(), *model.projector.parameters()]
                    target = [*model.target_backbone.parameters(), *model.target_projector.parameters()]
                    for po, pt in zip(online, target, strict=True):
                        pt.mul_(m).add_(po, alpha=1 - m)
                    n, size = len(k), model.queue.shape[0]
                    idx = (model.queue_ptr + torch.arange(n, device=dev)) % size
                    model.queue[idx] = k
                    model.queue_ptr.copy_((model.queue_ptr + n) % size)
            steps += 1
        if dev.type == "cuda":
            torch.cuda.synchronize()
        loop += time.perf_counter() - t
    return steps, loop, time.perf_counter() - t0


def featviz_train(method: str, args) -> tuple[int, float, float]:
    from featviz.train.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(method, args, f"{tmp}/run")
        timer = LoopTimer()
        t0 = time.perf_counter()
        res = train(cfg, progress=timer)
        return res.steps, timer.seconds, time.perf_counter() - t0


def _lightning_module(image_size: int):
    import lightning.pytorch as L
    from torch import nn

    from featviz.models.architectures import build_backbone

    class SimSiam(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.backbone = build_backbone("resnet18_w16-cifar", seed=0).train()
            d = self.backbone(torch.zeros(2, 3, image_size, image_size)).shape[1]
            self.projector = nn.Sequential(nn.Linear(d, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 128),
                                           nn.BatchNorm1d(128, affine=False))
            self.predictor = nn.Sequential(nn.Linear(128, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 128))

        def forward(self, x):
            return self.projector(self.backbone(x))

        def training_step(self, batch, batch_idx):
            x1, x2 = batch
            z1, z2 = self(x1), self(x2)
            p1, p2 = self.predictor(z1), self.predictor(z2)
            loss = -(F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean()) / 2
            return {"loss": loss, "z1": z1.detach(), "z2": z2.detach()}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return SimSiam()


def _digits_tensors(image_size: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.5, torch.tensor(d.target)


def lightning_fit(args, with_monitor: bool) -> tuple[float, float]:
    """Steps/s of one Trainer.fit (first batch's start to last batch's end), and the seconds spent in the callback.

    The second figure times FeatvizMonitor's own hooks, so its share of the run does not depend on
    how busy the machine was in the other run.
    """
    import lightning.pytorch as L

    from featviz.integrations.lightning import monitor_class
    from featviz.integrations.online import OnlineKnn

    x, y = _digits_tensors(args.image_size)

    def views(items):
        b = torch.stack([i[0] for i in items])
        aug = lambda t: torch.roll(t, tuple(int(v) for v in torch.randint(-2, 3, (2,))), (2, 3)) \
            + 0.1 * torch.randn_like(t)  # noqa: E731
        return aug(b), aug(b)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:1400], y[:1400]),
                                         batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=views,
                                         generator=torch.Generator().manual_seed(0))

    class Clock(L.Callback):
        def __init__(self):
            self.start = self.end = None

        def on_train_batch_start(self, *a, **k):
            self.start = self.start or time.perf_counter()

        def on_train_batch_end(self, *a, **k):
            self.end = time.perf_counter()

    clock = Clock()
    callbacks = [clock]
    inside = [0.0]

    def timed(hook):
        def run(*a, **k):
            t = time.perf_counter()
            hook(*a, **k)
            inside[0] += time.perf_counter() - t

        return run

    with tempfile.TemporaryDirectory() as tmp:
        if with_monitor:  # before the clock: its work at a step is inside the timed span
            monitor = monitor_class()(tmp, knn=OnlineKnn(x[:500], y[:500], x[1400:1700], y[1400:1700]))
            monitor.on_train_batch_end = timed(monitor.on_train_batch_end)
            callbacks.insert(0, monitor)
        trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            default_root_dir=tmp)
        trainer.fit(_lightning_module(args.image_size), loader)
    return (args.steps - 1) / (clock.end - clock.start), inside[0] / (clock.end - clock.start)


def lightning_main(args) -> None:
    torch.set_num_threads(args.threads)
    bare, mon, share = [], [], []
    for _ in range(args.repeats):
        bare.append(lightning_fit(args, False)[0])
        speed, part = lightning_fit(args, True)
        mon.append(speed)
        share.append(part)
        print(f"  steps/s without {bare[-1]:6.2f}, with FeatvizMonitor {mon[-1]:6.2f} "
              f"({100 * part:.2f} % of its run inside the callback)", flush=True)
    b, m = statistics.median(bare), statistics.median(mon)
    result = {"steps": args.steps, "without": b, "with_monitor": m, "cost": 1 - m / b,
              "callback_share": statistics.median(share)}
    if args.json:
        print(json.dumps({"args": vars(args), "results": result}, indent=2))
        return
    print(f"\nLightning Trainer, SimSiam resnet18_w16-cifar, digits {args.image_size}px batch {args.batch_size}, "
          f"{args.steps} steps, {args.threads} thread(s), median of {args.repeats}:")
    print("| without callback steps/s | with FeatvizMonitor (defaults) steps/s | 1 − ratio | time inside the callback "
          "(target <= 5 %) |")
    print("|---|---|---|---|")
    print(f"| {b:.2f} | {m:.2f} | {100 * result['cost']:.1f} % | {100 * result['callback_share']:.2f} % |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="simsiam,moco_v2")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--lightning", action="store_true", help="the FeatvizMonitor callback's cost under a Trainer")
    ap.add_argument("--steps", type=int, default=500, help="--lightning: steps per fit")
    args = ap.parse_args()
    if args.lightning:
        if args.image_size == 32 and "--image-size" not in " ".join(__import__("sys").argv):
            args.image_size = 16  # the digits preset's size
        return lightning_main(args)
    results = {}
    for method in args.methods.split(","):
        bare, fv, bare_run, fv_run = [], [], [], []
        for _ in range(args.repeats):
            s, loop, run = bare_loop(method, args)
            s2, loop2, run2 = featviz_train(method, args)
            assert s2 == s, (s, s2)
            bare.append(s / loop)
            fv.append(s2 / loop2)
            bare_run.append(run)
            fv_run.append(run2)
            if not args.json:
                print(f"  {method}: training steps/s bare {s / loop:6.2f}, featviz {s2 / loop2:6.2f}  |  whole run: "
                      f"bare {run:5.1f} s, featviz {run2:5.1f} s  ({s} steps each)", flush=True)
        b, f = statistics.median(bare), statistics.median(fv)
        results[method] = {"bare_steps_per_s": b, "featviz_steps_per_s": f, "ratio": f / b,
                           "bare_run_s": statistics.median(bare_run), "featviz_run_s": statistics.median(fv_run),
                           "steps": s}
    if args.json:
        print(json.dumps({"args": vars(args), "results": results}, indent=2))
        return
    print(f"\ndigits {args.image_size}px batch {args.batch_size}, {args.epochs} epochs, {args.threads} thread(s), "
          f"{args.device}, median of {args.repeats}:")
    print("| method | bare loop steps/s | featviz train steps/s | ratio (target >= 0.95) | "
          "whole run bare / featviz s |")
    print("|---|---|---|---|---|")
    for m, r in results.items():
        print(f"| {m} | {r['bare_steps_per_s']:.2f} | {r['featviz_steps_per_s']:.2f} | {r['ratio']:.2f}x | "
              f"{r['bare_run_s']:.1f} / {r['featviz_run_s']:.1f} |")


if __name__ == "__main__":
    main()
