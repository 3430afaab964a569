"""Steps/s of `featviz train` against a bare hand-written loop of the same model and loss.

Both sides train SimSiam (resnet18_w16-cifar, digits) on the same seeded views through the same
DataLoader; the bare loop has no checkpoints, metrics, kNN monitor or NaN check. Two figures:

- training steps/s: the time spent in the epochs' batch loops (data loading, forward, backward,
  optimiser step; featviz adds its NaN check and metrics lines every `log_every` steps), timed
  from outside on both sides (featviz: through its `progress` hook). Target >= 0.9x.
- whole run: from loading the data and building the model to the end; featviz's is its whole
  `train()` call, which adds per epoch the kNN and held-out collapse evaluation (PreciseBN, ~0.8 s
  on digits) and three checkpoint files. Digits' epochs are only 22 steps, so this per-epoch
  work weighs far more here than on a real dataset.

The default is the documented digits run's setting (all 1,438 training images, 22 steps per
epoch) for 3 epochs. Runs alternate (bare, featviz, bare, featviz, ...) so a busy machine hurts
both alike; the median of the repeats is reported.

    python benchmarks/train_bench.py [--epochs 3] [--batch-size 64] [--image-size 16] [--repeats 3] [--limit N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F


class LoopTimer:
    """A ``progress`` hook for ``featviz.train.train`` that times the batch loops from outside."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, iterable, total=None):
        t = time.perf_counter()
        yield from iterable
        self.seconds += time.perf_counter() - t


def bare_loop(epochs: int, batch_size: int, image_size: int, limit: int, threads: int) -> tuple[int, float, float]:
    """The loop a researcher would write by hand: build, load, forward, backward, step."""
    from featviz import augment, data
    from featviz.distributed import DistInfo
    from featviz.methods import build_method
    from featviz.models import build_backbone
    from featviz.train import epoch_batches

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    imgs = data.digits(image_size)
    items, labels = imgs.items[:limit or None], imgs.labels[:limit or None]
    n = int(round(len(items) * 0.8))  # what featviz trains on (20% held out for its kNN monitor)
    ds = augment.ViewDataset(items[:n], labels[:n], augment.MultiView("simsiam", image_size, hflip=False,
                                                                       min_scale=0.5))
    model = build_method("simsiam", build_backbone("resnet18_w16-cifar", seed=0)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.015, momentum=0.9, weight_decay=5e-4)

    def d(p, z):  # SimSiam's D, written out
        return -(F.normalize(p, dim=1) * F.normalize(z.detach(), dim=1)).sum(dim=1).mean()

    steps, loop = 0, 0.0
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=epoch_batches(n, batch_size, epoch, 0, DistInfo()),
                                             collate_fn=augment.collate_views)
        t = time.perf_counter()
        for (x1, x2), _, _ in loader:
            z1, z2 = model.projector(model.backbone(x1)), model.projector(model.backbone(x2))
            p1, p2 = model.predictor(z1), model.predictor(z2)
            loss = d(p1, z2) / 2 + d(p2, z1) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        loop += time.perf_counter() - t
    return steps, loop, time.perf_counter() - t0


def featviz_train(epochs: int, batch_size: int, image_size: int, limit: int, threads: int
                  ) -> tuple[int, float, float]:
    from featviz.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(method="simsiam", data="digits", out=f"{tmp}/run", arch="resnet18_w16-cifar",
                          epochs=epochs, batch_size=batch_size, image_size=image_size, limit=limit or None,
                          min_scale=0.5, hflip=False, threads=threads, lr=0.015, log_every=5)
        timer = LoopTimer()
        t0 = time.perf_counter()
        res = train(cfg, progress=timer)
        return res.steps, timer.seconds, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=0, help="use the first N digits (0: all 1,797)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    kw = dict(epochs=args.epochs, batch_size=args.batch_size, image_size=args.image_size, limit=args.limit,
              threads=args.threads)
    bare, fv, bare_run, fv_run = [], [], [], []
    for _ in range(args.repeats):
        s, loop, run = bare_loop(**kw)
        s2, loop2, run2 = featviz_train(**kw)
        assert s2 == s, (s, s2)
        bare.append(s / loop)
        fv.append(s2 / loop2)
        bare_run.append(run)
        fv_run.append(run2)
        print(f"  training steps/s: bare {s / loop:6.2f}, featviz {s2 / loop2:6.2f}  |  whole run: bare {run:5.1f} s, "
              f"featviz {run2:5.1f} s  ({s} steps each)", flush=True)
    b, f = statistics.median(bare), statistics.median(fv)
    rb, rf = statistics.median(bare_run), statistics.median(fv_run)
    print(f"SimSiam resnet18_w16-cifar {args.image_size}px batch {args.batch_size}, {args.threads} thread(s), "
          f"median of {args.repeats}:\n  training steps/s: bare loop {b:.2f}, featviz train {f:.2f}, "
          f"ratio {f / b:.2f}x "
          f"(target >= 0.9x)\n  whole run (+ per-epoch evaluation and checkpoints): bare {rb:.1f} s, featviz "
          f"{rf:.1f} s, ratio {rb / rf:.2f}x")

if __name__ == "__main__":
    main()
