"""Steps/s of `featviz train` against a bare hand-written loop of the same model and loss.

Both sides train SimSiam (resnet18_w16-cifar, digits) on the same seeded views through the same
DataLoader; the bare loop has no checkpoints, metrics, kNN monitor or NaN check. featviz's time is
its whole `train()` call (run-folder set-up, metrics.jsonl, kNN eval and checkpoints included).
Runs alternate (bare, featviz, bare, featviz, ...) so a busy machine hurts both alike; the
median of the repeats is reported.

    python benchmarks/train_bench.py [--epochs 2] [--batch-size 64] [--image-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F


def bare_loop(epochs: int, batch_size: int, image_size: int, limit: int, threads: int) -> tuple[int, float]:
    """The loop a researcher would write by hand: build, load, forward, backward, step."""
    from featviz import augment, data
    from featviz.methods import build_method
    from featviz.models import build_backbone
    from featviz.train import epoch_batches
    from featviz.distributed import DistInfo

    torch.set_num_threads(threads)
    imgs = data.digits(image_size)
    items, labels = imgs.items[:limit], imgs.labels[:limit]
    n = int(round(len(items) * 0.8))  # what featviz trains on (20% held out for its kNN monitor)
    ds = augment.ViewDataset(items[:n], labels[:n], augment.MultiView("simsiam", image_size, hflip=False,
                                                                       min_scale=0.5))
    model = build_method("simsiam", build_backbone("resnet18_w16-cifar", seed=0)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.015, momentum=0.9, weight_decay=5e-4)

    def d(p, z):  # SimSiam's D, written out
        return -(F.normalize(p, dim=1) * F.normalize(z.detach(), dim=1)).sum(dim=1).mean()

    steps, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=epoch_batches(n, batch_size, epoch, 0, DistInfo()),
                                             collate_fn=augment.collate_views)
        for (x1, x2), _, _ in loader:
            z1, z2 = model.projector(model.backbone(x1)), model.projector(model.backbone(x2))
            p1, p2 = model.predictor(z1), model.predictor(z2)
            loss = d(p1, z2) / 2 + d(p2, z1) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    return steps, time.perf_counter() - t0


def featviz_train(epochs: int, batch_size: int, image_size: int, limit: int, threads: int) -> tuple[int, float]:
    from featviz.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(method="simsiam", data="digits", out=f"{tmp}/run", arch="resnet18_w16-cifar",
                          epochs=epochs, batch_size=batch_size, image_size=image_size, limit=limit,
                          min_scale=0.5, hflip=False, threads=threads, lr=0.015, log_every=10)
        t0 = time.perf_counter()
        res = train(cfg)
        return res.steps, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=800)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    kw = dict(epochs=args.epochs, batch_size=args.batch_size, image_size=args.image_size, limit=args.limit,
              threads=args.threads)
    bare, fv = [], []
    for _ in range(args.repeats):
        s, t = bare_loop(**kw)
        bare.append(s / t)
        s2, t2 = featviz_train(**kw)
        assert s2 == s, (s, s2)
        fv.append(s2 / t2)
        print(f"  bare {s / t:6.2f} steps/s   featviz train {s2 / t2:6.2f} steps/s   ({s} steps each)")
    b, f = statistics.median(bare), statistics.median(fv)
    print(f"SimSiam resnet18_w16-cifar {args.image_size}px batch {args.batch_size}, {args.threads} thread(s): "
          f"bare loop {b:.2f} steps/s, featviz train {f:.2f} steps/s, ratio {f / b:.2f}x (target >= 0.9x)")


if __name__ == "__main__":
    main()
