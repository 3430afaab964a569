"""Images/s of `featviz embed` next to a bare `torch.no_grad()` loop over the same image files.

Both sides decode the same JPEGs with the same transform and model; the bare loop decodes in the
main process and runs the model batch by batch. featviz is timed through its library entry
(`featviz.embed.run_embed`, which the CLI calls), including writing the .npz. Median of
``--runs`` runs each, after one warm-up. Target: featviz >= 0.9x the bare loop.

    python benchmarks/embed_bench.py [--n 256] [--arch resnet18_w32-cifar] [--size 64] [--device auto]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        cls = folder / f"c{i % 5}"
        cls.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((size * 2, size * 2), Image.BICUBIC).save(cls / f"{i:05d}.jpg", quality=90)


def bare_loop(files, model, tf, batch: int, device) -> None:
    import torch

    from featviz.data import load_image

    model = model.to(device).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(files), batch):
            x = torch.stack([tf(load_image(f)) for f in files[i:i + batch]]).to(device)
            out.append(model(x).float().cpu())
    torch.cat(out).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--arch", default="resnet18_w32-cifar")
    ap.add_argument("--size", type=int, default=64, help="model input side")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    import torch

    from featviz import embed
    from featviz.data import eval_transform, labelled_images
    from featviz.distributed import resolve_device
    from featviz.models import build_backbone

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "imgs"
        make_images(root, args.n, args.size)
        files = labelled_images(root).items
        model = build_backbone(args.arch, seed=0)
        tf = eval_transform(args.size)

        def run_featviz():
            embed.run_embed(out=Path(tmp) / "e.npz", images=root, arch=args.arch, image_size=args.size,
                            batch_size=args.batch, device=args.device, force=True)

        def run_bare():
            bare_loop(files, model, tf, args.batch, device)

        times: dict[str, list[float]] = {"bare torch.no_grad loop": [], "featviz embed": []}
        run_bare()  # warm-up (page cache, oneDNN kernels)
        for _ in range(args.runs):
            for name, fn in (("bare torch.no_grad loop", run_bare), ("featviz embed", run_featviz)):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
    print(f"{args.n} JPEGs -> {args.arch} at {args.size}px, batch {args.batch}, device {device}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores")
    ips = {k: args.n / statistics.median(v) for k, v in times.items()}
    for k, v in ips.items():
        print(f"{k:26s} {v:8.1f} images/s")
    ratio = ips["featviz embed"] / ips["bare torch.no_grad loop"]
    print(f"featviz / bare = {ratio:.2f}x (target >= 0.9x)")


if __name__ == "__main__":
    main()
