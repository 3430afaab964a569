"""Peak memory (max RSS) of `featviz embed --pixels` then `featviz tsne` on ~200k pixels x 256 dims.

Each command runs in its own process through the real CLI; its peak resident memory is read from
``getrusage`` when it exits. Data: copies of sample_data/seg's 96-px scenes (VOC layout), embedded
with ``resnet18_w32-cifar`` at layer4 (256 channels, stride 8) at ``--image-size`` so that every
image gives (size/8)^2 pixels. Target: <= 4 GB for each step.

``--embed-images 20000,50000,200000`` measures instead `featviz embed --shard-size` (streamed shards)
on folders of that many tiny synthetic JPEGs (8 px, 10 classes, ``resnet18_w8-cifar``): its peak
memory should stay flat in N; ``--single`` also runs the one-file ``.npz`` output at the largest N for
comparison (that one holds every row in memory, plus rank 0's merge).

    python benchmarks/memory_bench.py [--pixels 200000] [--image-size 192] [--iterations 50]
    nice python benchmarks/memory_bench.py --embed-images 20000,50000,200000 [--single]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNNER = """
import atexit, resource, sys
atexit.register(lambda: print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr))
from featviz.cli import app
app(sys.argv[1:], standalone_mode=True)
"""


def run(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **(env or {})})
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"failed: featviz {' '.join(args)}\n{res.stderr[-3000:]}")
    kb = next(int(ln.split()[1]) for ln in res.stderr.splitlines() if ln.startswith("MAXRSS_KB"))
    return kb / 1024**2, wall


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # a tiny model on a shared machine: threads only contend


def tiny_images(folder: Path, n: int, *, classes: int = 10, size: int = 8) -> None:
    """``n`` tiny JPEGs in ``classes`` subfolders (a few random images, each written many times)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True)
    for i in range(n):
        (folder / f"class{i % classes}" / f"img_{i:07d}.jpg").write_bytes(blobs[i % len(blobs)])


def embed_images_bench(sizes: list[int], *, single: bool, shard_size: int, batch_size: int) -> None:
    """Peak RSS of `featviz embed --shard-size` at each N (and of the one-file output at the largest)."""
    rows = []
    common = ["--arch", "resnet18_w8-cifar", "--image-size", "8", "--batch-size", str(batch_size), "--device", "cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            img = Path(tmp) / f"img{n}"
            t = time.perf_counter()
            tiny_images(img, n)
            made = time.perf_counter() - t
            gb, wall = run(["embed", "--images", str(img), *common, "--shard-size", str(shard_size),
                            "--out", str(Path(tmp) / f"E{n}")], env=ONE_THREAD)
            rows.append(("sharded", n, gb, wall))
            print(f"N={n:>8,}  embed --shard-size {shard_size}: peak {gb * 1024:7.0f} MB, {wall:6.1f} s "
                  f"({n / wall:,.0f} img/s; images written in {made:.0f} s)", flush=True)
            if single and n == max(sizes):
                gb1, wall1 = run(["embed", "--images", str(img), *common, "--out", str(Path(tmp) / f"e{n}.npz")],
                                 env=ONE_THREAD)
                rows.append(("single", n, gb1, wall1))
                print(f"N={n:>8,}  embed --out e.npz (one file): peak {gb1 * 1024:7.0f} MB, {wall1:6.1f} s", flush=True)
            shutil.rmtree(img)
    sharded = [r for r in rows if r[0] == "sharded"]
    lo, hi = sharded[0], sharded[-1]
    print(f"sharded peak RSS from N={lo[1]:,} to N={hi[1]:,}: {lo[2] * 1024:.0f} -> {hi[2] * 1024:.0f} MB "
          f"({hi[2] / lo[2]:.2f}x for {hi[1] / lo[1]:.0f}x the images)")
    print(json.dumps([{"output": o, "images": n, "peak_mb": round(gb * 1024, 1), "seconds": round(w, 1)}
                      for o, n, gb, w in rows]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pixels", type=int, default=200_000)
    ap.add_argument("--image-size", type=int, default=192)
    ap.add_argument("--iterations", type=int, default=50, help="t-SNE iterations after early exaggeration")
    ap.add_argument("--embed-images", default=None, help="comma-separated image counts: the streamed-embed mode")
    ap.add_argument("--single", action="store_true", help="with --embed-images: also the one-file .npz at the largest")
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    if args.embed_images:
        sizes = sorted(int(s) for s in args.embed_images.split(","))
        embed_images_bench(sizes, single=args.single, shard_size=args.shard_size, batch_size=args.batch_size)
        return
    per_image = (args.image_size // 8) ** 2
    n_images = math.ceil(args.pixels / per_image)
    src = ROOT / "sample_data" / "seg"
    with tempfile.TemporaryDirectory() as tmp:
        img, msk = Path(tmp) / "img", Path(tmp) / "masks"
        img.mkdir()
        msk.mkdir()
        scenes = sorted((src / "JPEGImages").glob("*.jpg"))
        for i in range(n_images):
            s = scenes[i % len(scenes)]
            shutil.copy(s, img / f"{s.stem}_{i:05d}.jpg")
            shutil.copy(src / "SegmentationClass" / f"{s.stem}.png", msk / f"{s.stem}_{i:05d}.png")
        shutil.copy(src / "classes.txt", msk)
        emb = Path(tmp) / "pix.npz"
        gb_e, t_e = run(["embed", "--arch", "resnet18_w32-cifar", "--images", str(img), "--masks", str(msk),
                         "--pixels", "--layer", "layer4", "--image-size", str(args.image_size), "--batch-size", "32",
                         "--out", str(emb)])
        with __import__("numpy").load(emb, allow_pickle=False) as z:
            n, d = z["features"].shape
        gb_t, t_t = run(["tsne", str(emb), "--out", str(Path(tmp) / "map.png"), "--iterations", str(args.iterations)])
    print(f"{n_images} images -> {n:,} pixels x {d} dims")
    print(f"featviz embed --pixels : peak {gb_e:5.2f} GB, {t_e:6.1f} s")
    print(f"featviz tsne           : peak {gb_t:5.2f} GB, {t_t:6.1f} s  ({args.iterations} iterations after 250 EE)")
    print(f"max peak {max(gb_e, gb_t):.2f} GB (target <= 4 GB)")
    print(json.dumps({"pixels": int(n), "dims": int(d), "embed_peak_gb": gb_e, "tsne_peak_gb": gb_t}))


if __name__ == "__main__":
    main()
